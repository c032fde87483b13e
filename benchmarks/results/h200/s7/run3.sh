#!/bin/bash
# Session 7, GPU call 3 (H200): the fp16x2 math in the production wide GEMV (default; h2=False the fp32 math):
# GPU tests (kernels, fused engine, attention); decode ablation, batch 1 prompt 128, 7B and 8B shapes:
# engine-w4 (fp16x2) vs engine-w4-fp32math vs engine-fp16, one run; a profile of the 7B W4 b1 step.
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt
timeout 200 python -m pytest -q -x tests/test_kernels_triton.py > $OUT/tests_kernels.log 2>&1; tail -2 $OUT/tests_kernels.log
grep -E "FAILED|Error" $OUT/tests_kernels.log | head -5
timeout 170 python -m pytest -q -x tests/test_engine_fused.py tests/test_engine_cuda.py tests/test_engine_attn_kernel.py tests/test_attention_kernel.py > $OUT/tests_engine.log 2>&1
tail -2 $OUT/tests_engine.log
timeout 200 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 --prompt 128 \
  --backends engine-w4 engine-w4-fp32math engine-fp16 --budget 170 --out $OUT/decode_h2 > $OUT/decode_h2.log 2>&1
grep "^|" $OUT/decode_h2.md; tail -3 $OUT/decode_h2.log | cut -c1-300
timeout 60 python benchmarks/profile_decode.py --steps 10 > $OUT/profile.log 2>&1; tail -22 $OUT/profile.log | cut -c1-160
cp benchmarks/results/decode_profile-*.txt $OUT/ 2>/dev/null
cd $OUT && tar czf all.tgz * 2>/dev/null
