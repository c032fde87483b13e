"""GPTQ rounding on the AWQ grid (salience.gptq): small exact cases, and a tiny model written and reloaded."""

import json

import pytest
import torch

from salience import api, awq, gptq
from salience.arch import ARCHS
from salience.checkpoint import REPORT
from salience.quant import QuantConfig, compute_qparams, dequantize, quantize
from salience.quantize import quantize_linear

from tiny import assert_reloads_to, calib_file, tiny_model, tiny_tokenizer


# GPTQ's usual damping: the exact small cases below test the rounding itself, at a weak pull toward the weights
# (the pipeline's damping is SearchConfig.gptq_damp, its one default)
DAMP = 0.01


def _correlated_layer(seed=0, t=2048, k=256, n=48):
    """Inputs with correlated channels and a few outlier channels, and a weight; x [t, k], w [n, k]."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * 0.3 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :4] *= 30
    w = torch.randn(n, k, generator=g) * 0.05
    return x, w


def _grid(w, cfg, g=None):
    """fp16-rounded scales and zeros, with the clip search's ranges when g is given."""
    clip = awq.search_clip(w, g, cfg, asym=True) if g is not None else (None, None)
    s, z = compute_qparams(w, cfg, *clip)
    return s.half().float(), z


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_gptq_output_error_below_nearest(group_size):
    x, w = _correlated_layer()
    cfg = QuantConfig(4, group_size)
    g = awq.gram(x)
    s, z = _grid(w, cfg, g)
    near = quantize(w, cfg, s, z)[0]
    codes = gptq.round_gptq(w, g, s, z, cfg, DAMP)
    err_near = awq.gram_loss(dequantize(near, s, z, cfg) - w, g)
    err = awq.gram_loss(dequantize(codes, s, z, cfg) - w, g)
    assert err < 0.6 * err_near, (err, err_near)
    # the loss is the output error summed over tokens
    assert torch.allclose(err, ((x @ (dequantize(codes, s, z, cfg) - w).t()) ** 2).sum(), rtol=1e-3)


def test_codes_in_range_and_on_the_given_grid():
    x, w = _correlated_layer(1, k=128, n=16)
    cfg = QuantConfig(3, 32)
    g = awq.gram(x)
    s, z = _grid(w, cfg, g)
    codes = gptq.round_gptq(w, g, s, z, cfg, DAMP, block=48)  # a block size that does not divide K
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= cfg.qmax
    wq = dequantize(codes, s, z, cfg)
    # every value is (q - zero) * scale of its own group: dividing back gives integers in [-zero, qmax - zero]
    steps = (wq.reshape(16, 4, 32) / s[..., None]).reshape(16, 128)
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    # the error feedback moves codes, but not far from the weight: within a few steps of its range
    step = s.repeat_interleave(32, dim=1)
    assert ((wq - w).abs() <= 4 * step).float().mean() > 0.99


def test_identity_gram_is_nearest_rounding():
    _, w = _correlated_layer(2)
    cfg = QuantConfig(4, 64)
    s, z = _grid(w, cfg)
    near = quantize(w, cfg, s, z)[0]
    assert torch.equal(gptq.round_gptq(w, torch.eye(256) * 7.0, s, z, cfg, DAMP), near)
    # a diagonal Gram couples nothing either, whatever its scale per channel
    assert torch.equal(gptq.round_gptq(w, torch.diag(torch.rand(256) + 0.1), s, z, cfg, DAMP), near)


def test_dead_input_channels():
    x, w = _correlated_layer(3, k=128, n=16)
    x[:, 10:20] = 0  # channels no token reaches: zero rows and columns of G
    cfg = QuantConfig(4, 32)
    g = awq.gram(x)
    s, z = _grid(w, cfg)
    codes = gptq.round_gptq(w, g, s, z, cfg, DAMP)
    near = quantize(w, cfg, s, z)[0]
    assert torch.isfinite(gptq.inverse_factor(g, DAMP)).all()
    assert torch.equal(codes[:, 10:20], near[:, 10:20])  # nothing propagates into them ...
    err, err_near = (awq.gram_loss(dequantize(c, s, z, cfg) - w, g) for c in (codes, near))
    assert err < err_near


def test_quantize_linear_gptq_chunks_and_fp16_scales():
    """quantize_linear with a Gram: the same codes by chunks of rows as at once; the scales returned are
    the fp16-rounded ones the codes were rounded to; w becomes the dequantized weight."""
    x, w = _correlated_layer(4, k=128, n=40)
    cfg = QuantConfig(4, 32)
    g = awq.gram(x)
    w1, w2 = w.clone(), w.clone()
    a = quantize_linear(w1, cfg, g=g, damp=DAMP)
    b = quantize_linear(w2, cfg, g=g, damp=DAMP, max_elems=128 * 7)  # 7 rows a chunk
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(w1, w2)
    assert torch.equal(a.scales, a.scales.half().float())
    assert torch.equal(w1, dequantize(a.codes, a.scales, a.zeros, cfg))
    near = quantize_linear(w.clone(), cfg)
    assert torch.equal(near.scales, a.scales) and torch.equal(near.zeros, a.zeros)
    assert not torch.equal(near.codes, a.codes)


def test_one_damping_default():
    """The damping has one default, SearchConfig.gptq_damp: the rounding functions take it without one of
    their own, the CLI passes it on unless --gptq-damp is given."""
    x, w = _correlated_layer(5, k=64, n=8)
    with pytest.raises(ValueError, match="damp"):
        quantize_linear(w.clone(), QuantConfig(4, 32), g=awq.gram(x))
    with pytest.raises(TypeError):
        gptq.inverse_factor(awq.gram(x))  # no damping of its own
    from salience.cli import _search_config, build_parser
    base = ["quantize", "--rounding", "gptq"]
    assert _search_config(build_parser().parse_args(base)).gptq_damp == awq.SearchConfig().gptq_damp
    assert _search_config(build_parser().parse_args([*base, "--gptq-damp", "0.5"])).gptq_damp == 0.5


def test_search_config_rounding_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        awq.SearchConfig(rounding="stochastic")
    with pytest.raises(ValueError, match="gptq_damp"):
        awq.SearchConfig(rounding="gptq", gptq_damp=0)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_tiny_model_gptq_checkpoint_reloads(model_type, tmp_path, monkeypatch):
    """rounding="gptq" through api.quantize (dense and MoE blocks): the checkpoint reloads to exactly the
    in-memory weights, and its codes differ from round-to-nearest's on the same grid."""
    dtype = getattr(torch, ARCHS[model_type].dtype)
    tok = tiny_tokenizer()
    calib = calib_file(tmp_path)
    kw = dict(calib=calib, n_rows=8, seqlen=32, device="cpu", dtype=dtype, progress=False)
    fqs = {}
    damps = []  # every damping the pipeline factors with: SearchConfig's
    factor = gptq.inverse_factor
    monkeypatch.setattr(gptq, "inverse_factor", lambda g, damp, **k: damps.append(damp) or factor(g, damp, **k))
    for r in ("nearest", "gptq"):
        out = tmp_path / r
        loaded = (tiny_model(model_type, dtype), tok)
        _, fqs[r], _ = api.quantize(None, out, QuantConfig(4, 32), "awq", loaded=loaded,
                                    scfg=awq.SearchConfig(rounding=r), **kw)
    assert damps and set(damps) == {awq.SearchConfig().gptq_damp}
    assert json.loads((out / REPORT).read_text())["search"]["rounding"] == "gptq"
    assert_reloads_to(out, fqs["gptq"], fqs["nearest"], ARCHS[model_type].layers, dtype)
