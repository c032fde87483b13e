"""Building the engine's Transformer from a checkpoint folder (full precision or AWQ GEMM, ours or another
tool's), from a transformers model in memory, or with random weights of a given shape (benchmarks).

Names: Hugging Face's `model.layers.{i}.self_attn.q_proj.weight` etc. map to the engine's fused modules
(`layers.{i}.attn.wqkv`); a quantized linear has `.qweight/.qzeros/.scales` instead of `.weight`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import CheckpointError, check_finite, check_quant_config, tensor_shapes
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
    """Tensors by HF name: safetensors files of a folder (read lazily; headers checked up front, every tensor
    checked for NaN/inf as it is read) or a dict."""

    def __init__(self, tensors: dict | None = None, folder: Path | None = None):
        self.tensors, self.folder = tensors, folder
        self.files = tensor_shapes(folder) if folder is not None else {}  # name -> (file, shape)
        self.used: set[str] = set()

    def unused(self) -> list[str]:
        """Tensors nobody read (rotary caches some checkpoints carry aside)."""
        names = self.tensors if self.tensors is not None else self.files
        return sorted(k for k in names if k not in self.used and not k.endswith("rotary_emb.inv_freq"))

    def __contains__(self, k):
        return k in (self.tensors if self.tensors is not None else self.files)

    def where(self, k) -> str:
        return str(self.files[k][0]) if k in self.files else "the model in memory"

    def shape(self, k) -> tuple:
        self._need(k)
        return tuple(self.tensors[k].shape) if self.tensors is not None else self.files[k][1]

    def _need(self, k):
        if k not in self:
            raise CheckpointError(f"{self.folder or 'the model in memory'}: tensor {k} is missing")

    def get(self, k, device="cpu") -> torch.Tensor:
        self._need(k)
        self.used.add(k)
        if self.tensors is not None:
            return self.tensors[k].to(device)
        with safe_open(self.files[k][0], "pt", device=str(device)) as f:
            return check_finite(k, f.get_tensor(k), self.files[k][0])

    def expect(self, k, shape: tuple):
        if self.shape(k) != tuple(shape):
            raise CheckpointError(f"{self.where(k)}: tensor {k} has shape {self.shape(k)}, config.json implies "
                                  f"{tuple(shape)}")


def _check_linear(src: Source, names: list[str], quant: bool, group_size: int | None, k: int, n: int):
    """The shapes of the HF linears fused into one [k -> n] linear, against config.json."""
    outs = []
    for name in names:
        if quant:
            qw = src.shape(name + ".qweight")
            if len(qw) != 2 or qw[0] != k:
                src.expect(name + ".qweight", (k, *qw[1:]) if len(qw) == 2 else (k, "N/8"))
            g = -(-k // group_size)
            src.expect(name + ".scales", (g, qw[1] * 8))
            src.expect(name + ".qzeros", (g, qw[1]))
            outs.append(qw[1] * 8)
        else:
            w = src.shape(name + ".weight")
            if len(w) != 2 or w[1] != k:
                src.expect(name + ".weight", (w[0] if w else "N", k))
            outs.append(w[0])
    if sum(outs) != n:
        raise CheckpointError(f"{src.where(names[0] + ('.qweight' if quant else '.weight'))}: {names} have "
                              f"{sum(outs)} output rows together, config.json implies {n}")
    for name in names:
        if name + ".bias" in src:
            src.expect(name + ".bias", (outs[names.index(name)],))


def _floating(src: Source, k: str, device) -> torch.Tensor:
    t = src.get(k, device)
    if not t.is_floating_point():
        raise CheckpointError(f"{src.where(k)}: tensor {k} has dtype {t.dtype}, expected floating point")
    return t


def _awq_dtype(src: Source, k: str) -> torch.Tensor:
    """An AWQ GEMM tensor, its dtype checked: int32 words for qweight/qzeros, floating scales."""
    t = src.get(k)
    ok = t.is_floating_point() if k.endswith(".scales") else t.dtype == torch.int32
    if not ok:
        raise CheckpointError(f"{src.where(k)}: tensor {k} has dtype {t.dtype}, AWQ GEMM stores "
                              f"{'floating-point scales' if k.endswith('.scales') else 'int32 words'}")
    return t


def _linear(src: Source, names: list[str], group_size: int | None, device, dtype, k: int, n: int) -> nn.Module:
    """Fuse the HF linears `names` (rows in order) into one dense or 4-bit [k -> n] linear on device."""
    quant = [n + ".qweight" in src for n in names]
    bias = [n + ".bias" in src for n in names]
    if any(bias) and not all(bias):
        raise Unsupported(f"bias on some of {names} only")
    if all(quant) and group_size is None:
        raise CheckpointError(f"{src.where(names[0] + '.qweight')}: {names[0]} is quantized but config.json has "
                              "no quantization_config")
    if any(quant) and not all(quant):
        raise Unsupported(f"{names} mix 4-bit and full-precision weights: cannot fuse them")
    _check_linear(src, names, all(quant), group_size, k, n)
    b = torch.cat([_floating(src, nm + ".bias", device) for nm in names]).to(dtype) if all(bias) else None
    if all(quant):
        # AWQ GEMM keeps N last in all three tensors: concatenating along dim 1 concatenates output rows
        qw, qz, sc = (torch.cat([_awq_dtype(src, n + suffix) for n in names], dim=1)
                      for suffix in (".qweight", ".qzeros", ".scales"))
        return Int4Linear(PackedInt4.from_awq(qw, qz, sc, group_size, device=device, dtype=dtype), b)
    w = torch.cat([_floating(src, n + ".weight", device) for n in names]).to(dtype)
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

    def linear(ours, theirs):  # shapes [k -> n] from the meta model, i.e. from config.json
        meta = model.get_submodule(ours)
        _set(model, ours, _linear(src, theirs, group_size, device, dtype, meta.in_features, meta.out_features))

    def param(ours, theirs):
        src.expect(theirs, model.get_parameter(ours).shape)
        _set(model, ours, _param(_floating(src, theirs, device), dtype))

    for i in range(c.n_layers):
        hf = f"{prefix}layers.{i}."
        for ours, theirs in LINEARS.items():
            linear(f"layers.{i}.{ours}", [hf + n for n in theirs])
        for ours, theirs in norms.items():
            if ours.startswith("attn.") and not c.qk_norm:
                continue
            param(f"layers.{i}.{ours}.weight", hf + theirs + ".weight")
    param("embed.weight", prefix + "embed_tokens.weight")
    param("norm.weight", prefix + "norm.weight")
    if "lm_head.weight" in src or "lm_head.qweight" in src:
        linear("output", ["lm_head"])
    elif c.tie:
        model.output.weight = model.embed.weight
    else:
        raise Unsupported("no lm_head weights and tie_word_embeddings is false")
    left = src.unused()
    if left:  # weights the decoder has no place for: running without them would be wrong, not slower
        raise Unsupported(f"{len(left)} tensor(s) the engine's decoder does not use, e.g. {left[:3]}")
    return _finish(model, device)


def from_folder(folder: Path, device="cpu", dtype=torch.float16) -> Transformer:
    from ..checkpoint import read_config

    hf = read_config(folder)
    c = Config.from_hf(hf)
    return build(c, Source(folder=Path(folder)), check_quant_config(hf, folder), device, dtype)


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
