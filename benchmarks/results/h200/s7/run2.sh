#!/bin/bash
# Session 7, GPU call 2 (H200): the fp16x2-math GEMV (benchmarks/lab/gemv_lab.py --h2) against the dispatcher's
# default on the 7B/8B shapes, fp16 and bf16 x, with errors and the large/small-x guards. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 400 python benchmarks/lab/gemv_lab.py --h2 --out $OUT > $OUT/gemv_h2.log 2>&1; grep -v Warn $OUT/gemv_h2.log | cut -c1-300 | tail -40
cd $OUT && tar czf all.tgz * 2>/dev/null
