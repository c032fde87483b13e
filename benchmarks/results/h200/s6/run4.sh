#!/bin/bash
# Session 6, GPU call 4 (H200): the decode table with this session's code (batch-1 fused GEMVs by default):
# 7B then 8B; engine W4, engine FP16, transformers static cache at 1x128. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 420 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 330 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
cd $OUT && tar czf all.tgz * 2>/dev/null
