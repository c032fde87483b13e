#!/bin/bash
# Session 13, GPU call 5 (the last ~130 device seconds): transformers FP16 plain eager (default dynamic cache),
# the other transformers baseline, with our FP16 and W4 engines in the same run: 7B, batch 1, prompt 128.
# decode.py writes its table after every row, so a cut run keeps the rows it finished.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
timeout 110 python benchmarks/decode.py --shapes llama2-7b --batch 1 --prompt 128 --backends hf-eager engine-fp16 \
  engine-w4 --repeats 3 --budget 80 --out $OUT/eager > $OUT/eager.log 2>&1; grep "^|" $OUT/eager.md
