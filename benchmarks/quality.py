"""Quality side by side: wiki perplexity of every tool at the same bits, group size and calibration rows.

    python benchmarks/quality.py [--settings smollm2:4:64 gemma3-270m:4:128 ...] [--tools ...]
                                 [--windows 64|all] [--calib lee wiki-calib austen] [--peers DIR]

Every tool quantizes the same full-precision model (the embedded real models, bf16) from the same
calibration rows (`lee`, 128 x 512 tokens, seed 0, written once to a file that each tool reads), in its
own process and, for peers, its own virtual environment (`bash scripts/peers.sh` makes them under
`$SALIENCE_PEERS`, default ~/.cache/salience/peers). A tool writes its dequantized weights; this script
loads them into the same full-precision model and measures perplexity with the project's evaluator on
the same windows, so that only the weights differ between columns. Each tool's wall time (its own
measurement of the quantization, model loading excluded) and peak host memory (its process's max RSS)
are recorded.

Cells are cached in benchmarks/results/quality.json as they finish, so an interrupted run continues and
settings can be added run by run; `--redo` recomputes. Writes quality.md and .json (docs/quality.md and the
README's summary table quote it by hand).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from salience import api  # noqa: E402
from salience.data import calibration_rows, eval_windows, load_text  # noqa: E402
from salience.evaluate import perplexity  # noqa: E402
from salience.machine import cpu_name  # noqa: E402
from salience.models import materialize  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PEERS_SRC = ROOT / "benchmarks" / "peers"
GROUPS = {"smollm2": (32, 64), "gemma3-270m": (32, 64, 128)}  # the group sizes that divide every linear
# tool -> (virtual environment under --peers, or None for this one; runner; runner arguments)
TOOLS = {
    "rtn": (None, "salience_run.py", ["--method", "rtn"]),
    "salience": (None, "salience_run.py", ["--method", "awq"]),
    # opt-in GPTQ rounding on the AWQ grid, damping SearchConfig.gptq_damp (chosen on a held-out text:
    # benchmarks/results/ablation-choice-heldout.md)
    # (both opt-in columns were measured before the search damping became the default: kept without it)
    "salience-gptq": (None, "salience_run.py", ["--method", "awq", "--rounding", "gptq", "--search-damp", "0"]),
    # opt-in block-wise tuning of codes and ranges (salience.tune), SearchConfig's steps and rows
    "salience-tune": (None, "salience_run.py", ["--method", "awq", "--rounding", "tune", "--search-damp", "0"]),
    "llmc-awq": ("llmc", "llmc_run.py", ["--method", "awq"]),
    "llmc-gptq": ("llmc", "llmc_run.py", ["--method", "gptq"]),
    "hqq": ("hqq", "hqq_run.py", []),
}
# What a reader needs to read a peer's figures (said under the table)
PEER_NOTES = {
    "llm-compressor AWQ on Gemma-3": "its Gemma 3 mappings smooth pre_feedforward_layernorm -> gate/up and "
        "up -> down only (input_layernorm -> q/k/v is left out by design, its PR #2571: q_norm/k_norm follow "
        "q/k; v -> o is skipped because the GQA shapes differ), with its offset-norm context for Gemma's "
        "(1 + w) norms; its own tracker reports AWQ degrading Gemma 3 models (issues #2102, #2522), as here, "
        "where its result is close to RTN's",
}
CALIBRATION_FREE = ("rtn", "hqq")
OURS = ("salience", "salience-gptq", "salience-tune")  # the tools of the calibration-robustness study
LABELS = {"rtn": "RTN", "salience": "salience AWQ", "salience-gptq": "salience AWQ + GPTQ rounding (opt-in)",
          "salience-tune": "salience AWQ + tuning (opt-in)",
          "llmc-awq": "llm-compressor AWQ",
          "llmc-gptq": "llm-compressor GPTQ", "hqq": "HQQ (no calibration)"}
# Tools that were tried and cannot give a fair row on this machine: the table says why.
NOT_RUN = {
    "AutoAWQ 0.2.9": "runs on this CPU only for Llama-type models, about 14 min for SmolLM2 with 16 rows "
                     "(minutes x 8 with our 128 rows), needs a source patch (.cpu() backup aliasing) to give "
                     "sane output, and refuses gemma3_text; not run in this table",
    "GPTQModel 7.6.0": "installs from source here (BUILD_CUDA_EXT=0) and quantizes on the CPU "
                       "(benchmarks/peers/gptqmodel_run.py, needs GPTQMODEL_CPU_WORKERS >= 2 and "
                       "offload_to_disk=False), but took 673 s for SmolLM2 with only 4 calibration rows on "
                       "this shared 2-core machine (its CPU extension compiles first); the 128-row runs did not "
                       "fit the session. llm-compressor's GPTQModifier gives the GPTQ column instead",
}


def machine() -> dict:
    return {"machine": platform.machine(), "processor": cpu_name(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def parse_setting(s: str) -> tuple[str, int, int]:
    model, bits, gs = s.split(":")
    return model, int(bits), int(gs)


def all_settings() -> list[str]:
    return [f"{m}:{b}:{g}" for b in (4, 3) for m, gs in GROUPS.items() for g in gs]


def cell_key(model, bits, gs, tool, calib) -> str:
    """calib: the calibration tag; "-" for the calibration-free tools, whose cells every text shares."""
    return f"{model}|w{bits}g{gs}|{tool}|{'-' if tool in CALIBRATION_FREE else calib}"


class Store:
    """quality.json: {"machine": ..., "cells": {key: record}}; saved after every cell."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"cells": {}}
        self.data["machine"] = machine()

    def get(self, key):
        return self.data["cells"].get(key)

    def put(self, key, rec):
        """Merge one cell into the file under a lock: several runs (other settings) may share it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.exists():
                self.data["cells"] = json.loads(self.path.read_text())["cells"]  # others' cells too
            self.data["cells"][key] = rec
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def run_tool(tool, peers: Path, folder: Path, rows_file: Path, bits, gs, out: Path, timeout: int) -> dict:
    venv, runner, extra = TOOLS[tool]
    py = sys.executable if venv is None else str(peers / venv / "bin" / "python")
    if not Path(py).exists():
        return {"error": f"not installed: {py} (bash scripts/peers.sh)"}
    cmd = [py, str(PEERS_SRC / runner), "--model", str(folder), "--rows", str(rows_file), "--bits", str(bits),
           "--group-size", str(gs), "--out", str(out), *extra]
    # the tool's stderr (its progress bars and logs) goes to a file beside its output, to follow long runs
    log = out.parent / f"{out.stem}.stderr.txt"
    print("$", " ".join(cmd), f"2> {log}", flush=True)
    t = time.time()
    try:
        with open(log, "w") as err:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.time() - t
    if r.returncode:
        tail = [ln for ln in log.read_text().strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
        return {"error": f"exit {r.returncode}: {tail[0][:300]}"}
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec["process_seconds"] = round(wall, 1)
    # the machine's load over the run (1-minute average at its end), so that a time taken beside other jobs
    # can be told from one taken alone: the tool itself contributes about its thread count
    rec["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    return rec


class Evaluator:
    """One full-precision model per model name; a tool's tensors are loaded into it for one evaluation
    and the originals put back afterwards."""

    def __init__(self, model: str, windows: int | None):
        self.model, self.tok = api.load_any(model)
        self.model.eval()
        self.windows = windows
        self._win = {}

    def ppl(self, tensors: dict[str, torch.Tensor] | None, source: str = "wiki") -> float:
        if source not in self._win:
            self._win[source] = eval_windows(self.tok, load_text(source), 512, self.windows, source=source)
        w, n_prefix = self._win[source]
        sd = self.model.state_dict()
        backup = {}
        for k, v in (tensors or {}).items():
            if k not in sd or sd[k].shape != v.shape:
                raise ValueError(f"tool output tensor {k} {tuple(v.shape)} does not match the model")
            backup[k] = sd[k].clone()
            sd[k].copy_(v)
        try:
            return perplexity(self.model, w, n_prefix, desc="ppl")
        finally:
            for k, v in backup.items():
                sd[k].copy_(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="*", default=None, help="model:bits:group (default: all)")
    ap.add_argument("--tools", nargs="*", default=list(TOOLS), choices=list(TOOLS))
    ap.add_argument("--calib", nargs="*", default=["lee"],
                    help="calibration sources; the first is the table's, the others only run the salience "
                    "tools among --tools (the robustness study; evaluated on wiki-eval, disjoint from "
                    "wiki-calib)")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--windows", default="64", help="64 = quick mode, all = full mode")
    ap.add_argument("--peers", default=os.environ.get("SALIENCE_PEERS",
                                                      str(Path.home() / ".cache" / "salience" / "peers")))
    ap.add_argument("--work", default=str(ROOT / "out" / "quality"))
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per tool run")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite quality.md from quality.json")
    a = ap.parse_args()
    store = Store(RESULTS / "quality.json")
    if not a.report_only:
        run(a, store)
    write_report(store)


def run(a, store: Store):
    windows = None if a.windows == "all" else int(a.windows)
    wtag = a.windows
    settings = [parse_setting(s) for s in (a.settings or all_settings())]
    peers, work = Path(a.peers), Path(a.work)
    evaluators = {}
    for model, bits, gs in settings:
        if gs not in GROUPS[model]:
            raise SystemExit(f"group {gs} does not divide every linear of {model}; choose from {GROUPS[model]}")
        folder = Path(materialize(model))
        if model not in evaluators:
            evaluators.clear()  # one model in memory at a time
            evaluators[model] = Evaluator(model, windows)
        ev = evaluators[model]
        # full precision on this processor: bf16 kernels differ between CPUs in the last bits, so every cell's
        # loss is taken against the full-precision perplexity measured on the processor that measured it
        fkey = cell_key(model, 16, 0, "fp", "-")
        frec = store.get(fkey) or {"by_processor": {}}  # {"by_processor": {processor: {wtag: ppl}}}
        if a.redo or wtag not in frec["by_processor"].get(cpu_name(), {}):
            frec["by_processor"].setdefault(cpu_name(), {})[wtag] = ev.ppl(None)
            store.put(fkey, frec)
            print(fkey, frec, flush=True)
        jobs = [(t, a.calib[0]) for t in a.tools] + [(t, c) for t in a.tools if t in OURS for c in a.calib[1:]]
        for tool, calib in jobs:
            # the table's protocol is 128 rows; other row counts (time comparisons) get their own cells
            ctag = calib if a.rows == 128 else f"{calib}@{a.rows}"
            key = cell_key(model, bits, gs, tool, ctag)
            rec = store.get(key) or {}
            d = work / model
            out = d / f"{tool}-{ctag}-w{bits}g{gs}.safetensors"
            # in full mode wiki-eval is not wiki: the robustness study also needs the table's calibration
            # evaluated on wiki-eval (in quick mode their 64 windows are the same)
            also_eval = calib == a.calib[0] and len(a.calib) > 1 and wtag != "64"
            if not a.redo and "error" not in rec and wtag in rec.get("ppl", {}):
                if also_eval and wtag not in rec.get("ppl_wiki_eval", {}):
                    rec.setdefault("ppl_wiki_eval", {})[wtag] = ev.ppl(load_file(str(out)), "wiki-eval")
                    store.put(key, rec)
                    print(key, rec, flush=True)
                continue
            if "error" in rec and not a.redo:
                continue
            d.mkdir(parents=True, exist_ok=True)
            rows_file = d / f"rows-{calib}-{a.rows}x512.safetensors"
            if not rows_file.exists():
                save_file({"rows": calibration_rows(ev.tok, load_text(calib), a.rows, 512, seed=0)},
                          str(rows_file))
            if not out.exists() or a.redo or not rec.get("quantize_seconds"):
                res = run_tool(tool, peers, folder, rows_file, bits, gs, out, a.timeout)
                if "error" in res:
                    store.put(key, res)
                    print(key, res, flush=True)
                    continue
                rec = dict(res)  # new weights: the evaluations of the old ones (other window counts) go
            source = "wiki-eval" if calib != a.calib[0] else "wiki"
            weights = load_file(str(out))
            rec.setdefault("ppl", {})[wtag] = ev.ppl(weights, source)
            rec["eval_source"] = source
            rec["processor"] = cpu_name()
            if also_eval:
                rec.setdefault("ppl_wiki_eval", {})[wtag] = ev.ppl(weights, "wiki-eval")
            store.put(key, rec)
            print(key, rec, flush=True)


def write_report(store: Store):
    cells = store.data["cells"]
    m = store.data["machine"]
    wtags = sorted({w for c in cells.values() for w in c.get("ppl", {})})
    tools = list(TOOLS)
    # processors in order of first appearance; cells of any but the first are marked with their letter
    procs = list(dict.fromkeys(c["processor"] for c in cells.values() if "processor" in c))
    mark = {p: "" if i == 0 else f" [{chr(65 + i)}]" for i, p in enumerate(procs)}
    machines = "; ".join(f"{chr(65 + i)} = {p}" for i, p in enumerate(procs))
    md = ["# Quality: wiki perplexity, every tool side by side", "",
          f"Machines ({m['cpus']} cores, torch {m['torch']}, Python {m['python']}): {machines}. A cell measured "
          "on another machine than A is marked with its letter, and its loss is taken against full precision "
          "measured on that machine (bf16 kernels differ between CPUs in the last bits: the full-precision "
          "column gives each machine's figure). Written by `python benchmarks/quality.py` from "
          "quality.json.", "",
          "Same full-precision model (bf16), same calibration rows (lee, 128 x 512 tokens, seed 0) given to "
          "every tool, same evaluator and windows (wiki, windows of 512 tokens; quick = the first 64 "
          "windows, all = full mode). Cell: perplexity (loss vs full precision). **Bold**: smallest loss in "
          "the row. Asymmetric INT with an integer zero point for every tool except HQQ (float zero "
          "point). `-`: not run yet.", "",
          "Caveat (assets.md): the \"full-precision\" models are de-quantized GGUF files. SmolLM2's linears "
          "were Q4_1: blocks of 32 input weights on a 4-bit grid with a float minimum. At INT4 g32 a "
          "quantizer with a float zero point and groups along the input (HQQ here) can land back on that "
          "grid (its g32 weights differ from the loaded ones by 0.4 % in norm against RTN's 8.3 %, checked "
          "once on this run's outputs), so its g32 row is close to lossless for a reason that no real FP16 "
          "model offers; integer-zero-point tools (the AWQ checkpoint format) cannot represent a float "
          "minimum. Gemma (mostly 5-bit GGUF blocks) is the closer stand-in for a real model.", ""]
    for wtag in wtags:
        md += [f"## {'quick mode (64 windows)' if wtag == '64' else wtag + ' windows'}", "",
               "| model | setting | full precision | " + " | ".join(LABELS[t] for t in tools)
               + "".join(f" | RTN loss closed by {LABELS[t]}" for t in OURS) + " |",
               "|---|---|---:|" + "---:|" * (len(tools) + len(OURS))]
        for model, gss in GROUPS.items():
            f = cells.get(cell_key(model, 16, 0, "fp", "-")) or {}
            fps = {p: v[wtag] for p, v in f.get("by_processor", {}).items() if wtag in v}  # processor -> ppl
            for bits in (4, 3):
                for gs in gss:
                    vals, loss, where = {}, {}, {}
                    for t in tools:
                        c = cells.get(cell_key(model, bits, gs, t, "lee")) or {}
                        vals[t] = c.get("ppl", {}).get(wtag, "error" if "error" in c else None)
                        where[t] = c.get("processor")
                        if isinstance(vals[t], float):
                            loss[t] = vals[t] - fps[where[t]]
                    if not fps or all(v is None for v in vals.values()):
                        continue
                    best = min(loss, key=loss.get) if len(loss) >= 3 else None  # a row with peers to compare
                    row = []
                    for t in tools:
                        v = vals[t]
                        s = ("-" if v is None else "failed" if v == "error"
                             else f"{v:.3f} ({loss[t]:+.3f}){mark.get(where[t], '')}")
                        row.append(f"**{s}**" if t == best else s)
                    closed = [f"{100 * (loss['rtn'] - loss[t]) / loss['rtn']:.0f}%"
                              if "rtn" in loss and t in loss else "-" for t in OURS]
                    fp_cell = " / ".join(f"{v:.3f}{mark.get(p, '')}" for p, v in fps.items())
                    md.append(f"| {model} | INT{bits} g{gs} | {fp_cell} | " + " | ".join(row + closed) + " |")
        md.append("")
    md += ["## Quantization time and peak host memory", "",
           "Seconds of quantization as each tool measures it in its own process (model loading and writing "
           "excluded; calibration forward passes included) / peak RSS of that process (MiB). The machine was "
           "often shared with other jobs (load average 1-6 on 2 cores) and a cell keeps its latest run, so "
           "times from different runs are not comparable. Side by side on an idle machine, one after the "
           "other in one session: smollm2 INT4 g64, salience AWQ and llm-compressor AWQ (load average about "
           "2 during each, the tool's own two threads); later cells record the load at their end "
           "(quality.json, load_1min_at_end). n/a: the first cells measured RSS wrongly "
           "(ru_maxrss counts the parent's peak before the fork).", "",
           "| model | setting | " + " | ".join(LABELS[t] for t in tools) + " |", "|---|---|" + "---:|" * len(tools)]
    for model, gss in GROUPS.items():
        for bits in (4, 3):
            for gs in gss:
                row, any_ = [], False
                for t in tools:
                    c = cells.get(cell_key(model, bits, gs, t, "lee")) or {}
                    if "quantize_seconds" in c:
                        any_ = True
                        # early cells took ru_maxrss, which counts the orchestrator's peak before the fork
                        rss = f"{c['max_rss_mb']} MiB" if c.get("rss_source") == "VmHWM" else "n/a"
                        row.append(f"{c['quantize_seconds']:.0f} s / {rss}{mark.get(c.get('processor'), '')}")
                    else:
                        row.append("failed" if "error" in c else "-")
                if any_:
                    md.append(f"| {model} | INT{bits} g{gs} | " + " | ".join(row) + " |")
    fewer = [(k, c) for k, c in cells.items() if "@" in k.split("|")[3] and "quantize_seconds" in c]
    if fewer:
        md += ["", "Same-run time comparisons with fewer calibration rows (measured before llm-compressor's AWQ "
               "at 128 rows fitted a session):", "", "| model | setting | tool | rows | quantize time | peak RSS | perplexity |",
               "|---|---|---|---:|---:|---:|---:|"]
        for k, c in sorted(fewer):
            model, setting, tool, ctag = k.split("|")
            ppl = c.get("ppl", {}).get("64")
            md.append(f"| {model} | {setting} | {LABELS[tool]} | {ctag.split('@')[1]} | {c['quantize_seconds']:.0f} s | "
                      f"{c['max_rss_mb']} MiB | {'-' if ppl is None else f'{ppl:.3f}'} |")
    spread = [(k, c) for k, c in cells.items() if k.split("|")[2] in OURS and "@" not in k.split("|")[3]]
    by_setting = {}
    for k, c in spread:
        model, setting, tool, calib = k.split("|")
        for wtag, v in c.get("ppl", {}).items():
            source = c.get("eval_source", "wiki")
            if wtag != "64" and source == "wiki":  # full mode: only a wiki-eval figure is comparable
                v, source = c.get("ppl_wiki_eval", {}).get(wtag), "wiki-eval"
                if v is None:
                    continue
            by_setting.setdefault((model, setting, tool, wtag), {})[calib] = (v, mark.get(c.get("processor"), ""))
    rows = [(ms, d) for ms, d in sorted(by_setting.items(), key=lambda kv: (kv[0][0], kv[0][1], OURS.index(kv[0][2]),
                                                                            kv[0][3])) if len(d) > 1]
    if rows:
        md += ["", "## Calibration robustness (salience)", "",
               "Same model and setting calibrated on different text (128 x 512 tokens each), evaluated on "
               "wiki-eval (the wiki text minus its last 10 % of articles, which form wiki-calib; in quick "
               "mode its first 64 windows are the same as wiki's). Spread = (max - min) / min.", "",
               "| model | setting | tool | windows | calibration: perplexity | spread |",
               "|---|---|---|---|---|---:|"]
        texts = {c for _, d in rows for c in d}
        for (model, setting, tool, wtag), d in rows:
            vals = [v for v, _ in d.values()]
            cal = ", ".join(f"{c}: {v:.3f}{mk}" for c, (v, mk) in sorted(d.items()))
            missing = sorted(texts - set(d))  # a partial row: its spread is a lower bound
            cal += f" ({', '.join(missing)} not run yet)" if missing else ""
            md.append(f"| {model} | {setting} | {LABELS[tool]} | {wtag} | {cal} | "
                      f"{'>= ' if missing else ''}{100 * (max(vals) - min(vals)) / min(vals):.2f}% |")
    md += ["", "## Notes on peers", ""] + [f"- {name}: {why}." for name, why in PEER_NOTES.items()]
    errors = [(k, c["error"]) for k, c in cells.items() if "error" in c]
    md += ["", "## Tools that did not give a row", ""]
    md += [f"- {name}: {why}." for name, why in NOT_RUN.items()]
    md += [f"- `{k}`: {e}" for k, e in errors]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
