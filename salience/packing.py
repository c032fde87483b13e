"""The one on-disk layout: AWQ GEMM packing of 4-bit codes into int32 words.

A linear with K inputs and N outputs stores its codes transposed, [K, N], and packs 8 consecutive
output columns into one int32 word. Nibble i (bits 4i..4i+3) of word j holds column 8j + ORDER[i]:

    ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

    codes of one input row k, columns 8j .. 8j+7:   c0 c1 c2 c3 c4 c5 c6 c7
                                                     3  9  1  0 15  7  2  4   (example values)

    word (bits 31..0), nibble 7 on the left:        | c7 | c5 | c3 | c1 | c6 | c4 | c2 | c0 |
                                                     |  4 |  7 |  0 |  9 |  2 | 15 |  1 |  3 |
                                                     = 0x47092F13

    nibble i = (word >> 4i) & 0xF:  i=0 -> c0, i=1 -> c2, i=2 -> c4, i=3 -> c6,
                                    i=4 -> c1, i=5 -> c3, i=6 -> c5, i=7 -> c7

So a linear is stored as
    qweight int32 [K, N/8]   codes, packed as above
    qzeros  int32 [G, N/8]   integer zero points (G = K / group_size), packed the same way
    scales  fp16  [G, N]
and dequantizes as w[k, n] = (code[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]
(note: w here is [K, N], the transpose of nn.Linear.weight).

This is what transformers, vLLM, SGLang, AutoAWQ and llm-awq read for `"version": "gemm"`.
Kernels that want another layout repack from this one at load time.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32 word
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column ORDER[i] of its 8-column block
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # nibble i sits at bit 4i


def pack(codes: torch.Tensor, max_elems: int = 1 << 22) -> torch.Tensor:
    """codes [R, N] integers in 0..15 -> int32 [R, N/8] in AWQ order. By chunks of rows of at most max_elems
    codes (rows pack independently), so that the int32/int64 temporaries stay ~16-32 MiB each."""
    r, n = codes.shape
    if n % PACK:
        raise ValueError(f"AWQ GEMM packing needs the output dim to be a multiple of {PACK}, got {n}")
    out = torch.empty(r, n // PACK, dtype=torch.int32, device=codes.device)
    step = max(1, max_elems // max(n, 1))
    for r0 in range(0, r, step):
        c = codes[r0:r0 + step].to(torch.int32).reshape(-1, n // PACK, PACK)[:, :, list(ORDER)]  # nibble order
        words = (c << _SHIFTS.to(c.device)).sum(dim=-1, dtype=torch.int64)  # < 2^32, no overlap
        # reinterpret the unsigned 32-bit value as int32 (two's complement)
        out[r0:r0 + step] = words - ((words >> 31) << 32)
    return out


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AWQ order -> codes uint8 [R, N]."""
    r, w = words.shape
    c = (words[:, :, None] >> _SHIFTS.to(words.device)) & 0xF  # [R, N/8, 8], nibble order
    inv = [ORDER.index(i) for i in range(PACK)]  # column j sits in nibble inv[j]
    return c[:, :, inv].reshape(r, w * PACK).to(torch.uint8)


def pack_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """From quantize()'s row-major output ([N, K] codes, [N, G] scales/zeros) to the AWQ GEMM tensors
    (qweight [K, N/8], qzeros [G, N/8], scales fp16 [G, N])."""
    return pack(codes.t()), pack(zeros.round().t()), scales.t().contiguous().to(torch.float16)


def unpack_linear(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """Inverse of pack_linear: codes uint8 [N, K], scales fp32 [N, G], zeros fp32 [N, G]."""
    return unpack(qweight).t(), scales.t().float(), unpack(qzeros).t().float()


def dequantize_packed(qweight, qzeros, scales, group_size: int, dtype=torch.float16) -> torch.Tensor:
    """AWQ GEMM tensors -> dense nn.Linear weight [N, K] (the reference every kernel is tested against)."""
    k = qweight.shape[0]
    g = scales.shape[0]
    gs = k // g if group_size == -1 else group_size
    codes = unpack(qweight).float()  # [K, N]
    zeros = unpack(qzeros).float().repeat_interleave(gs, dim=0)  # [K, N]
    w = (codes - zeros) * scales.float().repeat_interleave(gs, dim=0)
    return w.t().contiguous().to(dtype)
