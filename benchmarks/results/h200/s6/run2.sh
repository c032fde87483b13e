#!/bin/bash
# Session 6, GPU call 2 (H200): tests of the fused GEMV neighbours (rms / glu / residual / emit);
# no PDL (removed); the b1 decode ablation (fused: rms/glu/residual/emit epilogues, vs unfused) on 7B and 8B shapes, one run; a profile
# of the fused 7B b1 step. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > $OUT/gpu.txt
timeout 150 python -m pytest -q -x tests/test_kernels_triton.py -k "fused or composed or graph or dispatch or gemv" \
  > $OUT/tests_kernels.log 2>&1; tail -3 $OUT/tests_kernels.log
timeout 300 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 --prompt 128 \
  --backends engine-w4 engine-w4-unfused engine-fp16 --budget 240 \
  --out $OUT/decode_fusion > $OUT/decode_fusion.log 2>&1
grep "^|" $OUT/decode_fusion.md; tail -3 $OUT/decode_fusion.log | cut -c1-300
timeout 90 python benchmarks/profile_decode.py --steps 10 > $OUT/profile.log 2>&1; tail -25 $OUT/profile.log | cut -c1-200
cp benchmarks/results/decode_profile-*.txt $OUT/ 2>/dev/null
timeout 150 python -m pytest -q -x tests/test_engine_fused.py tests/test_engine_cuda.py > $OUT/tests_engine.log 2>&1
tail -3 $OUT/tests_engine.log
cd $OUT && tar czf all.tgz * 2>/dev/null
