"""Building the engine's Transformer from a checkpoint folder (full precision or AWQ GEMM, ours or another
tool's), from a transformers model in memory, or with random weights of a given shape (benchmarks).

Names: Hugging Face's `model.layers.{i}.self_attn.q_proj.weight` etc. map to the engine's fused modules
(`layers.{i}.attn.wqkv`); a quantized linear has `.qweight/.qzeros/.scales` instead of `.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..kernels import PackedInt4
from .model import Config, Int4Linear, Transformer, Unsupported, inv_freq

# engine linear -> the HF linears fused into it (rows concatenated in this order)
LINEARS = {
    "attn.wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "attn.wo": ["self_attn.o_proj"],
    "w13": ["mlp.gate_proj", "mlp.up_proj"],
    "w2": ["mlp.down_proj"],
}
NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
SANDWICH_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                  "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm",
                  "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}


class Source:
    """Tensors by HF name: safetensors files of a folder (read lazily) or a dict."""

    def __init__(self, tensors: dict | None = None, folder: Path | None = None):
        self.tensors, self.files = tensors, {}
        if folder is not None:
            idx = folder / "model.safetensors.index.json"
            names = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() \
                else [f.name for f in sorted(folder.glob("*.safetensors"))]
            for name in names:
                if name == "salience_search.safetensors":
                    continue
                with safe_open(folder / name, "pt") as f:
                    for k in f.keys():
                        self.files[k] = folder / name
            if not self.files:
                raise FileNotFoundError(f"{folder}: no safetensors weights")

    def __contains__(self, k):
        return k in (self.tensors if self.tensors is not None else self.files)

    def get(self, k, device="cpu") -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[k].to(device)
        with safe_open(self.files[k], "pt", device=str(device)) as f:
            return f.get_tensor(k)


def _linear(src: Source, names: list[str], group_size: int | None, device, dtype) -> nn.Module:
    """Fuse the HF linears `names` (rows in order) into one dense or 4-bit linear on device."""
    quant = [n + ".qweight" in src for n in names]
    bias = [n + ".bias" in src for n in names]
    if any(bias) and not all(bias):
        raise Unsupported(f"bias on some of {names} only")
    b = torch.cat([src.get(n + ".bias", device) for n in names]).to(dtype) if all(bias) else None
    if all(quant):
        if group_size is None:
            raise Unsupported(f"{names[0]} is quantized but config.json has no quantization_config")
        # AWQ GEMM keeps N last in all three tensors: concatenating along dim 1 concatenates output rows
        qw, qz, sc = (torch.cat([src.get(n + suffix) for n in names], dim=1)
                      for suffix in (".qweight", ".qzeros", ".scales"))
        return Int4Linear(PackedInt4.from_awq(qw, qz, sc, group_size, device=device, dtype=dtype), b)
    if any(quant):
        raise Unsupported(f"{names} mix 4-bit and full-precision weights: cannot fuse them")
    w = torch.cat([src.get(n + ".weight", device) for n in names]).to(dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def _param(t: torch.Tensor, dtype) -> nn.Parameter:
    return nn.Parameter(t.to(dtype), requires_grad=False)


def _set(model: nn.Module, name: str, module_or_param):
    parent, _, leaf = name.rpartition(".")
    mod = model.get_submodule(parent) if parent else model
    if isinstance(module_or_param, nn.Parameter):
        mod._parameters[leaf] = module_or_param
    else:
        setattr(mod, leaf, module_or_param)


def _finish(model: Transformer, device) -> Transformer:
    """Recompute the non-persistent buffers (built on meta) and check nothing is left on meta."""
    for key, rp in model.c.ropes.items():
        model.register_buffer(f"inv_freq_{key}", inv_freq(rp, model.c.head_dim).to(device), persistent=False)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise Unsupported(f"tensors missing from the checkpoint for {left[:4]}")
    return model.eval()


def build(c: Config, src: Source, group_size: int | None, device="cpu", dtype=torch.float16,
          prefix: str = "model.") -> Transformer:
    """The engine's Transformer from HF-named tensors (dense or AWQ GEMM)."""
    with torch.device("meta"):
        model = Transformer(c)
    norms = SANDWICH_NORMS if c.sandwich else NORMS
    for i in range(c.n_layers):
        hf = f"{prefix}layers.{i}."
        for ours, theirs in LINEARS.items():
            _set(model, f"layers.{i}.{ours}", _linear(src, [hf + n for n in theirs], group_size, device, dtype))
        for ours, theirs in norms.items():
            if ours.startswith("attn.") and not c.qk_norm:
                continue
            _set(model, f"layers.{i}.{ours}.weight", _param(src.get(hf + theirs + ".weight", device), dtype))
    model.embed.weight = _param(src.get(prefix + "embed_tokens.weight", device), dtype)
    model.norm.weight = _param(src.get(prefix + "norm.weight", device), dtype)
    if "lm_head.weight" in src or "lm_head.qweight" in src:
        model.output = _linear(src, ["lm_head"], group_size, device, dtype)
    elif c.tie:
        model.output.weight = model.embed.weight
    else:
        raise Unsupported("no lm_head weights and tie_word_embeddings is false")
    return _finish(model, device)


