#!/bin/bash
# Session 5, GPU call 2 (H200): GEMM split-K / block sweep at M = 4..128, L2-hot vs rotated weights,
# launch floor; decode-step profiles at batch 16 (W4 and FP16). Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 330 python benchmarks/int4_kernels.py --sweep-split --deadline 280 --out $OUT > $OUT/sweep_split.log 2>&1
cat $OUT/sweep_split.log | grep -v Warning
for f in "" "--fp16"; do
  timeout 100 python benchmarks/profile_decode.py --batch 16 $f > $OUT/profile_b16$f.log 2>&1
  tail -25 $OUT/profile_b16$f.log
done
cp benchmarks/results/decode_profile-*b16*.txt $OUT/ 2>/dev/null
cd $OUT && tar czf all.tgz *.log *.json *.txt 2>/dev/null; ls
