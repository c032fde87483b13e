"""Block-wise tuning (salience.tune): the parametrisation starts exactly at the nearest rounding on the
searched grid, its gradients reach every parameter, tuning lowers the block's output error and never ends
above its start, and the pipeline writes checkpoints that reload to the in-memory weights."""

import json

import pytest
import torch

from salience import api, awq, tune
from salience.arch import ARCHS, get_module
from salience.checkpoint import REPORT
from salience.quant import QuantConfig
from salience.quantize import quantize_linear

from tiny import assert_reloads_to, calib_file, tiny_model, tiny_tokenizer


def _layer(seed=0, n=24, k=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.linspace(0.2, 2.0, k)


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("clipped", [False, True])
def test_start_is_nearest_rounding_on_the_searched_grid(group_size, clipped):
    """V = 0 with the clip search's factors gives quantize_linear's codes, fp16 scales and zeros."""
    cfg = QuantConfig(4, group_size)
    w = _layer()
    clip_min = clip_max = None
    if clipped:
        x = torch.randn(512, w.shape[1])
        clip_min, clip_max = awq.search_clip(w, x.T @ x, cfg, asym=True)
    ref = quantize_linear(w.clone(), cfg, clip_min, clip_max)
    wmin, wmax, a_lo, a_hi = tune.start_factors(w, clip_min, clip_max, cfg)
    codes, scales, zeros = tune.codes_of(w, torch.zeros_like(w), wmin, wmax, a_lo, a_hi, cfg)
    assert torch.equal(scales, ref.scales) and torch.equal(zeros, ref.zeros)
    assert torch.equal(codes, ref.codes)
    # the differentiable path computes the same dequantized weight
    fq = tune.fake_quant(w, torch.zeros_like(w), wmin, wmax, a_lo, a_hi, cfg.qmax)
    deq = ((codes.float() - zeros.repeat_interleave(group_size, 1)) * scales.repeat_interleave(group_size, 1))
    torch.testing.assert_close(fq, deq, rtol=0, atol=1e-6)


def test_gradients_reach_codes_and_ranges():
    cfg = QuantConfig(4, 32)
    w = _layer()
    wmin, wmax, a_lo, a_hi = tune.start_factors(w, None, None, cfg)
    v = torch.zeros_like(w, requires_grad=True)
    a_lo.requires_grad_(True)
    a_hi.requires_grad_(True)
    x = torch.randn(64, w.shape[1])
    loss = ((x @ tune.fake_quant(w, v, wmin, wmax, a_lo, a_hi, cfg.qmax).T - x @ w.T) ** 2).mean()
    gv, glo, ghi = torch.autograd.grad(loss, [v, a_lo, a_hi])
    assert gv.abs().sum() > 0 and glo.abs().sum() > 0 and ghi.abs().sum() > 0


def test_codes_move_at_most_one_step_from_nearest():
    cfg = QuantConfig(4, 32)
    w = _layer()
    wmin, wmax, a_lo, a_hi = tune.start_factors(w, None, None, cfg)
    near, _, _ = tune.codes_of(w, torch.zeros_like(w), wmin, wmax, a_lo, a_hi, cfg)
    for v in (torch.full_like(w, 0.5), torch.full_like(w, -0.5), torch.rand_like(w) - 0.5):
        codes, _, _ = tune.codes_of(w, v, wmin, wmax, a_lo, a_hi, cfg)
        assert (codes.int() - near.int()).abs().max() <= 1


def test_slice_rows():
    pe = (torch.randn(4, 8, 2), torch.randn(1, 8, 2))
    out = tune.slice_rows(((pe,), {"mask": torch.randn(4, 1, 8, 8), "pos": None, "n": 3}), 4, slice(1, 3))
    (cos, sin), = out[0]
    assert cos.shape == (2, 8, 2) and sin.shape == (1, 8, 2)
    assert out[1]["mask"].shape == (2, 1, 8, 8) and out[1]["pos"] is None and out[1]["n"] == 3
    torch.testing.assert_close(cos, pe[0][1:3])


def _block0():
    """A tiny llama's block 0, its input x [8, 16, hidden], calls (batches of 4 rows) as the pipeline records
    them, full-precision output y, and quantizable linears."""
    from salience.quantize import _forward, capture_block_inputs, quantizable_linears
    model = tiny_model("llama", torch.float32)
    rows = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    x, calls = capture_block_inputs(model, ARCHS["llama"], rows, 4, "cpu")
    block = get_module(model, ARCHS["llama"].layers)[0]
    return block, x, calls[0], _forward(block, x, calls[0], 4), quantizable_linears(block, ARCHS["llama"])


def test_tune_block_lowers_the_block_output_error():
    block, x, calls, y, lins = _block0()
    cfg = QuantConfig(4, 32)
    w0 = {n: l.weight.clone() for n, l in lins.items()}
    out, ranges, rep = tune.tune_block(block, {n: (None, None) for n in lins}, x, y, calls, 4, cfg,
                                       steps=60, rows=2)
    for n, l in lins.items():  # the block's weights are read, not written
        assert torch.equal(l.weight, w0[n])
    assert rep["loss_tuned"] < rep["loss_start"] and rep["kept"]
    for n, (codes, scales, zeros) in out.items():
        assert codes.dtype == torch.uint8 and int(codes.max()) <= cfg.qmax
        assert torch.equal(scales, scales.half().float()) and torch.equal(zeros, zeros.round())
        lo, hi = ranges[n]
        assert lo.shape == scales.shape and bool((hi >= lo).all())


def test_tune_keeps_the_start_when_tuning_does_not_help():
    """A learning rate far too large wrecks the codes: the start is kept and reported so."""
    block, x, calls, y, lins = _block0()
    cfg = QuantConfig(4, 32)
    start = {n: (None, None) for n in lins}
    out, _, rep = tune.tune_block(block, start, x, y, calls, 4, cfg, steps=3, rows=2, lr=0.3)
    assert not rep["kept"] and rep["loss_tuned"] >= rep["loss_start"]
    for n, (codes, scales, zeros) in out.items():
        ref = quantize_linear(lins[n].weight.clone(), cfg)
        assert torch.equal(codes, ref.codes) and torch.equal(scales, ref.scales)


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_tiny_model_tuned_checkpoint_reloads(model_type, tmp_path):
    """rounding="tune" through api.quantize (dense and MoE blocks): the checkpoint reloads to exactly the
    in-memory weights, the report records the tuning, and the codes differ from nearest rounding's."""
    dtype = getattr(torch, ARCHS[model_type].dtype)
    tok = tiny_tokenizer()
    calib = calib_file(tmp_path)
    kw = dict(calib=calib, n_rows=8, seqlen=32, device="cpu", dtype=dtype, progress=False)
    fqs = {}
    for r in ("nearest", "tune"):
        out = tmp_path / r
        _, fqs[r], _ = api.quantize(None, out, QuantConfig(4, 32), "awq", loaded=(tiny_model(model_type, dtype), tok),
                                    scfg=awq.SearchConfig(rounding=r, tune_steps=20, tune_rows=2), **kw)
    rep = json.loads((out / REPORT).read_text())
    assert rep["search"]["rounding"] == "tune"
    assert_reloads_to(out, fqs["tune"], fqs["nearest"], ARCHS[model_type].layers, dtype)


def test_search_config_checks_tuning():
    with pytest.raises(ValueError, match="tune_steps"):
        awq.SearchConfig(rounding="tune", tune_steps=0)


def test_tuning_on_propagated_inputs_targets_the_full_precision_model(tmp_path):
    """propagate + tune: block 1 is tuned against the full-precision model's block-1 output (not the
    full-precision block on the quantized input), and the result still reloads exactly."""
    from salience.quantize import capture_block_inputs, quantize_model
    model = tiny_model("llama", torch.float32)
    fp = tiny_model("llama", torch.float32)
    rows = torch.randint(0, model.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    targets = []
    orig = tune.tune_block

    def spy(block, start, x, y, *a, **k):
        targets.append(y.clone())
        return orig(block, start, x, y, *a, **k)

    import salience.quantize as q
    q.tune.tune_block, saved = spy, q.tune.tune_block
    try:
        quantize_model(model, ARCHS["llama"], QuantConfig(4, 32), rows,
                       awq.SearchConfig(rounding="tune", propagate=True, tune_steps=5, tune_rows=2),
                       batch_size=4, progress=False)
    finally:
        q.tune.tune_block = saved
    # the full-precision model's activations after blocks 0 and 1
    x, calls = capture_block_inputs(fp, ARCHS["llama"], rows, 4, "cpu")
    from salience.quantize import _forward
    layers = get_module(fp, ARCHS["llama"].layers)
    with torch.no_grad():
        for i in range(2):
            x = _forward(layers[i], x, calls[i], 4)
            torch.testing.assert_close(targets[i], x)
