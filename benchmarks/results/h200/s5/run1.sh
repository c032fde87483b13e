#!/bin/bash
# Session 5, GPU call 1 (H200): L2 prefetch in the int4 GEMV/GEMM. Writes under $OUT.
# (the prefetch code it measured was reverted after this run: commit 455e2ae has it)
set -x
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/gpu.txt
timeout 120 python -m pytest -q -x tests/test_kernels_triton.py -k "prefetch or graph" > $OUT/tests_prefetch.log 2>&1
tail -3 $OUT/tests_prefetch.log
timeout 260 python benchmarks/int4_kernels.py --sweep-prefetch --deadline 200 --out $OUT > $OUT/sweep_prefetch.log 2>&1
tail -40 $OUT/sweep_prefetch.log
for pf in 0 4 16; do
  timeout 80 python benchmarks/decode.py --shapes llama2-7b --batch 1 --prompt 128 --backends engine-w4 \
     --kernel-prefetch $pf --budget 60 --out $OUT/decode_pf$pf > $OUT/decode_pf$pf.log 2>&1
  grep "engine-w4" $OUT/decode_pf$pf.md
done
