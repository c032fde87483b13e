"""One entry point: PackedInt4 (a linear's weights, repacked once for one device) and int4_linear.

    p = PackedInt4.from_awq(qweight, qzeros, scales, group_size, device="cuda", dtype=torch.float16)
    y = int4_linear(x, p, bias)          # x [..., K] -> y [..., N], y.dtype = x.dtype

The kernel is picked by where p lives and by M = tokens (x flattened to [M, K]):
    CUDA, fp16/bf16 x:  M = 1 GEMV (CUDA cores, split-K) | M <= 256 fused dequant GEMM (tensor cores)
                        | larger M: dequantize (Triton) then cuBLAS.   fp32 x: dequantize then cuBLAS.
                        (thresholds and block sizes: triton_int4.py, from H100 and H200 sweeps)
    CPU:                torch's tinygemm for CPU in p.dtype (x is cast to it and the result back).
                        bf16 is its fast dtype; fp16 and fp32 are exact but far slower there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import layout

LOCKS = 4096  # split-K arrival counters per PackedInt4 on CUDA (one per output tile)


@dataclass(eq=False)
class PackedInt4:
    """A 4-bit linear (N outputs, K inputs) in the layout of the device it lives on (layout.py).

    layout "triton" (CUDA; on CPU tensors only for the interpreter): qweight int32 [Np/128, Kp/128, 128, 16],
        scales = sz int32 [Gp, Np] (fp16 scale bits | zero << 16), locks int32 (split-K counters,
        zero between calls).
    layout "tinygemm_cpu": qweight uint8 (tinygemm's packing), scales = scales_and_zeros [K/g, Np, 2]
        in dtype.
    """

    n: int
    k: int
    group_size: int  # as quantized (-1: one group)
    kernel_group_size: int  # the group size the kernels see (same numbers, maybe finer)
    dtype: torch.dtype  # CPU: the compute dtype; CUDA: informative (kernels take x's dtype)
    layout: str  # "triton" or "tinygemm_cpu": which kernels read these tensors
    qweight: torch.Tensor
    scales: torch.Tensor
    locks: torch.Tensor | None = None

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size: int, device=None,
                 dtype: torch.dtype = torch.float16) -> "PackedInt4":
        """From the AWQ GEMM tensors (qweight int32 [K, N/8], qzeros int32 [G, N/8], scales [G, N])."""
        device = torch.device(device) if device is not None else qweight.device
        k, n = qweight.shape[0], qweight.shape[1] * 8
        if device.type == "cuda":
            return cls.for_triton(*[a.to(device) for a in (qweight, qzeros, scales)], group_size, dtype)
        if device.type != "cpu":
            raise NotImplementedError(f"no int4 kernels for device {device}")
        t = [a.cpu() for a in (qweight, qzeros, scales)]
        w, sz, cgs = layout.repack_cpu(*t, group_size, dtype)
        return cls(n, k, group_size, cgs, dtype, "tinygemm_cpu", w, sz)

    @classmethod
    def for_triton(cls, qweight, qzeros, scales, group_size: int, dtype=torch.float16) -> "PackedInt4":
        """The Triton kernels' layout on qweight's device (CUDA; CPU tensors serve the interpreter)."""
        k, n = qweight.shape[0], qweight.shape[1] * 8
        qw, sz, kgs = layout.repack_gpu(qweight, qzeros, scales, group_size)
        locks = torch.zeros(LOCKS, dtype=torch.int32, device=qweight.device)
        return cls(n, k, group_size, kgs, dtype, "triton", qw, sz, locks)

    @property
    def device(self) -> torch.device:
        return self.qweight.device


def int4_linear(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x.dtype, W the 4-bit weight held by p."""
    if x.shape[-1] != p.k:
        raise ValueError(f"x has {x.shape[-1]} features, the linear takes {p.k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.stride(-1) != 1 or x2.stride(0) != p.k:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, p.n)
    elif p.layout == "triton":
        from . import triton_int4

        y = triton_int4.linear(x2, p, bias)
    else:
        y = _cpu_linear(x2, p, bias)
    return y.reshape(*lead, p.n)


def _cpu_linear(x2, p, bias):
    xc = x2.to(p.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, p.qweight, p.kernel_group_size, p.scales)
    y = y[:, : p.n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)
