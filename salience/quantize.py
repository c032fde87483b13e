"""The block-at-a-time driver: calibration inputs -> per block (statistics, scale search, fold, clip search,
quantize) -> integer tensors ready for the checkpoint writer.

Only one decoder block and its cached inputs are on the compute device at a time. Each block is calibrated
on the full-precision output of the previous block (the reference protocol), so the cached inputs
[n_rows, seqlen, hidden] are pushed through the unmodified block before it is changed.

Block inputs are captured without stopping the forward pass by an exception: the blocks are swapped for a
`_Recorder` that stores (hidden, kwargs) and passes hidden through, and the model's own forward is run,
which computes the masks and position embeddings each block expects (sliding/full windows included).
"""

from __future__ import annotations

import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq, moe
from .arch import Arch, ScaleGroup, get_module
from .lazy import InMemoryBlocks
from .quant import QuantConfig, compute_qparams, dequantize, quantize


class NonFiniteActivation(FloatingPointError):
    pass


@dataclass
class LinearResult:
    """Integer codes and qparams of one linear, row-major: codes [N, K] uint8, scales/zeros [N, G] fp32."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


@dataclass
class BlockResult:
    index: int
    linears: dict[str, LinearResult]
    search: dict[str, torch.Tensor] = field(default_factory=dict)  # saveable search results (scales, clips)
    report: dict = field(default_factory=dict)


# ---- capturing block inputs ----------------------------------------------------------------------------

class _Recorder(nn.Module):
    """Stands in for a decoder block: records its call and returns the hidden states unchanged."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


@torch.no_grad()
def capture_block_inputs(model: nn.Module, arch: Arch, rows: torch.Tensor, batch_size: int, device):
    """Run the model with its blocks replaced by recorders.

    Returns x [n_rows, seqlen, hidden] (block 0's input, on `device`) and per block a list over batches of
    (args, kwargs) to call that block with. Embeddings and the final norm run on `device`; the blocks never
    run here (they may be on the meta device), so this costs one embedding lookup."""
    layers = get_module(model, arch.layers)
    orig = list(layers)
    calls = [[] for _ in orig]
    for i in range(len(orig)):
        layers[i] = _Recorder(calls[i])
    base = model.base_model
    try:
        base.to(device)  # embeddings, rotary buffers, final norm: the blocks are recorders now
        for r0 in range(0, rows.shape[0], batch_size):
            base(input_ids=rows[r0:r0 + batch_size].to(device), use_cache=False)
    finally:
        base.to("cpu")  # before the blocks come back: they stay where they are
        for i, layer in enumerate(orig):
            layers[i] = layer
    x = torch.cat([c[0] for c in calls[0]], dim=0)
    per_block = [[(a, kw) for _, a, kw in c] for c in calls]
    return x, per_block


# ---- statistics of a block's linear inputs ----------------------------------------------------------------

class _InputStats:
    """Accumulates, for every distinct input tensor of the block's linears, sum |x| and X^T X (fp32).
    Linears reading the same tensor in a forward pass (q, k, v) share the entry of the first reader."""

    gram_block = 4096  # columns of X^T X computed at a time for wider inputs

    def __init__(self):
        self.key_of: dict[str, str] = {}  # linear -> first linear that read the same tensor
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._seen: dict[int, tuple] = {}  # id(tensor) -> (first reader, tensor kept alive for the pass)

    def hook(self, name):
        def fn(module, args):
            x = args[0]
            first = self._seen.get(id(x))
            if first is not None:
                self.key_of[name] = first[0]
                return
            self._seen[id(x)] = (name, x)
            self.key_of[name] = name
            x2 = x.reshape(-1, x.shape[-1])
            if not torch.isfinite(x2).all():
                raise NonFiniteActivation(f"non-finite (NaN/inf) activations at the input of {name}")
            a = x2.abs().float().sum(dim=0)
            k = x2.shape[1]
            if name not in self.abs_sum:
                self.abs_sum[name], self.count[name] = torch.zeros_like(a), 0
                self.gram[name] = torch.zeros(k, k, dtype=torch.float32, device=x2.device)
            self.abs_sum[name] += a
            self.count[name] += x2.shape[0]
            # X^T X sums up to n_tokens * max|x|^2: fp16 overflows (65504) long before fp32/bf16 would,
            # so fp16 activations are upcast; bf16 keeps its fast matmul (same exponent range as fp32).
            # Accumulated in fp32 across batches; wide inputs (7B down_proj: 11008) by column blocks, so
            # that the product and its fp32 copy stay K x 4096.
            xg = x2.float() if x2.dtype == torch.float16 else x2
            step = k if k <= self.gram_block else self.gram_block
            for j in range(0, k, step):
                self.gram[name][:, j:j + step] += (xg.t() @ xg[:, j:j + step]).float()
        return fn

    def new_pass(self):
        self._seen = {}

    def has(self, name):
        return name in self.key_of

    def tokens(self, name):
        return self.count[self.key_of[name]] if name in self.key_of else 0

    def x_mean(self, name):
        k = self.key_of[name]
        return self.abs_sum[k] / self.count[k]

    def gram_of(self, name):
        return self.gram[self.key_of[name]]


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _call(module, args, kwargs):
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# ---- one block -------------------------------------------------------------------------------------------

