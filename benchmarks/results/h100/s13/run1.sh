#!/bin/bash
# Session 13, GPU call 1 (ran on an H100; prepared in session 11 as h200/s11/run1.sh, commit 53542a1, removed once it ran: this file is that script): session 10's run2 (never run: no machine came) plus the GEMM launch-settings lab.
# GPU tests of the new layout and the pz GEMM (kernels, fused engine, engine CUDA, attention); the kernels table
# (all shapes, M until its deadline); GEMV vs GEMM at M = 1; the decode table (7B and 8B, batch 1/4/16, prompt
# 128/2048, transformers static 1x128); the GEMM at 4/8 warps x 3/4 stages vs cuBLAS at M = 2..64.
# Results go to /tmp/r and are packed into $OUT/all.tgz after every stage, so a cut run still returns its stages.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
pack() { tar czf /tmp/all.tgz -C $R . 2>/dev/null && mv /tmp/all.tgz $OUT/all.tgz; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $R/gpu.txt; cat $R/gpu.txt
timeout 140 python -m pytest -q -n 12 tests/test_kernels_triton.py tests/test_engine_fused.py tests/test_engine_cuda.py \
  tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $R/tests.log 2>&1; tail -3 $R/tests.log
grep -E "^FAILED|Error" $R/tests.log | head -8 | cut -c1-300; pack
timeout 125 python benchmarks/int4_kernels.py --no-gemlite --deadline 95 --out $R > $R/kernels.log 2>&1
grep -A40 "## Targets" $R/kernels.md | cut -c1-250 | head -30; pack
timeout 45 python benchmarks/lab/gemm_lab.py --m1 --out $R > $R/m1.log 2>&1; grep "^M=1" $R/m1.log; pack
timeout 135 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 110 --out $R/decode > $R/decode.log 2>&1
grep "^|" $R/decode.md; pack
timeout 75 python benchmarks/lab/gemm_lab.py --out $R > $R/gemm_lab.log 2>&1; grep "best" $R/gemm_lab.log | cut -c1-200; pack
