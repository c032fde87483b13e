"""Finding the scaling groups of an architecture with no table entry, from one forward pass.

A scaling group (prev -> linears) is valid when dividing prev's output channels by s and multiplying the
linears' input columns by s leaves the block's output unchanged. Discovery proposes candidates from one
recorded forward pass of each block on random tokens, then keeps only those that pass that test numerically:

1. Direct readers. Hooks record the output of every norm-like module (a leaf with a 1-D weight) and of every
   linear, and the input of every linear and router-like module (a leaf with a 2-D weight that is not an
   nn.Linear). A module reads prev's output when every row of its input equals a row of prev's output (exact
   values, so views, reshapes and the gathers of routed experts are followed). The readers of one prev form
   one group; readers that cannot be quantized (routers, linears whose out_features is not a multiple of 8,
   such as a shared-expert gate) are compensated instead. A norm group is tested with both folds,
   w / s and (1 + w) / s - 1 (Gemma), and keeps the exact one.
2. Linear -> linear through channel-wise homogeneous ops (up -> down through act(gate) * up; v -> o through
   attention without GQA; chunks of fused qkv / gate_up outputs): for every linear P and every set S of
   linears sharing one input, in the same sub-module, with P's output rows (or an equal chunk of them)
   as wide as S's inputs, the fold is tried with a random s and kept if exact.

`inspect` is the innermost module containing the group's modules (the linear itself for one linear).
Expert indices are written `*`. Groups found in some blocks only (dense vs MoE layers) are optional.
What discovery cannot know: which linears are q/k (no_clip) and whether fp16 overflows (dtype); the
printed entry says so.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from torch import nn

from .arch import Arch, Experts, ScaleGroup, get_module
from .moe import UnfusedExperts, unfuse
from .packing import PACK
from .quantize import _prev_rows, apply_scale, capture_block_inputs


def find_layers(model: nn.Module) -> str:
    """The ModuleList of decoder blocks: the one holding the most parameters."""
    best, size = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and not isinstance(mod, UnfusedExperts) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > size:
                best, size = name, n
    if best is None:
        raise ValueError("no nn.ModuleList of blocks found in the model")
    return best


def find_experts(block: nn.Module) -> Experts | None:
    """Fused experts (transformers >= 5: gate_up_proj [E, 2I, H], down_proj [E, H, I] parameters)."""
    for name, mod in block.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3:
            return Experts(name)
    return None


def _leaf_kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Linear):
        return "linear"
    if any(True for _ in mod.children()):
        return None
    w = getattr(mod, "weight", None)
    if not isinstance(w, (nn.Parameter, torch.Tensor)):
        return None
    return {1: "norm", 2: "router"}.get(w.dim())


def _quantizable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and mod.out_features % PACK == 0


class _Trace:
    """Per module of one block: inputs (linears, routers) and outputs (norms, linears), rows [n, d]."""

    def __init__(self, block: nn.Module):
        self.kind = {n: k for n, m in block.named_modules() if n and (k := _leaf_kind(m))}
        self.inputs: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        self.parent_out: dict[str, list] = {}  # outputs of the sub-modules holding the leaves
        self.order: dict[str, int] = {}
        self.handles = []
        for n, m in block.named_modules():
            if n in self.kind:
                self.handles.append(m.register_forward_hook(self._hook(n)))
            elif n:
                self.handles.append(m.register_forward_hook(self._parent_hook(n)))

    def _parent_hook(self, name):
        def fn(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if isinstance(out, torch.Tensor):
                self.parent_out.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]).float())
        return fn

    def _hook(self, name):
        def fn(module, args, out):
            self.order.setdefault(name, len(self.order))
            if self.kind[name] in ("linear", "router") and args:
                x = args[0].detach()
                self.inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float())
            if self.kind[name] in ("norm", "linear") and isinstance(out, torch.Tensor):
                self.outputs.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]).float())
        return fn

    def close(self):
        for h in self.handles:
            h.remove()
        self.inputs = {k: torch.cat(v) for k, v in self.inputs.items()}
        self.outputs = {k: torch.cat(v) for k, v in self.outputs.items()}
        self.parent_out = {k: torch.cat(v) for k, v in self.parent_out.items()}

    def inspect(self, members) -> str:
        """The module whose output error is the loss: the innermost module holding all members; for one
        linear, the sub-module it sits in unless the linear's output is that module's output (o_proj,
        down_proj: the linear is then the cheaper, equal choice) or it sits in the block itself."""
        if len(members) > 1:
            return _lca(members)
        lin = members[0]
        parent = lin.rpartition(".")[0]
        out = self.parent_out.get(parent)
        own = self.outputs[lin]
        if not parent or out is None or (out.shape == own.shape and torch.equal(out, own)):
            return lin
        return parent


def _rows_within(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Every row of x [m, d] equals (to rounding) some row of y [n, d]."""
    if x.shape[-1] != y.shape[-1]:
        return False
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)  # exact distances
    return bool((d <= 1e-5 * (1 + x.norm(dim=1))).all())


