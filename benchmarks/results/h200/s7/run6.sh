#!/bin/bash
# Session 7, GPU call 7 (H200): final config of the fp16x2 GEMV (o_proj 4 warps / 2 per SM, tallest 1 warp / 8 per SM):
# GEMV + fused engine tests; the kernels table's M = 1 rows; the b1 ablation (fp16x2 vs fp32 math); the decode table.
export TRITON_DEFAULT_FP_FUSION=1
timeout 110 python -m pytest -q -x tests/test_kernels_triton.py -k "gemv" > $OUT/tests_gemv.log 2>&1; tail -1 $OUT/tests_gemv.log
timeout 60 python -m pytest -q -x tests/test_engine_fused.py > $OUT/tests_engine_fused.log 2>&1; tail -1 $OUT/tests_engine_fused.log
timeout 60 python benchmarks/int4_kernels.py --ms 1 --no-gemlite --stem kernels_m1 --out $OUT > $OUT/kernels_m1.log 2>&1
grep -v Warn $OUT/kernels_m1.log | tail -20 | cut -c1-200
timeout 110 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 --prompt 128 \
  --backends engine-w4 engine-w4-fp32math --budget 90 --out $OUT/decode_h2 > $OUT/decode_h2.log 2>&1
grep "^|" $OUT/decode_h2.md
timeout 200 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 170 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
cd $OUT && tar czf all.tgz * 2>/dev/null
