"""Ablation of the search options on a real model: which of them lower wiki perplexity.

    python benchmarks/ablation.py [--model smollm2] [--group-size 64] [--rows 64] [--windows 64]
                                  [--select-text mobydick [--select-windows 32]] [--only NAME ...] [--tag TAG]
                                  [--calib lee wiki-calib austen]
    python benchmarks/ablation.py --choose RUN.json RUN.json ... [--tag TAG]

Each variant quantizes the same full-precision model in memory from the same calibration rows and is
evaluated on the same windows. Writes benchmarks/results/ablation-<model>-g<group>.md and .json (machine named).

--select-text: every variant (and full precision, RTN) is also measured on a held-out text that is neither
the calibration text (lee) nor the reported evaluation (wiki), and the variant with the lowest perplexity on
it is named: an option's setting is then chosen without looking at the reported windows.
--calib with several texts: every variant is calibrated on each (the first is the table's) and evaluated
on wiki-eval (disjoint from wiki-calib; its first 64 windows are wiki's), and the spread of its perplexity
over the texts, (max - min) / min, is reported (on the selection text too).
--choose: from such runs (one per model), the variant with the best mean relative improvement of the
selection perplexity over the default (nearest rounding) across the runs; writes
benchmarks/results/ablation-choice[-TAG].md and .json."""

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


def _v(**kw) -> SearchConfig:
    """A variant: search damping 0 (the loss the rows before ablation-choice-damp were measured with)
    unless given."""
    return SearchConfig(**{"search_damp": 0.0, **kw})


VARIANTS = {  # every option spelled out, so that the rows keep their meaning when defaults change
    "reference grid (x, alpha < 1, symmetric clip), Gram loss": _v(rounding="nearest", clip_asym=False),
    "output loss (8192 tokens)": _v(rounding="nearest", loss="output", clip_asym=False),
    "+ alpha = 1": _v(rounding="nearest", alpha_one=True, clip_asym=False),
    "+ both formulas (x, duo)": _v(rounding="nearest", formula="both", clip_asym=False),
    "+ asymmetric clip (the default since the first ablation)": _v(rounding="nearest", clip_asym=True),
    "all three": _v(rounding="nearest", alpha_one=True, formula="both", clip_asym=True),
    "default + finer alpha grid (refine 2)": _v(rounding="nearest", refine=2),
    "default + quantized outputs propagated": _v(rounding="nearest", propagate=True),
    "default + GPTQ rounding on the searched grid": _v(rounding="gptq", gptq_damp=0.01),
    "default + GPTQ rounding, damping 0.1": _v(rounding="gptq", gptq_damp=0.1),
    "default + GPTQ rounding, damping 0.3": _v(rounding="gptq", gptq_damp=0.3),
    "default + GPTQ rounding, damping 1": _v(rounding="gptq", gptq_damp=1.0),
    "default + GPTQ rounding, damping 3": _v(rounding="gptq", gptq_damp=3.0),
    "default + GPTQ rounding, damping 10": _v(rounding="gptq", gptq_damp=10.0),
    "default + GPTQ rounding, damping 30": _v(rounding="gptq", gptq_damp=30.0),
    "default + tuned rounding (100 steps of 4 rows)": _v(rounding="tune", tune_steps=100, tune_rows=4,
                                                                propagate=False),
    "default + tuned rounding (200 steps of 4 rows)": _v(rounding="tune", tune_steps=200, tune_rows=4,
                                                                propagate=False),
    "default + tuned rounding (400 steps of 4 rows)": _v(rounding="tune", tune_steps=400, tune_rows=4,
                                                                propagate=False),
    "default + tuned rounding on propagated inputs (200 steps of 4 rows)": _v(
        rounding="tune", tune_steps=200, tune_rows=4, propagate=True),
    **{f"default + search damping 0.3 + tuned rounding on propagated inputs ({n} steps of 4 rows)": _v(
        rounding="tune", tune_steps=n, tune_rows=4, propagate=True, search_damp=0.3) for n in (25, 50, 100)},
    **{f"default + search damping {d:g}": _v(rounding="nearest", search_damp=d)
       for d in (0.03, 0.1, 0.3, 0.5, 1.0, 3.0)},
}
# the baseline of --choose: nearest rounding, the shipped default before the search damping
DEFAULT = "+ asymmetric clip (the default since the first ablation)"
SHIPPED = "default + search damping 0.3"  # SearchConfig() at the ablation's 4 bits (awq.damp_for)
CALIB, EVAL = "lee", "wiki"
NOT_HELD_OUT = {CALIB, EVAL, "wiki-eval", "wiki-calib"}  # the calibration text and the evaluation's source
RESULTS = Path(__file__).parent / "results"


def best_on_selection(res: list[dict]) -> dict:
    """The variant record with the lowest held-out selection perplexity ("select_ppl")."""
    if not res:
        raise ValueError("no variants to select from")
    return min(res, key=lambda r: r["select_ppl"])


def choose_across(runs: list[dict], baseline: str = DEFAULT) -> tuple[str, dict[str, float]]:
    """The variant with the best mean relative improvement of the selection perplexity over `baseline`
    across runs (each an ablation .json with select_ppl per variant, e.g. one per model), and that mean for
    every variant present in all runs: (baseline_ppl - ppl) / baseline_ppl, positive = better."""
    per_run = []
    for run in runs:
        sel = {r["variant"]: r["select_ppl"] for r in run["variants"] if r.get("select_ppl") is not None}
        if baseline not in sel:
            raise ValueError(f"run {run.get('model')} g{run.get('group_size')} has no selection "
                             f"perplexity for the baseline {baseline!r}")
        per_run.append({v: (sel[baseline] - p) / sel[baseline] for v, p in sel.items()})
    common = [v for v in per_run[0] if all(v in r for r in per_run)]
    mean = {v: sum(r[v] for r in per_run) / len(per_run) for v in common}
    return max(mean, key=mean.get), mean


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="variant names to run")
    ap.add_argument("--tag", help="suffix of the result files (a partial run keeps the full table)")
    ap.add_argument("--select-text", help="held-out text (not lee, not wiki: e.g. mobydick) on which every "
                    "variant is also measured and the best one named")
    ap.add_argument("--select-windows", type=int, default=32, help="windows of 512 of the selection text")
    ap.add_argument("--resume", action="store_true", help="continue the run of the same settings and tag: "
                    "reuse its full-precision/RTN figures and finished variants (checked to match)")
    ap.add_argument("--calib", nargs="+", default=[CALIB], help="calibration texts (several: the robustness "
                    "spread of every variant; see the docstring)")
    ap.add_argument("--choose", nargs="+", metavar="RUN_JSON",
                    help="no run: choose one variant across these --select-text runs (see the docstring)")
    a = ap.parse_args()
    if a.choose:
        return choose(a)
    if a.select_text in NOT_HELD_OUT | set(a.calib):
        ap.error(f"--select-text {a.select_text} is not held out (calibration {a.calib}, evaluation {EVAL})")
    ev = eval_source(a)
    m, tok, _ = load_fp(a.model, dtype=torch.bfloat16)
    qcfg = QuantConfig(4, a.group_size)
    rows = {c: calibration_rows(tok, load_text(c), n_rows=a.rows, seqlen=512, seed=0) for c in a.calib}

    def select_ppl(model, desc):
        return api.ppl(model, tok, a.select_text, max_windows=a.select_windows, desc=f"sel {desc}") \
            if a.select_text else None

    prev = previous_run(a) if a.resume else None
    if prev is not None:
        out, res = {k: prev[k] for k in ("fp", "fp_select", "rtn", "rtn_select")}, prev["variants"]
        print(f"resuming: {len(res)} variants done", flush=True)
    else:
        out = {"fp": api.ppl(m, tok, ev, max_windows=a.windows, desc="fp"), "fp_select": select_ppl(m, "fp")}
        rtn = api.clone(m)
        api.fake_quantize(rtn, qcfg, "rtn", progress=False)
        out["rtn"] = api.ppl(rtn, tok, ev, max_windows=a.windows, desc="rtn")
        out["rtn_select"] = select_ppl(rtn, "rtn")
        del rtn
        res = []
    for name, scfg in VARIANTS.items():
        if (a.only and name not in a.only) or any(r["variant"] == name for r in res):
            continue
        by_calib = {}
        for c in a.calib:
            q = api.clone(m)
            t = time.time()
            api.fake_quantize(q, qcfg, "awq", rows[c], scfg, progress=False)
            dt = time.time() - t
            by_calib[c] = {"ppl": api.ppl(q, tok, ev, max_windows=a.windows, desc=f"{c} {name[:20]}"),
                           "select_ppl": select_ppl(q, f"{c} {name[:16]}"), "seconds": round(dt, 1)}
            print(c, by_calib[c], flush=True)
            del q
        res.append({"variant": name, "config": scfg.__dict__, **by_calib[a.calib[0]]})
        if len(a.calib) > 1:
            res[-1]["by_calib"] = by_calib
            res[-1]["spread"] = spread([r["ppl"] for r in by_calib.values()])
            if a.select_text:
                res[-1]["select_spread"] = spread([r["select_ppl"] for r in by_calib.values()])
        print(res[-1], flush=True)
        write(a, out, res)  # after every variant: an interrupted run keeps what it finished
    print("\n".join(write(a, out, res)))


def eval_source(a) -> str:
    """The evaluation text: wiki, or wiki-eval when a calibration is wiki-calib (or several are compared)."""
    return EVAL if a.calib == [CALIB] else "wiki-eval"


def spread(ppls: list[float]) -> float:
    """(max - min) / min."""
    return (max(ppls) - min(ppls)) / min(ppls)


def _stem(a) -> str:
    return f"ablation-{a.model}-g{a.group_size}" + (f"-{a.tag}" if a.tag else "")


SAME_RUN = ("model", "group_size", "rows", "windows", "select_text", "select_windows", "calib")


def previous_run(a) -> dict | None:
    """The saved run that --resume continues (None if there is none); its settings must be a's."""
    f = RESULTS / f"{_stem(a)}.json"
    if not f.exists():
        return None
    prev = json.loads(f.read_text())
    diff = [k for k in SAME_RUN if prev.get(k, [CALIB] if k == "calib" else None) != getattr(a, k)]
    if diff:
        raise SystemExit(f"--resume: {f.name} was made with other settings ({', '.join(diff)})")
    def meaning(cfg: dict) -> dict:  # the damping means nothing to nearest rounding (its default may move)
        cfg = {"search_damp": 0.0, **cfg}  # runs before search damping existed searched without it
        return {k: v for k, v in cfg.items() if not (k == "gptq_damp" and cfg["rounding"] == "nearest")}

    for r in prev["variants"]:
        if meaning(r["config"]) != meaning(VARIANTS[r["variant"]].__dict__):
            raise SystemExit(f"--resume: {r['variant']!r} in {f.name} had another configuration")
    return prev


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}


def write(a, out, res) -> list[str]:
    machine = _machine()
    sel = a.select_text
    ev, calibs = eval_source(a), a.calib
    multi = len(calibs) > 1
    md = [f"{a.model} INT4 g{a.group_size}, calibration {' / '.join(calibs)} {a.rows} x 512 (seed 0), {ev} "
          f"ppl on {a.windows} windows of 512, compute bf16, CPU {machine}. Full precision {out['fp']:.3f}, RTN "
          f"{out['rtn']:.3f}" + (f" (the ppl and loss-closed columns: calibration {calibs[0]})." if multi else ".")]
    if sel:
        md[0] += (f" Selection text (held out: neither calibration nor evaluation): {sel}, {a.select_windows} "
                  f"windows of 512; full precision {out['fp_select']:.3f}, RTN {out['rtn_select']:.3f} on it.")
    # numeric columns after the variant's name: (header, cell of a result record)
    cols = [(f"{sel} ppl (selection)", lambda r: f"{r['select_ppl']:.3f}")] if sel else []
    cols += [(f"{ev} ppl", lambda r: f"{r['ppl']:.3f}"),
             (f"RTN loss closed ({ev})",
              lambda r: f"{100 * (out['rtn'] - r['ppl']) / (out['rtn'] - out['fp']):.0f}%"),
             ("search time", lambda r: f"{r['seconds']:.0f} s")]
    if multi:
        cols += [(f"{ev} ppl, calibration {c}", lambda r, c=c: f"{r['by_calib'][c]['ppl']:.3f}")
                 for c in calibs[1:]]
        cols += [(f"spread ({ev})", lambda r: f"{100 * r['spread']:.2f}%")]
        cols += [(f"spread ({sel})", lambda r: f"{100 * r['select_spread']:.2f}%")] if sel else []
    md += ["", "| variant | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    md += ["| " + " | ".join([r["variant"], *(cell(r) for _, cell in cols)]) + " |" for r in res]
    if sel and res:
        best = best_on_selection(res)
        md += ["", f"Lowest {sel} (selection) perplexity: {best['variant']} ({best['select_ppl']:.3f}); its "
               f"{ev} perplexity {best['ppl']:.3f}" + ("" if len(res) > 1 else " (one variant so far)") + "."]
    RESULTS.mkdir(exist_ok=True)
    stem = _stem(a)
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine, **vars(a), **out, "variants": res},
                                                       indent=2))
    return md


def choose(a) -> None:
    """--choose: one variant across the given runs (see choose_across), written with every run's figures."""
    runs = [json.loads(Path(f).read_text()) for f in a.choose]
    texts = {r.get("select_text") for r in runs}
    if None in texts:
        raise SystemExit("--choose needs runs made with --select-text")
    best, mean = choose_across(runs)
    names = [f"{r['model']} g{r['group_size']}" for r in runs]
    md = [f"Choice across {', '.join(names)} (runs: {', '.join(Path(f).name for f in a.choose)}; selection "
          f"text {', '.join(sorted(texts))}; calibration {CALIB}): the variant with the best mean relative "
          f"improvement of the selection perplexity over the default ({DEFAULT}, nearest rounding), "
          f"(default - variant) / default, averaged over the runs. Machines: "
          f"{'; '.join(str(r['machine']) for r in runs)}.", "",
          "| variant | mean improvement (selection) | " +
          " | ".join(f"{n}: selection ppl / {EVAL} ppl" for n in names) + " |",
          "|---|---:|" + "---:|" * len(runs)]
    for v in sorted(mean, key=mean.get, reverse=True):
        cells = []
        for r in runs:
            rec = next(x for x in r["variants"] if x["variant"] == v)
            cells.append(f"{rec['select_ppl']:.3f} / {rec['ppl']:.3f}")
        md.append(f"| {v} | {100 * mean[v]:+.2f}% | " + " | ".join(cells) + " |")
    md += ["", f"Chosen: {best}."]
    RESULTS.mkdir(exist_ok=True)
    stem = "ablation-choice" + (f"-{a.tag}" if a.tag else "")
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"runs": [str(f) for f in a.choose], "baseline": DEFAULT, "chosen": best, "mean_improvement": mean,
         "machines": [r["machine"] for r in runs]}, indent=2))
    print("\n".join(md))


if __name__ == "__main__":
    main()
