"""Shared by the quality benchmark's tool runners. Each runner runs in its tool's own virtual environment
(so their pins never meet), so this file imports only torch, safetensors and transformers.

Protocol: a runner loads the full-precision model folder in bf16, reads the calibration rows the
orchestrator wrote (`rows` [n, seqlen] int64), quantizes with its tool, and writes every parameter the
tool may have changed (all but the embedding and the LM head; AWQ tools also rescale norms), with each
quantized linear's weight replaced by its dequantized value. The last stdout line is a JSON record."""

from __future__ import annotations

import argparse
import json
import time

import torch

KEYS: set = set()
from safetensors.torch import load_file, save_file


def args(extra=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="full-precision HF folder (safetensors)")
    ap.add_argument("--rows", required=True, help="safetensors file with 'rows' [n, seqlen] token ids")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--out", required=True)
    for a, kw in (extra or {}).items():
        ap.add_argument(a, **kw)
    return ap.parse_args()


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    m.eval()
    global KEYS
    KEYS = set(m.state_dict())  # tools add buffers (scales, zero points); only the model's own keys are saved
    return m, AutoTokenizer.from_pretrained(folder)


def rows(path) -> torch.Tensor:
    return load_file(path)["rows"]


def save(model, path):
    sd = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()
          if k in KEYS and "embed_tokens" not in k and not k.startswith("lm_head")}
    save_file(sd, path)


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space made at exec; getrusage's
    ru_maxrss would also count the parent's peak before the fork (Linux keeps it across execve)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def report(t_quant: float, **kw):
    print(json.dumps({"quantize_seconds": round(t_quant, 1), "max_rss_mb": round(peak_rss_mb()),
                      "rss_source": "VmHWM", **kw}), flush=True)


class Timer:
    def __enter__(self):
        self.t = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.t
