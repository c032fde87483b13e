"""A real-model table: wiki perplexity of full precision, RTN and AWQ, each measured by the
project's own `salience eval` (AWQ: on the checkpoint written by `salience quantize`).

    python benchmarks/real_models.py [--windows 64|all] [--only smollm2]

Writes benchmarks/results/real_models.md and .json (machine named)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROWS = [("smollm2", 64), ("smollm2", 32), ("gemma3-270m", 128)]
RESULTS = Path(__file__).parent / "results"


def salience(*args) -> tuple[str, float]:
    t = time.time()
    cmd = [sys.executable, "-m", "salience.cli", *args]
    print("$", " ".join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{r.stderr[-3000:]}")
    return r.stdout, time.time() - t


def eval_ppl(*args) -> tuple[float, float]:
    out, dt = salience("eval", *args)
    return float(re.search(r"perplexity of .*: ([0-9.]+)", out).group(1)), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", default="64")
    ap.add_argument("--only")
    ap.add_argument("--calib-rows", default="128")
    a = ap.parse_args()
    ev = ["--data", "wiki", "--windows", a.windows]
    rows = []
    fp_cache = {}
    for model, gs in ROWS:
        if a.only and model != a.only:
            continue
        if model not in fp_cache:
            fp_cache[model] = eval_ppl(model, *ev)[0]
        fp = fp_cache[model]
        rtn, _ = eval_ppl(model, *ev, "--fake-quant", "rtn", "--group-size", str(gs))
        out = Path("out") / "bench" / f"{model}-awq-w4g{gs}"
        _, tq = salience("quantize", "--model", model, "--group-size", str(gs), "--out", str(out), "--overwrite",
                         "--calib", "lee", "--calib-rows", a.calib_rows)
        awq, _ = eval_ppl(str(out), *ev)
        closed = (rtn - awq) / (rtn - fp) if rtn != fp else float("nan")
        rows.append({"model": model, "bits": 4, "group_size": gs, "fp": fp, "rtn": rtn, "awq": awq,
                     "rtn_loss_closed": closed, "quantize_seconds": round(tq, 1)})
        print(rows[-1], flush=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version()}
    try:
        import torch
        machine["torch"] = torch.__version__
    except ImportError:
        pass
    mode = "quick: first 64 windows" if a.windows == "64" else f"{a.windows} windows"
    md = [f"wiki perplexity ({mode} of 512 tokens), calibration: lee, {a.calib_rows} x 512 tokens, "
          f"compute bf16, by `salience eval` (AWQ: the written checkpoint). Machine: {machine}.", "",
          "| model | setting | full precision | RTN | AWQ | RTN loss closed by AWQ | quantize time |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} | INT4 g{r['group_size']} | {r['fp']:.3f} | {r['rtn']:.3f} | {r['awq']:.3f} | "
                  f"{100 * r['rtn_loss_closed']:.0f}% | {r['quantize_seconds']:.0f} s |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_models.md").write_text("\n".join(md) + "\n")
    (RESULTS / "real_models.json").write_text(json.dumps({"machine": machine, "windows": a.windows,
                                                           "rows": rows}, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
