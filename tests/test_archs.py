"""Every architecture in the table, end to end on a tiny random config: folding is exact, AWQ quantizes,
the written checkpoint reloads to the same logits as the in-memory fake-quantized model."""

import json

import pytest
import torch
import transformers
from tiny import CONFIGS, calib_file, tiny_model, tiny_tokenizer

from salience import api, moe
from salience.arch import ARCHS, UnsupportedArchitecture, arch_for, get_module
from salience.checkpoint import INDEX, REPORT, load_quantized, not_converted
from salience.nn import QuantLinear
from salience.quant import QuantConfig
from salience.quantize import _group_applies, apply_scale, block_groups, quantizable_linears


def test_every_table_entry_has_a_tiny_config():
    assert set(CONFIGS) == set(ARCHS)


def test_unknown_architecture_lists_supported():
    cfg = transformers.BertConfig()
    with pytest.raises(UnsupportedArchitecture, match="llama.*qwen3"):
        arch_for(cfg)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_folding_scales_is_exact(model_type):
    m = tiny_model(model_type)
    arch = arch_for(m.config)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref = m(ids).logits
        taken = 0
        for block in get_module(m, arch.layers):
            moe.unfuse(block, arch)
            for g in block_groups(block, arch):
                if not _group_applies(block, g):
                    continue
                k = get_module(block, g.linears[0]).in_features
                apply_scale(block, g, torch.rand(k) * 2 + 0.25, arch.norm_plus_one)
                taken += 1
        out = m(ids).logits
    assert taken >= 2 * len(get_module(m, arch.layers))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_quantize_and_reload_same_logits(model_type, tmp_path):
    arch = ARCHS[model_type]
    dtype = getattr(torch, arch.dtype)  # compute in the checkpoint's dtype so that reload is exact
    m = tiny_model(model_type, dtype=dtype)
    tok = tiny_tokenizer()
    calib = calib_file(tmp_path)
    out = tmp_path / "ckpt"
    path, fq, _ = api.quantize(None, out, QuantConfig(4, 32), "awq", calib, n_rows=8, seqlen=32,
                               device="cpu", dtype=dtype, loaded=(m, tok), progress=False)
    assert path == out and not (tmp_path / "ckpt.partial").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": not_converted(arch, m)}
    index = json.loads((out / INDEX).read_text())
    assert any(k.endswith(".qweight") for k in index["weight_map"])
    report = json.loads((out / REPORT).read_text())
    assert len(report["blocks"]) == 2 and report["blocks"][0]["groups"]
    qm, qtok = load_quantized(out, dtype=dtype)
    packed = ("qweight", "qzeros", "scales")
    qsd = {k: v.dtype for k, v in qm.state_dict().items() if not k.endswith(packed)}
    assert qsd == {k: v.dtype for k, v in fq.state_dict().items() if k in qsd}  # fp32 routers stay fp32
    n_q = sum(isinstance(mod, QuantLinear) for mod in qm.modules())
    n_lin = sum(len(quantizable_linears(b, arch)) for b in get_module(m, arch.layers))
    assert n_q == n_lin > 0
    # the reloaded 4-bit weights are exactly the in-memory fake-quantized ones
    fq_mods = dict(fq.named_modules())
    for name, mod in qm.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.dequantized_weight(dtype), fq_mods[name].weight), name
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b = fq(ids).logits, qm(ids).logits
    assert torch.isfinite(a).all()
    if dtype == torch.bfloat16:  # the CPU int4 kernel (bf16) sums in another order than F.linear
        torch.testing.assert_close(b, a, rtol=0.02, atol=0.01)
    else:  # fp16/fp32 on the CPU: dequantize + F.linear, bit-identical
        assert torch.equal(a, b), (a - b).abs().max()
    assert qtok is not None


def test_rtn_and_awq_in_memory_differ_and_awq_is_closer(tmp_path):
    """On a model with outlier input channels AWQ's output error is below RTN's."""
    torch.manual_seed(0)
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.embed_tokens.weight[:, :3] *= 30  # salient residual channels
    ids = torch.randint(0, 300, (16, 32))
    with torch.no_grad():
        ref = m(ids).logits
    errs = {}
    for method in ("rtn", "awq"):
        q = api.clone(m)
        api.fake_quantize(q, QuantConfig(4, 32), method, ids if method == "awq" else None, device="cpu",
                          dtype=torch.float32, progress=False)
        with torch.no_grad():
            errs[method] = float(((q(ids).logits - ref) ** 2).mean())
    assert errs["awq"] < errs["rtn"]
