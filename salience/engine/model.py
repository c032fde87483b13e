"""One compact decoder for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) and Gemma 3 text.

Architectures are data: FAMILIES holds each model_type's quirks, `Config.from_hf` reads the rest from the
checkpoint's config.json (through transformers' AutoConfig, which normalises old and new key names).
One block, pre-norm, for all of them:

    h = x + [post_attn_norm](attn(attn_norm(x)))           # gemma3: "sandwich" norms around attn and mlp
    y = h + [post_mlp_norm](mlp(mlp_norm(h)))
    attn: wqkv (fused q,k,v rows) -> [q/k RMSNorm per head] -> RoPE -> static KV cache -> SDPA -> wo
    mlp:  w13 (fused gate,up rows) -> act(gate) * up -> w2

4-bit linears: fused projections are built by concatenating the AWQ GEMM tensors of q,k,v (or gate,up)
along the output dim: qweight [K, N/8], qzeros [G, N/8] and scales [G, N] all keep N last, and AWQ packs
8 output columns per word, so concatenating words is concatenating columns (every N here is a multiple
of 8). No re-quantization, bit-exact; the kernels' repack (salience.kernels.layout) then runs once on the
fused tensors. Projections with different group sizes cannot be fused (never seen; refused clearly).

KV cache: static [B, n_kv, S, head_dim] per layer, two ways of filling it:
- one shared slot per step (`input_pos` [T]): every row writes the same slots, prompts of different
  lengths are left-padded and row b ignores slots < start[b] (its RoPE position is slot - start);
- per-row slots (`input_pos` [B, T], continuous batching): row b holds its own sequence from slot 0 and
  writes slot input_pos[b, t], so rows of different lengths decode side by side and a row can be refilled
  with a new prompt (`rows`: the cache rows a prefill writes) while the others keep their K/V.
Decode (T = 1) has fixed shapes and no host syncs either way, so it can be captured in a CUDA graph
(generate.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import PackedInt4, fuses, int4_linear
from ..kernels.attention import decode_attention
from ..kernels.reference import act_mul, rms_norm

# model_type -> quirks that config.json does not spell out. Everything else (sizes, heads, head_dim,
# eps, rope, sliding windows, biases: read from which tensors the checkpoint has) comes from the config.
FAMILIES = {
    "llama": dict(),  # also SmolLM / SmolLM2
    "mistral": dict(),  # sliding_window (if set) applies to every layer
    "qwen2": dict(),  # q,k,v biases (found in the weights)
    "qwen3": dict(qk_norm=True),  # RMSNorm over head_dim on q and k before RoPE
    "gemma3_text": dict(qk_norm=True, norm_offset=1.0, sandwich=True, embed_scale=True,
                        act="gelu_tanh"),  # norms x * (1 + w); embeddings * sqrt(dim); local/global rope
}


class Unsupported(ValueError):
    """The checkpoint needs something this decoder does not do; callers fall back to transformers."""


@dataclass
class Config:
    model_type: str
    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    ffn: int
    eps: float
    max_pos: int
    act: str = "silu"
    qk_norm: bool = False
    norm_offset: float = 0.0  # gemma: weight stored as w, applied as 1 + w
    sandwich: bool = False  # gemma3: post-attention and post-mlp norms
    embed_scale: bool = False  # gemma: embeddings * sqrt(dim)
    attn_scale: float = 0.0  # softmax scale (0: head_dim ** -0.5)
    final_softcap: float | None = None
    tie: bool = False
    windows: list = field(default_factory=list)  # per layer: sliding window (None: global)
    rope_keys: list = field(default_factory=list)  # per layer: key into ropes
    ropes: dict = field(default_factory=dict)  # key -> dict(rope_type, rope_theta, factor, ...)

    @classmethod
    def from_hf(cls, hf) -> "Config":
        """From a transformers PretrainedConfig (AutoConfig.from_pretrained(folder))."""
        mt = hf.model_type
        if mt not in FAMILIES:
            raise Unsupported(f"model_type {mt!r} has no engine entry (engine: {', '.join(FAMILIES)})")
        fam = dict(FAMILIES[mt])
        if getattr(hf, "attn_logit_softcapping", None):
            raise Unsupported("attention logit soft-capping (SDPA cannot apply it)")
        n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
        act = fam.pop("act", None) or {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(
            getattr(hf, "hidden_act", None) or getattr(hf, "hidden_activation", None))
        if act is None:
            raise Unsupported(f"activation {getattr(hf, 'hidden_act', None)!r}")
        n = hf.num_hidden_layers
        types = list(getattr(hf, "layer_types", None) or ["full_attention"] * n)
        sw = getattr(hf, "sliding_window", None)
        if mt == "mistral" and sw:
            types = ["sliding_attention"] * n
        windows = [sw if t == "sliding_attention" else None for t in types]
        # one rope per layer type where the config has several (gemma3: local 10k, global 1M base)
        per_type = _per_type_rope(hf) or getattr(hf, "rope_local_base_freq", None) is not None
        ropes, keys = {}, []
        for t in types:
            key = t if per_type else "default"
            if key not in ropes:
                ropes[key] = _rope_params(hf, t if per_type else None)
            keys.append(key)
        qpas = getattr(hf, "query_pre_attn_scalar", None)
        return cls(model_type=mt, vocab=hf.vocab_size, dim=hf.hidden_size, n_layers=n, n_heads=n_heads,
                   n_kv=getattr(hf, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
                   ffn=hf.intermediate_size, eps=hf.rms_norm_eps, max_pos=hf.max_position_embeddings,
                   act=act, attn_scale=qpas ** -0.5 if qpas else head_dim ** -0.5,
                   final_softcap=getattr(hf, "final_logit_softcapping", None),
                   tie=bool(getattr(hf, "tie_word_embeddings", False)), windows=windows, rope_keys=keys,
                   ropes=ropes, **fam)


def _per_type_rope(hf) -> bool:
    rp = getattr(hf, "rope_parameters", None)
    return isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values())


def _rope_params(hf, layer_type: str | None) -> dict:
    """transformers >= 5: config.rope_parameters (per layer type for Gemma 3); 4.x: rope_theta + rope_scaling
    (+ rope_local_base_freq for Gemma 3's sliding layers)."""
    rp = getattr(hf, "rope_parameters", None)
    if rp is None:
        if layer_type == "sliding_attention" and getattr(hf, "rope_local_base_freq", None):
            return {"rope_type": "default", "rope_theta": hf.rope_local_base_freq}
        rp = dict(getattr(hf, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rp["rope_type"] = rp.get("rope_type", rp.get("type", "default"))
    elif layer_type is not None:
        rp = rp[layer_type]
    rp = dict(rp)
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported("partial rotary embeddings")
    if rp.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise Unsupported(f"rope_type {rp['rope_type']!r} (engine: default, linear, llama3)")
    return rp


def inv_freq(rp: dict, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies [head_dim / 2] (fp32), as transformers computes them."""
    f = 1.0 / (rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        f = f / rp["factor"]
    elif kind == "llama3":  # Llama 3.1: long wavelengths slowed by `factor`, a smooth ramp in between
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        wavelen = 2 * math.pi / f
        scaled = torch.where(wavelen > old / lo, f / factor, f)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        f = torch.where(medium, smoothed, scaled)
    return f


class RMSNorm(nn.Module):
    """Holds a norm's weight; the math is `norm` below (so that it can be fused with its neighbours)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return norm(x, self.weight, self.eps, self.offset)


class Int4Linear(nn.Module):
    """A 4-bit linear in the kernels' layout for one device (built from AWQ GEMM tensors, see PackedInt4).
    Build it on its device: .to() does not move the packed weights."""

    def __init__(self, p: PackedInt4, bias: torch.Tensor | None):
        super().__init__()
        self.p = p
        self.in_features, self.out_features = p.k, p.n
        self.register_buffer("bias", bias)

    def forward(self, x, **neighbours):
        """neighbours: int4_linear's rms=, glu=, residual=, emit= (Block.fused_forward passes them)."""
        return int4_linear(x, self.p, self.bias, **neighbours)

    def fuses(self, x, glu: str | None = None) -> bool:
        """Does the kernel for x take the elementwise neighbours itself (kernels.fuses)?"""
        return fuses(self.p, x.numel() // x.shape[-1], x.dtype, glu)

    def extra_repr(self):
        return f"in={self.p.k}, out={self.p.n}, group_size={self.p.group_size}, layout={self.p.layout}"


# ---- the elementwise math between the matmuls: pure functions. Eager, each is several kernels; in
# decode on GPU they are compiled (torch.compile, one fused kernel each), since at batch 1 a 7B model's
# step is ~1300 tiny kernels otherwise, and even replayed from a CUDA graph each costs ~2 us.

norm = rms_norm  # RMSNorm (kernels/reference.py: the same math the fused M = 1 kernels use)


def residual(x, h, post_w, eps: float, offset: float):
    """x + h, or x + norm(h) with gemma3's post-attention / post-mlp norm (post_w)."""
    return x + (h if post_w is None else norm(h, post_w, eps, offset))


def residual_norm(x, h, post_w, w, eps: float, offset: float):
    """-> (x + [norm](h), norm(x + [norm](h))): the residual add and the next pre-norm in one pass."""
    x = residual(x, h, post_w, eps, offset)
    return x, norm(x, w, eps, offset)


def rotate(x, cos, sin):
    """RoPE in transformers' half-split convention. x [B, h, T, D], cos/sin [B, 1, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv_rope(qkv, cos, sin, qw, kw, n_heads: int, n_kv: int, hd: int, eps: float, offset: float):
    """qkv [B, T, (H + 2 Hkv) D] -> q [B, H, T, D], k, v [B, Hkv, T, D]; q/k norms (qw, kw) then RoPE."""
    b, t, _ = qkv.shape
    q, k, v = qkv.split([n_heads * hd, n_kv * hd, n_kv * hd], -1)
    q = q.view(b, t, n_heads, hd).transpose(1, 2)
    k = k.view(b, t, n_kv, hd).transpose(1, 2)
    v = v.view(b, t, n_kv, hd).transpose(1, 2)
    if qw is not None:
        q, k = norm(q, qw, eps, offset), norm(k, kw, eps, offset)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def qkv_rope_write(qkv, cos, sin, qw, kw, n_heads: int, n_kv: int, hd: int, eps: float, offset: float,
                   k_cache, v_cache, input_pos):
    """qkv_rope, then k and v written to the caches of rows 0..B-1 at slots input_pos: [T] (every row the
    same slots) or [B, T] (row b at its own). -> q, k, v. Compiled (GPU decode), the writes fuse into the
    RoPE kernel (inductor scatters in place: no copy of the cache)."""
    q, k, v = qkv_rope(qkv, cos, sin, qw, kw, n_heads, n_kv, hd, eps, offset)
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    b = q.shape[0]
    if input_pos.dim() == 1:
        k_cache[:b].index_copy_(2, input_pos, k)  # a view: the write lands in the cache
        v_cache[:b].index_copy_(2, input_pos, v)
    else:
        r = torch.arange(b, device=q.device)[:, None]  # [B, 1]
        # advanced indices on dims 0 and 2 put their broadcast [B, T] first: the target is [B, T, Hkv, D]
        # (not scatter_: on CPU it copied the whole cache at every call)
        k_cache[r, :, input_pos] = k.transpose(1, 2)
        v_cache[r, :, input_pos] = v.transpose(1, 2)
    return q, k, v


class Ops:
    """The functions above, as called (eager) or compiled into one kernel each (decode on GPU)."""

    NAMES = ("norm", "residual_norm", "qkv_rope", "qkv_rope_write", "act_mul")

    def __init__(self, compiled: bool):
        self.compiled = compiled
        for name in self.NAMES:
            fn = globals()[name]
            setattr(self, name, torch.compile(fn, fullgraph=True, dynamic=False) if compiled else fn)


EAGER = Ops(False)
_COMPILED = []


def compiled_ops() -> Ops:
    """One shared set of compiled ops (compilation happens at the first call, per input shapes)."""
    if not _COMPILED:
        cfg = torch._dynamo.config  # one entry per (batch size, model kind): more than the default 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED.append(Ops(True))
    return _COMPILED[0]


class Span(NamedTuple):
    """Decode attention bounds: row b's query attends to cache slots lo[b] <= s < hi[b] ([B] tensors)."""
    lo: torch.Tensor
    hi: torch.Tensor


class Attention(nn.Module):
    def __init__(self, c: Config, window: int | None):
        super().__init__()
        self.c, self.window = c, window
        self.wqkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv) * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.eps, c.norm_offset)
            self.k_norm = RMSNorm(c.head_dim, c.eps, c.norm_offset)
        self.k_cache = self.v_cache = None

    def forward(self, x, cos, sin, input_pos, mask, kv_len: int | None, ops: Ops, rows=None, qkv_kw=None,
                out_kw=None):
        """x [B, T, dim] (normed; qkv_kw / out_kw: int4_linear neighbours for wqkv / wo, Block.fused_forward);
        input_pos: cache slots, [T] (every row) or [B, T] (per row); mask
        [B, 1, g*T, S] bool (g = query heads per kv head, rows (head-in-group, token)), None (causal from
        slot 0: flash path on the fresh k, v) or a Span (decode, T = 1: the Triton decode-attention
        kernel over each row's live slots); kv_len: slots to attend to (prefill) or None (the whole
        cache); rows [B]: the cache rows x's rows go to (None: rows 0..B-1)."""
        c = self.c
        b, t, _ = x.shape
        qn, kn = (self.q_norm.weight, self.k_norm.weight) if c.qk_norm else (None, None)
        args = (self.wqkv(x, **(qkv_kw or {})), cos, sin, qn, kn, c.n_heads, c.n_kv, c.head_dim, c.eps, c.norm_offset)
        if rows is None:  # rows 0..B-1, at slots input_pos [T] or [B, T]
            q, k, v = ops.qkv_rope_write(*args, self.k_cache, self.v_cache, input_pos)
            rows = slice(0, b)
        else:  # prompts joining a running batch: cache rows `rows`, slots input_pos [T]
            q, k, v = ops.qkv_rope(*args)  # [B, H, T, D], [B, Hkv, T, D] x 2
            k, v = k.to(self.k_cache.dtype), v.to(self.v_cache.dtype)
            self.k_cache[rows[:, None], :, input_pos] = k.transpose(1, 2)  # target [B, T, Hkv, D]
            self.v_cache[rows[:, None], :, input_pos] = v.transpose(1, 2)
        g = c.n_heads // c.n_kv
        if isinstance(mask, Span):  # decode: reads the live slots once, writes [B, H * D] directly
            y = decode_attention(q[:, :, 0], self.k_cache[:, :, :kv_len], self.v_cache[:, :, :kv_len], mask.lo,
                                 mask.hi, c.attn_scale or c.head_dim ** -0.5)
            return self.wo(y[:, None], **(out_kw or {}))
        if mask is None:  # prompt from slot 0, no padding, no window to apply: causal flash attention
            if g > 1:
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.attn_scale)
        else:
            # [B, Hkv, S or kv_len, D]: views of rows 0..B-1, or copies of the joining rows
            kc, vc = self.k_cache[rows, :, :kv_len], self.v_cache[rows, :, :kv_len]
            # GQA without copying the cache: the g query heads sharing a kv head become g*T query rows
            qg = q.reshape(b, c.n_kv, g * t, c.head_dim)  # rows ordered (head-in-group, token)
            y = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=c.attn_scale)
            y = y.reshape(b, c.n_heads, t, c.head_dim)  # SDPA may return a non-contiguous layout (CUDA)
        return self.wo(y.transpose(1, 2).reshape(b, t, c.n_heads * c.head_dim), **(out_kw or {}))


class Block(nn.Module):
    def __init__(self, c: Config, window: int | None):
        super().__init__()
        self.c = c
        self.attn = Attention(c, window)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)
        self.attn_norm = RMSNorm(c.dim, c.eps, c.norm_offset)
        self.mlp_norm = RMSNorm(c.dim, c.eps, c.norm_offset)
        if c.sandwich:
            self.post_attn_norm = RMSNorm(c.dim, c.eps, c.norm_offset)
            self.post_mlp_norm = RMSNorm(c.dim, c.eps, c.norm_offset)

    def fused(self, x) -> bool:
        """Can this block run with its norms, activation and residual adds inside the 4-bit kernels (the
        CUDA GEMV at one token; kernels.fuses)? Not with Gemma's norms (weights applied as 1 + w, and
        gemma3's sandwich norms after a linear)."""
        lin = ((self.attn.wqkv, None), (self.attn.wo, None), (self.w13, self.c.act), (self.w2, None))
        return (not self.c.sandwich and not self.c.norm_offset
                and all(isinstance(m, Int4Linear) and m.fuses(x, glu) for m, glu in lin))

    def fused_forward(self, x, xw, next_w, cos, sin, input_pos, mask, kv_len, ops: Ops, rows=None):
        """One token through the block with every elementwise op inside the 4-bit GEMVs (self.fused):
            RMSNorm(x) * w @ W.T = (x * w) @ W.T * rsqrt(mean(x^2) + eps),
        so each linear that follows a pre-norm takes xw = x * w, emitted by the linear before it, and scales
        its output by the RMS of x (int4_linear's emit= and rms=); w13 stores act(gate) * up (glu=), wo and
        w2 add the residual. x [B, T, dim] the residual stream, xw = x * attn_norm.weight (None: computed
        here); next_w: the next pre-norm's weight (None after the last block). -> (x, x * next_w or None).
        Per block: 4 GEMVs, RoPE and the attention; no norm or activation kernel."""
        c = self.c
        if xw is None:
            xw = x * self.attn_norm.weight
        x, xw = self.attn(xw, cos, sin, input_pos, mask, kv_len, ops, rows, qkv_kw=dict(rms=(x, c.eps)),
                          out_kw=dict(residual=x, emit=self.mlp_norm.weight))
        h = self.w13(xw, rms=(x, c.eps), glu=c.act)
        if next_w is None:
            return self.w2(h, residual=x), None
        return self.w2(h, residual=x, emit=next_w)

    def forward(self, x, pending, cos, sin, input_pos, mask, kv_len, ops: Ops, rows=None):
        """x [B, T, dim] the residual stream, pending the previous block's MLP output still to be added to it
        (h, post_w), or None. -> (x, pending) of this block: its own residual add is left to whoever norms
        next (the next block's attn_norm, or the final norm), so that the add and the norm are one kernel
        (at batch 1 a 7B decode step has 32 fewer launches)."""
        c = self.c
        eps, off = c.eps, c.norm_offset
        pa, pm = (self.post_attn_norm.weight, self.post_mlp_norm.weight) if c.sandwich else (None, None)
        if pending is None:
            xn = ops.norm(x, self.attn_norm.weight, eps, off)
        else:
            x, xn = ops.residual_norm(x, *pending, self.attn_norm.weight, eps, off)
        h = self.attn(xn, cos, sin, input_pos, mask, kv_len, ops, rows)
        x, hn = ops.residual_norm(x, h, pa, self.mlp_norm.weight, eps, off)
        return x, (self.w2(ops.act_mul(self.w13(hn), c.act)), pm)


