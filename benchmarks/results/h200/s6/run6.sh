#!/bin/bash
# Session 6, GPU call 6 (H200): the GEMM / dequantize / split-K kernel tests with the final code (their epilogue
# signature changed with the GEMV neighbours). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 110 python -m pytest -q tests/test_kernels_triton.py -k "gemm or dequantize or strides or deterministic or fp32" \
  > $OUT/tests_gemm.log 2>&1; tail -2 $OUT/tests_gemm.log
