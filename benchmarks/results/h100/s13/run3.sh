#!/bin/bash
# Session 13, GPU call 3: GPU tests of the GEMM (BLOCK_M 32 now takes 8 warps on tall or deep matrices) and the
# engine; the decode table again, each figure now the median of 3 timed runs (call 1's single runs gave 7B
# batch-1 TTFT at prompt 2048 as 86 ms for W4 against 66 for FP16, while 8B gave 70 / 67); the kernels table at
# M = 32 and 64. Results go to /tmp/r and are packed into $OUT/all.tgz after every stage.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
pack() { tar czf /tmp/all.tgz -C $R . 2>/dev/null && mv /tmp/all.tgz $OUT/all.tgz; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $R/gpu.txt; cat $R/gpu.txt
timeout 110 python -m pytest -q -n 12 tests/test_engine_cuda.py tests/test_kernels_triton.py::test_gemm \
  tests/test_kernels_triton.py::test_gemm_groups_blocks_and_warps > $R/tests.log 2>&1; tail -1 $R/tests.log; grep -E "^FAILED|Error" $R/tests.log | head -8 | cut -c1-300; pack
timeout 330 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --repeats 3 --budget 300 --out $R/decode > $R/decode.log 2>&1
grep "^|" $R/decode.md; pack
timeout 70 python benchmarks/int4_kernels.py --no-gemlite --ms 32 64 --stem kernels_m32 --deadline 50 --out $R \
  > $R/kernels_m32.log 2>&1; grep -E "\| (32|64) \|" $R/kernels_m32.md | cut -c1-120; pack
