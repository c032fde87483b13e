#!/bin/bash
# Session 10, GPU call 2 (H200): the new GPU layout (adjacent k in nibbles j, j + 4) and the pz GEMM in production:
# GPU tests (kernels, fused engine, engine CUDA, attention; 8 processes); the kernels table (all shapes and M until
# its deadline); the decode table (7B and 8B, batch 1/4/16, prompt 128/2048, transformers static 1x128). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
timeout 150 python -m pytest -q -n 12 tests/test_kernels_triton.py tests/test_engine_fused.py tests/test_engine_cuda.py \
  tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
grep -E "^FAILED|Error" $OUT/tests.log | head -8 | cut -c1-300
timeout 130 python benchmarks/int4_kernels.py --no-gemlite --deadline 100 --out $OUT > $OUT/kernels.log 2>&1
grep -A40 "## Targets" $OUT/kernels.md | cut -c1-250 | head -30
timeout 45 python benchmarks/lab/gemm_lab.py --m1 --out $OUT > $OUT/m1.log 2>&1; grep "^M=1" $OUT/m1.log
timeout 135 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 110 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
cd $OUT && tar czf all.tgz * 2>/dev/null
