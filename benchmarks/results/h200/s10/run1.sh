#!/bin/bash
# Session 10, GPU call 1 (H200): GPU tests of the code as it stands (6898ca3's warp cap and cf17595's review were
# never run on a GPU): kernels, fused engine, engine CUDA, attention; the GEMM lab (benchmarks/lab/gemm_lab.py:
# the pair decode with the zero subtracted in fp16x2/bf16x2 against the production GEMM, M = 2..64); the decode
# table (7B and 8B, batch 1/4/16, prompt 128/2048: engine W4, engine FP16, transformers static 1x128). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt
timeout 200 python -m pytest -q -x tests/test_kernels_triton.py > $OUT/tests_kernels.log 2>&1; tail -2 $OUT/tests_kernels.log
grep -E "FAILED|Error" $OUT/tests_kernels.log | head -5
timeout 150 python -m pytest -q -x tests/test_engine_fused.py tests/test_engine_cuda.py tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $OUT/tests_engine.log 2>&1
tail -2 $OUT/tests_engine.log; grep -E "FAILED|Error" $OUT/tests_engine.log | head -5
timeout 200 python benchmarks/lab/gemm_lab.py --out $OUT > $OUT/gemm_lab.log 2>&1; grep -v Warn $OUT/gemm_lab.log | grep -v "rel err" | cut -c1-330
timeout 170 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 4 16 --prompt 128 2048 \
  --backends engine-w4 engine-fp16 hf-static --hf-static 1x128 --budget 150 --out $OUT/decode > $OUT/decode.log 2>&1
grep "^|" $OUT/decode.md; tail -3 $OUT/decode.log | cut -c1-300
cd $OUT && tar czf all.tgz * 2>/dev/null
