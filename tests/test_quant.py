"""The quantizer, the packing layout, and the AWQ search math, on small exact cases."""

import importlib.util
from pathlib import Path

import pytest
import torch

from salience import awq
from salience.packing import ORDER, dequantize_packed, pack, pack_linear, unpack, unpack_linear
from salience.quant import GroupSizeError, QuantConfig, compute_qparams, dequantize, fake_quantize, quantize


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (64, 128), (7, 200)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    words = pack(codes)
    assert words.dtype == torch.int32 and words.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack(words), codes)


def test_pack_nibble_order_matches_docstring_example():
    codes = torch.tensor([[3, 9, 1, 0, 15, 7, 2, 4]])
    assert pack(codes).item() & 0xFFFFFFFF == 0x47092F13
    assert ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_pack_linear_round_trip(group_size):
    cfg = QuantConfig(4, group_size)
    w = torch.randn(48, 256)
    codes, scales, zeros = quantize(w, cfg)
    qweight, qzeros, s16 = pack_linear(codes, scales, zeros)
    c2, s2, z2 = unpack_linear(qweight, qzeros, s16)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())
    ref = dequantize(codes, s16.t().float(), zeros, cfg)
    assert torch.equal(dequantize_packed(qweight, qzeros, s16, group_size, torch.float32), ref)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_dequant_error_within_half_step(bits, group_size):
    cfg = QuantConfig(bits, group_size)
    w = torch.randn(16, 256) * torch.linspace(0.1, 5, 256)
    codes, scales, zeros = quantize(w, cfg)
    assert codes.max() <= 2**bits - 1
    err = (dequantize(codes, scales, zeros, cfg) - w).abs()
    step = scales.repeat_interleave(256 // scales.shape[1], dim=1)
    # the integer zero point shifts the grid by < half a step at the range ends: allow one step there
    assert (err <= step * 0.5 + 1e-6).float().mean() > 0.97
    assert (err <= step + 1e-6).all()


def test_qparams_reference_formula():
    cfg = QuantConfig(4, 4)
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scales, zeros = compute_qparams(w, cfg)
    assert torch.allclose(scales, torch.tensor([[3.0 / 15]]))
    assert torch.equal(zeros, torch.tensor([[5.0]]))  # -round(-1 / 0.2)


def test_group_size_error_names_layer_and_options():
    with pytest.raises(GroupSizeError, match=r"model.layers.3.mlp.down_proj.*32, 64, -1"):
        QuantConfig(4, 128).groups(576, "model.layers.3.mlp.down_proj")


def test_fold_leaves_linear_outputs_unchanged():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(10, 32)
    ref = lin(norm(x))
    s = torch.rand(32) + 0.5
    awq.fold_into_prev(norm, s)
    awq.fold_into_linears([lin], s)
    assert torch.allclose(lin(norm(x)), ref, atol=1e-5)


def _outlier_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 256, generator=g)
    x[:, :4] *= 50  # salient channels with large activations
    w = torch.randn(64, 256, generator=g) * 0.05
    return x, w


def test_awq_beats_rtn_with_outlier_channels():
    x, w = _outlier_layer()
    cfg = QuantConfig(4, 128)
    y = x @ w.t()
    rtn = ((x @ fake_quantize(w, cfg).t() - y) ** 2).mean()
    g = awq.gram(x)
    s, (formula, alpha), losses = awq.search_scale(
        awq.activation_mean(x), None, lambda s: awq.gram_loss(awq.scaled_fake_quant(w, s, cfg) - w, g))
    q = awq.scaled_fake_quant(w, s, cfg)
    err = ((x @ q.t() - y) ** 2).mean()
    assert formula == "x" and alpha > 0 and err < 0.7 * rtn
    # the Gram form is the output error summed over tokens
    assert torch.allclose(awq.gram_loss(q - w, g), ((x @ (q - w).t()) ** 2).sum(), rtol=1e-3)


@pytest.mark.parametrize("asym", [False, True])
def test_clip_search_never_worse_than_no_clip(asym):
    x, w = _outlier_layer(1)
    cfg = QuantConfig(4, 64)
    g = awq.gram(x)
    cmin, cmax = awq.search_clip(w, g, cfg, asym=asym)
    clipped = fake_quantize(w, cfg, cmin, cmax)
    assert awq.gram_loss(clipped - w, g) <= awq.gram_loss(fake_quantize(w, cfg) - w, g) * 1.0001
    assert (cmin >= w.reshape(64, -1, 64).amin(-1) - 1e-6).all()


def test_scale_grid_candidates():
    assert awq.candidates(awq.SearchConfig()) == [("x", i / 20) for i in range(20)]
    both = awq.candidates(awq.SearchConfig(n_grid=4, formula="both", alpha_one=True))
    assert both == [(f, a) for f in ("x", "duo") for a in (0, 0.25, 0.5, 0.75, 1.0)]
    with pytest.raises(ValueError):
        awq.SearchConfig(formula="nope")


def test_autoawq_reader_reconstructs_our_weights():
    """An independent reader: AutoAWQ's own unpacking code (awq/utils/packing_utils.py, plain torch),
    loaded from the installed `autoawq` distribution without importing its package (which needs CUDA-era
    pins)."""
    spec = importlib.util.find_spec("awq")
    assert spec is not None, "pip install --no-deps autoawq==0.2.9 (the independent reader)"
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    pu = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(pu)
    cfg = QuantConfig(4, 64)
    w = torch.randn(96, 192)
    codes, scales, zeros = quantize(w, cfg)
    qweight, qzeros, s16 = pack_linear(codes, scales, zeros)
    iweight, izeros = pu.reverse_awq_order(*pu.unpack_awq(qweight, qzeros, 4), 4)
    assert torch.equal(iweight & 0xF, codes.t().to(iweight.dtype))  # [K, N] integer codes, exactly
    assert torch.equal(izeros & 0xF, zeros.t().to(izeros.dtype))
    theirs = pu.dequantize_gemm(qweight, qzeros, s16, 4, 64)  # [K, N], computed by them in fp16
    ours = dequantize(codes, s16.t().float(), zeros, cfg)  # [N, K]
    assert torch.equal(theirs.t(), ours.half())