class Transformer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c, w) for w in c.windows)
        self.norm = RMSNorm(c.dim, c.eps, c.norm_offset)
        self.output = nn.Linear(c.dim, c.vocab, bias=False)
        for key, rp in c.ropes.items():
            self.register_buffer(f"inv_freq_{key}", inv_freq(rp, c.head_dim), persistent=False)
        self.batch = self.max_seq = 0
        self.cache_version = 0  # bumped on every reallocation: CUDA graphs captured on older caches are stale

    @property
    def device(self):
        return self.embed.weight.device

    # fuse the norms, activation and residual adds into the 4-bit kernels where they can (Block.forward)
    fuse_linears: bool = True

    # None: decode attention through the Triton kernel (kernels/attention.py) on CUDA in fp16/bf16 with a
    # power-of-two head_dim, SDPA otherwise; True/False force it (tests run it in Triton's interpreter)
    attn_kernel: bool | None = None

    def decode_kernel(self, x) -> bool:
        hd = self.c.head_dim
        if self.attn_kernel is not None:
            return self.attn_kernel
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and hd >= 16 and hd & (hd - 1) == 0

    def _apply(self, fn, recurse=True):
        """.to(dtype) would round the RoPE frequencies too: recompute them in fp32 on the new device."""
        super()._apply(fn, recurse)
        for key, rp in self.c.ropes.items():
            setattr(self, f"inv_freq_{key}", inv_freq(rp, self.c.head_dim).to(self.embed.weight.device))
        return self

    def setup_cache(self, batch: int, max_seq: int, dtype=None):
        """Allocate (or reuse) the static KV cache [batch, n_kv, max_seq, head_dim] per layer."""
        if (batch, max_seq) == (self.batch, self.max_seq):
            return
        c, dtype = self.c, dtype or self.embed.weight.dtype
        for layer in self.layers:
            a = layer.attn
            a.k_cache = a.v_cache = None  # free the old one first
        for layer in self.layers:
            a = layer.attn
            shape = (batch, c.n_kv, max_seq, c.head_dim)
            a.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            a.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.batch, self.max_seq = batch, max_seq
        self.cache_version += 1

    def forward(self, idx, input_pos, start=None, kv_len: int | None = None, fresh: bool = False,
                last: bool | torch.Tensor = False, ops: Ops = EAGER, rows: torch.Tensor | None = None):
        """idx [B, T] tokens written at cache slots input_pos: [T] (consecutive, the same for every row) or
        [B, T] (per row: continuous batching's decode, each row at its own slot). start [B]: first real slot
        of each row (left padding; None: 0). kv_len: attend to slots < kv_len (prefill; None: the whole
        cache, the fixed-shape decode). fresh: the prompts start at slot 0 with no left padding (plain causal
        attention, skips the mask; right padding is fine: a real token never sees a later pad). last: True,
        logits of the last position only ([B, 1, vocab]; a 2048-token prompt of 16 rows would otherwise make
        8 GB of Llama-3 logits), or a LongTensor [B] (right-padded prompts): of position last[b] in row b.
        rows [B]: the cache rows that idx's rows fill (continuous batching: prompts joining a running batch,
        input_pos [T]); None: rows 0..B-1. ops: EAGER or Ops(compiled=True) (decode on GPU; prefill stays
        eager: every prompt length would compile again). -> [B, T, vocab]."""
        c = self.c
        b, t = idx.shape
        x = self.embed(idx)
        if c.embed_scale:  # gemma multiplies in the weights' dtype (sqrt(640) is 25.25 in bf16)
            x = x * torch.tensor(c.dim ** 0.5, dtype=x.dtype).item()  # a Python float: graph-safe
        qpos = input_pos if input_pos.dim() == 2 else input_pos[None]  # [B or 1, T] slot of each query
        pos = qpos.expand(b, t)
        if start is not None:
            pos = (pos - start[:, None]).clamp(min=0)  # padded slots get position 0, never attended
        # cos/sin per rope kind (gemma3: local and global bases), fp32 as transformers, then x's dtype
        rope = {}
        for key in c.ropes:
            f = pos[..., None].float() * getattr(self, f"inv_freq_{key}")  # [B, T, D/2]
            emb = torch.cat((f, f), dim=-1)[:, None]  # [B, 1, T, D]
            rope[key] = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        s = kv_len or self.max_seq
        masks = {}
        span = t == 1 and rows is None and self.decode_kernel(x)  # decode (kv_len: continuous batching's span)
        for w in set(c.windows):
            if fresh and (w is None or t <= w):
                masks[w] = None
                continue
            if span:  # decode through the kernel: slot bounds per row instead of a [B, 1, g, S] mask
                qp = qpos.expand(b, 1)[:, 0]  # [B] the slot each row's token was written to
                lo = start if start is not None else torch.zeros_like(qp)
                if w is not None:
                    lo = torch.maximum(lo, qp - w + 1)  # transformers: k > q - window
                masks[w] = Span(lo, qp + 1)
                continue
            kpos = torch.arange(s, device=idx.device)  # [S] slots
            m = kpos <= qpos[..., None]  # [B or 1, T, S] causal
            if w is not None:
                m = m & (kpos > qpos[..., None] - w)  # transformers: k > q - window
            m = m.expand(b, t, s)
            if start is not None:
                m = m & (kpos[None, None, :] >= start[:, None, None])
                # a pad slot's query would see nothing (SDPA: NaN, and 0 * NaN poisons later layers'
                # attention through its V): let it see itself
                m = m | (kpos == qpos[..., None])
            g = c.n_heads // c.n_kv  # GQA: rows for the g query heads of a kv head (see Attention)
            masks[w] = m[:, None].repeat(1, 1, g, 1) if g > 1 else m[:, None]  # [B, 1, g*T, S]
        pending = xw = None
        if self.fuse_linears and b * t == 1 and self.layers[0].fused(x):
            nxt = [layer.attn_norm.weight for layer in self.layers[1:]] + [None]
            for layer, key, w in zip(self.layers, c.rope_keys, nxt):
                x, xw = layer.fused_forward(x, xw, w, *rope[key], input_pos, masks[layer.attn.window], kv_len,
                                            ops, rows)
        else:
            for layer, key in zip(self.layers, c.rope_keys):
                x, pending = layer(x, pending, *rope[key], input_pos, masks[layer.attn.window], kv_len, ops, rows)

        def pick(t):  # [B, T, dim] -> the positions whose logits are wanted
            if isinstance(last, torch.Tensor):
                return t.gather(1, last[:, None, None].expand(b, 1, t.shape[-1]))  # [B, 1, dim]
            return t[:, -1:] if last else t

        if pending is None:  # fused blocks: x holds every residual add already
            logits = self.output(ops.norm(pick(x), self.norm.weight, c.eps, c.norm_offset))
        else:
            h, post_w = pending
            _, xn = ops.residual_norm(pick(x), pick(h), post_w, self.norm.weight, c.eps, c.norm_offset)
            logits = self.output(xn)
        if c.final_softcap:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits
