"""4-bit (AWQ) weight-only linears near the memory-bandwidth limit, on CUDA (Triton) and CPU.

Kernels know nothing of models: they take the AWQ GEMM tensors of one linear (salience/packing.py),
repack them once for a device, and compute y = x @ W.T + bias.

Public API
----------
    PackedInt4.from_awq(qweight, qzeros, scales, group_size, device=None, dtype=torch.float16)
        -> PackedInt4
        qweight int32 [K, N/8], qzeros int32 [G, N/8], scales fp16 [G, N] (AWQ GEMM layout);
        group_size 32, 64, 128, any multiple of 32, or -1 (one group). device: where the kernels run
        (default: qweight's). dtype: on CPU the compute dtype (bf16 is the fast one there; fp16/fp32
        are exact but slow); on CUDA informative, the kernels follow x's dtype (fp16/bf16; fp32 works
        through dequantize + cuBLAS). N need not be a multiple of 16 or 128 (padded at repack).

    int4_linear(x, packed, bias=None, *, rms=None, glu=None, residual=None, emit=None)
        x [..., K] on packed's device -> [..., N] in x.dtype. Picks the kernel by device and by
        M = x.numel() // K (linear.py says which). rms=(q, eps) / glu="silu"|"gelu_tanh" / residual /
        emit=w: a transformer's elementwise neighbours of the linear (linear.py defines them), inside
        the kernel where fuses(packed, M, dtype, glu) (the CUDA GEMV at one token; glu= when N is a
        multiple of 128), composed from torch ops elsewhere.

    int4_linear_ref(x, qweight, qzeros, scales, group_size, bias=None) -> Tensor
        The spec (reference.py): plain torch, what every kernel is tested against.

Modules: reference.py (spec), layout.py (repacking, layouts drawn), triton_int4.py (CUDA kernels,
imported only when a PackedInt4 lives on CUDA), linear.py (PackedInt4, int4_linear).
"""

from .linear import PackedInt4, fuses, int4_linear
from . import layout, reference
from .reference import dequantize_awq, int4_linear_ref

__all__ = ["PackedInt4", "fuses", "int4_linear", "int4_linear_ref", "dequantize_awq", "layout", "reference"]
