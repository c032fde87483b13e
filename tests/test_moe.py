"""Mixture of experts on tiny random configs: folding the shared scale into the router keeps routing exactly
as in full precision, every expert is written, experts without calibration tokens still quantize."""

import json

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model, tiny_tokenizer

from salience import api, moe
from salience.arch import ARCHS, arch_for, get_module
from salience.checkpoint import INDEX, SEARCH, load_quantized
from salience.nn import QuantLinear
from salience.quant import QuantConfig, compute_qparams, dequantize, quantize
from salience.quantize import _group_applies, apply_scale, block_groups

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]


def _routing(model, ids):
    """Top-k expert indices [T, k] of every router, by block index."""
    arch = arch_for(model.config)
    out, handles = {}, []
    for i, block in enumerate(get_module(model, arch.layers)):
        router = getattr(block.mlp, "gate", None)
        if router is None or isinstance(router, torch.nn.Linear):
            continue  # dense layer
        handles.append(router.register_forward_hook(
            lambda m, a, o, i=i: out.__setitem__(i, o[2].sort(-1)[0])))  # o = (logits, weights, indices)
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


def _calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(f"paragraph {i}: the fox and the dog run in the hills. " * 3 for i in range(40)))
    return str(p)


@pytest.mark.parametrize("model_type", MOE)
@pytest.mark.parametrize("compensate", [True, False])
def test_routing_unchanged_by_folding(model_type, compensate):
    """Random positive scales folded through the table's groups: same routing on every token, same logits.
    Control: without compensating the router, routing changes (the flaw this fixes)."""
    m = tiny_model(model_type)
    arch = arch_for(m.config)
    ids = torch.randint(0, 300, (4, 32))
    ref = _routing(m, ids)
    with torch.no_grad():
        ref_logits = m(ids).logits
        torch.manual_seed(1)
        for block in get_module(m, arch.layers):
            moe.unfuse(block, arch)
            for g in block_groups(block, arch):
                if not _group_applies(block, g):
                    continue
                if not compensate:
                    g = type(g)(g.prev, g.linears, g.inspect, g.prev_chunk, g.optional, ())
                k = get_module(block, g.linears[0]).in_features
                apply_scale(block, g, torch.rand(k) * 8 + 0.05, arch.norm_plus_one)
        out = _routing(m, ids)
        logits = m(ids).logits
    assert set(out) == set(ref) and ref
    same = all(torch.equal(out[i], ref[i]) for i in ref)
    if compensate:
        assert same
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    else:
        assert not same


