#!/bin/bash
# Session 6, GPU call 5 (H200): decode attention with the chunk combine done by the last-arriving program
# (one kernel) against the two-kernel version, in one call: new, before, new again. The two-kernel version was
# written to run5/attention_before.py before the call (`git show f8b3b2d:salience/kernels/attention.py`; the same
# file is salience/kernels/attention.py again since the one-kernel version was reverted).
# Tests of the new kernel first. Writes under $OUT.
export TRITON_DEFAULT_FP_FUSION=1
timeout 120 python -m pytest -q tests/test_attention_kernel.py tests/test_engine_attn_kernel.py > $OUT/tests_attention.log 2>&1
tail -2 $OUT/tests_attention.log
cp salience/kernels/attention.py /tmp/attention_new.py
for v in new before new2; do
  if [ $v = before ]; then cp benchmarks/results/h200/s6/run5/attention_before.py salience/kernels/attention.py; else cp /tmp/attention_new.py salience/kernels/attention.py; fi
  timeout 100 python benchmarks/decode.py --shapes llama2-7b llama3-8b --batch 1 16 --prompt 128 --backends engine-w4 \
    --budget 80 --out $OUT/decode_$v > $OUT/decode_$v.log 2>&1
  echo "== $v"; grep "engine-w4" $OUT/decode_$v.md
done
cp /tmp/attention_new.py salience/kernels/attention.py
cd $OUT && tar czf all.tgz * 2>/dev/null
