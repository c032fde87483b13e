"""A family the table has never seen costs one table entry and no code (issue 4).

Granite (IBM) is a Llama-shaped decoder with extra multipliers on embeddings, attention, residuals and
logits; none of them sits between a norm and the linears it feeds, so Llama's scaling groups are exact
for it. The test adds that entry at run time and quantizes, writes and reloads a tiny random Granite."""

import torch
import transformers

from salience import api, arch
from salience.checkpoint import load_quantized
from salience.nn import QuantLinear
from salience.quant import QuantConfig
from tiny import _COMMON, calib_file, perturb_norms, tiny_tokenizer


def test_unseen_family_needs_only_a_table_entry(tmp_path, monkeypatch):
    assert "granite" not in arch.ARCHS
    monkeypatch.setitem(arch.ARCHS, "granite", arch.ARCHS["llama"])  # the whole "port"
    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(**_COMMON, num_key_value_heads=2, residual_multiplier=0.5,
                                     embedding_multiplier=4.0, attention_multiplier=0.2, logits_scaling=2.0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    perturb_norms(m)
    ref = api.clone(m)
    calib = calib_file(tmp_path)
    out, fq, _ = api.quantize(None, tmp_path / "ckpt", QuantConfig(4, 32), "awq", calib, n_rows=8,
                              seqlen=32, device="cpu", dtype=torch.float16, loaded=(m, tiny_tokenizer()),
                              progress=False)
    qm, _ = load_quantized(out, dtype=torch.float16)
    assert sum(isinstance(x, QuantLinear) for x in qm.modules()) == 2 * 7
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b, r = fq(ids).logits, qm(ids).logits, ref(ids).logits
    assert torch.equal(a, b)  # fp16 on the CPU reloads bit-identically
    assert (a - r).abs().mean() < 0.2 * r.abs().mean()  # and stays close to full precision