@pytest.mark.parametrize("model_type", MOE)
def test_driver_compensates_router_and_writes_every_expert(model_type, tmp_path):
    """The written router is the original router with its columns multiplied by the searched scale (so its
    logits are unchanged in full precision), it stays 16-bit, and every expert of every MoE block is a
    quantized linear in the checkpoint."""
    m = tiny_model(model_type)
    arch = ARCHS[model_type]
    router_w = {i: b.mlp.gate.weight.detach().clone() for i, b in enumerate(m.model.layers)
                if hasattr(b.mlp, "experts")}  # MoE layers (not the dense ones)
    n_exp = next(b.mlp.experts.num_experts for b in m.model.layers if hasattr(b.mlp, "experts"))
    out = tmp_path / "ckpt"
    api.quantize(None, out, QuantConfig(4, 32), "awq", _calib(tmp_path), n_rows=8, seqlen=32, device="cpu",
                 dtype=torch.float32, loaded=(m, tiny_tokenizer()), progress=False)
    keys = json.loads((out / INDEX).read_text())["weight_map"]
    e = arch.experts
    with safe_open(out / SEARCH, "pt") as sf:
        search = {k: sf.get_tensor(k) for k in sf.keys()}
    shards = {f for f in keys.values()}
    tensors = {}
    for f in shards:
        with safe_open(out / f, "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert router_w
    mlp = "block_sparse_moe" if model_type == "mixtral" else "mlp"  # Mixtral's published (and vLLM's) names
    for i, w0 in router_w.items():
        p = f"model.layers.{i}.{mlp}"
        for x in range(n_exp):
            for proj in (e.gate, e.up, e.down):
                for t in ("qweight", "qzeros", "scales"):
                    assert f"{p}.experts.{x}.{proj}.{t}" in keys
        assert f"{p}.gate.weight" in keys and f"{p}.gate.qweight" not in keys
        [s_key] = [k for k in search if k.startswith(f"model.layers.{i}.scale.post_attention_layernorm->")]
        s = search[s_key]
        stored = tensors[f"{p}.gate.weight"]  # 16-bit, or fp32 where the class keeps the router in fp32
        assert stored.dtype == (torch.float32 if model_type == "deepseek_v3" else torch.float16)
        torch.testing.assert_close(stored, (w0 * s[None, :]).to(stored.dtype))
    cfg = json.loads((out / "config.json").read_text())
    # full names of the routers (and shared-expert gates) of the MoE layers only
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["lm_head"] + [
        f"model.layers.{i}.{n.replace('mlp.', mlp + '.')}" for i in router_w for n in arch.not_convert]
    # no quantized linear is excluded by any loader's rule: transformers (prefix/suffix), vLLM and AutoAWQ
    # (substring)
    from transformers.quantizers.quantizers_utils import should_convert_module
    skip = cfg["quantization_config"]["modules_to_not_convert"]
    for name in (k[: -len(".qweight")] for k in keys if k.endswith(".qweight")):
        assert should_convert_module(name, skip) and not any(x in name for x in skip), name
    for name in skip[1:]:  # and every listed router is excluded by both rules
        assert not should_convert_module(name, skip) and f"{name}.weight" in keys
    if model_type == "qwen2_moe":  # the dense layer 1 and the shared expert are quantized too
        assert "model.layers.1.mlp.down_proj.qweight" in keys
        assert "model.layers.0.mlp.shared_expert.down_proj.qweight" in keys
        assert "model.layers.0.mlp.shared_expert_gate.weight" in keys


def test_expert_without_tokens_quantizes_from_weights_alone(tmp_path):
    """A router that never picks experts 4..7: they are written anyway (RTN of their weights, their
    down_proj untouched by any scale), with a warning naming them; the checkpoint reloads to the same
    logits as the fake-quantized model."""
    m = tiny_model("qwen3_moe")
    with torch.no_grad():
        for b in m.model.layers:
            w = b.mlp.gate.weight  # [8, H]: logits of 0/1 and 2/3 are +-(x.d): one of each pair is > 0 = 4..7
            d1, d2 = torch.randn(2, w.shape[1])
            w.zero_()
            w[0], w[1], w[2], w[3] = d1, -d1, d2, -d2  # small logits: softmax must not underflow to ties
    down0 = {i: b.mlp.experts.down_proj[5].detach().clone() for i, b in enumerate(m.model.layers)}
    out = tmp_path / "ckpt"
    qcfg = QuantConfig(4, 32)
    with pytest.warns(UserWarning, match=r"no calibration token reached .*mlp\.experts\.4\.down_proj"):
        _, fq, _ = api.quantize(None, out, qcfg, "awq", _calib(tmp_path), n_rows=8, seqlen=32, device="cpu",
                                dtype=torch.float32, loaded=(m, tiny_tokenizer()), progress=False)
    report = json.loads((out / "salience_report.json").read_text())
    for r in report["blocks"]:
        assert {f"mlp.experts.{x}.{p}" for x in range(4, 8) for p in ("gate_proj", "up_proj", "down_proj")} \
            <= set(r["no_calibration_tokens"])
    qm, _ = load_quantized(out, dtype=torch.float32)
    for i, w in down0.items():
        q = qm.model.layers[i].mlp.experts[5].down_proj
        assert isinstance(q, QuantLinear)
        scales, zeros = compute_qparams(w, qcfg)
        codes, scales, zeros = quantize(w, qcfg, scales.half().float(), zeros)
        assert torch.equal(q.dequantized_weight(torch.float32), dequantize(codes, scales, zeros, qcfg))
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        # the checkpoint's router and norms are fp16 (the in-memory model computed in fp32)
        torch.testing.assert_close(qm(ids).logits, fq(ids).logits, atol=2e-3, rtol=1e-2)
