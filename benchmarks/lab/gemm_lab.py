"""GEMM laboratory (group size 128, bf16): the production GEMM's launch settings, and M = 1 GEMV against GEMM.

History. A run on an H200 (`benchmarks/results/h200/s10/run1/gemm_lab.log` at commit a566059; code at commit
d320148, the layout before 8a23aa7) compared the GEMM of that time (8 dots a unit on [BN, 16] slices of B + q, 3 integer ops a
code, per-token x sums for the zero points) with two variants written in this file:
  - "pair": one shift and one LOP3 per two codes (nibbles j, j + 4 of a word as one 32-bit pair of 16-bit
    floats), x gathered to match: 1.5-6x slower (Triton could not pipeline the gathered x loads);
  - "pz": the same pair with the zero subtracted in 16-bit float pairs (exact q - z into the tensor cores,
    no x sums), x pre-permuted: 1.25-1.61x faster at M = 2-16 and 1.26-1.39x at M = 32-64.
"pz" became the production _gemm_kernel (its decode: _qz_slice), and the GPU layout changed so that x needs
no permutation (layout.py); the variants' code is in the git history at d320148.

Now: `python benchmarks/lab/gemm_lab.py [--out DIR]` times the production GEMM at 4 / 8 warps and 3 / 4
stages against cuBLAS bf16 at M = 2..64 (the settings _gemm_config picks from); `--m1` times the production
GEMV against the GEMM forced to one token. GPU only (correctness is tests/test_kernels_triton.py's job).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.int4_kernels import copy_packed, gpu_time, int4_bytes, n_copies, random_awq  # noqa: E402
from salience.kernels import triton_int4 as T  # noqa: E402
from salience.kernels.linear import PackedInt4  # noqa: E402

SHAPES = [("7B qkv", 4096, 12288), ("7B o", 4096, 4096), ("7B gate_up", 4096, 22016), ("7B down", 11008, 4096),
          ("8B qkv", 4096, 6144), ("8B gate_up", 4096, 28672), ("8B down", 14336, 4096)]


def _cases(shapes, ms, seed=0):
    """(name, x bf16 [M, K], PackedInt4, copies past the L2) per shape and M."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for name, k, n in shapes:
        p = PackedInt4.for_triton(*random_awq(k, n, 128, "cuda"), 128)
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
            copies = [p] + [copy_packed(p) for _ in range(n_copies(int4_bytes(p.n, k, m), l2) - 1)]
            yield name, x.to(torch.bfloat16), p, copies


def _save(out, stem, rows):
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))


def bench(out):
    rows = []
    for name, x, p, copies in _cases(SHAPES, (2, 4, 8, 16, 32, 64)):
        m, k = x.shape
        dense = [torch.randn(p.n, k, device="cuda", dtype=x.dtype) for _ in copies]
        r = {"shape": name, "M": m, "dense_us": gpu_time([lambda w=w: F.linear(x, w) for w in dense])[0] * 1e6}
        del dense
        for nw in (4, 8):
            for ns in (3, 4):
                r[f"w{nw}_s{ns}_us"] = gpu_time([lambda q=q, nw=nw, ns=ns: T.gemm(x, q, num_warps=nw, num_stages=ns)
                                                 for q in copies])[0] * 1e6
        rows.append(r)
        mine = {kk[:-3]: v for kk, v in r.items() if kk.startswith("w")}
        best = min(mine, key=mine.get)
        print(f"{name:12s} M={m:3d}: dense {r['dense_us']:.1f} us, " + ", ".join(f"{kk} {v:.1f}" for kk, v in mine.items())
              + f"; best {best} x{r['dense_us'] / mine[best]:.2f} dense", flush=True)
        _save(out, "gemm_lab", rows)


def m1(out):
    """M = 1: the production GEMV against the production GEMM forced to one token."""
    rows = []
    for name, x, p, copies in _cases(SHAPES, (1,)):
        r = {"shape": name, "gemv_us": gpu_time([lambda q=q: T.gemv(x, q) for q in copies])[0] * 1e6,
             "gemm_us": gpu_time([lambda q=q: T.gemm(x, q) for q in copies])[0] * 1e6}
        rows.append(r)
        print(f"M=1 {name:12s}: GEMV {r['gemv_us']:.1f} us, GEMM {r['gemm_us']:.1f} us", flush=True)
        _save(out, "gemm_lab_m1", rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--m1", action="store_true", help="only M = 1: GEMV against GEMM (production kernels)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_lab.py times CUDA kernels; no CUDA device here")
    (m1 if a.m1 else bench)(a.out)


if __name__ == "__main__":
    main()
