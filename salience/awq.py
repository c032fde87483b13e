"""AWQ search math (Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024): pure functions.

Scale search. For a scaling group with inputs X [T, K] (T calibration tokens) feeding linears W_i [N_i, K],
find per-input-channel scales s [K] minimising

    L(s) = || f(X; {Q(W_i * s) / s}) - f(X; {W_i}) ||^2          (f = the inspected module)

over s = x_mean^a / w_mean^(1-a) * c  (c normalises s so that sqrt(max(s) min(s)) = 1), a in a grid.
x_mean[k] = mean_t |X[t, k]|; w_mean[k] = mean over rows of |W| / max|W| of its group ("duo" formula,
AutoAWQ); the x-only formula (llm-awq) uses w_mean = 1. When f is a single linear, L is exact and cheap
in Gram form: L = tr(dW G dW^T), dW = Q(W*s)/s - W, G = X^T X [K, K].

A Gram too large for the device (Llama-2-70B down_proj: K = 28672, 3.06 GiB in fp32) is kept as the row
panels of its upper triangle (PanelGram, about half the bytes) and the loss evaluated blockwise,
tr(dW G dW^T) = sum_i dW_i G_ii dW_i^T + 2 sum_{i<j} dW_i G_ij dW_j^T: the same sum, other rounding.

Clip search. For each linear (bar q/k), per (output row, group) choose the range shrink that minimises the
output error of that group's slice: dw [gs] with loss dw^T G_g dw, G_g the group's diagonal block of G.
The reference shrinks max|w| symmetrically although the quantizer is asymmetric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .quant import QuantConfig, fake_quantize_grouped


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the scale and clip searches; the defaults reproduce the reference algorithm."""

    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    alpha_one: bool = False  # also try alpha = 1 (the reference grid stops at (n_grid-1)/n_grid)
    # "x": s = x_mean^a (llm-awq); "duo": s = x_mean^a / w_mean^(1-a) (AutoAWQ); "both": search both
    formula: str = "x"
    clip_asym: bool = True  # shrink min and max separately (the quantizer is asymmetric); the ablation
    # (benchmarks/results/ablation-*.md) shows it beats the reference's symmetric shrink on both real models
    clip_grid: int = 20  # shrink steps of 1/clip_grid ...
    clip_max_shrink: float = 0.5  # ... down to (1 - clip_max_shrink) of the range
    # "output": error of the inspected module's output (reference), measured on `search_tokens` tokens;
    # "gram": error of the group's linear outputs, tr(dW G dW^T) over all tokens (fast on CPUs).
    loss: str = "gram"
    search_tokens: int = 8192
    # after the grid, `refine` more alphas each side of the best one at spacing 1 / (n_grid * (refine + 1))
    refine: int = 0
    # the next block's input is the quantized block's output (default: the full-precision output, as the
    # reference does): later blocks then search scales against the error that really reaches them
    # (with rounding "tune": each block is tuned on the quantized model's activations against the
    # full-precision model's output, a second activation buffer; see quantize_block's x_fp).
    # None: on with rounding "tune" (SmolLM2 g64: 24.260 vs 24.573 without, ablation-smollm2-g64-tune.md),
    # off otherwise (25.048 vs 24.905 for nearest rounding, ablation-smollm2-g64-propagate.md)
    propagate: bool | None = None
    # codes: "nearest" (round-to-nearest on the searched grid, the reference) or "gptq" (salience.gptq: the
    # same grid, the columns rounded in order with GPTQ's error feedback through the Gram of the linear's
    # scaled input, damped by gptq_damp * mean(diag G)). gptq keeps every full Gram of the block until its
    # linears are quantized (the reference keeps only diagonal blocks): see quantize_block's memory notes
    # Opt-in: its memory (every full Gram of a block) is above the GPU bounds nearest rounding meets.
    # gptq_damp is the one default of the damping (salience.gptq and quantize_linear take it as an argument).
    # GPTQ's usual 0.01 overfits the calibration text (worse than nearest on wiki); the value here was chosen
    # on a held-out text (Moby Dick; neither the calibration text lee nor the reported wiki windows) among
    # 0.3, 1, 3, 10: the best mean relative improvement of that perplexity over nearest rounding across
    # SmolLM2 g64 and Gemma-3-270M g128 (benchmarks/results/ablation-choice-heldout.md; damping 3 was a close
    # second there, and the better one on wiki)
    # "tune" (salience.tune): codes and range shrinks tuned by signed gradient descent on the error of the
    # whole block's output, tune_steps steps of tune_rows calibration rows each, from the nearest rounding on
    # the searched grid (kept only if better over all calibration rows)
    rounding: str = "nearest"
    gptq_damp: float = 1.0
    # ridge on the searches' loss: each input Gram G becomes G + search_damp * mean(diag G) * I before the
    # scale and clip searches (and GPTQ) read it, i.e. the loss gains search_damp * mean(x^2) * ||dW||^2, a
    # calibration-free weight error that pulls the searched scales and ranges away from what only the
    # calibration text's activations favour. 0: the reference loss. None: damp_for(bits), 0.3 at 4 bits,
    # chosen there on a held-out text (Moby Dick) among 0, 0.1, 0.3 across SmolLM2 g64 and Gemma-3-270M g128
    # (benchmarks/results/ablation-choice-damp.md; 1 was worse on both texts,
    # ablation-smollm2-g64-damp-robust.log; 0.5 and 1 worse than 0.3 on Moby Dick on both models in the
    # three-calibration runs ablation-*-damp-robust.md); 0 at other widths: at INT3 0.3 gave worse wiki perplexity
    # (SmolLM2 g32 36.326 vs 34.727, g64 43.684 vs 43.355) and no held-out choice was made there
    search_damp: float | None = None
    tune_steps: int = 200
    tune_rows: int = 4

    def __post_init__(self):
        if self.propagate is None:
            object.__setattr__(self, "propagate", self.rounding == "tune")
        if self.rounding not in ("nearest", "gptq", "tune"):
            raise ValueError(f"rounding must be 'nearest', 'gptq' or 'tune', got {self.rounding!r}")
        if self.tune_steps < 1 or self.tune_rows < 1:
            raise ValueError("tune_steps and tune_rows must be positive")
        if self.search_damp is not None and not self.search_damp >= 0:
            raise ValueError(f"search_damp must be >= 0, got {self.search_damp}")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be positive, got {self.gptq_damp}")
        if self.formula not in ("x", "duo", "both"):
            raise ValueError(f"formula must be 'x', 'duo' or 'both', got {self.formula!r}")
        if self.loss not in ("output", "gram"):
            raise ValueError(f"loss must be 'output' or 'gram', got {self.loss!r}")
        if self.n_grid < 1 or self.search_tokens < 1 or self.refine < 0:
            raise ValueError("n_grid and search_tokens must be positive, refine >= 0")


