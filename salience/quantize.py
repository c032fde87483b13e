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

import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import awq, gptq, moe, tune
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
def capture_block_inputs(model: nn.Module, arch: Arch, rows: torch.Tensor, batch_size: int, device,
                         host: bool = False):
    """Run the model with its blocks replaced by recorders.

    Returns x [n_rows, seqlen, hidden] (block 0's input, on `device`, or with host=True in host memory,
    pinned for an accelerator to read fast) and per block a list over batches of (args, kwargs) to call that
    block with. Embeddings and the final norm run on `device`; the blocks never run here (they may be on the
    meta device), so this costs one embedding lookup. Each batch's hidden states go into x as they come:
    the device holds the embeddings and one batch."""
    layers = get_module(model, arch.layers)
    orig = list(layers)
    calls = [[] for _ in orig]
    for i in range(len(orig)):
        layers[i] = _Recorder(calls[i])
    base = model.base_model
    x = None
    try:
        base.to(device)  # embeddings, rotary buffers, final norm: the blocks are recorders now
        for r0 in range(0, rows.shape[0], batch_size):
            base(input_ids=rows[r0:r0 + batch_size].to(device), use_cache=False)
            h = calls[0][-1][0]
            if x is None:
                pin = host and torch.device(device).type == "cuda"
                x = torch.empty((rows.shape[0], *h.shape[1:]), dtype=h.dtype, device="cpu" if host else h.device,
                                pin_memory=pin)
            x[r0:r0 + h.shape[0]] = h
            for c in calls:  # every recorder got the same tensor: drop it
                c[-1] = (None, *c[-1][1:])
    finally:
        base.to("cpu")  # before the blocks come back: they stay where they are
        for i, layer in enumerate(orig):
            layers[i] = layer
    per_block = [[(a, kw) for _, a, kw in c] for c in calls]
    return x, per_block


# ---- statistics of a block's linear inputs ----------------------------------------------------------------

class _InputStats:
    """Accumulates, for every distinct input tensor of the block's linears, sum |x| (in the first pass over
    the calibration rows) and X^T X in fp32 (for the linears named in `grams_for`, None: all, in the passes
    that ask). Linears reading the same tensor in a forward pass (q, k, v) share the entry of the first
    reader, their key, found in the first pass. A full Gram is K^2 fp32 (7B down_proj: 11008^2 * 4 = 0.45
    GiB): the driver asks for a few at a time, one pass each, and keeps only their diagonal blocks after.
    A Gram of more than `whole_max` bytes is kept as the row panels of its upper triangle (awq.PanelGram,
    `panel_rows` rows each: about half the bytes)."""

    gram_block = 4096  # columns of X^T X computed at a time for wider inputs

    def __init__(self, whole_max: float = math.inf, panel_rows: int | None = None):
        self.whole_max, self.panel_rows = whole_max, panel_rows
        self.key_of: dict[str, str] = {}  # linear -> first linear that read the same tensor
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.first_pass = True  # sum |x|, token counts, keys and the finiteness check: once
        self.grams_for: set[str] | None = None  # linears whose input's Gram this pass accumulates (None: all)
        # first pass: id(tensor) -> [first reader, the tensor (kept alive for the batch: ids stay unique),
        # Gram added]; later passes: keys whose Gram this batch added
        self._seen: dict = {}

    def hook(self, name):
        def fn(module, args):
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1])
            want = self.grams_for is None or name in self.grams_for
            if not self.first_pass:  # keys are known
                key = self.key_of[name]
                if want and key not in self._seen:  # once per batch, whichever reader asks first
                    self._seen[key] = True
                    self._add_gram(key, x2)
                return
            seen = self._seen.get(id(x))
            if seen is None:
                seen = self._seen[id(x)] = [name, x, False]
                # sum |x| in fp32: an fp32 copy made absolute in place (the same values as x.abs().float(),
                # without the 16-bit temporary)
                a = x2.to(torch.float32, copy=True).abs_().sum(dim=0)
                # a non-finite x makes the sum non-finite; only then (or on overflow) look at x itself
                if not torch.isfinite(a).all() and not torch.isfinite(x2).all():
                    raise NonFiniteActivation(f"non-finite (NaN/inf) activations at the input of {name}")
                if name not in self.abs_sum:
                    self.abs_sum[name], self.count[name] = torch.zeros_like(a), 0
                self.abs_sum[name] += a
                self.count[name] += x2.shape[0]
            key = self.key_of[name] = seen[0]
            if want and not seen[2]:  # once per batch, whichever reader asks first
                seen[2] = True
                self._add_gram(key, x2)
        return fn

    def _add_gram(self, key, x2):
        k = x2.shape[1]
        if key not in self.gram:
            if paneled(k, self.whole_max, self.panel_rows):
                self.gram[key] = awq.panel_gram(k, self.panel_rows, x2.device)
            else:
                self.gram[key] = torch.zeros(k, k, dtype=torch.float32, device=x2.device)
        # X^T X sums up to n_tokens * max|x|^2: fp16 overflows (65504) long before fp32/bf16 would,
        # so fp16 activations are upcast; bf16 keeps its fast matmul (same exponent range as fp32).
        # Accumulated in fp32 across batches; wide inputs (7B down_proj: 11008) by column blocks, so
        # that the product stays K x 4096 (or by panels). add_ upcasts each element of the 16-bit
        # product exactly as .float() would, without an fp32 copy of it.
        xg = x2.float() if x2.dtype == torch.float16 else x2
        awq.gram_add_(self.gram[key], xg, self.gram_block)

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


