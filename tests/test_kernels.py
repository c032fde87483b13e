"""salience.kernels on CPU: the spec against salience.packing, the GPU repacking (pure torch), and the
CPU int4 path (torch's tinygemm for CPU) against the spec. The Triton kernels: test_kernels_triton.py."""

import pytest
import torch

from salience import packing, quant
from salience.kernels import PackedInt4, dequantize_awq, int4_linear, int4_linear_ref, layout

# relative error ||y - ref|| / ||ref|| against the spec evaluated in float64; the floor is the
# rounding of the output (and, on CPU, of tinygemm's scales and float zeros) to the compute dtype
TOL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1.2e-2}


def awq_linear(n, k, group_size, seed=0):
    """Random weight [N, K], quantized and packed: (qweight, qzeros, scales)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    codes, s, z = quant.quantize(w, quant.QuantConfig(4, group_size))
    return packing.pack_linear(codes, s, z)


def spec64(x, awq, group_size, bias=None):
    """The spec with the weight rounded to x.dtype (as the spec does), then evaluated in float64."""
    w = dequantize_awq(*awq, group_size, dtype=x.dtype).double()
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


SHAPES = [(72, 256, 32), (200, 576, 64), (136, 384, 128), (72, 576, -1), (40, 192, 96), (8, 128, 128)]


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_reference_matches_packing(n, k, gs):
    awq = awq_linear(n, k, gs)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(dequantize_awq(*awq, gs, dtype), packing.dequantize_packed(*awq, gs, dtype))


def test_reference_is_linear():
    awq = awq_linear(72, 256, 64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=g)
    b = torch.randn(72, generator=g)
    w = packing.dequantize_packed(*awq, 64, torch.float32)
    # fp32 sums of 256 products in another order: allow float32 rounding of a sum that size
    torch.testing.assert_close(int4_linear_ref(x, *awq, 64, b), x @ w.t() + b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_gpu_layout_round_trip(n, k, gs):
    qweight, qzeros, scales = awq_linear(n, k, gs)
    qw, sz, kgs = layout.repack_gpu(qweight, qzeros, scales, gs)
    np_, kp = qw.shape[0] * qw.shape[2], qw.shape[1] * layout.UNIT
    assert qw.shape[2:] == (layout.N_ALIGN, layout.WORDS) and qw.is_contiguous()
    assert np_ % layout.N_ALIGN == 0 and kp % layout.UNIT == 0 and np_ >= n and kp >= k
    codes = packing.unpack(qweight).t()  # [N, K]
    back = layout.unpack_gpu(qw)
    assert torch.equal(back[:n, :k], codes)
    assert not back[n:].any() and not back[:, k:].any()
    # scales/zeros per kernel group, [Gp, Np]; padding is zero
    full_gs = k if gs == -1 else gs
    rep = full_gs // kgs
    s, z = layout.unpack_sz(sz)
    _, s_rows, z_rows = packing.unpack_linear(qweight, qzeros, scales)  # [N, G]
    assert torch.equal(s[: k // kgs, :n].float(), s_rows.repeat_interleave(rep, 1).t())
    assert torch.equal(z[: k // kgs, :n].float(), z_rows.repeat_interleave(rep, 1).t())
    assert not s[:, n:].any() and not z[:, n:].any() and not s[k // kgs:].any()


def test_gpu_layout_drawn_example():
    """The example in layout.py: codes k // 2 % 16 along one unit give word s = s repeated in every nibble."""
    codes = (torch.arange(128) // 2 % 16).repeat(8, 1)  # [N=8, K=128]
    qweight = packing.pack(codes.t())  # [K, N/8]
    qzeros = packing.pack(torch.zeros(1, 8, dtype=torch.int64))
    scales = torch.ones(1, 8, dtype=torch.float16)
    qw, _, _ = layout.repack_gpu(qweight, qzeros, scales, 128)
    words = layout.rows_view(qw)[0, 0]  # row 0, unit 0: 16 words
    assert words[3].item() == 0x33333333
    assert [w & 0xFFFFFFFF for w in words.tolist()] == [0x11111111 * s for s in range(16)]
    # the drawn rule on random codes: nibble i of word s holds k = 32 (i % 4) + 2 s + i // 4
    rnd = torch.randint(0, 16, (8, 128), generator=torch.Generator().manual_seed(0))
    qr, _, _ = layout.repack_gpu(packing.pack(rnd.t()), qzeros, scales, 128)
    wr = layout.rows_view(qr)[0, 0]
    assert all(((wr[s].item() >> (4 * i)) & 0xF) == rnd[0, 32 * (i % 4) + 2 * s + i // 4].item()
               for s in range(16) for i in range(8))
    # the 128 rows' words of one unit are one contiguous tile: row r's 16 words at 16 r
    assert torch.equal(qw[0, 0].reshape(-1)[:16], words)


def test_group_size_must_be_multiple_of_32():
    awq = awq_linear(8, 96, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        layout.repack_gpu(*awq, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        PackedInt4.from_awq(*awq, 48, device="cpu")


CPU_CASES = [  # (n, k, group_size, m)
    (72, 256, 32, 1), (200, 576, 64, 1), (136, 384, 128, 5), (72, 576, -1, 16),
    (40, 192, 96, 2), (200, 256, 128, 128), (72, 384, 64, 300), (8, 128, 32, 3),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k,gs,m", CPU_CASES)
def test_cpu_int4_linear(n, k, gs, m, dtype):
    awq = awq_linear(n, k, gs, seed=n + k + m)
    p = PackedInt4.from_awq(*awq, gs, device="cpu", dtype=dtype)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    y = int4_linear(x, p, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, spec64(x, awq, gs, bias)) < TOL[dtype]


def test_cpu_leading_dims_and_dtype_cast():
    awq = awq_linear(72, 256, 64)
    p = PackedInt4.from_awq(*awq, 64, device="cpu", dtype=torch.bfloat16)
    x = torch.randn(2, 3, 256)  # fp32 activations, bf16 compute
    y = int4_linear(x, p)
    assert y.shape == (2, 3, 72) and y.dtype == torch.float32
    assert rel_err(y.reshape(6, 72), spec64(x.reshape(6, 256).bfloat16(), awq, 64)) < TOL[torch.bfloat16]
    assert int4_linear(x[:, :0], p).shape == (2, 0, 72)


def test_cpu_neighbours_are_composed():
    """On CPU (tinygemm) int4_linear's rms=, glu=, residual= and emit= are torch ops around the kernel, in
    the documented order, and fuses() says so."""
    from salience.kernels import fuses, reference

    awq = awq_linear(144, 256, 64)
    p = PackedInt4.from_awq(*awq, 64, device="cpu", dtype=torch.bfloat16)
    assert not fuses(p, 1, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, q = (torch.randn(1, 2, 256, generator=g).bfloat16() for _ in range(2))
    r = torch.randn(1, 2, 72, generator=g).bfloat16()
    w = torch.rand(72, generator=g).bfloat16()
    y, yw = int4_linear(x, p, rms=(q, 1e-6), glu="gelu_tanh", residual=r, emit=w)
    xs = (x.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    want = r + reference.act_mul(int4_linear(xs, p), "gelu_tanh")
    assert y.shape == (1, 2, 72) and torch.equal(y, want) and torch.equal(yw, want * w)


def test_wrong_in_features():
    awq = awq_linear(72, 256, 64)
    p = PackedInt4.from_awq(*awq, 64, device="cpu")
    with pytest.raises(ValueError, match="256"):
        int4_linear(torch.randn(2, 128), p)