def damp_for(scfg: SearchConfig, bits: int) -> float:
    """The search damping a run at `bits` uses: scfg.search_damp, or its default for that width."""
    if scfg.search_damp is not None:
        return scfg.search_damp
    return 0.3 if bits == 4 else 0.0


def activation_mean(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> mean |x| per channel, fp32 [K]."""
    return x.reshape(-1, x.shape[-1]).float().abs().mean(dim=0)


def weight_mean(ws: Sequence[torch.Tensor], cfg: QuantConfig) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max |w|, over the concatenated linears: [K]."""
    w = torch.cat([x.float() for x in ws], dim=0)  # [sum N_i, K]
    n, k = w.shape
    wg = w.abs().reshape(n, cfg.groups(k), -1)
    wg = wg / wg.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return wg.reshape(n, k).mean(dim=0)


def scale_from_alpha(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """s = x_mean^a / w_mean^(1-a), normalised to sqrt(max s * min s) = 1; fp32 [K]."""
    s = x_mean.clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.clamp(min=1e-4).pow(1 - alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def candidates(scfg: SearchConfig) -> list[tuple[str, float]]:
    """(formula, alpha) pairs of the grid."""
    alphas = [i / scfg.n_grid for i in range(scfg.n_grid)] + ([1.0] if scfg.alpha_one else [])
    formulas = ("x", "duo") if scfg.formula == "both" else (scfg.formula,)
    return [(f, a) for f in formulas for a in alphas]


def refined(best: tuple[str, float], scfg: SearchConfig) -> list[tuple[str, float]]:
    """Alphas around the grid's best (same formula), inside [0, 1], not already on the grid."""
    formula, a = best
    step = 1.0 / (scfg.n_grid * (scfg.refine + 1))
    on_grid = {round(x, 9) for _, x in candidates(scfg)}
    out = []
    for j in range(1, scfg.refine + 1):
        for b in (a - j * step, a + j * step):
            if 0.0 <= b <= 1.0 and round(b, 9) not in on_grid:
                out.append((formula, b))
    return out


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor | None, loss_fn: Callable[[torch.Tensor], float],
                 grid: Sequence[tuple[str, float]] = tuple(("x", i / 20) for i in range(20))):
    """Grid search over (formula, alpha). loss_fn(s) -> output error with the group's linears at Q(W*s)/s.
    w_mean is needed only for "duo" candidates. Returns (best s [K], best (formula, alpha), losses)."""
    losses = []
    best = (float("inf"), None, None)
    for formula, alpha in grid:
        s = scale_from_alpha(x_mean, w_mean if formula == "duo" else None, alpha)
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, s, (formula, alpha))
    if best[1] is None:  # every loss was NaN
        raise FloatingPointError("scale search: the loss is NaN for every alpha")
    return best[1], best[2], torch.tensor(losses)


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Q(W * s) / s in fp32: the weight the quantized model effectively applies to unscaled inputs. One new
    [N, K] fp32 tensor and one temporary (w * s promotes w to fp32 exactly as w.float() would)."""
    n, k = w.shape
    ws = (w * s).reshape(n, cfg.groups(k), -1)
    return fake_quantize_grouped(ws, cfg.qmax, inplace=True).reshape(n, k).div_(s)


@dataclass
class PanelGram:
    """The upper triangle of a symmetric Gram G = X^T X [K, K] (fp32) as row panels: panel i =
    G[i*rows:(i+1)*rows, i*rows:] [rows, K - i*rows] (the last one may have fewer rows). It holds
    K^2 (1/2 + rows/2K) values: 70B down_proj (K = 28672, rows = 1024) 1.58 GiB instead of 3.06; the full
    K x K never exists, not even while accumulating (gram_add_)."""

    panels: list[torch.Tensor]
    rows: int

    @property
    def shape(self) -> tuple[int, int]:
        k = self.panels[0].shape[1]
        return k, k


def panel_gram(k: int, rows: int, device=None) -> PanelGram:
    """Zeros, as a PanelGram of a K x K Gram with panels of `rows` rows."""
    return PanelGram([torch.zeros(min(rows, k - r), k - r, dtype=torch.float32, device=device)
                      for r in range(0, k, rows)], rows)


def gram_bytes(k: int, rows: int | None = None) -> int:
    """Bytes of a K x K fp32 Gram: whole (rows None), or as a PanelGram of `rows`-row panels."""
    if rows is None:
        return 4 * k * k
    return sum(4 * min(rows, k - r) * (k - r) for r in range(0, k, rows))


def gram_add_(g: torch.Tensor | PanelGram, x: torch.Tensor, col_block: int = 4096):
    """g += X^T X for x [T, K] (16-bit or fp32; the product is formed in x's dtype and added in fp32, as
    .float() would upcast it). A whole g by column blocks of col_block, so that the product stays
    [K, col_block]; a PanelGram panel by panel ([rows, K - r0] each)."""
    if isinstance(g, PanelGram):
        for p, r in zip(g.panels, range(0, x.shape[1], g.rows)):
            p.add_(x[:, r:r + p.shape[0]].t() @ x[:, r:])
        return
    k = x.shape[1]
    step = k if k <= col_block else col_block
    for j in range(0, k, step):
        g[:, j:j + step].add_(x.t() @ x[:, j:j + step])


def damp_(g: torch.Tensor | PanelGram, lam: float) -> torch.Tensor | PanelGram:
    """g += lam * mean(diag g) * I in place, for a whole Gram [K, K] or a PanelGram (whose panel i holds
    the diagonal block G_ii in its first rows columns). Returns g."""
    if lam == 0:
        return g
    if isinstance(g, PanelGram):
        diags = [p[:, :p.shape[0]].diagonal() for p in g.panels]
        mean = sum(float(d.sum()) for d in diags) / g.shape[0]
        for d in diags:
            d.add_(lam * mean)
        return g
    d = g.diagonal()
    d.add_(lam * float(d.mean()))
    return g


def gram(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> X^T X [K, K] in fp32."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.t() @ x


def gram_loss(dw: torch.Tensor, g: torch.Tensor | PanelGram) -> torch.Tensor:
    """tr(dW G dW^T) = sum_t ||dW x_t||^2 for dW [N, K], G = X^T X [K, K]. For a PanelGram, blockwise over
    its panels P_i = [G_ii, G_i,>i]: sum_i dW_i G_ii dW_i^T + 2 dW_i G_i,>i dW_>i^T (G_ji = G_ij^T), one
    [N, K - r0] temporary at a time."""
    if not isinstance(g, PanelGram):
        return (dw @ g).mul_(dw).sum()
    loss = dw.new_zeros((), dtype=torch.float32)
    for p, r in zip(g.panels, range(0, dw.shape[1], g.rows)):
        b = p.shape[0]
        t = (dw[:, r:r + b] @ p).mul_(dw[:, r:])  # [N, K - r]: (dW_i G_ij) * dW_j for blocks j >= i
        loss += t[:, :b].sum() + 2 * t[:, b:].sum()
    return loss


def scaled_gram_error(w: torch.Tensor, s: torch.Tensor, cfg: QuantConfig, g: torch.Tensor | PanelGram,
                      max_elems: int = 1 << 24) -> torch.Tensor:
    """tr(dW G dW^T) for dW = Q(W*s)/s - W [N, K], over chunks of rows of at most max_elems weights, so that
    the fp32 temporaries stay at ~64 MiB each (7B down_proj: 4096 x 11008); rows quantize independently.
    A weight within one chunk takes the plain formula, bit for bit."""
    n, k = w.shape
    rows = max(1, max_elems // k)
    if n <= rows:
        return gram_loss(scaled_fake_quant(w, s, cfg).sub_(w), g)
    return sum(gram_loss(scaled_fake_quant(w[r:r + rows], s, cfg).sub_(w[r:r + rows]), g)
               for r in range(0, n, rows))


def diag_blocks(g: torch.Tensor | PanelGram, n_groups: int, s: torch.Tensor | None = None) -> torch.Tensor:
    """The n_groups diagonal [gs, gs] blocks of g [K, K] (or a PanelGram whose panel rows are a multiple of
    gs): [G, gs, gs], a copy (a 3-D g is taken as those blocks already). With s [K], those of the Gram of
    the scaled input X / s, i.e. g_ij / (s_i s_j), without forming the scaled [K, K] matrix."""
    if isinstance(g, PanelGram):
        gs = g.shape[0] // n_groups
        if g.rows % gs:
            raise ValueError(f"panels of {g.rows} rows hold no whole diagonal blocks of {gs}")
        b = torch.cat([diag_blocks(p[:, :p.shape[0]], p.shape[0] // gs) for p in g.panels])
    elif g.dim() == 3:
        b, gs = g, g.shape[1]
    else:
        gs = g.shape[0] // n_groups
        idx = torch.arange(n_groups, device=g.device)
        b = g.reshape(n_groups, gs, n_groups, gs)[idx, :, idx, :]
    if s is not None:
        sg = s.reshape(n_groups, gs)
        b = b / (sg[:, :, None] * sg[:, None, :])
    return b


def search_clip(w: torch.Tensor, g: torch.Tensor, cfg: QuantConfig, clip_grid: int = 20,
                max_shrink: float = 0.5, row_chunk: int = 1024, asym: bool = False):
    """Per (row, group) range shrink. w [N, K] (already scaled), g = X^T X [K, K] of the linear's (scaled)
    input, or its diagonal blocks [G, gs, gs] (diag_blocks). Symmetric (reference): [max(wmin, -m), min(wmax, m)], m = max|w| (1 - i/clip_grid).
    asym: [wmin (1 - i/clip_grid), wmax (1 - j/clip_grid)] over all (i, j).
    Returns clip_min, clip_max [N, G] for compute_qparams."""
    n, k = w.shape
    ng = cfg.groups(k)
    gs = k // ng
    g_blocks = g if isinstance(g, torch.Tensor) and g.dim() == 3 else diag_blocks(g, ng)  # [G, gs, gs]
    clip_min = torch.empty(n, ng, device=w.device)
    clip_max = torch.empty(n, ng, device=w.device)
    for r0 in range(0, n, row_chunk):
        wg = w[r0:r0 + row_chunk].float().reshape(-1, ng, gs)  # [n, G, gs]
        wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
        absmax = torch.maximum(-wmin, wmax)
        best = torch.full_like(wmin, float("inf"))
        bmin, bmax = wmin.clone(), wmax.clone()
        steps = [1 - i / clip_grid for i in range(int(clip_grid * max_shrink))]
        if asym:  # made one at a time: the 100 [n, G] pairs of the default grid would hold ~100 MiB at once
            ranges = ((wmin * a, wmax * b) for a in steps for b in steps)
        else:
            ranges = ((torch.maximum(wmin, -absmax * a), torch.minimum(wmax, absmax * a)) for a in steps)
        for lo, hi in ranges:
            # clamp(w, lo, hi) = min(max(w, lo), hi), also where lo > hi
            dw = fake_quantize_grouped(torch.clamp(wg, lo[..., None], hi[..., None]), cfg.qmax, lo, hi,
                                       inplace=True).sub_(wg)
            loss = torch.einsum("ngi,gij,ngj->ng", dw, g_blocks, dw)
            better = loss < best
            best = torch.where(better, loss, best)
            bmin = torch.where(better, lo, bmin)
            bmax = torch.where(better, hi, bmax)
        clip_min[r0:r0 + row_chunk] = bmin
        clip_max[r0:r0 + row_chunk] = bmax
    return clip_min, clip_max


# ---- folding: exact in full precision -------------------------------------------------------------------

@torch.no_grad()
def fold_into_linears(linears, s: torch.Tensor):
    """W[:, k] *= s[k] for each linear reading the scaled channels."""
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def fold_into_prev(prev, s: torch.Tensor, rows: slice = slice(None), plus_one: bool = False):
    """Divide prev's output channels `rows` by s. prev is a linear ([N, K] weight: rows of W and bias),
    or a norm (weight [K], optional bias). plus_one: the norm computes x * (1 + w), so
    (1 + w') = (1 + w) / s."""
    w = prev.weight
    if w.dim() == 2:
        w[rows].div_(s.to(w.dtype)[:, None])
    elif plus_one:
        w.copy_(((1 + w.float()) / s - 1).to(w.dtype))
    else:
        w.div_(s.to(w.dtype))
    b = getattr(prev, "bias", None)
    if b is not None:
        b[rows].div_(s.to(b.dtype))
