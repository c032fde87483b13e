"""GPTQ rounding (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023) on a fixed grid: pure functions.

The AWQ search fixes, per (output row, group), a scale and an integer zero (salience.awq: scale search,
fold, clip search). Round-to-nearest then picks each code alone. GPTQ picks the codes of one row column by
column, each one compensating the error of those before it, to minimise the row's output error

    L(q) = (q_hat - w) G (q_hat - w)^T,    q_hat = (q - zero) * scale,   G = X^T X [K, K]

(X [T, K] the linear's input over the calibration tokens; after an AWQ fold, the scaled input X / s, whose
Gram is G_ij / (s_i s_j)). Rows are independent (they share G), so any chunk of rows can be rounded alone.

Column j is rounded to the nearest code of its own group's grid (the grid never changes: the written scales
and zeros are exactly those given), then its error e_j = (w_j - q_hat_j) / U_jj is propagated to the columns
not yet rounded, w_{j+1:} -= e_j U_{j, j+1:}, where U is the upper Cholesky factor of H^-1 (H = G damped:
G + damp * mean(diag G) * I). That is the optimal least-squares update of the remaining columns for the
error just made (the OBS step), applied with GPTQ's lazy batches: inside a block of `block` columns the
updates are rank-1 on the block, the rest of the row is updated once per block (one matmul).

The damping is a regulariser, not only a guard for the Cholesky: with H = G + lambda I the rounding minimises
||X dW^T||^2 + lambda ||dW||^2 per row, the output error on the calibration tokens plus a weight error that
does not depend on them. GPTQ's usual damp = 0.01 fits the calibration text closely; on SmolLM2 (a 135M
model, 64 x 512 calibration tokens of news, wiki evaluation) that lowered every linear's calibration error
by 25-65% yet raised wiki perplexity above round-to-nearest's, and the perplexity fell steadily as the damping
grew (benchmarks/results/ablation-smollm2-g64-gptq*.md). damp -> infinity is round-to-nearest.
The pipeline's damping is SearchConfig.gptq_damp (its one default: the functions here take it as an argument,
without a default of their own), chosen on a held-out text, neither the calibration text nor the reported
evaluation: the damping with the best mean relative improvement over round-to-nearest of the perplexity on
Moby Dick, across SmolLM2 g64 and Gemma-3-270M g128 (benchmarks/ablation.py --select-text mobydick,
--choose; benchmarks/results/ablation-choice-heldout.md).

Columns no calibration token reached (diag G = 0) get H_jj = 1 and no coupling: they are rounded to the
nearest code and propagate nothing (their weights never touch the output).
"""

from __future__ import annotations

import torch

from .quant import QuantConfig


def inverse_factor(g: torch.Tensor, damp: float, dtype=torch.float64) -> torch.Tensor:
    """U [K, K] upper triangular with U^T U = (G + lambda I)^-1, lambda = damp * mean(diag G) (dead columns:
    their diagonal set to 1 first). Factorised in `dtype` (fp64 by default: an fp32 Gram of strongly
    correlated activations can have a condition number near fp32's limits even damped), returned in fp32.
    Should the damped matrix still not factor, the damping grows tenfold, up to three times."""
    h = g.to(dtype=dtype, copy=True)
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    lam = damp * diag.mean()
    for _ in range(4):
        l, info = torch.linalg.cholesky_ex(h + lam * torch.eye(h.shape[0], dtype=dtype, device=h.device))
        if info == 0:
            break
        lam = lam * 10
    else:
        raise FloatingPointError("GPTQ: the damped Gram is not positive definite (non-finite activations?)")
    hinv = torch.cholesky_inverse(l)  # (H + lambda I)^-1
    u, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if info != 0:
        raise FloatingPointError("GPTQ: the inverse Hessian is not positive definite")
    return u.float()


def round_with_factor(w: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      cfg: QuantConfig, block: int = 128) -> torch.Tensor:
    """Codes uint8 [N, K] of w [N, K] on the grid scales/zeros [N, G] (fp32; zeros integer-valued), rounding
    the columns in order with GPTQ's error feedback through u [K, K] (inverse_factor)."""
    n, k = w.shape
    gs = k // scales.shape[1]
    w = w.float().clone()  # [N, K], updated in place as errors propagate
    sc = scales.float().repeat_interleave(gs, dim=1)  # [N, K]: each column's scale and zero
    zc = zeros.float().repeat_interleave(gs, dim=1)
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2]  # [N, b], a view: updates land in w
        u1 = u[i1:i2, i1:i2]  # [b, b]
        err = torch.empty_like(w1)  # [N, b]: scaled errors e_j of the block
        for j in range(i2 - i1):
            c = i1 + j
            q = (torch.round(w1[:, j] / sc[:, c]) + zc[:, c]).clamp_(0, cfg.qmax)  # [N]
            codes[:, c] = q.to(torch.uint8)
            e = (w1[:, j] - (q - zc[:, c]) * sc[:, c]) / u1[j, j]
            err[:, j] = e
            w1[:, j + 1:] -= e[:, None] * u1[j, j + 1:][None, :]  # rank-1 update of the block's rest
        w[:, i2:] -= err @ u[i1:i2, i2:]  # the block's errors, to every later column at once
    return codes


def round_gptq(w: torch.Tensor, g: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, cfg: QuantConfig,
               damp: float, block: int = 128) -> torch.Tensor:
    """Codes uint8 [N, K] of w [N, K] (the weight as quantized: AWQ scale folded in) on the fixed grid
    scales/zeros [N, G], minimising (q_hat - w) G (q_hat - w)^T per row; g [K, K] the Gram of the linear's
    input (scaled the same way); damp: the multiple of mean(diag G) added to G (no default here: the
    pipeline's is SearchConfig.gptq_damp). Dequantize with salience.quant.dequantize(codes, scales, zeros, cfg)."""
    return round_with_factor(w, inverse_factor(g, damp), scales, zeros, cfg, block)
