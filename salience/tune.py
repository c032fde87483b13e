"""Block-wise tuning of the rounding and of the ranges by signed gradient descent (the idea of AutoRound:
Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs", 2023).

The AWQ search fixes per group a scale (folded into the weights) and a clip range; round-to-nearest then
picks each code alone, GPTQ picks them one linear at a time against that linear's own output. Both minimise a
per-linear error. Tuning minimises the error of the whole block instead, through attention and the MLP's
non-linearity, over the calibration rows:

    L(V, a) = mean over tokens of || block(x; W_hat(V, a)) - block(x; W) ||^2          x [rows, T, hidden]

for every quantized linear of the block at once, W [N, K] (AWQ scale folded in), with

    range     lo = wmin * a_lo,  hi = wmax * a_hi       wmin/wmax [N, G]: the group's data range
    scale     s  = fp16((hi - lo) / qmax)               a_lo, a_hi [N, G] in [A_MIN, 1]: start at the clip
    zero      z  = clamp(round(-lo / s), 0, qmax)       search's shrink (asymmetric: lo = wmin * a exactly)
    codes     q  = clamp(round(W / s + V) + z, 0, qmax) V [N, K] in [-1/2, 1/2]: starts at 0 (nearest)
    W_hat        = (q - z) * s

so each code may move one step up or down from nearest, and each range shrink may change. The rounds pass
gradients straight through (round(u) -> u in the backward). Each step takes the gradient on a few rows and
moves every parameter by lr * sign(grad) (lr decays linearly to 0): the total move of V is bounded by
lr * steps / 2, which the default lr = 1 / steps keeps near one half. The tuned parameters are kept only if
their loss over all calibration rows is below the starting point's (never worse on the calibration text).

x and the target: by default (SearchConfig.propagate, on with tuning) x is the quantized model's input to the
block (the previous blocks already tuned) and the target the full-precision model's output of the block, so
each block also makes up for the error of those before it (AutoRound's quantized inputs); with
propagate=False, x is the full-precision model's input and the target the block's own output on it. On
SmolLM2 g64 (benchmarks/results/ablation-smollm2-g64-tune.md) the first closes 62% of round-to-nearest's
perplexity loss, the second 56%, nearest rounding on the same grid 51%.

The codes, scales and zeros that come out are those of the AWQ GEMM format, as the other roundings give.
Cost: `steps` forward and backward passes of the block over `rows` calibration rows (SmolLM2-135M on a
2-core CPU in bf16, 4 x 512 tokens: ~0.2 s a step), plus one fp32 copy of the block's weights, V and its
gradient.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .quant import QuantConfig, range_to_qparams

A_MIN = 0.5  # the clip search's largest shrink (SearchConfig.clip_max_shrink's default): ranges stay >= half


def _round_ste(u: torch.Tensor) -> torch.Tensor:
    """round(u) forward, identity backward."""
    return u + (torch.round(u) - u).detach()


def _fp16_ste(u: torch.Tensor) -> torch.Tensor:
    """u rounded to fp16 (the checkpoint's scales) forward, identity backward."""
    return u + (u.half().float() - u).detach()


def grid(wmin: torch.Tensor, wmax: torch.Tensor, a_lo: torch.Tensor, a_hi: torch.Tensor, qmax: int):
    """Scale (fp16-rounded) and integer zero [N, G] of the ranges [wmin a_lo, wmax a_hi], as
    salience.quant.range_to_qparams then the fp16 rounding of quantize_linear; differentiable (STE)."""
    lo, hi = wmin * a_lo, wmax * a_hi
    s = (hi - lo).clamp(min=1e-5) / qmax
    z = _round_ste(-lo / s).clamp(0, qmax)  # the zero from the unrounded scale, as range_to_qparams
    return _fp16_ste(s), z


def fake_quant(w: torch.Tensor, v: torch.Tensor, wmin, wmax, a_lo, a_hi, qmax: int) -> torch.Tensor:
    """W_hat [N, K] of w [N, K] fp32 with rounding offsets v [N, K] and range factors a_lo/a_hi [N, G];
    differentiable in v, a_lo, a_hi (straight-through rounds)."""
    n, k = w.shape
    ng = wmin.shape[1]
    s, z = grid(wmin, wmax, a_lo, a_hi, qmax)  # [N, G]
    wg, vg = w.reshape(n, ng, -1), v.reshape(n, ng, -1)
    q = (_round_ste(wg / s[..., None] + vg) + z[..., None]).clamp(0, qmax)
    return ((q - z[..., None]) * s[..., None]).reshape(n, k)


@torch.no_grad()
def codes_of(w, v, wmin, wmax, a_lo, a_hi, cfg: QuantConfig):
    """The integer result of fake_quant: codes uint8 [N, K], scales (fp16 values) and zeros [N, G] fp32."""
    n, k = w.shape
    lo, hi = wmin * a_lo, wmax * a_hi
    scales, zeros = range_to_qparams(lo, hi, cfg)
    scales = scales.half().float()
    q = (torch.round(w.reshape(n, -1, cfg.group_size if cfg.group_size > 0 else k) / scales[..., None]
                     + v.reshape(n, scales.shape[1], -1)) + zeros[..., None]).clamp(0, cfg.qmax)
    return q.reshape(n, k).to(torch.uint8), scales, zeros


def start_factors(w: torch.Tensor, clip_min, clip_max, cfg: QuantConfig):
    """Data range wmin/wmax [N, G] of w and the factors a_lo/a_hi [N, G] that give the clip search's range
    (clip_min = wmin a_lo; 1 where none was searched or wmin = 0), clamped to [A_MIN, 1]."""
    n, k = w.shape
    wg = w.float().reshape(n, cfg.groups(k), -1)
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)

    def factor(clip, ref):
        if clip is None:
            return torch.ones_like(ref)
        f = torch.where(ref != 0, clip.float() / torch.where(ref != 0, ref, 1), torch.ones_like(ref))
        return f.clamp(A_MIN, 1.0)

    return wmin, wmax, factor(clip_min, wmin), factor(clip_max, wmax)


