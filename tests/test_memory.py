"""What keeps the quantizer within its memory bounds changes no bit of the result: Grams accumulated a few
groups per pass over the calibration rows (folds deferred to the last pass) against all in one pass, row
chunks in quantize/pack, and the pass plan itself."""

import pytest
import torch

from salience import quantize as Q
from salience.arch import ScaleGroup, arch_for
from salience import awq
from salience.awq import SearchConfig
from salience.packing import pack
from salience.quant import QuantConfig

from tiny import tiny_model


def _run(model_type, scfg, gram_bytes, dtype=torch.bfloat16):
    m = tiny_model(model_type)
    rows = torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(1))
    reports = Q.quantize_model(m, arch_for(m.config), QuantConfig(4, 32), rows, scfg, device="cpu", dtype=dtype,
                               batch_size=4, progress=False, gram_bytes=gram_bytes)
    return m.state_dict(), reports


# llama: MHA (v -> o group); qwen2: GQA (o_proj in no group: clip search only); qwen2_moe: experts, router,
# shared expert; deepseek_v3 with the output loss: a search that reads an earlier fold's module (the last pass);
# GPTQ rounding: full Grams kept from every pass until the block's linears are quantized
@pytest.mark.parametrize("model_type,scfg", [
    ("llama", SearchConfig()), ("qwen2", SearchConfig(formula="both", refine=1)), ("qwen2_moe", SearchConfig()),
    ("deepseek_v3", SearchConfig(loss="output", search_tokens=64)), ("llama", SearchConfig(propagate=True)),
    ("qwen2", SearchConfig(rounding="gptq")), ("qwen2_moe", SearchConfig(rounding="gptq")),
    ("qwen2_moe", SearchConfig(search_damp=0.3))])  # each pass's Grams damped once, after their last batch
def test_passes_change_nothing(model_type, scfg):
    one, rep1 = _run(model_type, scfg, float("inf"))
    many, rep2 = _run(model_type, scfg, 0)  # one group (or orphan linear) per pass
    assert all(r["passes"] == 1 for r in rep1) and any(r["passes"] > 2 for r in rep2)
    assert one.keys() == many.keys()
    for k in one:
        assert torch.equal(one[k], many[k]), k
    assert [r["groups"] for r in rep1] == [r["groups"] for r in rep2]


def test_first_dependent():
    m = tiny_model("deepseek_v3")
    arch = arch_for(m.config)
    block = m.model.layers[1]
    groups = [g for g in Q.block_groups(block, arch) if Q._group_applies(block, g)]
    assert Q._first_dependent(groups, SearchConfig()) == len(groups)  # Gram loss: own linears only
    # output loss: q_b_proj's search runs self_attn, whose q_a_proj the first group's fold scales
    i = Q._first_dependent(groups, SearchConfig(loss="output"))
    assert groups[i].prev == "self_attn.q_a_layernorm"


def test_plan_passes():
    # Gram sizes of groups and orphans, budget, first dependent group
    assert Q.plan_passes([1, 1, 2, 5], [], 4, 4) == [[0, 1, 2], [3]]
    assert Q.plan_passes([1, 1, 1, 5], [1, 5], 4, 4) == [[5], [0, 1, 2, 4], [3]]
    assert Q.plan_passes([1, 1, 2, 5], [], 4, 1) == [[0], [1, 2, 3]]  # from the dependent group on: last pass
    assert Q.plan_passes([1, 1, 2, 5], [], float("inf"), 4) == [[0, 1, 2, 3]]
    assert Q.plan_passes([], [], 0, 0) == [[]]  # RTN: one pass, the output only