def quant_group_size(hf_config) -> int | None:
    """The group size of an AWQ GEMM checkpoint's quantization_config, None when not quantized."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "awq" or str(qc.get("version", "gemm")).lower() != "gemm" \
            or qc.get("bits", 4) != 4 or not qc.get("zero_point", True):
        raise Unsupported(f"quantization_config {qc} (engine: awq, gemm, 4-bit, zero point)")
    return qc.get("group_size", 128)


def from_folder(folder: Path, device="cpu", dtype=torch.float16) -> Transformer:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(folder)
    c = Config.from_hf(hf)
    return build(c, Source(folder=Path(folder)), quant_group_size(hf), device, dtype)


def from_hf_model(m, device="cpu", dtype=None) -> Transformer:
    """From a transformers model in memory (full precision; tests and the fp baseline)."""
    c = Config.from_hf(m.config)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    return build(c, Source(tensors=sd), None, device, dtype or m.dtype)


# ---- random weights with real shapes (benchmarks: a 4-bit model's speed does not depend on its values)

SHAPES = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),  # smoke tests
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
}


def hf_config(shape: str):
    from transformers import AutoConfig

    kw = dict(SHAPES[shape])
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def random_awq(k: int, n: int, group_size: int, device, gen=None) -> tuple:
    """Random AWQ GEMM tensors (qweight [K, N/8], qzeros [G, N/8], scales fp16 [G, N]), codes uniform."""
    g = k // group_size
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), dtype=torch.int32, device=device, generator=gen)
    qz = torch.full((g, n // 8), 0x88888888 - 2 ** 32, dtype=torch.int32, device=device)  # zero 8
    sc = (torch.rand(g, n, device=device, generator=gen) * 2e-3 + 1e-3).half()
    return qw, qz, sc


def random_tensors(c: Config, group_size: int | None, device, dtype, seed: int = 0) -> dict:
    """HF-named random tensors for config c; linears as AWQ GEMM tensors when group_size is set."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hd = c.head_dim
    lin = {"self_attn.q_proj": (c.dim, c.n_heads * hd), "self_attn.k_proj": (c.dim, c.n_kv * hd),
           "self_attn.v_proj": (c.dim, c.n_kv * hd), "self_attn.o_proj": (c.n_heads * hd, c.dim),
           "mlp.gate_proj": (c.dim, c.ffn), "mlp.up_proj": (c.dim, c.ffn), "mlp.down_proj": (c.ffn, c.dim)}
    t = {}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        for name, (k, n) in lin.items():
            if group_size:
                qw, qz, sc = random_awq(k, n, group_size, device, gen)
                t[p + name + ".qweight"], t[p + name + ".qzeros"], t[p + name + ".scales"] = qw, qz, sc
            else:
                t[p + name + ".weight"] = (torch.randn(n, k, device=device, generator=gen, dtype=dtype)
                                           * k ** -0.5)
        for name in ("input_layernorm", "post_attention_layernorm"):
            t[p + name + ".weight"] = torch.ones(c.dim, device=device, dtype=dtype)
    t["model.embed_tokens.weight"] = torch.randn(c.vocab, c.dim, device=device, generator=gen, dtype=dtype)
    t["model.norm.weight"] = torch.ones(c.dim, device=device, dtype=dtype)
    t["lm_head.weight"] = torch.randn(c.vocab, c.dim, device=device, generator=gen, dtype=dtype) * c.dim ** -0.5
    return t


def random_model(shape: str, group_size: int | None, device="cuda", dtype=torch.float16) -> Transformer:
    """A Llama-shaped engine model with random weights (4-bit when group_size is set), built on device."""
    c = Config.from_hf(hf_config(shape))
    t = random_tensors(c, group_size, device, dtype)
    return build(c, Source(tensors=t), group_size, device, dtype)