def quantizable_linears(block: nn.Module, arch: Arch | None = None) -> dict[str, nn.Linear]:
    skip = set(arch.not_convert) if arch is not None else set()
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in skip}


def expand_groups(groups, n_experts: int) -> list[ScaleGroup]:
    """Resolve `*` (every expert index): a group whose prev has `*` is repeated per expert; otherwise each
    name with `*` in linears/compensate becomes one name per expert. Without experts, groups naming `*`
    are dropped (they are optional: dense layers of an MoE model)."""
    out = []
    for g in groups:
        names = (g.prev, g.inspect, *g.linears, *g.compensate)
        if not any("*" in n for n in names):
            out.append(g)
            continue
        if n_experts == 0:
            continue
        if "*" in g.prev:
            out += [ScaleGroup(g.prev.replace("*", str(e)), tuple(n.replace("*", str(e)) for n in g.linears),
                               g.inspect.replace("*", str(e)), g.prev_chunk, g.optional,
                               tuple(n.replace("*", str(e)) for n in g.compensate)) for e in range(n_experts)]
        else:
            def each(ns):
                return tuple(x for n in ns for x in ([n.replace("*", str(e)) for e in range(n_experts)]
                                                       if "*" in n else [n]))
            out.append(ScaleGroup(g.prev, each(g.linears), g.inspect, g.prev_chunk, g.optional,
                                  each(g.compensate)))
    return out


def block_groups(block: nn.Module, arch: Arch) -> list[ScaleGroup]:
    """The block's scaling groups with expert wildcards resolved (experts must be unfused: moe.unfuse)."""
    return expand_groups(arch.groups, moe.n_experts(block, arch))


def _has(block, name: str) -> bool:
    """Whether the block has module `name` (transformers sets absent optional submodules to None)."""
    try:
        return get_module(block, name) is not None
    except AttributeError:
        return False


def apply_scale(block, g: ScaleGroup, s: torch.Tensor, plus_one: bool = False):
    """Fold s into the group (exact in full precision): prev's output / s, linears' and compensated
    modules' input columns * s."""
    prev = get_module(block, g.prev)
    awq.fold_into_prev(prev, s, _prev_rows(prev, g), plus_one)
    awq.fold_into_linears([get_module(block, n) for n in (*g.linears, *g.compensate)], s)


def _prev_rows(prev: nn.Module, g: ScaleGroup) -> slice:
    if g.prev_chunk is None or prev.weight.dim() != 2:
        return slice(None)
    i, n = g.prev_chunk
    step = prev.weight.shape[0] // n
    return slice(i * step, (i + 1) * step)


def _group_applies(block, g: ScaleGroup) -> bool:
    missing = [n for n in (g.prev, *g.linears, *g.compensate) if not _has(block, n)]
    if missing:
        if g.optional:
            return False
        raise ValueError(f"scaling group {g.prev} -> {g.linears}: the block has no {missing} (table entry is "
                         "wrong)")
    prev = get_module(block, g.prev)
    width = prev.weight[_prev_rows(prev, g)].shape[0]  # channels prev feeds to `linears` (a view)
    ok = all(get_module(block, n).in_features == width for n in g.linears)
    if not ok and not g.optional:
        raise ValueError(f"scaling group {g.prev} -> {g.linears}: shapes disagree (table entry is wrong)")
    return ok