def test_gram_bytes_counts_shared_inputs_once():
    m = tiny_model("qwen2_moe")
    arch = arch_for(m.config)
    block = m.model.layers[0]
    from salience import moe

    moe.unfuse(block, arch)
    g = ScaleGroup("post_attention_layernorm", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                "mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                                "mlp.experts.1.gate_proj"), "mlp")
    assert Q._gram_bytes(block, g.linears, "mlp.experts") == 3 * 4 * 64 * 64  # shared, expert 0, expert 1


@pytest.mark.parametrize("clip", [False, True])
def test_quantize_linear_chunks(clip):
    torch.manual_seed(0)
    w = torch.randn(50, 96).bfloat16()
    cfg = QuantConfig(4, 32)
    cmin = cmax = None
    if clip:
        wg = w.float().reshape(50, 3, 32)
        cmin, cmax = wg.amin(-1) * 0.9, wg.amax(-1) * 0.8
    w1, w2 = w.clone(), w.clone()
    a = Q.quantize_linear(w1, cfg, cmin, cmax)
    b = Q.quantize_linear(w2, cfg, cmin, cmax, max_elems=96 * 7)  # 7 rows at a time
    assert torch.equal(w1, w2) and not torch.equal(w1, w)
    for x, y in [(a.codes, b.codes), (a.scales, b.scales), (a.zeros, b.zeros)]:
        assert torch.equal(x, y)


def test_pack_chunks():
    codes = torch.randint(0, 16, (37, 64), dtype=torch.uint8)
    assert torch.equal(pack(codes), pack(codes, max_elems=64 * 5))


def test_capture_to_host():
    m = tiny_model("llama")
    arch = arch_for(m.config)
    rows = torch.randint(0, 300, (5, 16))
    x, calls = Q.capture_block_inputs(m, arch, rows, 2, "cpu")
    xh, _ = Q.capture_block_inputs(m, arch, rows, 2, "cpu", host=True)
    assert torch.equal(x, xh) and x.shape == (5, 16, 64) and len(calls[0]) == 3
    assert torch.equal(x, m.model.embed_tokens(rows))


# ---- Grams kept as the panels of their upper triangle (awq.PanelGram) ------------------------------------

@pytest.mark.parametrize("rows", [64, 96])  # panels of equal rows, and a shorter last one
def test_panel_gram_equals_whole(rows):
    torch.manual_seed(0)
    k, cfg = 320, QuantConfig(4, 32)
    xs = [torch.randn(200, k).bfloat16() for _ in range(3)]
    whole, panels = torch.zeros(k, k), awq.panel_gram(k, rows)
    for x in xs:  # accumulated batch by batch, as the driver does
        awq.gram_add_(whole, x, col_block=128)
        awq.gram_add_(panels, x)
    assert sum(p.numel() for p in panels.panels) * 4 == awq.gram_bytes(k, rows) < 0.7 * awq.gram_bytes(k)
    for r, p in zip(range(0, k, rows), panels.panels):
        torch.testing.assert_close(p, whole[r:r + p.shape[0], r:], rtol=1e-6, atol=1e-3)
    if rows % 32 == 0:  # the clip search's diagonal blocks (here with the scale folded in)
        s = torch.rand(k) + 0.5
        torch.testing.assert_close(awq.diag_blocks(panels, 10, s), awq.diag_blocks(whole, 10, s), rtol=1e-6,
                                   atol=1e-3)
    dw = torch.randn(50, k) * 0.01
    torch.testing.assert_close(awq.gram_loss(dw, panels), awq.gram_loss(dw, whole), rtol=1e-5, atol=0)
    # the scale search: the same losses up to rounding, the same alpha
    w = torch.randn(96, k).bfloat16()
    x_mean = torch.cat(xs).float().abs().mean(0) * (torch.rand(k) * 4 + 0.1)
    grid = awq.candidates(awq.SearchConfig())
    s1, a1, l1 = awq.search_scale(x_mean, None, lambda s: awq.scaled_gram_error(w, s, cfg, whole), grid)
    s2, a2, l2 = awq.search_scale(x_mean, None, lambda s: awq.scaled_gram_error(w, s, cfg, panels, 320 * 40),
                                  grid)
    assert a1 == a2 and torch.equal(s1, s2)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=0)


def test_damp_adds_the_mean_diagonal_whole_and_paneled():
    torch.manual_seed(0)
    k = 96
    x = torch.randn(50, k) * torch.linspace(0.1, 3, k)
    whole, panels = torch.zeros(k, k), awq.panel_gram(k, 32)
    awq.gram_add_(whole, x)
    awq.gram_add_(panels, x)
    ref = whole + 0.5 * whole.diagonal().mean() * torch.eye(k)
    assert awq.damp_(whole, 0.5) is whole
    torch.testing.assert_close(whole, ref)
    awq.damp_(panels, 0.5)
    for r, p in zip(range(0, k, 32), panels.panels):  # the diagonal moved, nothing else
        torch.testing.assert_close(p, ref[r:r + p.shape[0], r:], rtol=1e-6, atol=1e-4)
    before = whole.clone()
    assert torch.equal(awq.damp_(whole, 0.0), before)


def test_panel_gram_sizes():
    # 70B down_proj: about half the whole Gram; 7B down_proj (0.45 GiB) is within its 0.5 GiB cache: whole
    assert awq.gram_bytes(28672, 1024) / 2**30 < 1.59 and awq.gram_bytes(28672) / 2**30 > 3.06
    assert not Q.paneled(11008, 128 * 512 * 4096 * 2, 1024) and Q.paneled(28672, 128 * 512 * 8192 * 2, 1024)
    assert not Q.paneled(28672, 0, None)  # per-channel groups: the clip search needs the whole Gram


def test_paneled_grams_change_last_bits_only(monkeypatch):
    """Every Gram paneled (4 panels of 32 rows for the 128-wide down_proj input): the same alphas in every
    group, the weights equal but for a few rounding flips."""
    monkeypatch.setattr(Q, "PANEL_ROWS", 32)
    made = []
    monkeypatch.setattr(awq, "panel_gram", lambda k, rows, device=None: made.append((k, rows)) or
                        awq.PanelGram([torch.zeros(min(rows, k - r), k - r, device=device)
                                       for r in range(0, k, rows)], rows))
    one, rep1 = _run("llama", SearchConfig(), float("inf"))
    assert not made
    m = tiny_model("llama")
    rows = torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(1))
    rep2 = Q.quantize_model(m, arch_for(m.config), QuantConfig(4, 32), rows, SearchConfig(), device="cpu",
                            dtype=torch.bfloat16, batch_size=4, progress=False, gram_whole_max=0)
    many = m.state_dict()
    assert (128, 32) in made and (64, 32) in made
    for r1, r2 in zip(rep1, rep2):
        assert {k: v["alpha"] for k, v in r1["groups"].items()} == \
            {k: v["alpha"] for k, v in r2["groups"].items()}
        for k, v in r1["groups"].items():
            assert abs(r2["groups"][k]["loss"] - v["loss"]) <= 1e-4 * v["loss"], k
    for k in one:
        same = (one[k] == many[k]).float().mean()
        assert same > 0.99, (k, same)
