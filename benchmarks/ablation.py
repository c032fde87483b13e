"""Ablation of the search options on a real model: which of them lower wiki perplexity.

    python benchmarks/ablation.py [--model smollm2] [--group-size 64] [--rows 64] [--windows 64]

Each variant quantizes the same full-precision model in memory from the same calibration rows and is
evaluated on the same windows. Writes benchmarks/results/ablation-<model>-g<group>.md and .json (machine named)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from salience import api
from salience.awq import SearchConfig
from salience.data import calibration_rows, load_text
from salience.models import load_fp
from salience.quant import QuantConfig

VARIANTS = {  # every option spelled out, so that the rows keep their meaning when defaults change
    "reference grid (x, alpha < 1, symmetric clip), Gram loss": SearchConfig(rounding="nearest", clip_asym=False),
    "output loss (8192 tokens)": SearchConfig(rounding="nearest", loss="output", clip_asym=False),
    "+ alpha = 1": SearchConfig(rounding="nearest", alpha_one=True, clip_asym=False),
    "+ both formulas (x, duo)": SearchConfig(rounding="nearest", formula="both", clip_asym=False),
    "+ asymmetric clip (the default since the first ablation)": SearchConfig(rounding="nearest", clip_asym=True),
    "all three": SearchConfig(rounding="nearest", alpha_one=True, formula="both", clip_asym=True),
    "default + finer alpha grid (refine 2)": SearchConfig(rounding="nearest", refine=2),
    "default + quantized outputs propagated": SearchConfig(rounding="nearest", propagate=True),
    "default + GPTQ rounding on the searched grid": SearchConfig(rounding="gptq", gptq_damp=0.01),
    "default + GPTQ rounding, damping 0.1": SearchConfig(rounding="gptq", gptq_damp=0.1),
    "default + GPTQ rounding, damping 0.3": SearchConfig(rounding="gptq", gptq_damp=0.3),
    "default + GPTQ rounding, damping 1": SearchConfig(rounding="gptq", gptq_damp=1.0),
    "default + GPTQ rounding, damping 3": SearchConfig(rounding="gptq", gptq_damp=3.0),
    "default + GPTQ rounding, damping 10": SearchConfig(rounding="gptq", gptq_damp=10.0),
    "default + GPTQ rounding, damping 30": SearchConfig(rounding="gptq", gptq_damp=30.0),
}
RESULTS = Path(__file__).parent / "results"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--tag", help="suffix of the result files (a partial run keeps the full table)")
    a = ap.parse_args()
    m, tok, _ = load_fp(a.model, dtype=torch.bfloat16)
    qcfg = QuantConfig(4, a.group_size)
    rows = calibration_rows(tok, load_text("lee"), n_rows=a.rows, seqlen=512)
    out = {"fp": api.ppl(m, tok, "wiki", max_windows=a.windows, desc="fp")}
    rtn = api.clone(m)
    api.fake_quantize(rtn, qcfg, "rtn", progress=False)
    out["rtn"] = api.ppl(rtn, tok, "wiki", max_windows=a.windows, desc="rtn")
    del rtn
    res = []
    for name, scfg in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        q = api.clone(m)
        t = time.time()
        api.fake_quantize(q, qcfg, "awq", rows, scfg, progress=False)
        dt = time.time() - t
        ppl = api.ppl(q, tok, "wiki", max_windows=a.windows, desc=name[:20])
        res.append({"variant": name, "config": scfg.__dict__, "ppl": ppl, "seconds": round(dt, 1)})
        print(res[-1], flush=True)
        del q
        write(a, out, res)  # after every variant: an interrupted run keeps what it finished
    print("\n".join(write(a, out, res)))


def write(a, out, res) -> list[str]:
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    md = [f"{a.model} INT4 g{a.group_size}, calibration lee {a.rows} x 512, wiki ppl on {a.windows} windows of 512, "
          f"compute bf16, CPU {machine}. Full precision {out['fp']:.3f}, RTN {out['rtn']:.3f}.", "",
          "| variant | wiki ppl | RTN loss closed | search time |", "|---|---:|---:|---:|"]
    for r in res:
        closed = (out["rtn"] - r["ppl"]) / (out["rtn"] - out["fp"])
        md.append(f"| {r['variant']} | {r['ppl']:.3f} | {100 * closed:.0f}% | {r['seconds']:.0f} s |")
    RESULTS.mkdir(exist_ok=True)
    stem = f"ablation-{a.model}-g{a.group_size}" + (f"-{a.tag}" if a.tag else "")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine, **vars(a), **out, "variants": res},
                                                       indent=2))
    return md


if __name__ == "__main__":
    main()
