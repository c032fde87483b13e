"""QuantLinear: a linear layer holding AWQ GEMM tensors (layout in salience.packing)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import PackedInt4, int4_linear
from .packing import PACK, dequantize_packed


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as 4-bit codes: qweight int32 [K, N/8], qzeros int32 [G, N/8],
    scales fp16 [G, N] (G = K / group_size), bias [N] or None.

    forward() runs salience.kernels.int4_linear on a copy of the weights repacked once for x's device
    (Triton kernels on CUDA, torch's int4 CPU kernel on the CPU); dequantized_weight() is the reference."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype=torch.float16, device=None):
        super().__init__()
        if out_features % PACK:
            raise ValueError(f"AWQ GEMM needs out_features divisible by {PACK}, got {out_features}")
        gs = in_features if group_size == -1 else group_size
        if in_features % gs:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        g = in_features // gs
        kw = dict(device=device)
        self.register_buffer("qweight", torch.empty(in_features, out_features // PACK, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.empty(g, out_features // PACK, dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.empty(g, out_features, dtype=torch.float16, **kw))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, **kw) if bias else None)

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        """[N, K] dense weight."""
        return dequantize_packed(self.qweight, self.qzeros, self.scales, self.group_size,
                                 dtype=dtype or self.scales.dtype)

    def packed(self, device, dtype) -> PackedInt4:
        """The kernels' copy of the weights for (device, dtype), repacked on first use and kept (not part
        of the state dict: the checkpoint stores only the AWQ layout)."""
        p = self.__dict__.get("_packed")
        if p is None or p.device != torch.device(device) or (p.device.type == "cpu" and p.dtype != dtype):
            p = PackedInt4.from_awq(self.qweight, self.qzeros, self.scales, self.group_size, device=device,
                                    dtype=dtype)
            self.__dict__["_packed"] = p
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type == "cpu" and x.dtype != torch.bfloat16:
            # torch's CPU int4 kernel is fast only in bf16; other dtypes take the exact dequantize path
            return F.linear(x, self.dequantized_weight(x.dtype), b)
        return int4_linear(x, self.packed(x.device, x.dtype), b)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_packed", None)  # .to() / .cuda(): repack on the next call
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


@contextmanager
def params_on_meta():
    """Build modules with parameters on the meta device (no memory, no init) but real buffers, so that
    non-persistent buffers computed in __init__ (rotary inv_freq) survive a load with assign=True."""
    from transformers.initialization import no_init_weights

    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        with no_init_weights():
            yield
    finally:
        nn.Module.register_parameter = register
