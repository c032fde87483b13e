"""The decode-attention kernel (salience/kernels/attention.py) against its torch spec.

Without CUDA the cases run in a child process under Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported; see test_kernels_triton.py for why a child)."""

import os

import pytest
import torch

try:
    from interpreter import rerun_under_interpreter
except ImportError:  # tests/ imported as a package
    from tests.interpreter import rerun_under_interpreter

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if CUDA else "cpu"

if RUN_HERE:
    from salience.kernels.attention import _interpreted, decode_attention, decode_attention_ref

    assert CUDA or _interpreted()


def test_attention_kernel_in_interpreter():
    """Without CUDA: this file's cases in a child process under Triton's interpreter."""
    if not RUN_HERE:
        print(rerun_under_interpreter(__file__))


CASES = [  # B, Hq, Hkv, D, S, block_s, chunk, dtype
    (1, 4, 4, 64, 100, 32, None, torch.float16),
    (2, 8, 2, 128, 300, 64, 128, torch.bfloat16),  # chunks of two blocks, the last one ragged
    (3, 4, 1, 256, 50, 16, 16, torch.bfloat16),  # gemma-3-270m-like: 4 query heads on 1 kv head, D 256
    (2, 9, 3, 64, 40, 64, None, torch.float16),  # SmolLM2-like: groups of 3 (padded to 16 rows)
    (1, 2, 2, 32, 260, 32, 256, torch.float16),  # one chunk of eight blocks
]


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
@pytest.mark.parametrize("b,hq,hkv,d,s,block_s,chunk,dtype", CASES)
def test_decode_attention_matches_spec(b, hq, hkv, d, s, block_s, chunk, dtype):
    g = torch.Generator().manual_seed(b * 100 + s)
    q = torch.randn(b, hq, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype).to(DEV)
    hi = torch.randint(1, s + 1, (b,), generator=g)
    lo = (hi - torch.randint(1, s + 1, (b,), generator=g)).clamp(min=0)  # windows of every size
    hi[0], lo[0] = s, 0  # one row attends to the whole cache
    lo, hi = lo.to(DEV), hi.to(DEV)
    scale = d ** -0.5
    out = decode_attention(q, k, v, lo, hi, scale, block_s=block_s, chunk=chunk)
    ref = decode_attention_ref(q, k, v, lo, hi, scale)
    assert out.shape == (b, hq * d) and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.float() - ref.float()).abs().max().item() < tol


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
def test_idle_rows_get_zeros():
    q = torch.randn(2, 4, 64).half().to(DEV)
    k = torch.randn(2, 2, 32, 64).half().to(DEV)
    lo = torch.tensor([5, 0], device=DEV)
    hi = torch.tensor([5, 7], device=DEV)  # row 0: no live slot
    out = decode_attention(q, k, k.clone(), lo, hi, 0.125)
    assert (out[0] == 0).all() and torch.isfinite(out).all()
    ref = decode_attention_ref(q, k, k.clone(), lo, hi, 0.125)
    assert (out[1].float() - ref[1].float()).abs().max().item() < 4e-3


def test_shape_errors():
    from salience.kernels.attention import decode_attention as da
    q = torch.randn(1, 3, 64)
    k = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="does not fit"):
        da(q, k, k, torch.tensor([0]), torch.tensor([8]), 0.1)
