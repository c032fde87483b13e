"""Where one decode step of the engine spends its GPU time, kernel by kernel (torch.profiler).

    python benchmarks/profile_decode.py [--shape llama2-7b] [--batch 1] [--prompt 128] [--steps 20]

Random weights, W4 g128 (and --fp16 for the FP16 engine). The step runs with the compiled elementwise ops
but without the CUDA graph, so that the profiler sees each kernel; kernel times are those of the graphed
step, only the gaps between launches differ, and the graphed step's time is printed beside it. Writes
benchmarks/results/decode_profile-<shape>-b<batch>.txt.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from salience.engine.generate import Runner  # noqa: E402
from salience.engine.weights import random_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# kernel-name fragments -> category (first match wins)
CATEGORIES = [("int4 GEMV/GEMM", ("_gemv", "_gemm_kernel", "_dequant")), ("cuBLAS GEMM", ("gemm", "gemv", "cutlass", "sm90")),
              ("attention", ("attention", "fmha", "flash", "softmax")), ("KV cache write", ("index_copy", "index_put", "scatter")),
              ("compiled elementwise", ("triton_",))]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def step_ms(runner, tok, n) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        tok = runner.decode(tok).argmax(-1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fp16", action="store_true", help="the FP16 engine instead of W4")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = random_model(a.shape, None if a.fp16 else 128, "cuda", torch.float16)
    ids = torch.randint(0, model.c.vocab, (a.batch, a.prompt), device="cuda")
    lines = [f"# decode step profile: {a.shape} {'fp16' if a.fp16 else 'W4 g128'}, batch {a.batch}, "
             f"prompt {a.prompt}, {torch.cuda.get_device_name()}", ""]
    graphed = Runner(model, cuda_graph=True, compile=True, prefix_reuse=False)
    graphed.reset(a.batch, a.prompt + 3 * a.steps + 8)
    tok = graphed.prefill(ids, torch.zeros(a.batch, dtype=torch.long, device="cuda")).argmax(-1)
    step_ms(graphed, tok, 3)
    g_ms = step_ms(graphed, tok, a.steps)
    eager = Runner(model, cuda_graph=False, compile=True, prefix_reuse=False)
    eager.reset(a.batch, a.prompt + 3 * a.steps + 8)
    tok = eager.prefill(ids, torch.zeros(a.batch, dtype=torch.long, device="cuda")).argmax(-1)
    e_ms = step_ms(eager, tok, 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step_ms(eager, tok, a.steps)
    totals, per_kernel = {}, {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total / a.steps / 1e3  # ms per step
        if t <= 0:
            continue
        per_kernel[ev.key] = (t, ev.count // a.steps)
        cat = category(ev.key)
        totals[cat] = totals.get(cat, 0.0) + t
    busy = sum(totals.values())
    lines += [f"graphed step: {g_ms:.3f} ms ({a.batch * 1e3 / g_ms:.1f} tok/s); ungraphed step: {e_ms:.3f} ms; "
              f"GPU busy per step (sum of kernel times): {busy:.3f} ms", "",
              "| category | ms per step | share of busy |", "|---|---:|---:|"]
    for cat, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {t:.3f} | {100 * t / busy:.1f}% |")
    lines += ["", "| kernel | calls per step | ms per step | us per call |", "|---|---:|---:|---:|"]
    for name, (t, c) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:40]:
        lines.append(f"| {name[:90]} | {c} | {t:.3f} | {1e3 * t / max(c, 1):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = f"{a.shape}-{'fp16' if a.fp16 else 'w4'}-b{a.batch}"
    (RESULTS / f"decode_profile-{tag}.txt").write_text(text)


if __name__ == "__main__":
    main()
