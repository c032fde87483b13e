#!/bin/bash
# Session 7, GPU call 1 (H200): GPU tests of the session-6 review commit (kernels, fused engine, attention);
# the GEMV laboratory (benchmarks/lab/gemv_lab.py: the wide GEMV with its math replaced by one FMUL a word,
# against the dispatcher's default, tinygemm, cuBLAS bf16). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt
timeout 100 python benchmarks/lab/gemv_lab.py --out $OUT > $OUT/gemv_lab.log 2>&1; grep -v Warn $OUT/gemv_lab.log | cut -c1-400
timeout 200 python -m pytest -q -x tests/test_kernels_triton.py > $OUT/tests_kernels.log 2>&1; tail -2 $OUT/tests_kernels.log
timeout 200 python -m pytest -q -x tests/test_engine_fused.py tests/test_engine_cuda.py tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $OUT/tests_engine.log 2>&1
tail -2 $OUT/tests_engine.log
cd $OUT && tar czf all.tgz * 2>/dev/null
