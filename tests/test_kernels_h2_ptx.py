"""The fp16x2 GEMV's inline PTX (triton_int4._h2_asm) run on the CPU by a small interpreter of the PTX
instructions it uses, so that CI checks the instruction sequence itself (Triton's CPU interpreter runs no
inline PTX and takes a plain-Triton stand-in; the GPU logs under benchmarks/results/h200/s7/ check the
real thing).

The interpreter follows the PTX ISA: lop3 by its truth table, f16x2 arithmetic rounded once to nearest
even per half (an fp16 product is exact in float64, so float64 then one rounding is exactly fma.rn).
"""

import re

import numpy as np
import pytest

pytest.importorskip("triton")
from salience.kernels import triton_int4 as T  # noqa: E402

M32 = 0xFFFFFFFF


def _halves(v):
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)


def _pack(h):
    b = np.asarray(h, dtype=np.float16).view(np.uint16).astype(np.uint32)
    return int(b[0]) | (int(b[1]) << 16)


def run_ptx(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute asm's instructions on 32-bit operands {$n: value}; returns the operands after (outputs)."""
    regs: dict[str, object] = {}
    ops = dict(operands)

    def val(tok):
        tok = tok.strip()
        if tok.startswith("$"):
            return ops[int(tok[1:])]
        if tok in regs:
            return regs[tok]
        return int(tok, 0)

    def put(tok, v):
        tok = tok.strip()
        if tok.startswith("$"):
            ops[int(tok[1:])] = v
        else:
            regs[tok] = v

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in re.split(r",(?![^{]*})", rest)]
        if op == "mov.b32" and args[0].startswith("{"):  # unpack: {lo, hi} <- 32 bits
            lo, hi = (a.strip() for a in args[0].strip("{}").split(","))
            v = val(args[1])
            put(lo, v & 0xFFFF)
            put(hi, v >> 16)
        elif op == "mov.b32":
            put(args[0], val(args[1]) & M32)
        elif op == "shr.b32":
            put(args[0], (val(args[1]) & M32) >> val(args[2]))
        elif op == "lop3.b32":
            a, b, c, lut = (val(x) for x in args[1:])
            r = 0
            for i in range(8):
                if lut >> i & 1:
                    r |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
            put(args[0], r & M32)
        elif op in ("sub.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            h = [_halves(val(x)).astype(np.float64) for x in args[1:]]
            r = h[0] - h[1] if op == "sub.f16x2" else h[0] * h[1] + (h[2] if len(h) == 3 else 0.0)
            put(args[0], _pack(r.astype(np.float16)))
        elif op == "cvt.f32.f16":
            put(args[0], float(np.array([val(args[1])], dtype=np.uint16).view(np.float16)[0]))
        elif op == "add.f32":
            put(args[0], int(np.array([np.float32(val(args[1])) + np.float32(val(args[2]))],
                                      dtype=np.float32).view(np.uint32)[0]))
        else:
            raise NotImplementedError(op)
    return ops


@pytest.mark.parametrize("seed", range(6))
def test_h2_asm_computes_the_dot_of_four_words(seed):
    """Words j = 0..3 (columns s = j of one row and unit) with zero z and x' (|x'| < 1, the kernel's
    scaled x): output 0 = sum_j sum_i (q_i(word j) - z) x'[16 i + j] within fp16 accumulation error, the
    other outputs 0; operands laid out as _h2_unit passes them (pack=4)."""
    rng = np.random.default_rng(seed)
    words = [int(w) for w in rng.integers(0, 2**32, 4, dtype=np.uint64)]
    z = int(rng.integers(0, 16))
    x = (rng.uniform(-1, 1, 128) * (0.5 if seed % 2 else 1e-3)).astype(np.float16)
    ops = {4 + j: words[j] for j in range(4)}
    for t in range(4):
        for j in range(4):
            ops[8 + 4 * t + j] = _pack([x[16 * t + j], x[16 * (t + 4) + j]])
    m1, m16 = (0x6400 | z) * 0x10001, (0x6400 | (z << 4)) * 0x10001
    ops.update({24 + j: m1 for j in range(4)} | {28 + j: m16 for j in range(4)})
    out = run_ptx(T._H2_ASM.value, ops)
    got = float(np.array([out[0]], dtype=np.uint32).view(np.float32)[0])
    terms = [((words[j] >> (4 * i)) & 0xF) - z for j in range(4) for i in range(8)]
    xs = [float(x[16 * i + j]) for j in range(4) for i in range(8)]
    want = sum(q * v for q, v in zip(terms, xs))
    scale = sum(abs(q * v) for q, v in zip(terms, xs))
    assert abs(got - want) <= 2e-3 * scale, (got, want)
    assert out[1] == out[2] == out[3] == 0


def test_ptx_interpreter_rejects_unknown_instructions():
    with pytest.raises(NotImplementedError):
        run_ptx("{\nbrev.b32 $0, $1;\n}", {0: 0, 1: 1})