def slice_rows(obj, n: int, rows: slice):
    """Tensors with first dim n inside (nested) tuples, lists and dicts cut to `rows`; others as they are
    (a block call's extra arguments: position embeddings and masks per row, or broadcast over rows)."""
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.dim() > 0 and obj.shape[0] == n and n > 1 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_rows(o, n, rows) for o in obj)
    if isinstance(obj, dict):
        return {k: slice_rows(v, n, rows) for k, v in obj.items()}
    return obj


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


class _Linear:
    """One tuned linear: its weight w [N, K] fp32, data range wmin/wmax [N, G], and the parameters v [N, K],
    a_lo/a_hi [N, G] (a0: their start)."""

    def __init__(self, weight: torch.Tensor, clip_min, clip_max, cfg: QuantConfig):
        self.w = weight.detach().float()
        self.wmin, self.wmax, self.a_lo, self.a_hi = start_factors(self.w, clip_min, clip_max, cfg)
        self.v = torch.zeros_like(self.w)
        self.a0 = (self.a_lo.clone(), self.a_hi.clone())

    @property
    def leaves(self):
        return [self.v, self.a_lo, self.a_hi]

    def clamp_(self):
        self.v.clamp_(-0.5, 0.5)
        self.a_lo.clamp_(A_MIN, 1.0)
        self.a_hi.clamp_(A_MIN, 1.0)

    def fake_quant(self, qmax: int) -> torch.Tensor:
        return fake_quant(self.w, self.v, self.wmin, self.wmax, self.a_lo, self.a_hi, qmax)

    @torch.no_grad()
    def reset_(self):
        """Back to the start (nearest rounding on the searched ranges)."""
        self.v.zero_()
        self.a_lo.copy_(self.a0[0])
        self.a_hi.copy_(self.a0[1])

    def codes(self, cfg: QuantConfig):
        return codes_of(self.w, self.v, self.wmin, self.wmax, self.a_lo, self.a_hi, cfg)

    def range(self):
        """The ranges (lo, hi) [N, G] the codes are on."""
        return self.wmin * self.a_lo, self.wmax * self.a_hi