# ---- scaling groups of a block -----------------------------------------------------------------------------

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


# ---- passes over the calibration rows -----------------------------------------------------------------------

def _reads(g: ScaleGroup, scfg: awq.SearchConfig) -> tuple[str, ...]:
    """Modules whose weights the search of g reads: its linears; with the output loss of a non-linear
    module, that module's whole subtree."""
    return g.linears if g.inspect in g.linears or scfg.loss == "gram" else (*g.linears, g.inspect)


def _first_dependent(groups: list[ScaleGroup], scfg: awq.SearchConfig) -> int:
    """Index of the first group whose search reads a module that an earlier group's fold writes (len(groups)
    if none: with the Gram loss, each search reads only its own linears, which no earlier fold touches in
    any table entry). Groups before it may be searched on the unmodified block, in any pass."""
    def within(a, b):
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    written: list[str] = []
    for i, g in enumerate(groups):
        if any(within(r, w) for r in _reads(g, scfg) for w in written):
            return i
        written += [g.prev, *g.linears, *g.compensate]
    return len(groups)


def paneled(k: int, whole_max: float, panel_rows: int | None) -> bool:
    """Whether the K x K Gram is kept as the panels of its upper triangle: more than whole_max bytes whole,
    and panels (a multiple of the group size: none for per-channel groups) narrower than K."""
    return panel_rows is not None and panel_rows < k and 4 * k * k > whole_max


def _gram_bytes(block: nn.Module, names, experts: str | None, whole_max: float = math.inf,
                panel_rows: int | None = None) -> int:
    """fp32 X^T X bytes the linears `names` of one group need: one K x K Gram for all the dense linears (they
    read one tensor, prev's output) and one per routed expert (each reads its own tokens); paneled ones
    (paneled) counted as such."""
    inputs = {}
    for n in names:
        e = n[len(experts) + 1:].split(".")[0] if experts and n.startswith(experts + ".") else None
        inputs[e] = get_module(block, n).in_features
    return sum(awq.gram_bytes(k, panel_rows if paneled(k, whole_max, panel_rows) else None)
               for k in inputs.values())


def plan_passes(sizes: list[int], orphan_sizes: list[int], budget: float, first_dependent: int) -> list[list[int]]:
    """Which units each pass over the calibration rows accumulates the Grams of. Units 0..len(sizes)-1 are
    the scaling groups in table order (sizes: their Gram bytes), the next ones linears that are in no group
    but get a clip search (orphans). Consecutive groups share a pass while their Grams fit `budget` bytes (a
    larger group has a pass of its own); groups from first_dependent on all go in the last pass, searched
    after the earlier groups' folds as the reference does; each orphan joins the first pass with room, or a
    pass of its own at the front. One pass when everything fits."""
    passes, cur, size = [], [], 0
    for i, b in enumerate(sizes[:first_dependent]):
        if cur and size + b > budget:
            passes.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += b
    if cur and size + sum(sizes[first_dependent:]) > budget:
        passes.append(cur)
        cur = []
    cur += list(range(first_dependent, len(sizes)))
    if cur or not passes:
        passes.append(cur)
    used = [sum(sizes[i] for i in p) for p in passes]
    for j, b in enumerate(orphan_sizes, start=len(sizes)):
        p = next((p for p in range(len(passes)) if used[p] + b <= budget), None)
        if p is None:
            passes.insert(0, [])
            used.insert(0, 0)
            p = 0
        passes[p].append(j)
        used[p] += b
    return passes


