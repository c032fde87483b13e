#!/bin/bash
# Session 5, GPU call 3 (H200): the M=1 GEMV's fixed cost (floor experiment + NCU of a 128x128 GEMV and GEMM);
# the GEMM's new split-K cap re-swept (its "default" column); the kernel tests. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 150 python -m pytest -q -x tests/test_kernels_triton.py > $OUT/gpu_tests_kernels.log 2>&1; tail -2 $OUT/gpu_tests_kernels.log
timeout 120 python benchmarks/int4_kernels.py --floor --out $OUT > $OUT/floor.log 2>&1; grep -v Warn $OUT/floor.log
for c in gemv:128:128:1 gemm:128:128:16 gemv:4096:4096:1 gemm:4096:4096:1; do
  timeout 60 ncu --launch-skip 2 --launch-count 1 -k regex:"_gem" --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    python benchmarks/int4_kernels.py --one $c > $OUT/ncu_${c//:/_}.txt 2>&1
  grep -E "Duration|Elapsed Cycles|Registers|Achieved Occ|Stall|Warp Cycles Per Issued|DRAM Throughput" $OUT/ncu_${c//:/_}.txt | head -12
done
timeout 200 python benchmarks/int4_kernels.py --sweep-split --out $OUT > $OUT/sweep_split.log 2>&1; grep -v Warn $OUT/sweep_split.log | cut -c1-200
cd $OUT && tar czf all.tgz * 2>/dev/null; ls | head -30
