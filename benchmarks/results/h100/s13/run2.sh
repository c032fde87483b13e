#!/bin/bash
# Session 13, GPU call 2 (warm H100, right after call 1): the Llama-3-8B half of the decode table (call 1's 110 s
# budget ended after 7B). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1; timeout 250 python benchmarks/decode.py --shapes llama3-8b --batch 1 4 16 --prompt 128 2048 --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 200 --out $OUT/decode8b > $OUT/decode8b.log 2>&1; grep "^|" $OUT/decode8b.md; tail -3 $OUT/decode8b.log | cut -c1-300
