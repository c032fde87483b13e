"""Perplexity over evaluation windows (protocol in salience.data): exp(mean NLL of the scored tokens)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, n_prefix: int = 0, batch_size: int | None = None,
               device="cpu", desc: str = "ppl", progress: bool = True) -> float:
    """windows [n, L] token ids. Token t is scored from the logits at t - 1, so positions 1 .. L-1 are
    scored: with a prepended BOS (n_prefix = 1) that is every text token, without it (n_prefix = 0) the
    window's first token is context only. n_prefix is kept in the signature for the record."""
    vocab = model.config.get_text_config().vocab_size
    if batch_size is None:  # keep fp32 logits of a batch near 1 GiB
        batch_size = max(1, (1 << 28) // (windows.shape[1] * vocab))
    nll, count = 0.0, 0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits  # [B, L, V]
        pred = logits[:, :-1].float()
        tgt = ids[:, 1:]
        loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss during evaluation (NaN/inf logits)")
        nll += float(loss)
        count += tgt.numel()
    return math.exp(nll / count)
