#!/bin/bash
# Session 7, GPU call 6 (H200): M=1 GEMV sweep with the fp16x2 math (warps 1/2/4, units 1/2, stages 3/4,
# waves 3-8) and the fp32 math, 7B/8B shapes, tinygemm and cuBLAS bf16 in the same run. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 330 python benchmarks/int4_kernels.py --sweep-gemv --out $OUT > $OUT/sweep_gemv.log 2>&1; grep -v Warn $OUT/sweep_gemv.log | cut -c1-330
cd $OUT && tar czf all.tgz * 2>/dev/null