def _lca(names) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for seg in zip(*parts):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return ".".join(common)


class _Checker:
    """Folds a candidate group with a random s and compares the block's output with the reference."""

    def __init__(self, block, args, kwargs, x):
        self.block, self.args, self.kwargs, self.x = block, args, kwargs, x
        self.state = {k: v.clone() for k, v in block.state_dict().items()}
        self.ref = self._run()
        g = torch.Generator().manual_seed(0)
        self.gen = g

    @torch.no_grad()
    def _run(self):
        out = self.block(self.x, *self.args, **self.kwargs)
        return (out[0] if isinstance(out, tuple) else out).float()

    @torch.no_grad()
    def exact(self, g: ScaleGroup, plus_one: bool = False) -> bool:
        prev = get_module(self.block, g.prev)
        width = prev.weight[_prev_rows(prev, g)].shape[0]
        s = torch.exp(torch.rand(width, generator=self.gen) * 2 - 1)  # in [1/e, e]
        try:
            apply_scale(self.block, g, s.to(prev.weight.device), plus_one)
            out = self._run()
        finally:
            self.block.load_state_dict(self.state)
        err = (out - self.ref).norm() / self.ref.norm().clamp(min=1e-12)
        return bool(err < 1e-4)


@torch.no_grad()
def discover_block(block: nn.Module, x: torch.Tensor, args=(), kwargs=None) -> tuple[list[ScaleGroup], dict]:
    """Scaling groups of one block (experts already unfused), from its input x [b, t, h] and call args.
    Returns (groups in execution order, {norm prev: plus_one})."""
    kwargs = kwargs or {}
    trace = _Trace(block)
    try:
        block(x, *args, **kwargs)
    finally:
        trace.close()
    check = _Checker(block, args, kwargs, x)
    mods = dict(block.named_modules())
    readers = [n for n in trace.inputs]
    groups: list[tuple[int, ScaleGroup]] = []
    plus_one: dict[str, bool] = {}
    direct: set[tuple[str, str]] = set()

    # 1. direct readers of each norm's / linear's output
    for p, y in trace.outputs.items():
        rd = [r for r in readers if r != p and _rows_within(trace.inputs[r], y)]
        quant = tuple(r for r in rd if _quantizable(mods[r]))
        comp = tuple(r for r in rd if not _quantizable(mods[r]))
        if not quant:
            continue
        members = (*quant, *comp)
        g = ScaleGroup(p, quant, trace.inspect(members), compensate=comp)
        options = (False, True) if trace.kind[p] == "norm" else (False,)
        ok = [po for po in options if check.exact(g, po)]
        if not ok:
            continue
        if trace.kind[p] == "norm":
            plus_one[p] = ok[0]
        groups.append((trace.order[p], g))
        direct.update((p, r) for r in quant)

    # 2. linear -> linear through homogeneous ops: consumer sets = linears reading one input
    classes: list[list[str]] = []
    for r in sorted((r for r in readers if trace.kind[r] == "linear" and _quantizable(mods[r])),
                    key=trace.order.get):
        for c in classes:
            if torch.equal(trace.inputs[c[0]], trace.inputs[r]):
                c.append(r)
                break
        else:
            classes.append([r])
    for p in sorted((n for n in trace.inputs if trace.kind[n] == "linear"), key=trace.order.get):
        n_out = mods[p].out_features
        for c in classes:
            if p in c or any((p, r) in direct for r in c) or trace.order[c[0]] < trace.order[p]:
                continue
            w = mods[c[0]].in_features
            if n_out % w:
                continue
            n = n_out // w
            for i in range(n):
                g = ScaleGroup(p, tuple(c), trace.inspect(c), prev_chunk=(i, n) if n > 1 else None)
                if check.exact(g):
                    groups.append((trace.order[p], g))
                    break
    return [g for _, g in sorted(groups, key=lambda t: t[0])], plus_one


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _wild(name: str) -> str:
    return _INDEX.sub("*", name)


