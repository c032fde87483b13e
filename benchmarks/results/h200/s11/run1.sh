#!/bin/bash
# Session 11, GPU call 1: session 10's run2 (never run: no machine came) plus the GEMM launch-settings lab.
# GPU tests of the new layout and the pz GEMM (kernels, fused engine, engine CUDA, attention); the kernels table
# (all shapes, M until its deadline); GEMV vs GEMM at M = 1; the decode table (7B and 8B, batch 1/4/16, prompt
# 128/2048, transformers static 1x128); the GEMM at 4/8 warps x 3/4 stages vs cuBLAS at M = 2..64. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt; cat $OUT/gpu.txt
timeout 140 python -m pytest -q -n 12 tests/test_kernels_triton.py tests/test_engine_fused.py tests/test_engine_cuda.py \
  tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $OUT/tests.log 2>&1; tail -3 $OUT/tests.log
grep -E "^FAILED|Error" $OUT/tests.log | head -8 | cut -c1-300
timeout 125 python benchmarks/int4_kernels.py --no-gemlite --deadline 95 --out $OUT > $OUT/kernels.log 2>&1
grep -A40 "## Targets" $OUT/kernels.md | cut -c1-250 | head -30
timeout 45 python benchmarks/lab/gemm_lab.py --m1 --out $OUT > $OUT/m1.log 2>&1; grep "^M=1" $OUT/m1.log
timeout 135 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 110 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md
timeout 75 python benchmarks/lab/gemm_lab.py --out $OUT > $OUT/gemm_lab.log 2>&1; grep "best" $OUT/gemm_lab.log | cut -c1-200
cd $OUT && tar czf /tmp/all.tgz * 2>/dev/null && rm -rf $OUT/* && mv /tmp/all.tgz $OUT/
