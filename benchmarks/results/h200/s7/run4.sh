#!/bin/bash
# Session 7, GPU call 5 (H200): the decode table with the fp16x2 GEMV (7B then 8B; engine W4, engine FP16,
# transformers static cache at 1x128); the kernels table's M = 1 rows (kernels_m1.md). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 150 python benchmarks/int4_kernels.py --ms 1 --no-gemlite --stem kernels_m1 --out $OUT > $OUT/kernels_m1.log 2>&1
grep -v Warn $OUT/kernels_m1.log | tail -22 | cut -c1-250
timeout 400 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 310 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
cd $OUT && tar czf all.tgz * 2>/dev/null
