"""Structure discovery: on every architecture of the table it finds the table's groups; a made-up
architecture defined here quantizes with no table entry."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import CONFIGS, VLM_CONFIGS, perturb_norms, tiny_model, tiny_tokenizer, tiny_vlm
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from salience import api, moe
from salience.arch import (
    ARCHS,
    Arch,
    UnsupportedArchitecture,
    arch_for,
    arch_from_dict,
    arch_to_dict,
    get_module,
)
from salience.checkpoint import ARCH, load_quantized
from salience.cli import main
from salience.discover import arch_to_python, collapse, discover, group_key
from salience.nn import QuantLinear
from salience.quant import QuantConfig
from salience.quantize import _group_applies, block_groups


def _table_keys(model, arch: Arch):
    """The table's groups that apply to some block of `model`, wildcards for expert indices."""
    keys = set()
    for block in get_module(model, arch.layers):
        moe.unfuse(block, arch)
        applied = [g for g in block_groups(block, arch) if _group_applies(block, g)]
        keys |= {group_key(g) for g in collapse(applied)}
    return keys


@pytest.mark.parametrize("model_type", sorted(CONFIGS) + [f"vlm:{k}" for k in sorted(VLM_CONFIGS)])
def test_discovery_finds_the_table(model_type):
    if model_type.startswith("vlm:"):
        m = tiny_vlm(model_type[4:])
    else:
        m = tiny_model(model_type)
    arch = arch_for(m.config)
    found = discover(m, experts=arch.experts)  # experts: the table's names for the unfused linears
    assert found.layers == arch.layers
    assert {group_key(g) for g in found.groups} == _table_keys(m, arch)
    assert found.norm_plus_one == arch.norm_plus_one
    assert set(found.not_convert) <= set(arch.not_convert)


# ---- a made-up architecture: RMS norms computing x * (1 + w); norm -> q and fused kv; v half of kv ->
# proj (attention by hand); norm -> fused [gate; up] -> SwiGLU -> out. No entry in the table.

