#!/bin/bash
# Session 5, GPU call 5 (H200): the CUDA tests of the engine, decode attention and quantizer (incl. GPTQ rounding)
# with this session's kernels. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 420 python -m pytest -q tests/test_cuda.py tests/test_engine_cuda.py tests/test_engine_attn_kernel.py \
  tests/test_attention_kernel.py > $OUT/gpu_tests_engine_cuda.log 2>&1
tail -15 $OUT/gpu_tests_engine_cuda.log