@torch.no_grad()
def quantize_block(block: nn.Module, index: int, x: torch.Tensor, calls, arch: Arch, qcfg: QuantConfig,
                   scfg: awq.SearchConfig | None, batch_size: int, out: torch.Tensor | None = None):
    """Quantize one block in place (weights become their dequantized values) and return
    (BlockResult, the block's full-precision output [n_rows, seqlen, hidden]).

    scfg None = round-to-nearest (no search). x and the block must be on the same device. `out` (may be x
    itself: each batch's output overwrites its input once computed) receives the output instead of a new
    tensor, so one activation buffer serves the whole model. The integer results stay on the device."""
    t0 = time.time()
    phases = {}
    lins = quantizable_linears(block, arch)
    groups = block_groups(block, arch)
    for name, lin in lins.items():
        qcfg.groups(lin.in_features, f"block {index} {name}")  # clear error before any work
    stats = _InputStats()
    inspect_names = {g.inspect for g in groups if g.inspect not in lins and _has(block, g.inspect)} \
        if scfg is not None and scfg.loss == "output" else set()
    n_search_rows = max(1, -(-scfg.search_tokens // x.shape[1])) if scfg else 0
    saved_calls: dict[str, list] = {n: [] for n in inspect_names}
    saved_rows: dict[str, int] = {}

    def keep_call(name):
        def fn(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if saved_rows.get(name, 0) < n_search_rows:
                saved_rows[name] = saved_rows.get(name, 0) + h.shape[0]
                if out is not None and h.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                    h = h.clone()  # a view of `out`, which is overwritten batch by batch
                    args, kwargs = ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
                saved_calls[name].append((args, kwargs))
        return fn

    # compensated modules (routers) read all tokens of their group: the group's activation statistic
    watched = {**lins, **{n: get_module(block, n) for g in groups for n in g.compensate if _has(block, n)}}
    handles = [m.register_forward_pre_hook(stats.hook(n)) for n, m in watched.items()] if scfg else []
    handles += [get_module(block, n).register_forward_pre_hook(keep_call(n), with_kwargs=True)
                for n in inspect_names]
    x_in = x.clone() if scfg is not None and scfg.propagate else None  # `out` may overwrite x below
    with _hooks(handles):
        y = _forward(block, x, calls, batch_size, out, each=stats.new_pass)
    stats.new_pass()
    if y is not None and not torch.isfinite(y).all():
        raise NonFiniteActivation(f"non-finite (NaN/inf) output of block {index}")
    phases["forward"] = time.time() - t0

    search: dict[str, torch.Tensor] = {}
    report: dict = {"groups": {}, "skipped_groups": []}
    in_scale: dict[str, torch.Tensor] = {}  # linear -> scale applied to its input columns
    # Linears no calibration token reached (experts the router never picked): quantized from their weights
    # alone (no scale, no clip search).
    no_tokens = sorted(n for n in lins if scfg is not None and not stats.has(n))
    if no_tokens:
        report["no_calibration_tokens"] = no_tokens
        warnings.warn(f"block {index}: no calibration token reached {', '.join(no_tokens)}; quantized from "
                      "the weights alone (no search of their own)", stacklevel=2)
    if scfg is not None:
        for g in groups:
            if not _group_applies(block, g):  # optional: shapes disagree, or a dense/MoE alternative
                if all(_has(block, n) for n in (g.prev, *g.linears)):  # report shape mismatches only
                    report["skipped_groups"].append(f"{g.prev} -> {','.join(g.linears)}")
                continue
            if not any(stats.has(n) for n in g.linears):
                continue  # an expert without tokens: nothing to measure, listed in no_calibration_tokens
            s, alpha, losses = _search_group(block, g, stats, saved_calls, qcfg, scfg)
            apply_scale(block, g, s, arch.norm_plus_one)
            for n in g.linears:
                in_scale[n] = s
            key = f"{g.prev}->{'+'.join(g.linears)}"
            search[f"scale.{key}"] = s.cpu()
            report["groups"][key] = {"formula": alpha[0], "alpha": alpha[1], "loss": float(losses.min()),
                                     "loss_alpha0": float(losses[0])}

    phases["scale_search"] = time.time() - t0 - sum(phases.values())
    linears: dict[str, LinearResult] = {}
    for name, lin in lins.items():
        w = lin.weight
        clip_min = clip_max = None
        if scfg is not None and scfg.clip_grid > 0 and name not in arch.no_clip and stats.has(name):
            # only the diagonal blocks matter; with the folded scale s those of the Gram of X / s
            g = awq.diag_blocks(stats.gram_of(name), qcfg.groups(w.shape[1]), in_scale.get(name))
            # on a GPU, fewer and larger row chunks (16 Mi weights, 64 MiB in fp32); the CPU keeps 1024 rows
            chunk = max(1024, (1 << 24) // w.shape[1]) if w.is_cuda else 1024
            clip_min, clip_max = awq.search_clip(w, g, qcfg, scfg.clip_grid, scfg.clip_max_shrink, chunk,
                                                 asym=scfg.clip_asym)
            search[f"clip_min.{name}"], search[f"clip_max.{name}"] = clip_min.cpu(), clip_max.cpu()
        scales, zeros = compute_qparams(w, qcfg, clip_min, clip_max)
        scales = scales.half().float()  # the checkpoint stores fp16 scales: quantize with exactly those
        codes, scales, zeros = quantize(w, qcfg, scales, zeros)
        # The in-memory block becomes the fake-quantized model (what the checkpoint reloads to).
        w.copy_(dequantize(codes, scales, zeros, qcfg, dtype=w.dtype))
        linears[name] = LinearResult(codes, scales, zeros)
    phases["clip_quantize"] = time.time() - t0 - sum(phases.values())
    if x_in is not None:  # the next block's input: this block's output with its quantized weights
        _forward(block, x_in, calls, batch_size, out=y)
        del x_in
        phases["propagate"] = time.time() - t0 - sum(phases.values())
    report["seconds"] = round(time.time() - t0, 3)
    report["phases"] = {k: round(v, 3) for k, v in phases.items()}
    return BlockResult(index, linears, search, report), y


def _forward(block, x, calls, batch_size: int, out=None, each=None):
    """The block over x [n_rows, seqlen, hidden], one batch of rows per recorded call (its extra args and
    kwargs). The output goes into `out` (which may be x: each batch's output overwrites its input once
    computed) or a new tensor; None when there are no calls. each() runs before every batch."""
    outs = []
    for b, (args, kwargs) in enumerate(calls):
        if each is not None:
            each()
        rows = slice(b * batch_size, (b + 1) * batch_size)
        yb = _call(block, (x[rows], *args), kwargs)
        if out is None:
            outs.append(yb)
        else:
            out[rows] = yb
    return out if out is not None and calls else (torch.cat(outs, dim=0) if outs else None)


def _search_group(block, g: ScaleGroup, stats: _InputStats, saved_calls, qcfg, scfg):
    lins = [get_module(block, n) for n in g.linears]
    # the member that saw the most tokens (the router or shared expert, not a routed expert) gives mean|x|
    x_mean = stats.x_mean(max((*g.compensate, *g.linears), key=stats.tokens))
    w_mean = awq.weight_mean([lin.weight for lin in lins], qcfg) if scfg.formula != "x" else None
    orig = [lin.weight.clone() for lin in lins]

    if g.inspect in g.linears or scfg.loss == "gram":
        # Output error of the group's linears, exact over all calibration tokens in Gram form. When the
        # inspected module is that single linear this is the reference loss; otherwise a surrogate that
        # skips the non-linear rest of the module (attention, SiLU * up).
        # each linear's own Gram (routed experts see different tokens); linears without tokens add nothing
        grams = [stats.gram_of(n) if stats.has(n) else None for n in g.linears]

        def loss_fn(s):
            return sum(awq.scaled_gram_error(w, s, qcfg, gm) for w, gm in zip(orig, grams) if gm is not None)
    else:  # non-linear module: output MSE on the saved calls
        mod = get_module(block, g.inspect)
        calls = saved_calls[g.inspect]
        ref = [_call(mod, a, kw).float() for a, kw in calls]

        def loss_fn(s):
            for lin, w in zip(lins, orig):
                lin.weight.copy_(awq.scaled_fake_quant(w, s, qcfg).to(w.dtype))
            err = sum(((_call(mod, a, kw).float() - r) ** 2).sum() for (a, kw), r in zip(calls, ref))
            return err

    try:
        s, alpha, losses = awq.search_scale(x_mean, w_mean, loss_fn, awq.candidates(scfg))
        if scfg.refine:
            s2, alpha2, losses2 = awq.search_scale(x_mean, w_mean, loss_fn, awq.refined(alpha, scfg))
            if losses2.min() < losses.min():
                s, alpha = s2, alpha2
            losses = torch.cat([losses, losses2])
    finally:
        for lin, w in zip(lins, orig):
            lin.weight.copy_(w)
    return s.to(orig[0].device), alpha, losses


# ---- the whole model ----------------------------------------------------------------------------------------

def fp32_names(model: nn.Module):
    """Predicate on tensor names the model class keeps in fp32 whatever its dtype (transformers'
    _keep_in_fp32_modules[_strict]: DeepSeek-V3's router weight and score bias). Matched as transformers
    does, on whole dotted components."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or []),
            *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])]
    if not keep:
        return lambda name: False
    pattern = re.compile(r"(^|\.)(" + "|".join(map(re.escape, keep)) + r")($|\.)")
    return lambda name: pattern.search(name) is not None


def _cast_floats(obj, dtype):
    """Floating tensors inside (nested) tuples, lists and dicts cast to dtype; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


def to_compute(module: nn.Module, device, dtype, keep_fp32=lambda name: False) -> nn.Module:
    """module.to(device, dtype), except floating tensors named by keep_fp32, which go to fp32."""
    module.to(device=device, dtype=dtype)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point() and keep_fp32(name):
            t.data = t.data.float()
    return module


@torch.no_grad()
def quantize_model(model: nn.Module, arch: Arch, qcfg: QuantConfig, rows: torch.Tensor | None,
                   scfg: awq.SearchConfig | None, device="cpu", dtype=None, batch_size: int = 8,
                   on_block=None, progress: bool = True, blocks=None, start: int = 0,
                   x: torch.Tensor | None = None):
    """Quantize every decoder block of `model`, one block on `device` at a time.

    rows [n, seqlen] calibration token ids (None with scfg None: RTN needs no data). blocks: where the
    blocks come from (salience.lazy.InMemoryBlocks(model) by default: quantized in place on the CPU;
    LazyBlocks: read from the shards, freed after). on_block(BlockResult, block, x_next) is called as each
    block finishes (the checkpoint writer streams it to disk); x_next [n, seqlen, hidden] is the next
    block's input, valid only during the call. Resuming: start = first block to do, x = its input.
    Returns the list of block reports (of blocks start..)."""
    blocks = blocks if blocks is not None else InMemoryBlocks(model, arch)
    dtype = dtype or next(model.parameters()).dtype
    keep_fp32 = fp32_names(model)
    calls = None
    if scfg is not None:
        x0, calls = capture_block_inputs(model, arch, rows, batch_size, device)
        # the captured kwargs (rotary cos/sin, float masks) carry the loaded model's dtype: an fp32 model
        # computed in bf16 would otherwise promote q/k to fp32 inside the block
        calls = [[(_cast_floats(a, dtype), _cast_floats(kw, dtype)) for a, kw in c] for c in calls]
        # one activation buffer on the device, overwritten by each block's output
        x = x0.to(dtype) if x is None else x.to(device=device, dtype=dtype)
        del x0
        blocks.drop_base()  # lazy: the embeddings are not needed again
    reports = []
    # one tick per block; the ETA counts only this run's blocks (a resumed run starts at `start`)
    bar = tqdm(range(start, len(blocks)), desc="AWQ" if scfg else "RTN", unit="block", total=len(blocks),
               initial=start, disable=not progress)
    for i in bar:
        block = blocks.load(i)  # on the host (lazy: read from the shards)
        moe.unfuse(block, arch)  # fused experts -> per-expert linears (no-op for dense blocks)
        block = to_compute(block, device, dtype, keep_fp32)  # the router stays fp32 if asked
        try:
            res, x = quantize_block(block, i, x, calls[i] if calls else [], arch, qcfg, scfg, batch_size, out=x)
        except NonFiniteActivation as e:
            raise NonFiniteActivation(f"block {i}: {e}") from None
        if on_block is not None:
            on_block(res, block, x)
        blocks.release(i, block)
        reports.append(res.report)
        bar.set_postfix_str(f"{res.report['seconds']:.1f}s/block")
        del res, block  # the integer results live on the device: free them before the next block
    blocks.close()
    return reports
