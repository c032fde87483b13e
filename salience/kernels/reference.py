"""The spec every 4-bit kernel is tested against: plain torch, no speed.

A linear with K inputs and N outputs arrives as the AWQ GEMM tensors (salience/packing.py draws that
layout): qweight int32 [K, N/8], qzeros int32 [G, N/8], scales fp16 [G, N], G = K / group_size
(group_size = -1: G = 1). Nibble i of a word holds column 8j + ORDER[i] of its 8-column block.

    W[n, k] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]      computed in fp32,
                                                                             rounded once to x.dtype
    int4_linear_ref(x, ...) = x @ W.T + bias                                 [M, K] -> [M, N]

These few lines repeat salience.packing.dequantize_packed so that kernels/ imports only torch (and
triton); tests/test_kernels.py checks that the two agree bit for bit.

The elementwise math around a transformer's linears is defined here too, as plain torch: rms_norm (the
engine's norm) and act_mul (what int4_linear's glu= computes; its rms=, residual= and emit= are composed in
linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8-column block


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] in AWQ order -> codes uint8 [R, 8C]."""
    r, c = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nib = (words[:, :, None] >> shifts) & 0xF  # [R, C, 8], nibble order
    col_to_nibble = [AWQ_ORDER.index(j) for j in range(8)]
    return nib[:, :, col_to_nibble].reshape(r, 8 * c).to(torch.uint8)


def group_size_of(k: int, n_groups: int, group_size: int) -> int:
    """The group size in codes along K (resolves -1 to K)."""
    gs = k if group_size == -1 else group_size
    if gs * n_groups != k:
        raise ValueError(f"group_size {group_size} with {n_groups} groups does not cover K={k}")
    return gs


def dequantize_awq(qweight, qzeros, scales, group_size: int, dtype=torch.float16) -> torch.Tensor:
    """AWQ GEMM tensors -> dense nn.Linear weight [N, K] in dtype."""
    k = qweight.shape[0]
    gs = group_size_of(k, scales.shape[0], group_size)
    codes = unpack_awq(qweight).float()  # [K, N]
    zeros = unpack_awq(qzeros).float().repeat_interleave(gs, dim=0)  # [K, N]
    w = (codes - zeros) * scales.float().repeat_interleave(gs, dim=0)  # [K, N], fp32
    return w.t().to(dtype)


def rms_norm(x, w, eps: float, offset: float = 0.0):
    """RMSNorm over the last dim. offset 0 (Llama): w * (x / rms(x)).to(dtype); offset 1 (Gemma, weight
    stored as w, applied as 1 + w): (x / rms(x) * (1 + w)) in fp32, then dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + w.float())).to(x.dtype)
    return w * xf.to(x.dtype)


ACTS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def act_mul(y, act: str):
    """y [.., 2F] (gate, then up) -> act(gate) * up [.., F] (a gated MLP's input to its down projection)."""
    gate, up = y.chunk(2, dim=-1)
    return ACTS[act](gate) * up


def int4_linear_ref(x, qweight, qzeros, scales, group_size: int, bias=None) -> torch.Tensor:
    """x [M, K] -> [M, N] = x @ W.T (+ bias), W dequantized in fp32 and rounded to x.dtype."""
    w = dequantize_awq(qweight, qzeros, scales, group_size, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
