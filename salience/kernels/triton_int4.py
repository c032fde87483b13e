"""Triton kernels for 4-bit weight-only linears on CUDA, over the GPU layout of layout.py.

Decode is memory-bound: at M tokens a linear must stream N*K/2 bytes of codes, so each kernel is
judged by effective bandwidth (bytes of weights, scales, zeros, x and out per call / time). Four:

  _gemv_wide_kernel  M = 1, CUDA cores, group sizes that are multiples of 128 (most checkpoints).
                   Programs own BLOCK_N rows and a K range (split-K), U units per step; Triton's
                   software pipeliner streams the words, x and scales through a cp.async ring. Its
                   math is fp16x2 by inline PTX (_h2_unit, drawn above _H2_WORD), or fp32 (h2=False).
  _gemv_kernel     M = 1, group sizes 32/64 or K not a multiple of 128: the same math, the next
                   unit's words, scales and x loaded by hand while the current one computes.
  _gemm_kernel     M up to a few hundred: a [BLOCK_N, 32] slice of exact q - z, made 16-bit floats two
                   codes an instruction, is the tensor cores' A operand, tokens are B (acc [BLOCK_N, BLOCK_M]).
  _dequant_kernel  prefill: write the dense weight [N, K] once, then cuBLAS (F.linear) does the GEMM.

The GEMVs also take a transformer's elementwise neighbours (int4_linear's rms=, glu=, residual=, emit=),
all outside their main loops, whose per-code work they would otherwise slow: an RMSNorm as a scale of
the output, act(gate) * up from tiles of interleaved gate and up rows, the residual add and y * w (the
next RMS= linear's input) in the epilogue. That removes the batch-1 decode step's norm and activation
kernels (kernels_notes.md, session 6).

Measured on an H200 (4.8 TB/s datasheet, ~4.3 measured by a copy; h200/kernels_m1.md, kernels_notes.md):
1.0-3.6 TB/s effective at M = 1 with the fp16x2 math (1.04-1.34x the fp32 math). Not for lack of bytes in
flight (a deeper cp.async ring did not help): with the math replaced by one multiply a word the same
programs reach 1.3 TB/s (o_proj, 8 MB) to 4.0 TB/s (65 MB): the small matrices give each SM a few short
programs whose ramp-up and split-K tail weigh as much as the streaming.

Dequantization without an int->float convert (those run at 1/4 rate on Hopper). The bits
0x3F800000 | (q << 19) are the fp32 number v = 1 + q/16, and

    (q - z) * s = v * 16s + c,      c = -(16 + z) * s,

where 16s and c are exact in fp32 (s is fp16: 11 significant bits, times an integer <= 31). One fma
then rounds once, to exactly the reference's fp32 (q - z) * s. The GEMV goes further and keeps the
fma per code out of its inner loop: per word it sums p = sum_i v_i x_i and xs = sum_i x_i over the
nibbles of one group, then adds 16s * p + c * xs (= s * sum_i (q_i - z) x_i).

Split-K without a memset or an extra launch: each program of a split writes its fp32 partial tile to
a workspace, then bumps the tile's counter (acq_rel); the program that arrives last sums the partials
in a fixed order (so results are deterministic), writes the output and resets the counter to 0. The
counters live in PackedInt4.locks and are zero between calls; two streams must not run one
PackedInt4 at the same time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .layout import UNIT, WORDS
from .linear import LOCKS

GEMV_MAX_M = 1  # tokens up to which the GEMV (gemv(): _gemv_wide_kernel or _gemv_kernel) runs
GEMM_MAX_M = 256  # above this: dequantize, then cuBLAS
SPLIT_WAVES = 4  # split-K aims at this many programs per SM
MAX_SPLIT = 32
GEMV_H2 = True  # gemv()'s default math for the wide GEMV: fp16x2 (False: fp32; benchmarks flip it for ablations)
GLU_CODES = {None: 0, "silu": 1, "gelu_tanh": 2}  # glu= of int4_linear -> the GEMVs' GLU
# integer arguments that only bound loops and masks: not worth a compiled variant per value class
# (the strides and row lengths stay specialized: their divisibility by 16 lets loads vectorize; UPG == 1 is
# worth a variant)
_RUNTIME_INTS = ["M", "N", "K", "n_units", "units_per_split", "ONE", "stride_rm", "stride_qm"]
ONE = 0x3F800000  # the bits of 1.0f
_WORDS = tl.constexpr(WORDS)  # int32 words per unit (128 codes) and row


@triton.jit
def _nibble_f32(words, i: tl.constexpr, one):
    """Nibble i of each int32 word as fp32 v = 1 + q/16: the 4 bits go straight into the mantissa.
    one: the bits of 1.0 (0x3F800000). Passed as a kernel argument it sits in a register and ptxas
    fuses the mask and the or into one LOP3; as a literal it costs two (the GEMM takes the literal:
    with the argument, Triton routes its dot operand through shared memory)."""
    if 4 * i <= 19:
        t = words << (19 - 4 * i)
    else:
        t = words >> (4 * i - 19)
    return ((t & 0x780000) | one).to(tl.float32, bitcast=True)


@triton.jit
def _sz_fields(sz):
    """Packed int32 (fp16 scale bits | zero << 16) -> scale s (fp32) and zero z (int32)."""
    return (sz & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), (sz >> 16) & 0xFF


@triton.jit
def _scale_zero(sz):
    """Packed int32 (fp16 scale bits | zero << 16) -> 16*s and c = -(16 + z)*s, fp32."""
    s, z = _sz_fields(sz)
    return s * 16.0, -(z.to(tl.float32) + 16.0) * s


@triton.jit
def _act(g, GLU: tl.constexpr):
    """silu (GLU 1) or tanh-approximated gelu (GLU 2) of fp32 g. gelu_tanh(g) = g * sigmoid(2y) with
    y = sqrt(2 / pi) (g + 0.044715 g^3), since (1 + tanh(y)) / 2 = sigmoid(2y)."""
    if GLU == 1:
        return g / (1.0 + tl.exp(-g))
    y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g / (1.0 + tl.exp(-2.0 * y))


@triton.jit
def _rms_sumsq(q_row, K, RB: tl.constexpr, RMS: tl.constexpr):
    """sum(q^2) over row q's K values (RB >= K) in fp32, reduced as soon as loaded: holding the row in
    registers through the main loop cost the 7B GEMVs a resident program per SM (run2 of h200/s6)."""
    r = tl.arange(0, RB)
    ss = 0.0
    if RMS:
        q = tl.load(q_row + r, mask=r < K, other=0.0).to(tl.float32)
        ss = tl.sum(q * q, axis=0)
    return ss


@triton.jit
def _rms_scale(acc, ss, K, eps):
    """acc * rsqrt(mean(q^2) + eps): the RMSNorm of row q applied after the matmul (it is linear in x)."""
    return acc * tl.rsqrt(ss / K + eps)


@triton.jit
def _store_out(acc, rm, rn, cols, M, N, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr, stride_om, stride_rm,
               HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, GLU: tl.constexpr, EMIT: tl.constexpr):
    """acc [BM, BN] fp32 over weight rows rn of N (+ bias[rn]) -> out[rm, cols] in out's dtype, then as
    int4_linear's neighbours say (each rounded to the dtype where the composed torch ops round):
      GLU: rn interleaves gate and up rows (_tile_rows): out = act(gate) * up, BN / 2 columns of N / 2;
      HAS_RES: out = r[rm, cols] + out;  EMIT: also o2[rm, cols] = out * e[cols]."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    dt: tl.constexpr = out_ptr.dtype.element_ty
    n_out = N // 2 if GLU > 0 else N
    if GLU > 0:
        BM: tl.constexpr = acc.shape[0]
        BH: tl.constexpr = acc.shape[1] // 2
        g, u = tl.split(tl.reshape(acc, [BM, BH, 2]))
        a = _act(g.to(dt).to(tl.float32), GLU)
        y = (a.to(dt).to(tl.float32) * u.to(dt).to(tl.float32)).to(dt)
    else:
        y = acc.to(dt)
    mask = (rm[:, None] < M) & (cols[None, :] < n_out)
    if HAS_RES:
        r = tl.load(r_ptr + rm[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(out_ptr + rm[:, None] * stride_om + cols[None, :], y, mask=mask)
    if EMIT:
        e = tl.load(e_ptr + cols, mask=cols < n_out, other=0.0).to(tl.float32)
        tl.store(o2_ptr + rm[:, None] * stride_om + cols[None, :], (y.to(tl.float32) * e[None, :]).to(dt),
                 mask=mask)


@triton.jit
def _epilogue(acc, rm, rn, cols, tile, pid_k, n_split, M, N, NP, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr,
              ws_ptr, lock_ptr, stride_om, stride_rm, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
              GLU: tl.constexpr, EMIT: tl.constexpr, SPLIT: tl.constexpr):
    """Write one [BM, BN] tile (_store_out); with split-K the last program of the tile to arrive reduces."""
    if SPLIT:
        row_ok = rm[:, None] < M
        ws = ws_ptr + rm[:, None] * NP + rn[None, :]  # [BM, BN] of split 0; split j at + j*M*NP
        tl.store(ws + pid_k * M * NP, acc, mask=row_ok)
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == n_split - 1:
            tot = tl.load(ws, mask=row_ok, other=0.0, cache_modifier=".cg")
            for j in range(1, n_split):
                tot += tl.load(ws + j * M * NP, mask=row_ok, other=0.0, cache_modifier=".cg")
            _store_out(tot, rm, rn, cols, M, N, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr, stride_om, stride_rm,
                       HAS_BIAS, HAS_RES, GLU, EMIT)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        _store_out(acc, rm, rn, cols, M, N, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr, stride_om, stride_rm,
                   HAS_BIAS, HAS_RES, GLU, EMIT)


@triton.jit
def _slice_group(u, j: tl.constexpr, SUB: tl.constexpr, UPG):
    """Row of sz (the group) of slice j (32 codes) of unit u: SUB groups a unit (4: groups of 32, one a slice;
    2: groups of 64, two slices each), or one group for UPG units (SUB == 1)."""
    if SUB > 1:
        return u * SUB + j // (4 // SUB)
    return u // UPG


@triton.jit
def _below(a, b, SHAPE: tl.constexpr):
    """The scalar a < b as a tensor mask (Triton's CPU interpreter wants tensor masks)."""
    return tl.zeros(SHAPE, dtype=tl.int32) + a < b


@triton.jit
def _w_rows(w_ptr, pid_n, BN: tl.constexpr, SWB, SWR):
    """Pointers to unit 0 of the BN weight rows of tile pid_n ([BN]); unit u is at + u * SWU.
    Rows sit in blocks of 128 (layout.py): row n is at (n // 128) * SWB + (n % 128) * SWR. BN divides 128,
    so a tile never straddles two blocks."""
    r0 = pid_n * BN
    return w_ptr + (r0 // 128) * SWB + ((r0 % 128) + tl.arange(0, BN)) * SWR


@triton.jit
def _tile_rows(w_ptr, pid_n, N, BN: tl.constexpr, SWB, SWR, GLU: tl.constexpr):
    """(rows [BN], pointers to their unit 0 [BN], output columns) of GEMV tile pid_n. GLU: the rows of a
    [gate (N / 2 rows); up (N / 2 rows)] weight interleaved, gate j then up j for the BN / 2 outputs j of
    the tile (two runs of BN / 2 contiguous rows), so that the tile's epilogue holds both factors of each
    output."""
    if GLU > 0:
        a = tl.arange(0, BN)
        rn = (a % 2) * (N // 2) + pid_n * (BN // 2) + a // 2
        ptrs = w_ptr + (rn // 128) * SWB + (rn % 128) * SWR
        cols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        ptrs = _w_rows(w_ptr, pid_n, BN, SWB, SWR)
        cols = rn
    return rn, ptrs, cols


@triton.jit
def _x_pair(ptrs, ok):
    """x at ptrs [..., 2] (two adjacent k, one contiguous run) -> (even k, odd k) vectors, masked by ok."""
    return tl.split(tl.load(ptrs, mask=ok, other=0.0))


@triton.jit
def _x_slice(x_row, r, ok, j: tl.constexpr, K, MASK_K: tl.constexpr):
    """x of slice j, k = r + 32 j (r [16, 2]: 128 u + 2 s + h) -> (even k, odd k) vectors [16], masked by ok
    [16, 2] (and by k < K with MASK_K)."""
    if MASK_K:
        ok = ok & (r + 32 * j < K)
    return _x_pair(x_row + r + 32 * j, ok)


@triton.jit
def _x_unit(x_row, u, ok, K, MASK_K: tl.constexpr):
    """x of one unit as 8 vectors of 16, one per nibble i: x[128 u + 32 (i % 4) + 2 s + i // 4], s = 0..15
    (layout.py), masked by ok [16]; loaded as 4 contiguous slices of 32 and split into even and odd k."""
    r = u * 128 + 2 * tl.arange(0, _WORDS)[:, None] + tl.arange(0, 2)[None, :]  # [16, 2]
    ok2 = ok[:, None] & (r >= 0)
    x0, x4 = _x_slice(x_row, r, ok2, 0, K, MASK_K)
    x1, x5 = _x_slice(x_row, r, ok2, 1, K, MASK_K)
    x2, x6 = _x_slice(x_row, r, ok2, 2, K, MASK_K)
    x3, x7 = _x_slice(x_row, r, ok2, 3, K, MASK_K)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _pick8(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    elif i == 3:
        return a3
    elif i == 4:
        return a4
    elif i == 5:
        return a5
    elif i == 6:
        return a6
    else:
        return a7


# fp16x2 math of the M = 1 GEMV (_gemv_wide_kernel with H2), per 4 words of one row and unit (pack=4):
#
#   word s (nibble i = code of k = 32 (i % 4) + 2 s + i // 4, layout.py):  | n7 | n6 | n5 | n4 | n3 | n2 | n1 | n0 |
#   w        & 0x000F000F | 0x64006400 -> fp16 pair (1024 + n0, 1024 + n4)        x' pair (x'[2 s],      x'[2 s + 1])
#   w        & 0x00F000F0 | 0x64006400 -> fp16 pair (1024 + 16 n1, 1024 + 16 n5)  x' pair (x'[32 + 2 s], x'[33 + 2 s])
#   (w >> 8) & 0x000F000F | 0x64006400 -> (1024 + n2, 1024 + n6)                  x' pair (x'[64 + 2 s], x'[65 + 2 s])
#   (w >> 8) & 0x00F000F0 | 0x64006400 -> (1024 + 16 n3, 1024 + 16 n7)            x' pair (x'[96 + 2 s], x'[97 + 2 s])
#
# One LOP3 a pair (one shift a word), minus the row's 1024 + z (1024 + 16 z) gives q - z (16 (q - z))
# exactly (HSUB2), times the x' pair summed in fp16x2 (HFMA2) over the 4 words, the 16 (q - z) sums times
# 1/16 added (exact), the fp16 pair summed into one fp32: ~1.8 instructions a code against ~4.2 for the fp32
# math (v12 in kernels_notes.md). x' = x * 2^e with e chosen per program so that |x'| < 1: no fp16 overflow
# (|sums| <= 8 * 15 and 8 * 240) and fp16's relative precision for everything above 2^-14 of max |x|.
# The sum of a pack leaves in its first output, the other three are 0.
_H2_WORD = """
lop3.b32 t0, $W, msk, mag, 0xea;
lop3.b32 t1, $W, msk16, mag, 0xea;
shr.b32 sh, $W, 8;
lop3.b32 t2, sh, msk, mag, 0xea;
lop3.b32 t3, sh, msk16, mag, 0xea;
sub.f16x2 t0, t0, $24;
sub.f16x2 t1, t1, $28;
sub.f16x2 t2, t2, $24;
sub.f16x2 t3, t3, $28;
"""


def _h2_asm() -> str:
    """PTX for 4 words: outputs $0-$3, inputs words $4-$7, x' pairs t = 0..3 at $8 + 4t + j (word j),
    1024 + z pairs $24-$27, 1024 + 16 z pairs $28-$31 (the same value four times: one row and unit)."""
    lines = ["{", ".reg .b32 t0, t1, t2, t3, sh, acc, acc16, msk, msk16, mag, sc;", ".reg .b16 lo, hi;",
             ".reg .f32 f0, f1;", "mov.b32 msk, 0x000F000F;", "mov.b32 msk16, 0x00F000F0;", "mov.b32 mag, 0x64006400;"]
    for j in range(4):
        lines.append(_H2_WORD.replace("$W", f"${4 + j}"))
        x = [f"${8 + 4 * t + j}" for t in range(4)]
        op, a, a16 = ("mul.rn.f16x2", "", "") if j == 0 else ("fma.rn.f16x2", ", acc", ", acc16")
        lines += [f"{op} acc, t0, {x[0]}{a};", f"fma.rn.f16x2 acc, t2, {x[2]}, acc;",
                  f"{op} acc16, t1, {x[1]}{a16};", f"fma.rn.f16x2 acc16, t3, {x[3]}, acc16;"]
    lines += ["mov.b32 sc, 0x2C002C00;", "fma.rn.f16x2 acc, acc16, sc, acc;", "mov.b32 {lo, hi}, acc;",
              "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;", "add.f32 $0, f0, f1;", "mov.b32 $1, 0;", "mov.b32 $2, 0;",
              "mov.b32 $3, 0;", "}"]
    return "\n".join(lines)


_H2_ASM = tl.constexpr(_h2_asm())
_H2_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 28))


@triton.jit
def _x_scale(x_row, k_lo, k_hi, XC: tl.constexpr):
    """(2^e, 2^-e) with |x[k] * 2^e| < 1 for k in [k_lo, k_hi): e from the exponent of max |x| there (the
    scale clamped to [2^-126, 2^14])."""
    amax = 0.0
    for k0 in range(k_lo, k_hi, XC):
        r = k0 + tl.arange(0, XC)
        amax = tl.maximum(amax, tl.max(tl.abs(tl.load(x_row + r, mask=r < k_hi, other=0.0).to(tl.float32)), axis=0))
    e = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 112), 252)  # biased exponent
    return ((253 - e) << 23).to(tl.float32, bitcast=True), ((e + 1) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _x16(ptrs, mask, scale):
    """x' = x * scale in fp16 (scale a power of two: exact but for fp16 subnormals); fp16 x is scaled in
    fp16, others through fp32."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if x.dtype == tl.float16:
        return x * scale.to(tl.float16)
    return (x.to(tl.float32) * scale).to(tl.float16)


@triton.jit
def _pair16(a, b):
    """fp16 tensors a, b -> int32 holding a in the low half, b in the high half."""
    return (a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _h2_unit(words, sz, xb, xo, scale, EMULATE: tl.constexpr):
    """One step of the fp16x2 GEMV: sum_i (q_i - z) x'[32 (i % 4) + 2 s + i // 4] * s_row for words [BN, U, 16] (a
    [BN, U, 16] fp32 term whose sum over words is the step's contribution), x' from xb = x of the units
    ([U, 16, 2] pointers of slice 0, x[2 s + h]; masked by xo [U, 1, 1]). EMULATE (Triton's CPU interpreter, which runs no
    inline PTX): the same sum with fp32 products of the fp16 x'."""
    s, z = _sz_fields(sz)  # [BN, U]; z < 16
    x0, x4 = tl.split(_x16(xb, xo, scale))  # x' of nibbles j (even k) and j + 4 (odd k), [U, 16]
    x1, x5 = tl.split(_x16(xb + 32, xo, scale))
    x2, x6 = tl.split(_x16(xb + 64, xo, scale))
    x3, x7 = tl.split(_x16(xb + 96, xo, scale))
    if EMULATE:
        r = tl.zeros(words.shape, dtype=tl.float32)
        for i in tl.static_range(8):
            q = ((words >> (4 * i)) & 0xF) - z[:, :, None]
            r += q.to(tl.float32) * _pick8(i, x0, x1, x2, x3, x4, x5, x6, x7).to(tl.float32)[None, :, :]
    else:
        zz = tl.zeros(words.shape, dtype=tl.int32)
        r = tl.inline_asm_elementwise(
            _H2_ASM, _H2_CONSTRAINTS,
            [words, zz + _pair16(x0, x4)[None, :, :], zz + _pair16(x1, x5)[None, :, :],
             zz + _pair16(x2, x6)[None, :, :], zz + _pair16(x3, x7)[None, :, :],
             zz + ((0x6400 | z) * 0x10001)[:, :, None], zz + ((0x6400 | (z << 4)) * 0x10001)[:, :, None]],
            dtype=tl.float32, is_pure=True, pack=4)
    return r * s[:, :, None]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, q_ptr, e_ptr, out_ptr, o2_ptr, ws_ptr, lock_ptr,
                 M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om, stride_rm,
                 stride_qm, ONE, eps,
                 BN: tl.constexpr, SUB: tl.constexpr, MASK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, HAS_RES: tl.constexpr, RMS: tl.constexpr, RB: tl.constexpr,
                 GLU: tl.constexpr, EMIT: tl.constexpr):
    """out[m, n-block] = x[m] @ W[n-block].T over units [u_lo, u_hi), one token m per program (grid
    axis 2; meant for M = 1). Tiles are [BN, 16] (rows, words of a unit) or slices of that layout, so
    no value moves between threads until the final sum. Everything the next unit needs (its words,
    x, and, when a group spans whole units, its scales) is loaded while this unit computes (by hand:
    written before _gemv_wide_kernel's tl.range pipelining, which does the same with less code but
    has not been written for SUB > 1 yet). SUB = groups per unit (1: group size a multiple of 128;
    2: 64; 4: 32).
    Fused neighbours (int4_linear's rms=, glu=, residual=, emit=), all outside the main loop: RMS, the
    RMSNorm of row q (RB >= K of its values, summed before the loop) scales the output (_rms_scale); GLU,
    tiles of interleaved gate/up rows (_tile_rows) and act(gate) * up stored; HAS_RES, EMIT (_store_out)."""
    NPG: tl.constexpr = 8 // SUB  # nibbles per group (2 per slice of 32 codes)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rs = tl.arange(0, _WORDS)
    rn, w_rows, cols = _tile_rows(w_ptr, pid_n, N, BN, SWB, SWR, GLU)  # [BN], [BN], [BN or BN / 2]
    w_base = w_rows[:, None] + rs[None, :]  # [BN, 16]
    sz_row = sz_ptr + rn  # [BN]
    x_row = x_ptr + m * stride_xm
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    ss = _rms_sumsq(q_ptr + m * stride_qm, K, RB, RMS)

    acc = tl.zeros([BN, _WORDS], dtype=tl.float32)
    words = tl.load(w_base + u_lo * SWU)
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_unit(x_row, u_lo, rs >= 0, K, MASK_K)
    if SUB == 1:
        sz = tl.load(sz_row + (u_lo // UPG) * NP)
    for u in range(u_lo, u_hi):
        nxt = tl.load(w_base + (u + 1) * SWU, mask=_below(u + 1, u_hi, [BN, 1]), other=0)
        n0, n1, n2, n3, n4, n5, n6, n7 = _x_unit(x_row, u + 1, _below(u + 1, u_hi, [_WORDS]), K, MASK_K)
        if SUB == 1:
            nsz = tl.load(sz_row + ((u + 1) // UPG) * NP, mask=_below(u + 1, u_hi, [BN]), other=0)
            s16, c = _scale_zero(sz)
        for t in tl.static_range(8):  # nibbles in k order of their slices: 0, 4, 1, 5, 2, 6, 3, 7, so that
            # a group's nibbles come in one run (slice t // 2 holds k = 32 (t // 2) .. + 31)
            xi = _pick8(t // 2 + 4 * (t % 2), x0, x1, x2, x3, x4, x5, x6, x7).to(tl.float32)
            v = _nibble_f32(words, t // 2 + 4 * (t % 2), ONE)  # [BN, 16]
            if SUB > 1:
                if t % NPG == 0:
                    s16, c = _scale_zero(tl.load(sz_row + (u * SUB + t // NPG) * NP))
            if t % NPG == 0:
                p = v * xi[None, :]
                xs = xi
            else:
                p += v * xi[None, :]
                xs += xi
            if t % NPG == NPG - 1:
                acc += p * s16[:, None] + xs[None, :] * c[:, None]
        words = nxt
        x0, x1, x2, x3, x4, x5, x6, x7 = n0, n1, n2, n3, n4, n5, n6, n7
        if SUB == 1:
            sz = nsz
    out = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    if RMS:
        out = _rms_scale(out, ss, K, eps)
    rm = m + tl.arange(0, 1)
    _epilogue(out, rm, rn, cols, m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(1), M, N,
              NP, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr, ws_ptr, lock_ptr, stride_om, stride_rm, HAS_BIAS, HAS_RES,
              GLU, EMIT, SPLIT)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemv_wide_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, q_ptr, e_ptr, out_ptr, o2_ptr, ws_ptr, lock_ptr,
                      M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om, stride_rm,
                      stride_qm, ONE, eps,
                      BN: tl.constexpr, U: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      STAGES: tl.constexpr, STEP_SUM: tl.constexpr, HAS_RES: tl.constexpr, RMS: tl.constexpr,
                      RB: tl.constexpr, GLU: tl.constexpr, EMIT: tl.constexpr, H2: tl.constexpr,
                      EMULATE: tl.constexpr):
    """_gemv_kernel's math for group sizes that are multiples of 128 and K % 128 == 0, reading U
    consecutive units per step: [BN, U, 16] words. A loop given num_stages (tl.range) has all its
    loads pipelined by Triton, dot or no dot, as cp.async copies into a STAGES-deep ring of shared
    memory, so no hand-written prefetch is needed. Units past u_hi (when U does not divide the split)
    load code 0, scale 0 and x 0: exact zeros.

    STEP_SUM: each step's products are summed over the 16 words at once (a few lane shuffles), so that
    the accumulator is [BN, U] rather than [BN, U, 16]: with the row's unit sum P = sum_s p[s] and the
    unit's x sum X = sum_s xs[s] (the same for every row),
        sum_s (16 s p[s] + c xs[s]) = 16 s P + c X.
    NCU (H200, 7B qkv, without it): 165 registers a thread, 3 programs per SM, 2.45 warps per scheduler
    of which 1.06 eligible: latency-bound at low occupancy; this frees ~30 registers a thread.
    H2 (the default on CUDA): fp16x2 math (_h2_unit, ~1.8 instead of ~4.2 instructions a code: 1.04-1.34x
    faster on the H200, kernels_notes.md v12) on x' = x * 2^e, e per program (_x_scale); EMULATE: its
    stand-in for the CPU interpreter.
    RMS, GLU, HAS_RES, EMIT: as in _gemv_kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    ru = tl.arange(0, U)
    rs = tl.arange(0, _WORDS)
    rn, w_rows, cols = _tile_rows(w_ptr, pid_n, N, BN, SWB, SWR, GLU)  # [BN], [BN], [BN or BN / 2]
    w_base = w_rows[:, None, None] + ru[None, :, None] * SWU + rs[None, None, :]  # [BN, U, 16]
    # [U, 16, 2]: x[128 (u + ru) + 2 s + h], the even and odd k of the pairs of nibbles (j, j + 4) at + 32 j
    x_base = x_ptr + m * stride_xm + ru[:, None, None] * 128 + 2 * rs[None, :, None] + tl.arange(0, 2)[None, None, :]
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    ss = _rms_sumsq(q_ptr + m * stride_qm, K, RB, RMS)
    if H2:
        scale, unscale = _x_scale(x_ptr + m * stride_xm, u_lo * 128, u_hi * 128, 512)
    if STEP_SUM:
        acc = tl.zeros([BN, U], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, U, _WORDS], dtype=tl.float32)
    for u in tl.range(u_lo, u_hi, U, num_stages=STAGES):
        uok = (u + ru) < u_hi  # [U]
        words = tl.load(w_base + u * SWU, mask=uok[None, :, None], other=0)
        sz = tl.load(sz_ptr + ((u + ru) // UPG)[None, :] * NP + rn[:, None], mask=uok[None, :], other=0)  # [BN, U]
        if H2:
            acc += _h2_unit(words, sz, x_base + u * 128, uok[:, None, None], scale, EMULATE)
        else:
            s16, c = _scale_zero(sz)
            for j in tl.static_range(4):
                xe, xo = _x_pair(x_base + u * 128 + 32 * j, uok[:, None, None])  # [U, 16] each
                for h in tl.static_range(2):
                    xi = (xe if h == 0 else xo).to(tl.float32)
                    v = _nibble_f32(words, j + 4 * h, ONE)  # [BN, U, 16]
                    if j + h == 0:
                        p = v * xi[None, :, :]
                        xs = xi
                    else:
                        p += v * xi[None, :, :]
                        xs += xi
            if STEP_SUM:
                acc += tl.sum(p, axis=2) * s16 + c * tl.sum(xs, axis=1)[None, :]  # [BN, U]
            else:
                acc += p * s16[:, :, None] + xs[None, :, :] * c[:, :, None]
    if STEP_SUM:
        out = tl.sum(acc, axis=1)[None, :]  # [1, BN]
    else:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    if H2:
        out = out * unscale  # back from x' = x * 2^e
    if RMS:
        out = _rms_scale(out, ss, K, eps)
    rm = m + tl.arange(0, 1)
    _epilogue(out, rm, rn, cols, m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(1), M, N,
              NP, b_ptr, r_ptr, e_ptr, out_ptr, o2_ptr, ws_ptr, lock_ptr, stride_om, stride_rm, HAS_BIAS, HAS_RES,
              GLU, EMIT, SPLIT)


# The GEMM's decode, per word and slice j: one shift, one LOP3 and one 16-bit float pair subtraction give
# exact q - z for the two adjacent codes k = 32 j + 2 s, 32 j + 2 s + 1 (nibbles j, j + 4; layout.py):
#
#   t = (w >> 4j) & 0x000F000F | M    (B + q_even, B + q_odd)   M = 0x43004300 (bf16, B = 128), 0x64006400 (fp16)
#   a = t - (B + z, B + z)           (q_even - z, q_odd - z)   sub.{bf16,f16}x2: exact, |q - z| <= 15
#
# and a is already one register of the tensor cores' A operand (two adjacent k of one row).
_PZ_BF16 = tl.constexpr("{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; "
                        "sub.rn.bf16x2 $0, t, $2; }")
_PZ_F16 = tl.constexpr("{ .reg .b32 t; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; sub.rn.f16x2 $0, t, $2; }")


@triton.jit
def _qz_slice(words, zz, z, j: tl.constexpr, dt: tl.constexpr, BN: tl.constexpr, EMULATE: tl.constexpr):
    """[BN, 32] exact q - z of slice j (k = 32 j .. 32 j + 31 of each row's unit, natural order) from words
    [BN, 16]; zz [BN, 1] the int32 pair (B + z, B + z), z [BN, 1]. EMULATE (the CPU interpreter, which runs
    no inline PTX and mishandles 16-bit float bit patterns): the same values in fp32."""
    if EMULATE:
        lo = (((words >> (4 * j)) & 0xF) - z).to(tl.float32)
        hi = (((words >> (4 * j + 16)) & 0xF) - z).to(tl.float32)
    else:
        w = words >> (4 * j) if j > 0 else words
        if dt == tl.bfloat16:
            t = tl.inline_asm_elementwise(_PZ_BF16, "=r,r,r", [w, zz], dtype=tl.int32, is_pure=True, pack=1)
        else:
            t = tl.inline_asm_elementwise(_PZ_F16, "=r,r,r", [w, zz], dtype=tl.int32, is_pure=True, pack=1)
        lo = t.to(tl.int16).to(dt, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BN, 32)  # (even, odd) k adjacent: natural order


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gemm_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                 M, N, K, NP, SWB, SWR, SWU, UPG, n_units, units_per_split, stride_xm, stride_om,
                 BM: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, MASK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """One unit (128 codes of K) per step: 4 slices of [BN, 32] exact q - z (_qz_slice: 1.5 instructions
    a code, no layout conversion: Triton loads the words from its cp.async ring straight into the A
    operand's registers) times x[:, 32 codes].T (contiguous, pipelined) on the tensor cores (wgmma, A
    from registers), acc [BN, BM]; the fp32 partial of each group times its scales:

        sum_k (q - z) s x  =  s * sum_k (q - z) x

    SUB = groups per unit (1: group size a multiple of 128; 2: 64; 4: 32): a group is 4 / SUB slices.
    H200 against the previous GEMM (8 slices of B + q, 3 integer ops a code, x sums for the zeros):
    1.25-1.61x at M = 2-16, 1.26-1.39x at M = 32-64 (benchmarks/lab/gemm_lab.py, h200/s10/run1)."""
    SPG: tl.constexpr = 4 // SUB  # slices per group (SUB == 1: the group is the unit, or several units)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rs = tl.arange(0, _WORDS)
    r32 = tl.arange(0, 32)
    w_base = _w_rows(w_ptr, pid_n, BN, SWB, SWR)[:, None] + rs[None, :]  # [BN, 16]
    x_base = x_ptr + rm[:, None] * stride_xm + r32[None, :]  # [BM, 32]
    m_ok = rm[:, None] < M
    u_lo = pid_k * units_per_split
    u_hi = tl.minimum(u_lo + units_per_split, n_units)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    MAG: tl.constexpr = 0x4300 if dt == tl.bfloat16 else 0x6400

    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for u in range(u_lo, u_hi):
        words = tl.load(w_base + u * SWU)  # [BN, 16] int32
        for j in tl.static_range(4):
            if j % SPG == 0:
                s, z = _sz_fields(tl.load(sz_ptr + _slice_group(u, j, SUB, UPG) * NP + rn))
                zz = ((MAG | z) * 0x10001)[:, None]
            a = _qz_slice(words, zz, z[:, None], j, dt, BN, EMULATE)
            if MASK_K:
                xj = tl.load(x_base + u * 128 + 32 * j, mask=m_ok & (u * 128 + 32 * j + r32[None, :] < K),
                             other=0.0)
            else:
                xj = tl.load(x_base + u * 128 + 32 * j, mask=m_ok, other=0.0)  # [BM, 32]
            if EMULATE:
                xj = xj.to(tl.float32)
            if j % SPG == 0:
                part = tl.dot(a, tl.trans(xj))  # [BN, BM]
            else:
                part = tl.dot(a, tl.trans(xj), part)
            if j % SPG == SPG - 1:
                acc += part * s[:, None]
    tile = pid_m * tl.num_programs(0) + pid_n
    _epilogue(tl.trans(acc), rm, rn, rn, tile, pid_k, tl.num_programs(2), M, N, NP, b_ptr, out_ptr, out_ptr, out_ptr,
              out_ptr, ws_ptr, lock_ptr, stride_om, 0, HAS_BIAS, False, 0, False, SPLIT)


@triton.jit(do_not_specialize=["N", "K", "n_units", "ONE"])
def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, NP, SWB, SWR, SWU, UPG, n_units, ONE,
                    BN: tl.constexpr, NU: tl.constexpr, SUB: tl.constexpr):
    """out [N, K] = (q - z) * s in out's dtype, for BN rows and NU units per program; each slice of 32
    codes (nibbles j and j + 4: even and odd k) joined into one contiguous [BN, 32] store."""
    SPG: tl.constexpr = 4 // SUB
    pid_n = tl.program_id(0)
    pid_u = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rs = tl.arange(0, _WORDS)
    r32 = tl.arange(0, 32)
    n_ok = rn[:, None] < N
    w_rows = _w_rows(w_ptr, pid_n, BN, SWB, SWR)
    for r in tl.static_range(NU):
        u = pid_u * NU + r
        u_ok = _below(u, n_units, [BN])
        words = tl.load(w_rows[:, None] + u * SWU + rs[None, :], mask=u_ok[:, None], other=0)
        for j in tl.static_range(4):
            if j % SPG == 0:
                sz = tl.load(sz_ptr + _slice_group(u, j, SUB, UPG) * NP + rn, mask=u_ok, other=0)
                s16, c = _scale_zero(sz)
                s16 = s16[:, None]
                c = c[:, None]
            lo = _nibble_f32(words, j, ONE) * s16 + c
            hi = _nibble_f32(words, j + 4, ONE) * s16 + c
            w = tl.join(lo, hi).reshape(BN, 32)
            k = u * 128 + 32 * j + r32  # [32]
            tl.store(out_ptr + rn[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=n_ok & (k < K)[None, :])


# ---------------------------------------------------------------------------------------------------
# launchers: x2 [M, K] contiguous rows, p a PackedInt4 on the same CUDA device


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _n_sms(t: torch.Tensor) -> int:
    if not t.is_cuda:  # interpreter on CPU tensors: pretend a small GPU so that split-K is exercised
        return 4
    return _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _interpreted() -> bool:
    """Were the kernels decorated under TRITON_INTERPRET=1 (CPU tests)?"""
    return not isinstance(_gemm_kernel, triton.runtime.JITFunction)


def _geometry(p):
    """(SUB, UPG): groups per unit, units per group, for the kernels' group size."""
    gs = p.kernel_group_size
    return (UNIT // gs, 1) if gs < UNIT else (1, gs // UNIT)


def _split(tiles: int, n_units: int, step: int, sms: int, split, waves: int = SPLIT_WAVES, cap: int = MAX_SPLIT):
    """Split-K: (n_split, units_per_split), units_per_split a multiple of step; no split is empty; about
    `waves` programs per SM, at most `cap` splits, unless `split` is given. Block sizes must divide Np (a
    multiple of 128)."""
    if split is None:
        split = max(1, min(waves * sms // max(tiles, 1), n_units // (2 * step), cap))
    if tiles > LOCKS:  # one counter per tile
        split = 1
    ups = -(-n_units // split)
    ups = -(-ups // step) * step
    return -(-n_units // ups), ups


def _w_geometry(p):
    """(Np, n_units, (SWB, SWR, SWU)): padded rows, units along K, and the word strides of p.qweight
    [Np/128, units, 128, 16] (block of 128 rows, row, unit). The kernels read any strides: the layout of
    layout.py, or a view of another (benchmarks/int4_kernels.py times the row-major one through a view)."""
    nb, n_units, rows, words = p.qweight.shape
    swb, swu, swr, one = p.qweight.stride()
    assert rows == 128 and words == WORDS and one == 1, "qweight must be [Np/128, units, 128, 16]"
    return nb * rows, n_units, (swb, swr, swu)


def _check_block_n(bn: int):
    if bn > 128 or 128 % bn:
        raise ValueError(f"BLOCK_N must divide 128 (a tile stays inside one block of 128 rows), got {bn}")


def _launch_args(x2, p, bias, out, n_split, m_rows, np_):
    """(x, codes, scales, bias, out, workspace, counters); an absent bias is replaced by out (never read)."""
    ws = torch.empty(n_split, m_rows, np_, device=x2.device, dtype=torch.float32) if n_split > 1 else out
    b = bias if bias is not None else out
    return (x2, p.qweight, p.scales, b, out, ws, p.locks)


def _rows(t, m, n, what):
    """t as [m, n] rows of unit stride, or None."""
    if t is None:
        return None
    if t.numel() != m * n:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {m} x {n} values")
    t = t.reshape(m, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _reg_cap(maxnreg):
    """Launch option capping registers per thread (more resident warps; may spill)."""
    return {} if maxnreg is None else {"maxnreg": maxnreg}


def _gemv_config(np_: int, k: int, h2: bool = True):
    """(BLOCK_N, units per step, split-K waves, stages, STEP_SUM, num_warps) of _gemv_wide_kernel.
    With the fp16x2 math (h2), one unit a step and 3 stages (h200/s7/run2 and run5 sweeps, 7B/8B shapes):
    2 warps a program and 4 programs per SM, within 0-7 % of the best on every shape; 4096 x 4096 (o_proj)
    4 warps and 2 programs per SM (7.9 against 8.2 us for the fp32 math, where 4 per SM took 8.9). (1 warp
    and 8 per SM won the 8B gate_up alone, 24.3 -> 22.8 us, yet cost the 8B decode step 2.5 %: run6.)
    With the fp32 math: from the H200
    sweeps of the tiled layout (benchmarks/results/h200/: kernels_sweep_layout.json, stepsum/): BLOCK_N
    128 everywhere; two units a step on wide matrices, fewer programs per SM on the tallest and on long
    K; the per-step word sum only on the tallest (8B lm_head 101 -> 96 us), where it wins (it costs
    5-18 % on o_proj and down_proj)."""
    if h2:
        if np_ * k <= 4096 * 4096:
            return 128, 1, 2, 3, False, 4
        return 128, 1, 4, 3, False, 2
    if k >= 8192:  # down_proj: 11008 / 14336 inputs
        return 128, 1, 2, 4, False, 4
    if np_ <= 8192:  # o_proj, 8B qkv
        return 128, 1, 2, 3, False, 4
    if np_ >= 24576:  # 8B gate_up, lm_heads
        return 128, 2, 2, 3, True, 4
    return 128, 2, 4, 3, False, 4  # 7B qkv and gate_up


def gemv(x2, p, bias=None, *, rms=None, glu=None, residual=None, emit=None, block_n=None, split=None,
         num_warps=None, maxnreg=None, wide=None, waves=None, stages=None, step_sum=None, h2=None):
    """CUDA-core GEMV with split-K, one token per program (meant for M = 1; any M works).
    Group sizes that are multiples of 128 with K % 128 == 0 (the usual checkpoints) take
    _gemv_wide_kernel (`wide` units per step, a `stages`-deep cp.async ring; h2: its fp16x2 math, False
    for the fp32 math), others _gemv_kernel (fp32 math). waves: split-K aims at this many programs per SM.
    Unset arguments come from _gemv_config.
    rms=(q, eps), glu, residual, emit: int4_linear's fused neighbours (-> (y, y * emit) with emit)."""
    m, k = x2.shape
    if glu is not None and (not _glu_tiles(p.n) or (block_n or 128) != 128):
        raise ValueError(f"glu= needs [gate; up] rows in whole tiles of 128 (N = {p.n}, BLOCK_N 128)")
    n_out = p.n // 2 if glu else p.n
    np_, n_units, strides = _w_geometry(p)
    sub, upg = _geometry(p)
    use_wide = sub == 1 and k % UNIT == 0
    h2 = (GEMV_H2 if h2 is None else h2) and use_wide
    bn0, wide0, waves0, stages0, sum0, nw0 = _gemv_config(np_, k, h2) if use_wide else (128, 1, SPLIT_WAVES, 1, False, 4)
    if h2 and step_sum:
        raise ValueError("step_sum is a variant of the fp32 math (h2=False)")
    stages, step_sum = stages or stages0, sum0 if step_sum is None else step_sum
    block_n, wide, waves = block_n or bn0, wide or wide0, waves or waves0
    # the fp16x2 math takes each thread's words 4 at a time (one row and unit): a tile needs >= 4 words a
    # thread, BLOCK_N * U * 16 >= 4 * 32 * num_warps
    h2_warps = max(1, block_n * wide // 8)
    if h2 and num_warps is not None and num_warps > h2_warps:
        raise ValueError(f"the fp16x2 GEMV needs BLOCK_N * U >= 8 * num_warps (got {block_n} * {wide}, "
                         f"{num_warps} warps); use fewer warps or h2=False")
    num_warps = num_warps or (min(nw0, h2_warps) if h2 else nw0)
    _check_block_n(block_n)
    out = torch.empty(m, n_out, device=x2.device, dtype=x2.dtype)
    o2 = torch.empty_like(out) if emit is not None else out
    residual = _rows(residual, m, n_out, "residual")
    q, eps = rms if rms is not None else (None, 0.0)
    q = _rows(q, m, k, "rms row")
    if emit is not None and (emit.shape != (n_out,) or emit.stride(0) != 1):
        raise ValueError(f"emit must be a contiguous [{n_out}] vector, got shape {tuple(emit.shape)}")
    tiles = np_ // block_n
    n_split, ups = _split(tiles * m, n_units, wide, _n_sms(x2), split, waves)
    x, w, sz, b, _, ws, locks = _launch_args(x2, p, bias, out, n_split, m, np_)
    dummy = out
    args = (x, w, sz, b, residual if residual is not None else dummy, q if q is not None else dummy,
            emit if emit is not None else dummy, out, o2, ws, locks,
            m, p.n, k, np_, *strides, upg, n_units, ups, x2.stride(0), out.stride(0),
            residual.stride(0) if residual is not None else 0, q.stride(0) if q is not None else 0, ONE,
            float(eps))
    meta = dict(BN=block_n, HAS_BIAS=bias is not None, SPLIT=n_split > 1, HAS_RES=residual is not None,
                RMS=q is not None, RB=triton.next_power_of_2(k) if q is not None else 16, GLU=GLU_CODES[glu],
                EMIT=emit is not None, num_warps=num_warps, num_stages=1, **_reg_cap(maxnreg))
    if use_wide:
        _gemv_wide_kernel[(tiles, n_split, m)](
            *args, U=wide, STAGES=stages, STEP_SUM=step_sum, H2=h2, EMULATE=_interpreted(), **meta)
    else:
        _gemv_kernel[(tiles, n_split, m)](*args, SUB=sub, MASK_K=(k % UNIT != 0), **meta)
    return (out, o2) if emit is not None else out


def _gemm_config(m: int, k: int, n: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, split cap) from the H200 sweep of split-K counts
    (benchmarks/int4_kernels.py --sweep-split, results/h200/s5/run2/): BLOCK_N 128 on every shape, and at
    most min(8, K / 16M) splits. Each split writes and reads back an fp32 partial tile: n_split * M * N * 8
    bytes against the codes' N * K / 2, so the cap keeps the partials within the codes' own traffic. With
    4-wave splits the narrow matrices (N = 4096-6144) lost 15-50 % at M = 64 to partials (o_proj 27.0 ->
    18.5 us with 4 splits) and a few % at M = 4-16."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    # 8 warps at BLOCK_M 64: 7B qkv 26.4 against 31.2 us with 4 (h200/s10/run1 gemm_lab). At BLOCK_M 32 (M = 32)
    # the H100 kernels table with 4 warps (h100/s13/run1) against 8 (run3), us: 8 win on matrices of 16384 to
    # 32768 rows or K >= 11008 (7B gate_up 36.9 -> 33.3, lm_head 48.1 -> 42.7, 8B gate_up 44.4 -> 41.1, the
    # downs 19.0 -> 18.6, 22.5 -> 21.7, 71.2 -> 66.5 at K = 11008 / 14336 / 28672, 70B lm_head 75.8 -> 72.2);
    # 4 win on the taller ones (8B lm_head, 128256 rows, 121.6 -> 146.2; 70B gate_up, 57344 rows, 120.3 ->
    # 133.7: many tiles already fill the machine) and tie or win on the rest (qkv, o: -2 .. +4 %).
    # This rule itself (run4): 1.93x bf16 geomean over the 15 shapes against 1.90 (run1) and 1.92 (run3).
    # BLOCK_M 16: 4 warps best on every 7B/8B shape, 3 stages best or within 4 % of 4 (h100/s13/run1 gemm_lab).
    wide = bm == 64 or (bm == 32 and n <= 32768 and (n >= 16384 or k >= 11008))
    return bm, 128, 8 if wide else 4, 3, max(1, min(8, k // (16 * m)))


def gemm(x2, p, bias=None, *, block_m=None, block_n=None, split=None, num_warps=None, num_stages=None,
         maxnreg=None):
    """Fused dequant + tensor-core GEMM, split-K when the grid is small."""
    m, k = x2.shape
    np_, n_units, strides = _w_geometry(p)
    bm, bn, nw, ns, cap = _gemm_config(m, k, p.n)
    bm, bn = block_m or bm, block_n or bn
    _check_block_n(bn)
    nw, ns = num_warps or nw, num_stages or ns
    out = torch.empty(m, p.n, device=x2.device, dtype=x2.dtype)
    tn, tm = np_ // bn, triton.cdiv(m, bm)
    n_split, ups = _split(tn * tm, n_units, 1, _n_sms(x2), split, cap=cap)
    sub, upg = _geometry(p)
    _gemm_kernel[(tn, tm, n_split)](
        *_launch_args(x2, p, bias, out, n_split, m, np_),
        m, p.n, k, np_, *strides, upg, n_units, ups, x2.stride(0), out.stride(0),
        BM=bm, BN=bn, SUB=sub, MASK_K=(k % UNIT != 0), HAS_BIAS=bias is not None,
        SPLIT=n_split > 1, EMULATE=_interpreted(), num_warps=nw, num_stages=ns, **_reg_cap(maxnreg))
    return out


def dequantize(p, dtype, *, block_n=64, units=2, num_warps=4):
    """The dense weight [N, K] in dtype, written by one Triton kernel."""
    np_, n_units, strides = _w_geometry(p)
    out = torch.empty(p.n, p.k, device=p.qweight.device, dtype=dtype)
    sub, upg = _geometry(p)
    _check_block_n(block_n)
    grid = (triton.cdiv(p.n, block_n), triton.cdiv(n_units, units))
    _dequant_kernel[grid](p.qweight, p.scales, out, p.n, p.k, np_, *strides, upg, n_units, ONE,
                          BN=block_n, NU=units, SUB=sub, num_warps=num_warps)
    return out


def _glu_tiles(n: int) -> bool:
    """Do N = 2F [gate; up] rows make whole GLU tiles (64 gate + 64 up rows each, _tile_rows)?"""
    return n % 128 == 0


def fuses(m: int, dtype: torch.dtype, n: int, glu: str | None = None) -> bool:
    """Does the kernel for M = m rows of this dtype and N = n weight rows take int4_linear's rms=, glu=,
    residual= and emit= itself? (The GEMV does, glu= where the rows make whole GLU tiles; linear.py
    composes them from torch ops elsewhere.)"""
    return m <= GEMV_MAX_M and dtype in (torch.float16, torch.bfloat16) and (glu is None or _glu_tiles(n))


def linear(x2, p, bias=None):
    """x2 [M, K] -> [M, N]: the kernel for this M (GEMV, fused GEMM, or dequantize + cuBLAS)."""
    m = x2.shape[0]
    if x2.dtype in (torch.float16, torch.bfloat16):
        if m <= GEMV_MAX_M:
            return gemv(x2, p, bias)
        if m <= GEMM_MAX_M:
            return gemm(x2, p, bias)
    return F.linear(x2, dequantize(p, x2.dtype), bias)
