"""Routed experts as one linear per projection per expert.

transformers >= 5 stores a block's experts fused: gate_up_proj [E, 2I, H] (rows [gate; up] of each
expert) and down_proj [E, H, I], and runs them with top_k_index [T, k] / top_k_weights [T, k] from the
router. AWQ needs linears it can hook, scale and quantize, and the AWQ GEMM checkpoint (AutoAWQ, vLLM) stores
one quantized linear per expert: `<experts>.<e>.<gate|up|down>.qweight`. `unfuse` swaps the fused module for
`UnfusedExperts`, whose forward is the same computation: for every expert e and every token t routed to it
at position j, y[t] += w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])). It is used for quantizing and,
on a model built from config, for loading the checkpoint back (whose expert linears become QuantLinear).
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import Arch, Experts, get_module


class _Expert(nn.Module):
    pass


class UnfusedExperts(nn.ModuleList):
    """experts[e].<gate>, .<up>, .<down>: nn.Linear without bias. Called like the fused module."""

    def __init__(self, spec: Experts, n_experts: int, hidden: int, inter: int, act_fn: nn.Module,
                 dtype=None, device=None):
        super().__init__()
        self.spec = spec
        # not a child module: the list's children are exactly the experts (indices 0..E-1); stateless
        self.__dict__["act_fn"] = act_fn
        for _ in range(n_experts):
            e = _Expert()
            kw = dict(bias=False, dtype=dtype, device=device)
            setattr(e, spec.gate, nn.Linear(hidden, inter, **kw))
            setattr(e, spec.up, nn.Linear(hidden, inter, **kw))
            setattr(e, spec.down, nn.Linear(inter, hidden, **kw))
            self.append(e)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states [T, H]; top_k_index, top_k_weights [T, k]
        out = torch.zeros_like(hidden_states)
        g, u, d = self.spec.gate, self.spec.up, self.spec.down
        for e in top_k_index.unique().tolist():
            if not 0 <= e < len(self):  # padding index of expert-parallel layouts
                continue
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            ex = self[e]
            h = getattr(ex, d)(self.act_fn(getattr(ex, g)(x)) * getattr(ex, u)(x))
            out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _check_layout(fused: nn.Module, path: str):
    """The decorator transformers puts on its experts classes records the layout; accept the common one."""
    layout = {k: getattr(fused, k, None) for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                    "has_post_expert_norm")}
    want = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
            "has_post_expert_norm": False}
    if any(layout[k] is not None and layout[k] != v for k, v in want.items()) or \
            getattr(fused, "gate_up_proj", None) is None or getattr(fused, "down_proj", None) is None:
        raise NotImplementedError(f"{path}: fused experts layout {layout} ({type(fused).__name__}) is not "
                                  f"supported; supported: {want} with gate_up_proj [E, 2I, H], "
                                  "down_proj [E, H, I]")


@torch.no_grad()
def unfuse(block: nn.Module, arch: Arch) -> int:
    """Replace the block's fused experts module (if any) by UnfusedExperts holding the same weights.
    Returns the number of experts (0 for a block without routed experts, e.g. a dense layer)."""
    spec = arch.experts
    if spec is None:
        return 0
    parent_path, _, leaf = spec.path.rpartition(".")
    parent = get_module(block, parent_path) if parent_path else block
    fused = getattr(parent, leaf, None)
    if fused is None:
        return 0
    if isinstance(fused, UnfusedExperts):
        return len(fused)
    _check_layout(fused, spec.path)
    gu, dn = fused.gate_up_proj, fused.down_proj  # [E, 2I, H], [E, H, I]
    n, two_i, hidden = gu.shape
    inter = two_i // 2
    new = UnfusedExperts(spec, n, hidden, inter, fused.act_fn, dtype=gu.dtype, device=gu.device)
    if gu.device.type != "meta":
        for e, ex in enumerate(new):
            getattr(ex, spec.gate).weight.copy_(gu[e, :inter])
            getattr(ex, spec.up).weight.copy_(gu[e, inter:])
            getattr(ex, spec.down).weight.copy_(dn[e])
    setattr(parent, leaf, new)
    return n


def n_experts(block: nn.Module, arch: Arch) -> int:
    if arch.experts is None:
        return 0
    try:
        mod = get_module(block, arch.experts.path)
    except AttributeError:
        return 0
    return len(mod) if isinstance(mod, UnfusedExperts) else 0
