"""Calibration statistics stay finite and exact for fp16 activations whose X^T X exceeds fp16's range."""

import pytest
import torch

from salience.quantize import _InputStats


def test_fp16_gram_does_not_overflow():
    torch.manual_seed(0)
    x = (torch.randn(4, 256, 8) * 100).half()  # X^T X diagonal ~ 1024 * 1e4 = 1e7 > 65504
    lin = torch.nn.Linear(8, 3).half()
    st = _InputStats()
    h = lin.register_forward_pre_hook(st.hook("lin"))
    with torch.no_grad():
        for b in x:
            st.new_pass()
            lin(b)
    h.remove()
    x32 = x.float().reshape(-1, 8)
    g = st.gram_of("lin")
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    torch.testing.assert_close(g, x32.t() @ x32, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(st.x_mean("lin"), x32.abs().mean(0), rtol=1e-4, atol=1e-3)


def test_fp32_model_computed_in_bf16_with_output_loss():
    """Captured rotary tables of an fp32 model are cast to the compute dtype (the reference output loss
    runs the attention module and used to meet fp32 cos/sin with bf16 activations)."""
    from salience import api
    from salience.awq import SearchConfig
    from salience.quant import QuantConfig
    from tiny import tiny_model

    m = tiny_model("llama", dtype=torch.float32)
    rows = torch.randint(0, 300, (4, 32))
    reports = api.fake_quantize(m, QuantConfig(4, 32), "awq", rows, SearchConfig(loss="output"), device="cpu",
                                dtype=torch.bfloat16, progress=False)
    assert len(reports) == 2 and all(torch.isfinite(p).all() for p in m.parameters())


def test_refined_alphas_are_new_and_in_range():
    from salience.awq import SearchConfig, candidates, refined

    scfg = SearchConfig(n_grid=10, refine=2)
    grid = {a for _, a in candidates(scfg)}
    for best in [("x", 0.0), ("x", 0.5), ("x", 0.9)]:
        r = refined(best, scfg)
        assert r and all(0 <= a <= 1 and a not in grid and f == "x" for f, a in r)
        assert all(abs(a - best[1]) <= 2 / 30 + 1e-9 for _, a in r)


def test_refine_never_worse_and_propagate_changes_only_later_blocks():
    from salience import api
    from salience.awq import SearchConfig
    from salience.quant import QuantConfig
    from tiny import tiny_model

    rows = torch.randint(0, 300, (4, 32))

    def run(**kw):
        m = tiny_model("llama", dtype=torch.float32)
        reps = api.fake_quantize(m, QuantConfig(4, 32), "awq", rows, SearchConfig(**kw), device="cpu",
                                 dtype=torch.float32, progress=False)
        return m, reps

    base, rb = run()
    fine, rf = run(refine=2)
    for a, b in zip(rb, rf):
        for key, g in a["groups"].items():
            assert b["groups"][key]["loss"] <= g["loss"] * (1 + 1e-6)
    prop, _ = run(propagate=True)
    blocks_b, blocks_p = base.model.layers, prop.model.layers
    assert all(torch.equal(p, q) for p, q in zip(blocks_b[0].parameters(), blocks_p[0].parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(blocks_b[1].parameters(), blocks_p[1].parameters()))


def test_search_damping_reaches_every_gram_once(monkeypatch):
    """search_damp adds its ridge to each input Gram once, before the searches read it: the reported scale
    losses then include lam * mean(x^2) * ||dW||^2, so they rise; 0 never calls it."""
    from salience import api, awq
    from salience.awq import SearchConfig
    from salience.quant import QuantConfig
    from tiny import tiny_model

    rows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    calls = []
    real = awq.damp_
    monkeypatch.setattr(awq, "damp_", lambda g, lam: calls.append((g.shape, lam)) or real(g, lam))

    def run(d):
        m = tiny_model("llama", dtype=torch.float32)
        return api.fake_quantize(m, QuantConfig(4, 32), "awq", rows, SearchConfig(search_damp=d),
                                 device="cpu", dtype=torch.float32, progress=False)

    plain = run(0.0)
    assert not calls
    damped = run(1.0)
    # per block: the inputs of qkv (norm), o, gate/up (norm), down: four distinct Grams
    assert len(calls) == 4 * len(damped) and all(lam == 1.0 for _, lam in calls)
    for a, b in zip(plain, damped):
        for key, g in a["groups"].items():
            assert b["groups"][key]["loss"] > g["loss"]
    with pytest.raises(ValueError, match="search_damp"):
        SearchConfig(search_damp=-1)


def test_search_damping_default_depends_on_the_width():
    from salience.awq import SearchConfig, damp_for
    # chosen on a held-out text at 4 bits; the reference loss elsewhere; an explicit value always wins
    assert damp_for(SearchConfig(), 4) == 0.3 and damp_for(SearchConfig(), 3) == 0.0
    assert damp_for(SearchConfig(search_damp=0.0), 4) == 0.0
    assert damp_for(SearchConfig(search_damp=1.0), 3) == 1.0
