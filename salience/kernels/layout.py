"""Kernel layouts, repacked once at load time from the AWQ GEMM tensors (reference.py restates that layout).

GPU layout: unit-interleaved codes, tiles of 128 rows x 1 unit stored contiguously
-------------------------------------------------------------------------------------
Codes are stored per output row n (like nn.Linear.weight), 8 codes of one row per int32 word. K is cut
into units of UNIT = 128 codes, 16 words per unit, and each unit into 4 slices of 32 codes (j = 0..3).
Word s (0..15) holds in its nibbles j and j + 4 the two adjacent codes k = 32 j + 2 s and 32 j + 2 s + 1:

    one row, one unit (128 codes k = 0..127), 16 words w0..w15, nibble i = bits 4i..4i+3:

                 nibble 7   nibble 6   nibble 5   nibble 4   nibble 3   nibble 2   nibble 1   nibble 0
      w0  bits: | k=97   | k=65   | k=33   | k=1    | k=96   | k=64   | k=32   | k=0    |
      w1        | k=99   | k=67   | k=35   | k=3    | k=98   | k=66   | k=34   | k=2    |
      ...
      w15       | k=127  | k=95   | k=63   | k=31   | k=126  | k=94   | k=62   | k=30   |
                  `-------- pair j + 4 (odd k) ------'   `------- pair j (even k) ---------'

    nibble i  <-  k = 32 (i % 4) + 2 s + i // 4

    e.g. codes k=0..127 of a row = k // 2 % 16 (0, 0, 1, 1, ..., 15, 15, 0, 0, ...), then
         w_s holds the code s in all 8 nibbles: w3 = 0x33333333

Why: one mask keeps nibbles j and j + 4 of a word, the 16-bit halves of a 32-bit register, and with the
bits of a 16-bit float (0x6400: 1024, fp16; 0x4300: 128, bf16) or-ed in, one LOP3 gives the pair of
exact floats (B + q[32 j + 2 s], B + q[32 j + 2 s + 1]): two ADJACENT k, which is what one register of a
tensor-core operand holds, and what the M = 1 GEMV multiplies with one 32-bit pair of x. The 16 words of
slice j are then a [rows, 32] tile of codes in natural k order against x[32 j : 32 j + 32] (contiguous),
with no gather and no shuffle. A slice never straddles a group of 32, 64, 128, ...

Rows are then taken in blocks of 128, and the 128 rows' words of one unit form one contiguous 8 KiB
tile; a block's tiles follow each other along K:

    qweight int32 [Np/128, Kp/128, 128, 16]     [row block b, unit u, row r, word s]
                                                 nibble i  <-  code (128b + r, 128u + 32 (i % 4) + 2s + i // 4)

    memory:  | b=0,u=0: rows 0..127 x 16 words | b=0,u=1: rows 0..127 | ... | b=1,u=0: rows 128..255 | ...
                  (8 KiB, contiguous)              (8 KiB)

A kernel tile of BLOCK_N <= 128 rows (BLOCK_N divides 128) and U units is then U contiguous runs of
BLOCK_N * 64 bytes, and a program walking K streams one contiguous range: DRAM sees long bursts
rather than one 64-byte piece per row (the row-major [Np, Kp/8] order of earlier versions, which the
kernels can still read through a strided view; benchmarks/int4_kernels.py --sweep-layout times both).

    sz      int32 [Gp, Np]     per group and row: bits 0-15 the AWQ fp16 scale (unchanged, exact),
                               bits 16-23 the integer zero point. One 4-byte load gives both (and
                               4-byte loads are what cp.async, Triton's pipelined loads, can move).

Np = N rounded up to 128 and Kp = K rounded up to 128; padded rows and columns hold code 0, scale 0,
zero 0, so they add exact zeros. Group sizes that are neither 32, 64 nor a multiple of 128 (say 96,
or -1 when K = 576) are re-expressed exactly with a smaller group (64 or 32) by repeating scales/zeros.

CPU layout: torch's tinygemm for CPU
------------------------------------
`torch.ops.aten._convert_weight_to_int4pack_for_cpu` packs codes [Np, K] (Np = N rounded up to 16) its
own way; `_weight_int4pack_mm_for_cpu` computes w = (q - 8) * scale + zero with float zeros, so the
AWQ integer zero z maps to zero = (8 - z) * scale (exact in fp32, then rounded to the compute dtype).
Its group size must be 32, 64, 128 or 256; others are re-expressed by repeating scales.
"""

from __future__ import annotations

import torch

from .reference import group_size_of, unpack_awq

UNIT = 128  # codes per unit along K
WORDS = UNIT // 8  # int32 words per unit and row
N_ALIGN = 128  # output rows are padded to this (the largest BLOCK_N)
CPU_N_ALIGN = 16  # tinygemm CPU wants N % 16 == 0


def _kernel_group_size(gs: int) -> int:
    """A group size the GPU kernels handle (32, 64, or a multiple of 128) that divides gs."""
    if gs % 32:
        raise ValueError(f"group size {gs} is not a multiple of 32")
    if gs in (32, 64) or gs % UNIT == 0:
        return gs
    return 64 if gs % 64 == 0 else 32


def _cpu_group_size(gs: int) -> int:
    for g in (256, 128, 64, 32):
        if gs % g == 0:
            return g
    raise ValueError(f"group size {gs} is not a multiple of 32")


