"""Group-wise asymmetric integer quantization: pure functions on tensors.

A weight `w` of shape [n_out, n_in] is cut along the input dim into groups of `group_size`
columns (group_size = -1: one group per output row). Each (row, group) gets

    scale = (max - min) / (2^bits - 1)          # float
    zero  = clamp(-round(min / scale), 0, 2^bits - 1)   # integer
    q     = clamp(round(w / scale) + zero, 0, 2^bits - 1)
    w_hat = (q - zero) * scale

which is the quantizer of the AWQ paper and of every AWQ GEMM checkpoint. The functions return the
integer codes, scales and zeros; packing (salience.packing) never re-derives them.

Shapes: codes [n_out, n_in] uint8, scales/zeros [n_out, n_groups].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = range(2, 9)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)


class GroupSizeError(ValueError):
    """A group size does not divide a layer's input dim."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def groups(self, n_in: int, name: str = "layer") -> int:
        """Number of groups along an input dim of n_in; a clear error when it does not divide."""
        if self.group_size == -1:
            return 1
        if n_in % self.group_size:
            ok = [g for g in (32, 64, 128, 256) if n_in % g == 0] + [-1]
            raise GroupSizeError(
                f"group size {self.group_size} does not divide the input dim {n_in} of {name}; "
                f"group sizes that work for it: {', '.join(map(str, ok))}"
            )
        return n_in // self.group_size


def _grouped(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """[n_out, n_in] -> [n_out, n_groups, group_size] (a view)."""
    n_out, n_in = w.shape
    g = cfg.groups(n_in)
    return w.reshape(n_out, g, n_in // g)


def range_to_qparams(wmin: torch.Tensor, wmax: torch.Tensor, cfg: QuantConfig):
    """Scale and integer zero from a per-group range. The range always contains 0 only if the
    data does; a zero-width range gets a tiny scale so that division stays finite."""
    scales = ((wmax - wmin).clamp(min=1e-5) / cfg.qmax).float()
    zeros = (-torch.round(wmin.float() / scales)).clamp(0, cfg.qmax)
    return scales, zeros


def compute_qparams(w: torch.Tensor, cfg: QuantConfig, clip_min=None, clip_max=None):
    """Per (row, group) scale and zero. clip_min/clip_max [n_out, n_groups], if given, replace
    the data range (the result of a clip search)."""
    wg = _grouped(w.float(), cfg)
    wmin = wg.amin(dim=-1) if clip_min is None else clip_min.float()
    wmax = wg.amax(dim=-1) if clip_max is None else clip_max.float()
    return range_to_qparams(wmin, wmax, cfg)


def quantize(w: torch.Tensor, cfg: QuantConfig, scales=None, zeros=None):
    """w [n_out, n_in] -> (codes uint8 [n_out, n_in], scales fp32 [n_out, G], zeros fp32 [n_out, G])."""
    if scales is None:
        scales, zeros = compute_qparams(w, cfg)
    wg = _grouped(w.float(), cfg)
    q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, cfg.qmax)
    return q.reshape(w.shape).to(torch.uint8), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, cfg: QuantConfig,
               dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize: (q - zero) * scale, [n_out, n_in]."""
    qg = _grouped(codes.float(), cfg)
    w = (qg - zeros[..., None].float()) * scales[..., None].float()
    return w.reshape(codes.shape).to(dtype)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, clip_min=None, clip_max=None) -> torch.Tensor:
    """Quantize then dequantize, in w's dtype; the weight the 4-bit model effectively uses."""
    scales, zeros = compute_qparams(w, cfg, clip_min, clip_max)
    codes, _, _ = quantize(w, cfg, scales, zeros)
    return dequantize(codes, scales, zeros, cfg, dtype=w.dtype)


def fake_quantize_grouped(wg: torch.Tensor, qmax: int, wmin=None, wmax=None, inplace: bool = False) -> torch.Tensor:
    """Fake-quantize an already grouped fp32 tensor [..., group_size] with ranges [...];
    the hot loop of the searches (no reshapes, no integer dtype). inplace: wg is overwritten with the
    result (the same values; no temporaries of wg's size)."""
    if wmin is None:
        wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = (wmax - wmin).clamp(min=1e-5) / qmax
    zeros = (-torch.round(wmin / scales)).clamp(0, qmax)
    # q = clamp(round(w / scale) + zero, 0, qmax); w_hat = (q - zero) * scale
    q = wg.div_(scales[..., None]) if inplace else wg / scales[..., None]
    q.round_().add_(zeros[..., None]).clamp_(0, qmax)
    return q.sub_(zeros[..., None]).mul_(scales[..., None])
