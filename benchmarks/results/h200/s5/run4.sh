#!/bin/bash
# Session 5, GPU call 4 (H200): the decode table with this session's kernels (7B then 8B; engine W4, engine FP16,
# transformers static cache at 1x128); then the M=1 floor experiment; then the kernel tests. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 330 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 270 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
timeout 70 python benchmarks/int4_kernels.py --floor --out $OUT > $OUT/floor.log 2>&1; grep -v Warn $OUT/floor.log | cut -c1-400
timeout 140 python -m pytest -q tests/test_kernels_triton.py > $OUT/gpu_tests_kernels.log 2>&1; tail -2 $OUT/gpu_tests_kernels.log
cd $OUT && tar czf all.tgz * 2>/dev/null