def _rows_params(qzeros, scales, gs: int, new_gs: int):
    """AWQ zeros/scales -> row-major [N, G'] integer zeros (int32) and fp16 scales, group new_gs."""
    z = unpack_awq(qzeros).t().to(torch.int32)  # [N, G]
    s = scales.t()  # [N, G]
    rep = gs // new_gs
    if rep > 1:
        z, s = z.repeat_interleave(rep, dim=1), s.repeat_interleave(rep, dim=1)
    return z, s


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def repack_gpu(qweight, qzeros, scales, group_size: int):
    """AWQ GEMM tensors -> (qweight int32 [Np/128, Kp/128, 128, 16], sz int32 [Gp, Np], kernel group size).
    See the module docstring for the layout."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    gs = group_size_of(k, scales.shape[0], group_size)
    kgs = _kernel_group_size(gs)
    z, s = _rows_params(qzeros, scales.to(torch.float16), gs, kgs)  # [N, K/kgs]
    np_, kp = -(-n // N_ALIGN) * N_ALIGN, -(-k // UNIT) * UNIT
    gp = -(-kp // kgs)
    codes = _pad(unpack_awq(qweight).t().to(torch.int64), np_, kp)  # [Np, Kp]
    # k = 128 u + 32 j + 2 s + h  ->  word s, nibble i = j + 4 h
    c = codes.reshape(np_, kp // UNIT, 4, WORDS, 2).permute(0, 1, 3, 4, 2).reshape(np_, kp // UNIT, WORDS, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=c.device)
    words = (c << shifts).sum(dim=-1)  # [Np, units, 16], < 2^32, nibbles do not overlap
    # [Np, units, 16] -> [Np/128, 128, units, 16] -> [Np/128, units, 128, 16]: an 8 KiB tile per (block, unit)
    qw = _to_int32(words).reshape(np_ // N_ALIGN, N_ALIGN, kp // UNIT, WORDS).transpose(1, 2).contiguous()
    s_bits = _pad(s, np_, gp).view(torch.int16).to(torch.int32) & 0xFFFF  # [Np, Gp]
    sz = (s_bits | (_pad(z, np_, gp) << 16)).t().contiguous()  # [Gp, Np]
    return qw, sz, kgs


def unpack_sz(sz: torch.Tensor):
    """Inverse of the sz packing: int32 [Gp, Np] -> (scales fp16, zeros uint8), both [Gp, Np]."""
    s = (sz & 0xFFFF).to(torch.int16).view(torch.float16)
    return s, ((sz >> 16) & 0xFF).to(torch.uint8)


def rows_view(qw: torch.Tensor) -> torch.Tensor:
    """The GPU qweight [Np/128, units, 128, 16] as [Np, units, 16] (row n, unit u, word s); a copy."""
    nb, units, rows, words = qw.shape
    return qw.transpose(1, 2).reshape(nb * rows, units, words)


def row_major_view(qw: torch.Tensor) -> torch.Tensor:
    """The codes of qw [Np/128, units, 128, 16] stored row-major ([Np, Kp/8], each row's units contiguous:
    the order before the tiles), seen as a strided [Np/128, units, 128, 16] view of that copy, which the
    kernels read like qw (benchmarks/int4_kernels.py --sweep-layout times the two orders; tests)."""
    nb, units = qw.shape[:2]
    rm = rows_view(qw).reshape(nb * N_ALIGN, units * WORDS).contiguous()  # [Np, Kp/8]
    return rm.view(nb, N_ALIGN, units, WORDS).permute(0, 2, 1, 3)  # strides (128 Kp/8, 16, Kp/8, 1)


def unpack_gpu(qw: torch.Tensor) -> torch.Tensor:
    """Inverse of the GPU packing: int32 [Np/128, Kp/128, 128, 16] -> codes uint8 [Np, Kp] (for tests)."""
    w = rows_view(qw)  # [Np, units, 16]
    np_, units, _ = w.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qw.device)
    nib = (w[..., None] >> shifts) & 0xF  # [Np, units, s, i = j + 4 h]
    nib = nib.reshape(np_, units, WORDS, 2, 4).permute(0, 1, 4, 2, 3)  # [Np, units, j, s, h]: k = 32 j + 2 s + h
    return nib.reshape(np_, units * UNIT).to(torch.uint8)


def repack_cpu(qweight, qzeros, scales, group_size: int, dtype: torch.dtype):
    """AWQ GEMM tensors -> (tinygemm CPU weight uint8, scales_and_zeros [K/g, Np, 2] in dtype, g)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    gs = group_size_of(k, scales.shape[0], group_size)
    cgs = _cpu_group_size(gs)
    z, s = _rows_params(qzeros, scales, gs, cgs)  # [N, K/cgs]
    np_ = -(-n // CPU_N_ALIGN) * CPU_N_ALIGN
    codes = _pad(unpack_awq(qweight).t().to(torch.int32), np_, k).contiguous()  # [Np, K]
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s32 = _pad(s.float(), np_, s.shape[1])  # [Np, G'], padded rows: scale 0
    zf = (8 - _pad(z, np_, z.shape[1]).float()) * s32  # tinygemm: w = (q - 8) * s + zf; exact in fp32
    sz = torch.stack([s32.t(), zf.t()], dim=-1).to(dtype).contiguous()  # [G', Np, 2]
    return w, sz, cgs