def collapse(groups) -> list[ScaleGroup]:
    """Expert indices -> `*`; groups repeated per expert become one."""
    out, seen = [], set()
    for g in groups:
        def uniq(ns):
            return tuple(dict.fromkeys(_wild(n) for n in ns))
        c = ScaleGroup(_wild(g.prev), uniq(g.linears), _wild(g.inspect), g.prev_chunk, g.optional,
                       uniq(g.compensate))
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def group_key(g: ScaleGroup):
    """Identity of a group for comparisons (member order and `optional` do not matter)."""
    return (g.prev, frozenset(g.linears), g.inspect, g.prev_chunk, frozenset(g.compensate))


@torch.no_grad()
def discover(model: nn.Module, experts: Experts | None = None, n_rows: int = 2, seqlen: int = 32,
             seed: int = 0, vocab: int | None = None) -> Arch:
    """An Arch for `model` found from one forward pass on random tokens (the model is modified in place only
    by unfusing fused experts, an exact change). experts: the naming of unfused experts (default: found,
    named gate_proj / up_proj / down_proj)."""
    layers_path = find_layers(model)
    layers = get_module(model, layers_path)
    spec = experts or find_experts(layers[0]) or next((e for b in layers if (e := find_experts(b))), None)
    arch = Arch(layers=layers_path, groups=(), experts=spec)
    vocab = vocab or model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, min(vocab, 32000), (n_rows, seqlen), generator=g)
    dtype = next(model.parameters()).dtype
    x, calls = capture_block_inputs(model, arch, rows, n_rows, "cpu")
    per_block, plus_one, signatures = [], {}, {}
    for i, block in enumerate(layers):
        unfuse(block, arch)
        x = x.to(dtype)
        (args, kwargs), = calls[i]
        sig = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
        if sig in signatures:  # same structure as an earlier block: same groups
            found = signatures[sig]
        else:
            found, po = discover_block(block, x, args, kwargs)
            plus_one.update(po)
            signatures[sig] = found
        per_block.append(collapse(found))
        out = block(x, *args, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    # union over blocks in first-seen order; present in only some blocks -> optional
    keys_per_block = [{group_key(gr) for gr in b} for b in per_block]
    merged, seen = [], set()
    for b in per_block:
        for gr in b:
            k = group_key(gr)
            if k in seen:
                continue
            seen.add(k)
            merged.append(replace(gr, optional=not all(k in kb for kb in keys_per_block)))
    if len(set(plus_one.values())) > 1:
        raise ValueError(f"norms fold differently ({plus_one}): one Arch has one norm_plus_one flag")
    not_convert = tuple(dict.fromkeys(c for gr in merged for c in gr.compensate))
    return Arch(layers=layers_path, groups=tuple(merged), norm_plus_one=any(plus_one.values()),
                experts=spec, not_convert=not_convert,
                notes=(("found by salience.discover: check no_clip (q/k linears) and dtype (bfloat16 if fp16 "
                        "overflows) by hand"),))


# ---- saving an entry ---------------------------------------------------------------------------------------

def arch_to_python(arch: Arch, model_type: str) -> str:
    """The entry as Python to paste into salience/arch.py's ARCHS."""
    lines = [f'    "{model_type}": Arch(', f'        layers="{arch.layers}",', "        groups=("]
    for g in arch.groups:
        extra = ""
        if g.prev_chunk:
            extra += f", prev_chunk={g.prev_chunk}"
        if g.optional:
            extra += ", optional=True"
        if g.compensate:
            extra += f", compensate={g.compensate!r}"
        lines.append(f"            ScaleGroup({g.prev!r}, {g.linears!r}, {g.inspect!r}{extra}),")
    lines.append("        ),")
    if arch.norm_plus_one:
        lines.append("        norm_plus_one=True,")
    if arch.experts:
        e = arch.experts
        lines.append(f"        experts=Experts({e.path!r}, {e.gate!r}, {e.up!r}, {e.down!r}),")
    if arch.not_convert:
        lines.append(f"        not_convert={arch.not_convert!r},")
    lines.append("        no_clip=(),  # TODO: the q/k projections (their error is shaped by softmax)")
    lines.append('        dtype="float16",  # "bfloat16" if the model overflows fp16 (Gemma)')
    lines.append("    ),")
    return "\n".join(lines)
