#!/bin/bash
# Session 13, GPU call 4: the kernels table at M = 32 with _gemm_config's narrowed rule (8 warps only for
# N in 16384..32768 or K >= 11008), against run1 (4 warps everywhere) and run3 (8 warps for N >= 16384 or K >= 8192).
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 75 python benchmarks/int4_kernels.py --no-gemlite --ms 32 --stem kernels_m32_rule --deadline 55 --out $OUT \
  > $OUT/kernels_m32_rule.log 2>&1; grep -E "\| 32 \|" $OUT/kernels_m32_rule.md | cut -c1-120
