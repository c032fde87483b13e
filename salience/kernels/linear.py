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

from . import layout, reference

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


def int4_linear(x: torch.Tensor, p: PackedInt4, bias: torch.Tensor | None = None, *, rms=None,
                glu: str | None = None, residual: torch.Tensor | None = None, emit: torch.Tensor | None = None):
    """x [..., K] @ W.T (+ bias) -> [..., N] in x.dtype, W the 4-bit weight held by p.

    A transformer's elementwise neighbours of the linear, in this order (reference.py's math):
      rms=(q, eps): x is scaled by rsqrt(mean(q^2) + eps), q [..., K] (fp32 statistics). With x = q * w
          this is the pre-norm w * RMSNorm(q) folded around the linear (the kernel scales its output);
      glu="silu" | "gelu_tanh": W holds [gate; up] rows (N = 2F), the result is act(gate) * up [..., F];
      residual [..., N or F]: the result is residual + y;
      emit=w [N or F]: returns (y, y * w), y * w being the x of a following rms= linear.
    fuses(p, m, dtype, glu) says whether the kernel does them itself (the CUDA GEMV at one token: no extra
    launches); otherwise they are composed from torch ops here, the same numbers up to rounding."""
    if x.shape[-1] != p.k:
        raise ValueError(f"x has {x.shape[-1]} features, the linear takes {p.k}")
    if glu is not None and glu not in reference.ACTS:
        raise ValueError(f"glu must be one of {sorted(reference.ACTS)}, got {glu!r}")
    if glu is not None and p.n % 2:
        raise ValueError(f"glu= needs [gate; up] rows, an even N (got {p.n})")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, p.k)
    if x2.stride(-1) != 1 or x2.stride(0) != p.k:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_out = p.n // 2 if glu else p.n
    if m and fuses(p, m, x2.dtype, glu):
        from . import triton_int4

        y = triton_int4.gemv(x2, p, bias, rms=rms, glu=glu, residual=residual, emit=emit)
        return tuple(t.reshape(*lead, n_out) for t in y) if emit is not None else y.reshape(*lead, n_out)
    if rms is not None:
        q, eps = rms
        qf = q.reshape(m, p.k).float()
        x2 = (x2.float() * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + eps)).to(x2.dtype)
    if m == 0:
        y = x2.new_zeros(0, p.n)
    elif p.layout == "triton":
        from . import triton_int4

        y = triton_int4.linear(x2, p, bias)
    else:
        y = _cpu_linear(x2, p, bias)
    if glu is not None:
        y = reference.act_mul(y, glu)
    y = y.reshape(*lead, n_out)
    if residual is not None:
        y = residual + y
    return (y, y * emit) if emit is not None else y


def fuses(p: PackedInt4, m: int, dtype: torch.dtype, glu: str | None = None) -> bool:
    """Whether int4_linear runs rms=, glu=, residual= and emit= inside its kernel for m tokens of this
    dtype (the CUDA GEMV at m = 1; glu= where p's rows make whole GLU tiles). Where it does not they cost
    separate torch ops, so a caller that compiles its own elementwise kernels (the engine) passes them only
    where this is True."""
    if p.layout != "triton":
        return False
    from . import triton_int4

    return triton_int4.fuses(m, dtype, p.n, glu)


def _cpu_linear(x2, p, bias):
    xc = x2.to(p.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, p.qweight, p.kernel_group_size, p.scales)
    y = y[:, : p.n]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x2.dtype)