def tune_block(block: nn.Module, start: dict[str, tuple], x: torch.Tensor, y: torch.Tensor, calls,
               batch_size: int, cfg: QuantConfig, steps: int, rows: int = 4, lr: float | None = None,
               seed: int = 0):
    """Tune the linears named in `start` (name -> (clip_min, clip_max) [N, G] or (None, None)) of `block`
    against its full-precision output y [n_rows, T, hidden] on the inputs x [n_rows, T, hidden] (batch b of
    `batch_size` rows runs with calls[b]'s extra args and kwargs). The block's weights are read (AWQ scale
    folded in) and left unchanged. Each step: `rows` consecutive calibration rows of one batch, at random.
    Returns ({name: (codes uint8 [N, K], scales, zeros [N, G])}, {name: (lo, hi) [N, G], the tuned ranges},
    report)."""
    t0 = time.time()
    dev = next(block.parameters()).device
    lins = {n: _Linear(block.get_submodule(n).weight, *start[n], cfg) for n in start}
    wdt = block.get_submodule(next(iter(start))).weight.dtype
    leaves = [t for lin in lins.values() for t in lin.leaves]

    def weights():
        return {f"{n}.weight": lin.fake_quant(cfg.qmax).to(wdt) for n, lin in lins.items()}

    def run(ws, b, sub=slice(None)):
        """The block with weights ws over the rows `sub` of batch b: [len(sub), T, hidden]."""
        args, kwargs = calls[b]
        nb = min(batch_size, x.shape[0] - b * batch_size)
        xb = x[b * batch_size:(b + 1) * batch_size][sub].to(dev)
        args, kwargs = slice_rows(args, nb, sub), slice_rows(kwargs, nb, sub)
        return _out(torch.func.functional_call(block, ws, (xb, *args), kwargs))

    @torch.no_grad()
    def full_loss():
        """MSE of the block's output over all calibration rows."""
        ws = weights()
        tot = 0.0
        for b in range(len(calls)):
            yb = y[b * batch_size:(b + 1) * batch_size].to(dev)
            tot += float(((run(ws, b).float() - yb.float()) ** 2).sum())
        return tot / y.numel()

    frozen = [p for p in block.parameters() if p.requires_grad]  # no gradients for the block's own weights
    for p in frozen:
        p.requires_grad_(False)
    try:
        loss0 = full_loss()
        lr0 = 1.0 / steps if lr is None else lr
        gen = torch.Generator().manual_seed(seed)
        n_rows = x.shape[0]
        rows = max(1, min(rows, batch_size, n_rows))
        with torch.enable_grad():
            for t in leaves:
                t.requires_grad_(True)
            for step in range(steps):
                b = int(torch.randint(0, len(calls), (1,), generator=gen))
                nb = min(batch_size, n_rows - b * batch_size)
                o = int(torch.randint(0, max(1, nb - rows + 1), (1,), generator=gen))
                sub = slice(o, o + rows)
                yb = y[b * batch_size:(b + 1) * batch_size][sub].to(dev).float()
                # the squared error relative to the target's mean power, summed (not averaged) over the
                # tokens: the same sign of gradient as the MSE, but gradients that a bf16/fp16 backward
                # does not flush to zero (the MSE of a well-quantized block is ~1e-6)
                loss = ((run(weights(), b, sub).float() - yb) ** 2).sum() / yb.pow(2).mean().clamp(min=1e-12)
                # allow_unused: an MoE expert no token of these rows was routed to has no gradient (stays)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                a = lr0 * (1 - step / steps)  # linear decay to 0
                with torch.no_grad():
                    for t, g in zip(leaves, grads):
                        if g is not None:
                            t.sub_(a * g.sign())
                    for lin in lins.values():
                        lin.clamp_()
            for t in leaves:
                t.requires_grad_(False)
        loss1 = full_loss()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    kept = loss1 < loss0
    if not kept:  # the start: never worse than it on the calibration rows
        for lin in lins.values():
            lin.reset_()
    out = {n: lin.codes(cfg) for n, lin in lins.items()}
    ranges = {n: lin.range() for n, lin in lins.items()}
    moved = 0
    for n, lin in lins.items() if kept else ():  # codes that differ from the start's
        lin.reset_()
        moved += int((out[n][0] != lin.codes(cfg)[0]).sum())
    report = {"loss_start": loss0, "loss_tuned": loss1, "kept": bool(kept), "steps": steps, "rows": rows,
              "codes_changed": moved / sum(lin.w.numel() for lin in lins.values()),
              "seconds": round(time.time() - t0, 3)}
    return out, ranges, report