# ---- one block -------------------------------------------------------------------------------------------

PANEL_ROWS = 1024
"""Rows of a paneled Gram's panels (rounded down to a multiple of the group size): its triangle holds
K^2 (1/2 + PANEL_ROWS/2K) values in K / PANEL_ROWS panels (70B down_proj: 28, 1.58 GiB); each batch adds
one [PANEL_ROWS, K - r0] 16-bit product per panel (56 MiB at most there)."""

phase_hook = None
"""Debugging and benchmarks: when set, phase_hook(block_index, phase) is called at the end of each phase
of the driver (capture: block -1; per block: load, pass <p>, search <group>, clip_quantize, write, ...);
benchmarks/quantize.py reads and resets torch.cuda.max_memory_allocated there."""


class _Phases:
    """Seconds per kind of phase of one block (the report's `phases`); phase_hook at each boundary."""

    def __init__(self, index: int):
        self.index, self.t0, self.seconds = index, time.time(), {}
        self.t = self.t0

    def end(self, kind: str, name: str | None = None):
        now = time.time()
        self.seconds[kind] = self.seconds.get(kind, 0.0) + now - self.t
        self.t = now
        if phase_hook is not None:
            phase_hook(self.index, name or kind)


@torch.no_grad()
def quantize_block(block: nn.Module, index: int, x: torch.Tensor, calls, arch: Arch, qcfg: QuantConfig,
                   scfg: awq.SearchConfig | None, batch_size: int, out: torch.Tensor | None = None,
                   gram_bytes: float = math.inf, before_write=None, gram_whole_max: float = math.inf,
                   x_fp: torch.Tensor | None = None):
    """Quantize one block in place (weights become their dequantized values) and return
    (BlockResult, the block's full-precision output [n_rows, seqlen, hidden]).

    scfg None = round-to-nearest (no search). x may live on the host (pinned memory) while the block is
    on an accelerator: each batch of rows moves to the block's device when it is used. `out` (may be x
    itself: each batch's output overwrites its input once computed) receives the output instead of a new
    tensor, so one activation buffer serves the whole model; before_write() is called before the first
    write into it (someone else may still be reading it). The integer results stay on the device.

    Memory. The scale searches need the fp32 X^T X of each group's input (K^2 * 4 bytes: 0.45 GiB for a
    7B down_proj, 3 GiB for a 70B one), the clip search only its diagonal blocks. The full-precision block
    runs over x once per pass; a pass accumulates the Grams of as many consecutive groups as fit
    `gram_bytes` (a larger group: alone), whose scales are searched right after it, each Gram freed once
    searched (diagonal blocks kept). Every pass runs the unmodified block, so the folds of all groups
    searched before the last pass wait until its forward is done. That is exact: a search reads only its
    own group's weights, which no earlier fold touches (_first_dependent checks it; groups for which it
    fails are searched in the last pass, after the earlier folds). The last pass writes the output.
    gram_bytes=inf: one pass, all Grams at once (fastest). A Gram of more than gram_whole_max bytes keeps
    only its upper triangle, as panels of rows (awq.PanelGram: about half; 70B down_proj 1.58 GiB instead
    of 3.06) and its loss is evaluated blockwise: the same sum in another order, so the losses change in
    their last bits only. Grams within gram_whole_max (all, by default) take the whole-matrix path, bit for
    bit as before.
    GPTQ rounding (scfg.rounding == "gptq") needs each linear's full Gram when it is quantized, after every
    fold: the Grams are then kept whole (not cut to diagonal blocks) until the end of the block, so the block
    holds all of them at once, whatever gram_bytes says: one K^2 fp32 per distinct input (Llama-2-7B: 3 x
    4096^2 + 11008^2 floats = 0.64 GiB; 70B: 8192^2 x 3 + 28672^2 floats = 3.8 GiB; an MoE block one per
    routed expert, which can be far more), plus one scaled copy and an fp64 factorisation of the linear being
    quantized (K^2 x 12 bytes more, transiently). Its Grams are never cut into panels.
    x_fp (tuning on propagated inputs, scfg.rounding == "tune" with scfg.propagate): the full-precision model's
    input to this block [n_rows, seqlen, hidden], overwritten by its output through the unmodified block, which
    is then the tuning's target: the quantized block is tuned to map the quantized model's activations x to
    the full-precision model's, and so to make up for the error of the blocks before it."""
    ph = _Phases(index)
    lins = quantizable_linears(block, arch)
    for name, lin in lins.items():
        qcfg.groups(lin.in_features, f"block {index} {name}")  # clear error before any work
    report: dict = {"groups": {}, "skipped_groups": []}
    applying, clip = [], set()
    if scfg is not None:
        for g in block_groups(block, arch):
            if _group_applies(block, g):
                applying.append(g)
            elif all(_has(block, n) for n in (g.prev, *g.linears)):  # optional; report shape mismatches only
                report["skipped_groups"].append(f"{g.prev} -> {','.join(g.linears)}")
        clip = {n for n in lins if scfg.clip_grid > 0 and n not in arch.no_clip}
    gptq_rounding = scfg is not None and scfg.rounding == "gptq"
    if gptq_rounding:
        gram_whole_max = math.inf  # GPTQ factors each full Gram: no panels (see the docstring's memory cost)
    grouped = {n for g in applying for n in g.linears}
    # linears in no scaling group whose Grams are still needed: for the clip search (diagonal blocks), and
    # with GPTQ rounding all of them (full Grams)
    orphans = [n for n in lins if (n in clip or gptq_rounding) and n not in grouped]
    experts = arch.experts.path if arch.experts else None
    units = [*applying, *orphans]
    # panels of ~PANEL_ROWS rows, whole groups each (the clip search reads the groups' diagonal blocks)
    panel_rows = qcfg.group_size * max(1, PANEL_ROWS // qcfg.group_size) if qcfg.group_size > 0 else None
    passes = [[units[i] for i in p] for p in plan_passes(
        [_gram_bytes(block, g.linears, experts, gram_whole_max, panel_rows) for g in applying],
        [_gram_bytes(block, (n,), experts, gram_whole_max, panel_rows) for n in orphans], gram_bytes,
        _first_dependent(applying, scfg) if scfg is not None else 0)]

    stats = _InputStats(gram_whole_max, panel_rows)
    inspect_names = {g.inspect for g in applying if g.inspect not in lins and _has(block, g.inspect)} \
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
    watched = {**lins, **{n: get_module(block, n) for g in applying for n in g.compensate}} if scfg else {}
    tuning = scfg is not None and scfg.rounding == "tune"
    if x_fp is not None:
        if not (tuning and scfg.propagate):
            raise ValueError("x_fp: only for tuning on propagated inputs (rounding='tune', propagate=True)")
        _forward(block, x_fp, calls, batch_size, out=x_fp, check=f"non-finite (NaN/inf) output of block {index}")
        ph.end("forward", "full-precision stream")
    # `out` may overwrite x below: propagation and tuning read the block's input after the last pass
    x_in = x.clone() if scfg is not None and (scfg.propagate or tuning) else None

    search: dict[str, torch.Tensor] = {}
    in_scale: dict[str, torch.Tensor] = {}  # linear -> scale applied to its input columns
    diag: dict[str, torch.Tensor] = {}  # input key -> diagonal blocks [G, gs, gs] of its Gram (clip search)
    full: dict[str, torch.Tensor] = {}  # input key -> its whole Gram [K, K] (GPTQ rounding)
    deferred: list[tuple[ScaleGroup, torch.Tensor]] = []  # searched, folded after the last pass's forward
    damp = awq.damp_for(scfg, qcfg.bits) if scfg is not None else 0.0
    y = None
    for p, units in enumerate(passes):
        last = p == len(passes) - 1
        stats.grams_for = {n for u in units for n in (u.linears if isinstance(u, ScaleGroup) else (u,))}
        # hooks during the forward only (the output-loss searches run modules of the block too); after the
        # first pass (statistics of every input, the inputs of the inspected modules saved), only on the
        # linears whose Grams the pass accumulates
        handles = [m.register_forward_pre_hook(stats.hook(n)) for n, m in watched.items()
                   if p == 0 or (n in stats.grams_for and stats.has(n))]
        handles += [get_module(block, n).register_forward_pre_hook(keep_call(n), with_kwargs=True)
                    for n in (inspect_names if p == 0 else ())]
        if last and out is not None and before_write is not None:
            before_write()
        with _hooks(handles):
            y = _forward(block, x, calls, batch_size, out, each=stats.new_pass, output=last,
                         check=f"non-finite (NaN/inf) output of block {index}")
        stats.first_pass = False
        stats.new_pass()
        if damp:
            for gm in stats.gram.values():  # this pass's Grams, complete now (earlier passes' were freed)
                awq.damp_(gm, damp)
        ph.end("forward", f"pass {p}")
        if p == 0:
            # Linears no calibration token reached (experts the router never picked): quantized from
            # their weights alone (no scale, no clip search).
            no_tokens = sorted(n for n in lins if scfg is not None and not stats.has(n))
            if no_tokens:
                report["no_calibration_tokens"] = no_tokens
                warnings.warn(f"block {index}: no calibration token reached {', '.join(no_tokens)}; "
                              "quantized from the weights alone (no search of their own)", stacklevel=2)
        if last:
            for g, s in deferred:
                apply_scale(block, g, s, arch.norm_plus_one)
        for i, u in enumerate(units):
            if isinstance(u, ScaleGroup) and any(stats.has(n) for n in u.linears):  # else: no tokens
                s, alpha, losses = _search_group(block, u, stats, saved_calls, qcfg, scfg)
                if last:
                    apply_scale(block, u, s, arch.norm_plus_one)
                else:
                    deferred.append((u, s))
                for n in u.linears:
                    in_scale[n] = s
                key = f"{u.prev}->{'+'.join(u.linears)}"
                search[f"scale.{key}"] = s.cpu()
                report["groups"][key] = {"formula": alpha[0], "alpha": alpha[1], "loss": float(losses.min()),
                                         "loss_alpha0": float(losses[0])}
                ph.end("scale_search", f"search {key}")
            # Grams no later unit of this pass reads: keep the diagonal blocks the clip search needs
            later = {stats.key_of.get(n) for v in units[i + 1:]
                     for n in (v.linears if isinstance(v, ScaleGroup) else (v,))}
            for k in [k for k in stats.gram if k not in later]:
                gm = stats.gram.pop(k)
                if gptq_rounding:
                    full[k] = gm  # the clip search takes its diagonal blocks too
                elif any(stats.key_of.get(n) == k for n in clip):
                    diag[k] = awq.diag_blocks(gm, qcfg.groups(gm.shape[0]))
                del gm

    linears: dict[str, LinearResult] = {}
    tune_start: dict[str, tuple] = {}  # linear -> its searched range (clip_min, clip_max), tuned together
    for name, lin in lins.items():
        w = lin.weight
        clip_min = clip_max = None
        g_full = None  # GPTQ: the Gram of the linear's scaled input X / s, g_ij / (s_i s_j) [K, K]
        if gptq_rounding and stats.has(name):
            g_full, s = full[stats.key_of[name]], in_scale.get(name)
            if s is not None:
                g_full = g_full / (s[:, None] * s[None, :])
        if name in clip and stats.has(name):
            # with the folded scale s, the diagonal blocks of the Gram of X / s
            g = awq.diag_blocks(g_full, qcfg.groups(w.shape[1])) if g_full is not None else \
                awq.diag_blocks(diag[stats.key_of[name]], qcfg.groups(w.shape[1]), in_scale.get(name))
            # on a GPU, fewer and larger row chunks (16 Mi weights, 64 MiB in fp32); the CPU keeps 1024 rows
            chunk = max(1024, (1 << 24) // w.shape[1]) if w.is_cuda else 1024
            clip_min, clip_max = awq.search_clip(w, g, qcfg, scfg.clip_grid, scfg.clip_max_shrink, chunk,
                                                 asym=scfg.clip_asym)
            search[f"clip_min.{name}"], search[f"clip_max.{name}"] = clip_min.cpu(), clip_max.cpu()
        if tuning and stats.has(name):
            # quantized below, all of the block's at once. Linears the clip search skips (arch.no_clip: q/k,
            # whose output error says little of the attention scores') start from their full range and get
            # their ranges tuned too: tuning's loss is the block's output, through attention
            tune_start[name] = (clip_min, clip_max)
            continue
        # The in-memory block becomes the fake-quantized model (what the checkpoint reloads to).
        linears[name] = quantize_linear(w, qcfg, clip_min, clip_max, g=g_full,
                                        damp=scfg.gptq_damp if g_full is not None else None)
        del g_full
    ph.end("clip_quantize")
    if tune_start:
        target = x_fp if x_fp is not None else y
        tuned, ranges, report["tune"] = tune.tune_block(block, tune_start, x_in, target, calls, batch_size,
                                                        qcfg, scfg.tune_steps, scfg.tune_rows)
        for name, (codes, scales, zeros) in tuned.items():
            linears[name] = LinearResult(codes, scales, zeros)
            lin = lins[name]
            lin.weight.copy_(dequantize(codes, scales, zeros, qcfg, dtype=lin.weight.dtype))
            search[f"tuned_min.{name}"], search[f"tuned_max.{name}"] = (t.cpu() for t in ranges[name])
        ph.end("tune")
    if x_in is not None:  # the next block's input: this block's output with its quantized weights
        _forward(block, x_in, calls, batch_size, out=y)
        del x_in
        ph.end("propagate")
    report["seconds"] = round(time.time() - ph.t0, 3)
    report["phases"] = {k: round(v, 3) for k, v in ph.seconds.items()}
    report["passes"] = len(passes)
    return BlockResult(index, linears, search, report), y


def quantize_linear(w: torch.Tensor, qcfg: QuantConfig, clip_min=None, clip_max=None,
                    max_elems: int = 1 << 24, g: torch.Tensor | None = None,
                    damp: float | None = None) -> LinearResult:
    """Integer codes and qparams of w [N, K] (ranges clip_min/max [N, G] if given; scales rounded to the
    fp16 the checkpoint stores), and w overwritten with its dequantized values. By chunks of rows of at most
    max_elems weights, so that the fp32 temporaries stay ~64 MiB (7B down_proj: 4096 x 11008 would take 0.17
    GiB each): every step is per row, so the chunking does not change a bit.
    g [K, K]: the Gram of w's input (AWQ scale folded in); the codes are then rounded by GPTQ on the same grid
    (salience.gptq; the scales and zeros are unchanged, the fp16-rounded scales are the grid it rounds to)
    instead of to the nearest code, damped by `damp` (required with g; the pipeline passes
    SearchConfig.gptq_damp, the one default). GPTQ too is per row: one factorisation of g serves every chunk."""
    if g is not None and damp is None:
        raise ValueError("quantize_linear: GPTQ rounding (g given) needs damp (SearchConfig.gptq_damp)")
    n, k = w.shape
    ng = qcfg.groups(k)
    u = gptq.inverse_factor(g, damp) if g is not None else None  # [K, K]
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, ng, dtype=torch.float32, device=w.device)
    zeros = torch.empty(n, ng, dtype=torch.float32, device=w.device)
    step = max(1, max_elems // k)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        s, z = compute_qparams(w[rows], qcfg, None if clip_min is None else clip_min[rows],
                               None if clip_max is None else clip_max[rows])
        s = s.half().float()  # the checkpoint stores fp16 scales: quantize with exactly those
        if u is None:
            codes[rows], scales[rows], zeros[rows] = quantize(w[rows], qcfg, s, z)
        else:
            codes[rows] = gptq.round_with_factor(w[rows], u, s, z, qcfg)
            scales[rows], zeros[rows] = s, z
        w[rows] = dequantize(codes[rows], scales[rows], zeros[rows], qcfg, dtype=w.dtype)
    return LinearResult(codes, scales, zeros)


def _forward(block, x, calls, batch_size: int, out=None, each=None, output: bool = True, check=None):
    """The block over x [n_rows, seqlen, hidden], one batch of rows per recorded call (its extra args and
    kwargs), each batch moved to the block's device (x may live on the host). The output goes into `out`
    (which may be x: each batch's output overwrites its input once computed), a new tensor beside x, or
    nowhere (output=False: a statistics pass); None when there are no calls. each() runs before every
    batch; check: the message of the NonFiniteActivation raised for a non-finite output."""
    dev = next(block.parameters()).device
    outs = []
    for b, (args, kwargs) in enumerate(calls):
        if each is not None:
            each()
        rows = slice(b * batch_size, (b + 1) * batch_size)
        yb = _call(block, (x[rows].to(dev, non_blocking=True), *args), kwargs)
        if check is not None and not torch.isfinite(yb).all():
            raise NonFiniteActivation(check)
        if output and out is None:
            outs.append(yb.to(x.device))
        elif output:
            out[rows] = yb
        del yb  # else it stays on the device through the next batch's forward (70B: 64 MiB at the peak)
    if not output or not calls:
        return None
    return out if out is not None else torch.cat(outs, dim=0)


def _search_group(block, g: ScaleGroup, stats: _InputStats, saved_calls, qcfg, scfg):
    lins = [get_module(block, n) for n in g.linears]
    # the member that saw the most tokens (the router or shared expert, not a routed expert) gives mean|x|
    x_mean = stats.x_mean(max((*g.compensate, *g.linears), key=stats.tokens))
    w_mean = awq.weight_mean([lin.weight for lin in lins], qcfg) if scfg.formula != "x" else None

    if g.inspect in g.linears or scfg.loss == "gram":
        # Output error of the group's linears, exact over all calibration tokens in Gram form. When the
        # inspected module is that single linear this is the reference loss; otherwise a surrogate that
        # skips the non-linear rest of the module (attention, SiLU * up). Reads the weights, never writes.
        ws = [lin.weight for lin in lins]
        # each linear's own Gram (routed experts see different tokens); linears without tokens add nothing
        grams = [stats.gram_of(n) if stats.has(n) else None for n in g.linears]

        def loss_fn(s):
            return sum(awq.scaled_gram_error(w, s, qcfg, gm) for w, gm in zip(ws, grams) if gm is not None)

        s, alpha, losses = _search(x_mean, w_mean, loss_fn, scfg)
        return s.to(ws[0].device), alpha, losses
    # non-linear module: output MSE on the saved calls, the group's linears set to Q(W*s)/s in turn
    mod = get_module(block, g.inspect)
    calls = saved_calls[g.inspect]
    ref = [_call(mod, a, kw).float() for a, kw in calls]
    orig = [lin.weight.clone() for lin in lins]

    def loss_fn(s):
        for lin, w in zip(lins, orig):
            lin.weight.copy_(awq.scaled_fake_quant(w, s, qcfg).to(w.dtype))
        err = sum(((_call(mod, a, kw).float() - r) ** 2).sum() for (a, kw), r in zip(calls, ref))
        return err

    try:
        s, alpha, losses = _search(x_mean, w_mean, loss_fn, scfg)
    finally:
        for lin, w in zip(lins, orig):
            lin.weight.copy_(w)
    return s.to(orig[0].device), alpha, losses


def _search(x_mean, w_mean, loss_fn, scfg):
    """The grid of scfg, then (refine) alphas around its best."""
    s, alpha, losses = awq.search_scale(x_mean, w_mean, loss_fn, awq.candidates(scfg))
    if scfg.refine:
        s2, alpha2, losses2 = awq.search_scale(x_mean, w_mean, loss_fn, awq.refined(alpha, scfg))
        if losses2.min() < losses.min():
            s, alpha = s2, alpha2
        losses = torch.cat([losses, losses2])
    return s, alpha, losses


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
                   x=None, gram_bytes: float | None = None, gram_whole_max: float | None = None):
    """Quantize every decoder block of `model`, one block on `device` at a time.

    rows [n, seqlen] calibration token ids (None with scfg None: RTN needs no data). blocks: where the
    blocks come from (salience.lazy.InMemoryBlocks(model) by default: quantized in place on the CPU;
    LazyBlocks: read from the shards, freed after). on_block(BlockResult, block, x_next) is called as each
    block finishes (the checkpoint writer streams it to disk); x_next [n, seqlen, hidden] is the next
    block's input, the activation buffer itself: on_block may return a function that the driver calls
    before it next overwrites the buffer (the writer saves it from there, no host copy), else x_next is
    valid only during the call. Resuming: start = first block to do, x = its input, or a function that
    reads it into the given buffer and returns True (CheckpointWriter.read_activations).
    gram_bytes: the Grams one pass over the calibration rows may accumulate (quantize_block); default: one
    block's bytes on an accelerator, no limit (one pass, fastest) on the CPU. Results do not depend on it.
    gram_whole_max: the largest Gram kept whole; larger ones keep their upper triangle (quantize_block;
    the losses then change in their last bits). Default: on an accelerator the activation buffer's bytes
    (the budget's share for it, free on the device since the buffer lives on the host), none on the CPU.
    Returns the list of block reports (of blocks start..).

    Device memory (an accelerator): the block, its integer results, one batch's activations and the Grams
    of one pass. The activations of all calibration rows [n, seqlen, hidden] (7B, 128 x 512 rows: 0.5 GiB)
    stay in pinned host memory, one buffer overwritten by each block's output, read a batch at a time. The
    peak is the pass that accumulates down_proj's fp32 Gram, at the MLP: Llama-2-7B (batches of 8 x 512
    tokens) block 0.38 GiB + Gram 11008^2 * 4 = 0.45 + act(gate), up, their product [4096, 11008] and ~3
    [4096, 4096] bf16 = 0.35: ~1.17 GiB (2 blocks + cache: 1.25; the Gram, 0.45 GiB, is within the cache's
    0.5 and stays whole). 70B: the whole Gram (3.06 GiB) is more than the cache (1 GiB): its upper triangle
    in 28 panels of 1024 rows, 1.58 GiB; block 1.59 + 1.58 + act(gate), up, their product [4096, 28672]
    (0.66) and ~3 [4096, 8192] (0.19): ~4.0 GiB (2 blocks + cache: 4.19; with the whole Gram 5.61 measured).
    benchmarks/quantize.py measures each phase."""
    blocks = blocks if blocks is not None else InMemoryBlocks(model, arch)
    dtype = dtype or next(model.parameters()).dtype
    keep_fp32 = fp32_names(model)
    host = torch.device(device).type != "cpu"  # the activations stay in host memory
    calls = x_fp = None
    if scfg is not None:
        x0, calls = capture_block_inputs(model, arch, rows, batch_size, device, host=host)
        # the captured kwargs (rotary cos/sin, float masks) carry the loaded model's dtype: an fp32 model
        # computed in bf16 would otherwise promote q/k to fp32 inside the block
        calls = [[(_cast_floats(a, dtype), _cast_floats(kw, dtype)) for a, kw in c] for c in calls]
        # one activation buffer, overwritten by each block's output
        if x0.dtype != dtype:
            x0 = x0.to(dtype)
        if host and torch.device(device).type == "cuda" and not x0.is_pinned():
            x0 = x0.pin_memory()
        if callable(x):  # resuming: the saved input of block `start` is read into the buffer
            if not x(x0):
                raise ValueError(f"resuming at block {start}: no saved input activations")
        elif x is not None:
            x0.copy_(x)
        x = x0
        del x0
        if scfg.rounding == "tune" and scfg.propagate:
            if start:  # a checkpoint saves the quantized stream only
                raise ValueError("resuming a run that tunes on propagated inputs is not supported: "
                                 "the full-precision model's activations are not saved; restart it")
            x_fp = x.clone()  # the full-precision model's activations: the tuning's targets
        blocks.drop_base()  # lazy: the embeddings are not needed again
        _phase_end(-1, "capture")
    if gram_whole_max is None:
        gram_whole_max = x.numel() * x.element_size() if host and x is not None else math.inf
    reports = []
    # one tick per block; the ETA counts only this run's blocks (a resumed run starts at `start`)
    before_write = None  # what on_block returned: called before x is overwritten
    bar = tqdm(range(start, len(blocks)), desc="AWQ" if scfg else "RTN", unit="block", total=len(blocks),
               initial=start, disable=not progress)
    for i in bar:
        block = blocks.load(i)  # on the host (lazy: read from the shards)
        moe.unfuse(block, arch)  # fused experts -> per-expert linears (no-op for dense blocks)
        block = to_compute(block, device, dtype, keep_fp32)  # the router stays fp32 if asked
        blocks.prefetch(i + 1)  # read ahead while this block is quantized
        _phase_end(i, "load")
        budget = gram_bytes if gram_bytes is not None else \
            math.inf if not host else sum(p.numel() * p.element_size() for p in block.parameters())
        try:
            res, x = quantize_block(block, i, x, calls[i] if calls else [], arch, qcfg, scfg, batch_size, out=x,
                                    gram_bytes=budget, before_write=before_write,
                                    gram_whole_max=gram_whole_max, x_fp=x_fp)
        except NonFiniteActivation as e:
            raise NonFiniteActivation(f"block {i}: {e}") from None
        if on_block is not None:
            before_write = on_block(res, block, x)
        blocks.release(i, block)
        reports.append(res.report)
        bar.set_postfix_str(f"{res.report['seconds']:.1f}s/block")
        del res, block  # the integer results live on the device: free them before the next block
        _phase_end(i, "write")
    blocks.close()
    return reports


def _phase_end(index: int, name: str):
    if phase_hook is not None:
        phase_hook(index, name)