class _Norm1p(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(h) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class _Attn(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(h, h)
        self.wkv = nn.Linear(h, 2 * h)
        self.proj = nn.Linear(h, h)

    def forward(self, x):
        b, t, h = x.shape
        q = self.wq(x)
        k, v = self.wkv(x).chunk(2, dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, h))


class _Block(nn.Module):
    def __init__(self, h=64, heads=4, f=128, mixed_norms=False):
        super().__init__()
        self.ln_a = nn.LayerNorm(h) if mixed_norms else _Norm1p(h)
        self.attn = _Attn(h, heads)
        self.ln_b = _Norm1p(h)
        self.ffn = nn.ModuleDict({"fc_in": nn.Linear(h, 2 * f, bias=False),
                                  "fc_out": nn.Linear(f, h, bias=False)})

    def forward(self, x, **kwargs):
        x = x + self.attn(self.ln_a(x))
        g, u = self.ffn["fc_in"](self.ln_b(x)).chunk(2, dim=-1)
        return x + self.ffn["fc_out"](F.silu(g) * u)


class _Trunk(nn.Module):
    def __init__(self, vocab=300, h=64, n=2, mixed_norms=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(_Block(h, mixed_norms=mixed_norms) for _ in range(n))
        self.ln_f = nn.LayerNorm(h)

    def get_input_embeddings(self):
        return self.wte

    def forward(self, input_ids, **kwargs):
        x = self.wte(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x)


class ToyLM(nn.Module):
    def __init__(self, mixed_norms=False):
        super().__init__()
        self.trunk = _Trunk(mixed_norms=mixed_norms)
        self.head = nn.Linear(64, 300, bias=False)

    @property
    def base_model(self):
        return self.trunk

    def get_input_embeddings(self):
        return self.trunk.wte

    def forward(self, input_ids):
        return self.head(self.trunk(input_ids))


def test_made_up_architecture_discovered_and_quantized():
    torch.manual_seed(0)
    m = ToyLM().eval()
    perturb_norms(m)
    with torch.no_grad():
        m.trunk.wte.weight[:, :3] *= 30  # salient channels: AWQ must beat RTN
    arch = discover(m)
    print(arch_to_python(arch, "toy"))
    assert arch.layers == "trunk.blocks" and arch.norm_plus_one
    assert {group_key(g) for g in arch.groups} == {
        ("ln_a", frozenset({"attn.wq", "attn.wkv"}), "attn", None, frozenset()),
        ("attn.wkv", frozenset({"attn.proj"}), "attn.proj", (1, 2), frozenset()),  # v half of [k; v]
        ("ln_b", frozenset({"ffn.fc_in"}), "ffn.fc_in", None, frozenset()),  # the ModuleDict is never called
        ("ffn.fc_in", frozenset({"ffn.fc_out"}), "ffn.fc_out", (1, 2), frozenset()),  # up half of [gate; up]
    }
    ids = torch.randint(0, 300, (16, 32))
    with torch.no_grad():
        ref = m(ids)
    errs = {}
    for method in ("rtn", "awq"):
        q = api.clone(m)
        reports = api.fake_quantize(q, QuantConfig(4, 32), method, ids if method == "awq" else None,
                                    device="cpu", dtype=torch.float32, progress=False, arch=arch)
        with torch.no_grad():
            errs[method] = float(((q(ids) - ref) ** 2).mean())
    assert len(reports[0]["groups"]) == len(arch.groups)
    assert errs["awq"] < errs["rtn"]


def test_norms_folding_differently_are_refused():
    with pytest.raises(ValueError, match="norms fold differently"):
        discover(ToyLM(mixed_norms=True).eval())


def test_entry_round_trips_as_json_and_python():
    arch = ARCHS["qwen2_moe"]
    assert arch_from_dict(arch_to_dict(arch)) == arch
    from salience.arch import Experts, ScaleGroup  # noqa: F401  (names the printed entry uses)
    code = arch_to_python(arch, "qwen2_moe")
    entry = eval("{" + code + "}")["qwen2_moe"]
    assert (entry.groups, entry.experts, entry.not_convert) == (arch.groups, arch.experts, arch.not_convert)


# ---- the same made-up blocks as a Hugging Face model (registered with the auto classes, saved to a folder):
# the command line end to end, discover -> JSON -> quantize --arch -> reload

class ToyConfig(transformers.PretrainedConfig):
    model_type = "salience_toy"

    def __init__(self, vocab_size=320, hidden_size=64, num_hidden_layers=2, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        super().__init__(**kwargs)


class _ToyPre(transformers.PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "trunk"


class ToyTrunk(_ToyPre):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(_Block(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def forward(self, input_ids, **kwargs):
        x = self.wte(input_ids)
        for b in self.blocks:
            x = b(x)
        return BaseModelOutput(last_hidden_state=x)


class ToyForCausalLM(_ToyPre):
    def __init__(self, config):
        super().__init__(config)
        self.trunk = ToyTrunk(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.trunk.wte

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.head(self.trunk(input_ids).last_hidden_state))


def test_cli_discover_then_quantize_unknown_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    if "salience_toy" not in transformers.CONFIG_MAPPING:
        transformers.AutoConfig.register("salience_toy", ToyConfig)
        transformers.AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM)
    torch.manual_seed(0)
    m = ToyForCausalLM(ToyConfig()).eval()
    with pytest.raises(UnsupportedArchitecture, match="salience discover"):
        arch_for(m.config)
    folder, entry, out = tmp_path / "toy", tmp_path / "toy-arch.json", tmp_path / "toy-awq"
    m.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"story {i}: the quick brown fox jumps over the dog." * 4 for i in range(40)))

    assert main(["discover", str(folder), "--json", str(entry)]) == 0
    printed = capsys.readouterr().out
    assert '"salience_toy": Arch(' in printed and "ScaleGroup('attn.wkv', ('attn.proj',), 'attn.proj', " \
        "prev_chunk=(1, 2))" in printed
    arch = arch_from_dict(json.loads(entry.read_text()))
    assert len(arch.groups) == 4 and arch.norm_plus_one

    assert main(["quantize", "--model", str(folder), "--arch", str(entry), "--calib", str(text),
                 "--calib-rows", "8", "--seqlen", "32", "--group-size", "32", "--dtype", "float32",
                 "--out", str(out)]) == 0
    assert arch_from_dict(json.loads((out / ARCH).read_text())) == arch
    qm, _ = load_quantized(out, dtype=torch.float32)
    assert type(qm) is ToyForCausalLM
    assert sum(isinstance(x, QuantLinear) for x in qm.modules()) == 2 * 5
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        ref, q = m(ids).logits, qm(ids).logits
    assert torch.isfinite(q).all() and ((q - ref).norm() / ref.norm()) < 0.2


def test_discovery_on_granite_finds_llamas_groups():
    """Granite (not in the table; multipliers on embeddings, attention, residuals, logits): discovery finds
    exactly Llama's groups, the entry tests/test_new_family.py adds by hand."""
    from tiny import _COMMON

    torch.manual_seed(0)
    cfg = transformers.GraniteConfig(**_COMMON, num_key_value_heads=4, residual_multiplier=0.5,
                                     embedding_multiplier=4.0, attention_multiplier=0.2, logits_scaling=2.0)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    perturb_norms(m)
    found = discover(m)
    assert {group_key(g) for g in found.groups} == {group_key(g) for g in ARCHS["llama"].groups}  # MHA: v -> o
