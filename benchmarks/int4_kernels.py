"""Bandwidth benchmark of the 4-bit linears (salience.kernels), with the baselines timed in the same run.

GPU (default with CUDA): the linears of Llama-2-7B, Llama-3-8B and Llama-2-70B (qkv and gate_up fused)
at M = 1 .. 2048 tokens, bf16 activations, group size 128: ours (int4_linear, whichever kernel it
picks) against cuBLAS bf16 and fp16 (F.linear), tinygemm (aten._weight_int4pack_mm) and gemlite.
CPU (--cpu): SmolLM2-135M's linears at M = 1, 16, 128: ours (tinygemm for CPU, bf16) against F.linear
in fp32 and bf16.

How it times. Each method gets enough copies of its weights to exceed 4x the last-level cache (GPU:
50 MB L2; CPU: 32 MB L3), and every timed call reads the next copy, so weights come from DRAM/HBM as in
a real forward pass. GPU calls are captured in one CUDA graph (launch gaps shrink to what a graphed
decode step sees) and timed with CUDA events; the median over replays is divided by the calls in it.

Effective bandwidth = bytes one call must move / time, with the bytes of the AWQ tensors for every
int4 method: qweight N*K/2 + scales 2*N*G + qzeros N*G/2, plus x (2*M*K) and y (2*M*N). The dense
baselines are reported with their own bytes (2*N*K + x + y). Ratios are time(baseline) / time(ours).

    python benchmarks/int4_kernels.py                 # GPU, writes benchmarks/results/kernels.{md,json}
    python benchmarks/int4_kernels.py --quick         # GPU, a few shapes
    python benchmarks/int4_kernels.py --sweep         # GPU, block-size sweep of each kernel (for tuning)
    python benchmarks/int4_kernels.py --cpu           # CPU, writes benchmarks/results/kernels_cpu.{md,json}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from salience.kernels import PackedInt4, int4_linear  # noqa: E402
from salience.kernels.reference import unpack_awq  # noqa: E402
from salience.machine import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GS = 128
GPU_MODELS = {  # name -> [(layer, K, N)]
    "Llama-2-7B": [("qkv", 4096, 12288), ("o", 4096, 4096), ("gate_up", 4096, 22016), ("down", 11008, 4096),
                   ("lm_head", 4096, 32000)],
    "Llama-3-8B": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                   ("lm_head", 4096, 128256)],
    "Llama-2-70B": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192),
                    ("lm_head", 8192, 32000)],
}
GPU_MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
SWEEP_SHAPES = list(dict.fromkeys((k, n) for m in ("Llama-2-7B", "Llama-3-8B") for _, k, n in GPU_MODELS[m]))  # (K, N)
CPU_SHAPES = [("q/o", 576, 576), ("k/v", 576, 192), ("qkv", 576, 960), ("gate_up", 576, 3072),
              ("down", 1536, 576), ("lm_head", 576, 49152)]
CPU_MS = [1, 16, 128]


def int4_bytes(n, k, m, gs=GS):
    g = k // gs
    return n * k // 2 + 2 * n * g + n * g // 2 + 2 * m * k + 2 * m * n


def dense_bytes(n, k, m, elt=2):
    return elt * n * k + elt * m * k + elt * m * n


def random_awq(k, n, gs, device, seed=0):
    """Random AWQ GEMM tensors (uniform codes and zeros, scales ~ 1e-3) made on device."""
    g = torch.Generator(device=device).manual_seed(seed)
    qweight = torch.randint(-2**31, 2**31, (k, n // 8), dtype=torch.int64, generator=g, device=device)
    qzeros = torch.randint(-2**31, 2**31, (k // gs, n // 8), dtype=torch.int64, generator=g, device=device)
    scales = (torch.rand(k // gs, n, generator=g, device=device) * 2e-3 + 1e-4).to(torch.float16)
    return qweight.to(torch.int32), qzeros.to(torch.int32), scales


def copy_packed(p):
    """Another PackedInt4 with its own copies of the tensors (weights rotated past the cache)."""
    return dataclasses.replace(p, qweight=p.qweight.clone(), scales=p.scales.clone(),
                               locks=None if p.locks is None else p.locks.clone())


def n_copies(nbytes, cache_bytes):
    return max(2, math.ceil(4 * cache_bytes / nbytes))


# --------------------------------------------------------------------------------------------- GPU


def gpu_time(fns, target_s=0.03):
    """Seconds per call of the callables fns (one per weight copy), graphed, median of replays."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for f in fns:
        f()
    e1.record()
    e1.synchronize()
    per_pass = max(e0.elapsed_time(e1) / 1e3, 1e-6)
    n_pass = max(1, min(20, math.ceil(2e-3 / per_pass)))  # >= ~2 ms of work per graph
    graphed = True
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n_pass):
                for f in fns:
                    f()
        run = graph.replay
    except Exception as e:  # a method that cannot be captured is timed eagerly (and marked)
        print(f"    (not graphed: {type(e).__name__}: {str(e)[:100]})", flush=True)
        torch.cuda.synchronize()
        graphed = False

        def run():
            for _ in range(n_pass):
                for f in fns:
                    f()
    run()
    torch.cuda.synchronize()
    reps = max(3, min(25, math.ceil(target_s / (per_pass * n_pass))))
    times = []
    for _ in range(reps):
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times) / (n_pass * len(fns)), graphed


def tinygemm_weights(qweight, qzeros, scales, gs):
    """AWQ -> (packed int4 for aten._weight_int4pack_mm, scales_and_zeros bf16 [K/gs, N, 2])."""
    codes = unpack_awq(qweight).t().to(torch.int32)  # [N, K]
    w = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(w.contiguous(), 8)
    z = unpack_awq(qzeros).float()  # [G, N]
    s = scales.float()
    sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def gemlite_linear(qweight, qzeros, scales, gs, dtype):
    import gemlite

    k, n = qweight.shape[0], qweight.shape[1] * 8
    dt = gemlite.DType.BF16 if dtype == torch.bfloat16 else gemlite.DType.FP16
    lin = gemlite.GemLiteLinear(4, group_size=gs, in_features=k, out_features=n, input_dtype=dt,
                                output_dtype=dt)
    codes = unpack_awq(qweight).t().contiguous()  # [N, K] uint8
    lin.pack(codes, scales.t().contiguous().to(dtype), unpack_awq(qzeros).t().contiguous().to(dtype), None)
    return lin


def machine_gpu():
    import triton

    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sms": p.multi_processor_count, "l2_mb": p.L2_cache_size / 2**20,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def bench_gpu(models, ms, with_gemlite=True, gemlite_budget_s=150.0, deadline_s=None, save=None):
    dev = "cuda"
    info = machine_gpu()
    l2 = info["l2_mb"] * 2**20
    rows = []
    gemlite_ok, gemlite_spent = with_gemlite, 0.0
    gemlite_note = "" if with_gemlite else "not run (--no-gemlite)"
    if with_gemlite:
        try:
            import gemlite  # noqa: F401
        except Exception as e:
            gemlite_ok, gemlite_note = False, f"gemlite not importable: {type(e).__name__}: {e}"
    t_start = time.time()
    for model, layers in models.items():
        for layer, k, n in layers:
            if deadline_s and time.time() - t_start > deadline_s:
                print(f"deadline reached, skipping {model} {layer}", flush=True)
                continue
            awq = random_awq(k, n, GS, dev, seed=k + n)
            p0 = PackedInt4.from_awq(*awq, GS, device=dev, dtype=torch.bfloat16)
            c4 = n_copies(n * k // 2, l2)
            ours = [p0] + [copy_packed(p0) for _ in range(c4 - 1)]
            cd = n_copies(2 * n * k, l2)
            w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(cd)]
            wh = [w.to(torch.float16) for w in w16]
            tg = tinygemm_weights(*awq, GS)
            tgs = [tg] + [(tg[0].clone(), tg[1].clone()) for _ in range(c4 - 1)]
            gl = None
            if gemlite_ok:
                try:
                    g0 = time.time()
                    gl = [gemlite_linear(*awq, GS, torch.bfloat16) for _ in range(c4)]
                    gemlite_spent += time.time() - g0
                except Exception as e:
                    gemlite_ok = False
                    gemlite_note = f"gemlite failed to pack: {type(e).__name__}: {str(e)[:200]}"
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                xh = x.to(torch.float16)
                r = {"model": model, "layer": layer, "k": k, "n": n, "m": m}
                r["ours_s"], r["ours_graphed"] = gpu_time([lambda p=p: int4_linear(x, p) for p in ours])
                r["bf16_s"], _ = gpu_time([lambda w=w: F.linear(x, w) for w in w16])
                r["fp16_s"], _ = gpu_time([lambda w=w: F.linear(xh, w) for w in wh])
                r["tinygemm_s"], _ = gpu_time(
                    [lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], GS, t[1]) for t in tgs])
                if gl is not None and gemlite_ok and gemlite_spent < gemlite_budget_s:
                    try:
                        g0 = time.time()
                        r["gemlite_s"], r["gemlite_graphed"] = gpu_time([lambda g=g: g(x) for g in gl])
                        gemlite_spent += time.time() - g0
                    except Exception as e:
                        gemlite_ok = False
                        gemlite_note = f"gemlite failed: {type(e).__name__}: {str(e)[:200]}"
                elif gl is not None and gemlite_spent >= gemlite_budget_s:
                    gemlite_note = f"gemlite skipped after {gemlite_budget_s:.0f} s of its (autotuning) time"
                r["ours_tbs"] = int4_bytes(n, k, m) / r["ours_s"] / 1e12
                r["bf16_tbs"] = dense_bytes(n, k, m) / r["bf16_s"] / 1e12
                rows.append(r)
                print(fmt_gpu_row(r), flush=True)
            del ours, w16, wh, tg, tgs, gl, p0, awq
            torch.cuda.empty_cache()
            if save:  # results so far, in case the run is cut short
                save({"machine": info, "group_size": GS, "dtype": "bfloat16", "rows": rows,
                      "gemlite_note": gemlite_note})
    return {"machine": info, "group_size": GS, "dtype": "bfloat16", "rows": rows,
            "gemlite_note": gemlite_note}


def ratio(r, key):
    return r[key] / r["ours_s"] if r.get(key) else float("nan")


GPU_HEADER = (f"{'model':12} {'layer':8} {'K':>6} {'N':>6} {'M':>5} {'ours us':>9} {'TB/s':>5} "
              f"{'bf16 us':>9} {'TB/s':>5} {'x bf16':>6} {'x fp16':>6} {'x tiny':>6} {'x geml':>6}")


def fmt_gpu_row(r):
    return (f"{r['model']:12} {r['layer']:8} {r['k']:6} {r['n']:6} {r['m']:5} {r['ours_s'] * 1e6:9.1f} "
            f"{r['ours_tbs']:5.2f} {r['bf16_s'] * 1e6:9.1f} {r['bf16_tbs']:5.2f} {ratio(r, 'bf16_s'):6.2f} "
            f"{ratio(r, 'fp16_s'):6.2f} {ratio(r, 'tinygemm_s'):6.2f} {ratio(r, 'gemlite_s'):6.2f}")


def gpu_targets(rows):
    """The issue's targets, shape by shape: (description, [(row, value, ok)])."""
    out = []
    small = [r for r in rows if r["model"] in ("Llama-2-7B", "Llama-3-8B")]
    out.append(("M=1, 7B/8B shapes: >= 2.5 TB/s effective",
                [(r, r["ours_tbs"], r["ours_tbs"] >= 2.5) for r in small if r["m"] == 1]))
    out.append(("M=1, 7B/8B shapes: >= 1.4x tinygemm",
                [(r, ratio(r, "tinygemm_s"), ratio(r, "tinygemm_s") >= 1.4) for r in small if r["m"] == 1]))
    out.append(("M<=16: >= 3x cuBLAS bf16",
                [(r, ratio(r, "bf16_s"), ratio(r, "bf16_s") >= 3) for r in rows if r["m"] <= 16]))
    out.append(("M=64: >= 2x cuBLAS bf16",
                [(r, ratio(r, "bf16_s"), ratio(r, "bf16_s") >= 2) for r in rows if r["m"] == 64]))
    out.append(("M>=1024: >= 0.9x cuBLAS bf16",
                [(r, ratio(r, "bf16_s"), ratio(r, "bf16_s") >= 0.9) for r in rows if r["m"] >= 1024]))
    return out


def write_gpu(res, stem="kernels", out_dir=RESULTS):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    mi = res["machine"]
    lines = [f"# 4-bit linears on {mi['gpu']}", "",
             f"torch {mi['torch']}, triton {mi['triton']}, CUDA {mi['cuda']}, Python {mi['python']}, "
             f"{mi['sms']} SMs, L2 {mi['l2_mb']:.0f} MB. Activations bf16, group size {res['group_size']}, "
             "random AWQ weights.", "",
             "Times are per call: CUDA-graph replays over rotating weight copies (> 4x L2), median. "
             "TB/s = effective bandwidth (ours: AWQ qweight + scales + qzeros + x + y; bf16: its dense "
             "weight + x + y). `x bf16` etc. = time(baseline) / time(ours), > 1 means ours is faster. "
             "tiny = tinygemm (aten._weight_int4pack_mm), geml = gemlite.", ""]
    if res.get("gemlite_note"):
        lines += [f"gemlite: {res['gemlite_note']}", ""]
    lines += ["| model | layer | K | N | M | ours us | ours TB/s | bf16 us | bf16 TB/s | x bf16 | x fp16 "
              "| x tiny | x geml |", "|" + "---|" * 13]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['k']} | {r['n']} | {r['m']} | "
                     f"{r['ours_s'] * 1e6:.1f} | {r['ours_tbs']:.2f} | "
                     f"{r['bf16_s'] * 1e6:.1f} | {r['bf16_tbs']:.2f} | "
                     f"{ratio(r, 'bf16_s'):.2f} | {ratio(r, 'fp16_s'):.2f} | {ratio(r, 'tinygemm_s'):.2f} | "
                     f"{ratio(r, 'gemlite_s'):.2f} |")
    lines += ["", "## Targets", ""]
    for desc, items in gpu_targets(res["rows"]):
        ok = sum(1 for *_, good in items if good)
        lines.append(f"- {desc}: {ok}/{len(items)} met")
        misses = [f"{r['model']} {r['layer']} M={r['m']}: {v:.2f}" for r, v, good in items if not good]
        if misses:
            lines.append("  - missed: " + "; ".join(misses))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def print_targets(rows):
    for desc, items in gpu_targets(rows):
        ok = sum(1 for *_, good in items if good)
        vals = ", ".join(f"{r['layer']}@{r['model'][-3:]}:M{r['m']}={v:.2f}" for r, v, _ in items)
        print(f"{desc}: {ok}/{len(items)}  [{vals}]")


# ------------------------------------------------------------------------------------------- sweep


def sweep(out_dir):
    """Time each kernel over a grid of block sizes and splits (to choose the dispatcher's defaults)."""
    from salience.kernels import triton_int4 as T

    dev = "cuda"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [(4096, 12288), (4096, 4096), (11008, 4096)]
    gemv_cfgs = [dict(block_n=bn, num_warps=nw) for bn, nw in [(128, 4), (64, 2), (64, 4), (128, 8)]]
    gemm_cfgs = [dict(block_n=bn, num_warps=nw, num_stages=ns) for bn, nw, ns in
                 [(128, 4, 3), (128, 4, 4), (128, 4, 5), (64, 4, 4), (64, 2, 4), (64, 4, 6), (128, 8, 4)]]
    dq_cfgs = [dict(block_n=bn, units=nu, num_warps=nw) for bn, nu, nw in
               [(64, 2, 4), (128, 1, 8)]]
    res = []

    def rec(kind, k, n, m, cfg, split, t):
        e = {"kind": kind, "k": k, "n": n, "m": m, "cfg": cfg, "split": split, "us": t * 1e6,
             "tbs": int4_bytes(n, k, m) / t / 1e12}
        res.append(e)

    for k, n in shapes:
        awq = random_awq(k, n, GS, dev, seed=1)
        p0 = PackedInt4.from_awq(*awq, GS, device=dev, dtype=torch.bfloat16)
        ps = [p0] + [copy_packed(p0) for _ in range(n_copies(n * k // 2, l2) - 1)]
        n_units = k // 128
        for m in (1,):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            best = None
            for cfg in gemv_cfgs:
                tiles = p0.n // cfg["block_n"] * m
                for waves in (2, 4, 8):
                    split = max(1, min(waves * sms // tiles, n_units // 2, 32))
                    t, _ = gpu_time([lambda p=p: T.gemv(x, p, split=split, **cfg) for p in ps], target_s=0.01)
                    rec("gemv", k, n, m, cfg, split, t)
                    if best is None or t < best[0]:
                        best = (t, cfg, split)
            print(f"gemv K={k} N={n} M={m}: best {best[0] * 1e6:.1f} us "
                  f"{int4_bytes(n, k, m) / best[0] / 1e12:.2f} TB/s {best[1]} split={best[2]}", flush=True)
        for m in (1, 4, 16, 32, 64, 128, 256, 512):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            best = None
            for cfg in gemm_cfgs:
                for split in (None, 1):
                    t, _ = gpu_time([lambda p=p: T.gemm(x, p, split=split, **cfg) for p in ps], target_s=0.01)
                    rec("gemm", k, n, m, cfg, split, t)
                    if best is None or t < best[0]:
                        best = (t, cfg, split)
            if m >= 256:
                for cfg in dq_cfgs:
                    t, _ = gpu_time([lambda p=p: F.linear(x, T.dequantize(p, x.dtype, **cfg)) for p in ps],
                                    target_s=0.01)
                    rec("dq+cublas", k, n, m, cfg, None, t)
                    if t < best[0]:
                        best = (t, {"dq": cfg}, None)
            print(f"gemm K={k} N={n} M={m}: best {best[0] * 1e6:.1f} us "
                  f"{int4_bytes(n, k, m) / best[0] / 1e12:.2f} TB/s {best[1]} split={best[2]}", flush=True)
        del ps, p0, awq
        torch.cuda.empty_cache()
    save_sweep(out_dir, "kernels_sweep", res)


def sweep_regs(out_dir):
    """Register caps (maxnreg) for the small-M kernels: more resident warps against spills."""
    from salience.kernels import triton_int4 as T

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res = []
    for k, n in [(4096, 12288), (4096, 4096), (11008, 4096), (4096, 22016)]:
        awq = random_awq(k, n, GS, "cuda", seed=1)
        p0 = PackedInt4.from_awq(*awq, GS, device="cuda", dtype=torch.bfloat16)
        ps = [p0] + [copy_packed(p0) for _ in range(n_copies(n * k // 2, l2) - 1)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cases = [("gemm", dict(maxnreg=r)) for r in (None, 96)]
            if m == 1:
                cases += [("gemv", dict(maxnreg=r, block_n=bn, num_warps=nw))
                          for r in (None,) for bn, nw in ((128, 4), (128, 8), (64, 2), (64, 4))]
            for kind, cfg in cases:
                f = T.gemv if kind == "gemv" else T.gemm
                t, _ = gpu_time([lambda p=p: f(x, p, **cfg) for p in ps], target_s=0.01)
                res.append({"kind": kind, "k": k, "n": n, "m": m, "cfg": cfg, "us": t * 1e6})
                print(f"{kind} K={k} N={n} M={m} {cfg}: {t * 1e6:.1f} us "
                      f"{int4_bytes(n, k, m) / t / 1e12:.2f} TB/s", flush=True)
        del ps, p0, awq
        torch.cuda.empty_cache()
    (out_dir / "kernels_sweep_regs.json").write_text(json.dumps(res, indent=0))


def save_sweep(out_dir, stem, rows):
    """out_dir/stem.json: the machine and the sweep's rows (rewritten after each shape: a cut run keeps them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({"machine": machine_gpu(), "rows": rows}, indent=0))


def sweep_shapes(deadline_s=None, t0=None):
    """SWEEP_SHAPES (K, N), none started once deadline_s seconds have passed since t0 (each skip printed)."""
    for k, n in SWEEP_SHAPES:
        if deadline_s and time.time() - t0 > deadline_s:
            print(f"deadline: skipping K={k} N={n}", flush=True)
            continue
        yield k, n


def sweep_operands(k, n, l2):
    """One shape's operands for the sweeps, each with enough copies to defeat L2 (n_copies): the AWQ
    tensors, our packed weights (ps[0] the original), a bf16 dense weight and tinygemm's weights."""
    awq = random_awq(k, n, GS, "cuda", seed=1)
    p0 = PackedInt4.from_awq(*awq, GS, device="cuda", dtype=torch.bfloat16)
    nc = n_copies(n * k // 2, l2)
    ps = [p0] + [copy_packed(p0) for _ in range(nc - 1)]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    ws = [w] + [w.clone() for _ in range(n_copies(2 * n * k, l2) - 1)]
    tg = tinygemm_weights(*awq, GS)
    tgs = [tg] + [tuple(t.clone() for t in tg) for _ in range(nc - 1)]
    return awq, ps, ws, tgs


def baseline_times(x, ws, tgs):
    """Seconds per call of cuBLAS bf16 and tinygemm on x, over the rotated copies."""
    return {"bf16": gpu_time([lambda w=w: F.linear(x, w) for w in ws], target_s=0.01)[0],
            "tiny": gpu_time([lambda t=t: torch.ops.aten._weight_int4pack_mm(x, t[0], GS, t[1]) for t in tgs],
                             target_s=0.01)[0]}


def sweep_gemv(out_dir, ms=(1,)):
    """M = 1 GEMV (group 128): the dispatcher's default against _gemv_wide_kernel over (BLOCK_N, units per
    step, warps, stages, split waves), with tinygemm and cuBLAS bf16 in the same run. Writes
    kernels_sweep_gemv_wide.json (earlier sweeps are in the history: commit a566059 has
    benchmarks/results/h200/ for the tiled layout and benchmarks/results/gemv_experiments/, run at commit
    8ea719b on row-major codes, where "old" is the hand-pipelined _gemv_kernel)."""
    from salience.kernels import triton_int4 as T

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    # (small BLOCK_N 16/32 without split-K, 8 warps and waves 1 never won on the H200; see
    # benchmarks/results/h200/sweep_gemv.log at commit a566059)
    # step_sum: the accumulator summed over words every step (fewer registers)
    # h2: the fp16x2 math (its first sweep: benchmarks/results/h200/s7/run2/ at commit a566059, made with
    # benchmarks/lab/gemv_lab.py --h2)
    cfgs = [dict(block_n=128, num_warps=nw, stages=st, waves=wv, wide=u, h2=True)
            for u, nw in ((1, 2), (1, 1), (2, 2), (1, 4)) for st in (3, 4) for wv in (3, 4, 6, 8)]
    cfgs += [dict(block_n=128, num_warps=4, stages=3, waves=wv, wide=u, step_sum=False, h2=False)
             for u in (1, 2) for wv in (2, 4)]
    res = []
    for k, n in sweep_shapes():
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        p0 = ps[0]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = T.gemv(x, p0)
            byt = int4_bytes(n, k, m)
            base = baseline_times(x, ws, tgs)
            base["default"], _ = gpu_time([lambda p=p: T.gemv(x, p) for p in ps], target_s=0.01)
            best = None
            for cfg in cfgs:
                y = T.gemv(x, p0, **cfg)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                t, _ = gpu_time([lambda p=p: T.gemv(x, p, **cfg) for p in ps], target_s=0.01)
                res.append({"k": k, "n": n, "m": m, "cfg": cfg, "us": t * 1e6, "tbs": byt / t / 1e12,
                            "rel_err_vs_default": err})
                if best is None or t < best[0]:
                    best = (t, cfg)
            res.append({"k": k, "n": n, "m": m, "baselines_us": {a: b * 1e6 for a, b in base.items()}})
            t = best[0]
            print(f"K={k} N={n} M={m}: best {t * 1e6:.1f} us {byt / t / 1e12:.2f} TB/s {best[1]} | "
                  f"default {base['default'] * 1e6:.1f} us ({byt / base['default'] / 1e12:.2f} TB/s) | "
                  f"x default {base['default'] / t:.2f} x tiny {base['tiny'] / t:.2f} x bf16 {base['bf16'] / t:.2f}",
                  flush=True)
        del ps, p0, awq, ws, tgs
        torch.cuda.empty_cache()
    save_sweep(out_dir, "kernels_sweep_gemv_wide", res)


def sweep_split(out_dir, deadline_s=None):
    """GEMM at M = 4..128: split-K count (partials cost n_split * M * N * 4 bytes written and read back,
    as much as the codes themselves at M = 16 with 16 splits of a 4096-wide matrix), BLOCK_N and
    BLOCK_M, on the 7B/8B shapes, with cuBLAS bf16 and tinygemm in the same run. Also each shape's
    dispatcher default and bf16 with the weights L2-hot (one copy, no rotation) against the usual
    rotated copies, and the floor of a launch (a 128 x 128 matrix). Writes kernels_sweep_split.json."""
    from salience.kernels import triton_int4 as T

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    res, t0 = [], time.time()
    tiny_p = PackedInt4.from_awq(*random_awq(128, 128, GS, "cuda"), GS, device="cuda", dtype=torch.bfloat16)
    for m in (1, 16):
        x = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16)
        t, _ = gpu_time([lambda: int4_linear(x, tiny_p)], target_s=0.01)
        res.append({"k": 128, "n": 128, "m": m, "floor_us": t * 1e6})
        print(f"launch floor (K=N=128) M={m}: {t * 1e6:.2f} us", flush=True)
    for k, n in sweep_shapes(deadline_s, t0):
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        p0 = ps[0]
        for m in (1, 4, 16, 64, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            byt = int4_bytes(n, k, m)
            base = dict(baseline_times(x, ws, tgs),
                        bf16_hot=gpu_time([lambda w=ws[0]: F.linear(x, w)], target_s=0.01)[0],
                        default=gpu_time([lambda p=p: int4_linear(x, p) for p in ps], target_s=0.01)[0],
                        default_hot=gpu_time([lambda p=p0: int4_linear(x, p)], target_s=0.01)[0])
            us = {a: b * 1e6 for a, b in base.items()}
            res.append({"k": k, "n": n, "m": m, "baselines_us": us})
            msg = (f"K={k:5} N={n:6} M={m:3} | default {us['default']:6.1f} us (hot {us['default_hot']:6.1f})"
                   f" | bf16 {us['bf16']:6.1f} (hot {us['bf16_hot']:6.1f}) | tiny {us['tiny']:6.1f}")
            if m == 1:
                print(msg, flush=True)
                continue
            ref = x.float() @ T.dequantize(p0, torch.float32).t()
            bms = (None,) if m <= 16 else (32, 64) if m <= 64 else (64, 128)
            best = None
            for bm in bms:
                for bn in (64, 128):
                    for sp in (1, 2, 4, 8, 16, None):
                        cfg = dict(block_m=bm, block_n=bn, split=sp)
                        if bm == 128:
                            cfg["num_warps"] = 8
                        y = T.gemm(x, p0, **cfg).float()
                        err = ((y - ref).norm() / ref.norm()).item()
                        t, _ = gpu_time([lambda p=p: T.gemm(x, p, **cfg) for p in ps], target_s=0.01)
                        res.append({"k": k, "n": n, "m": m, "cfg": cfg, "us": t * 1e6, "tbs": byt / t / 1e12,
                                    "rel_err": err})
                        if best is None or t < best[0]:
                            best = (t, cfg)
            bt = best[0]
            print(f"{msg} | best {bt * 1e6:6.1f} us {byt / bt / 1e12:4.2f} TB/s {best[1]} | x default "
                  f"{base['default'] / bt:4.2f} x bf16 {base['bf16'] / bt:4.2f} x tiny {base['tiny'] / bt:4.2f}",
                  flush=True)
        del ps, ws, tgs, p0, awq
        torch.cuda.empty_cache()
        save_sweep(out_dir, "kernels_sweep_split", res)


def floor_m1(out_dir):
    """The fixed cost of the M = 1 GEMV: an empty Triton kernel, the GEMV's variants (stages, step sum) and
    the GEMM run at M = 1 (BLOCK_N, split), on a tiny matrix and the narrow 7B/8B shapes. (Written after
    sweep_split printed 6.5 us for a 128 x 128 GEMV; that was the first timing of its process, not the
    kernel: 2.3 us here, benchmarks/results/h200/s5/run4/ at commit a566059.) Writes kernels_floor_m1.json."""
    import triton
    import triton.language as tl

    from salience.kernels import triton_int4 as T

    @triton.jit
    def _empty(out_ptr):
        tl.store(out_ptr + tl.arange(0, 1), tl.zeros([1], dtype=tl.float32))

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    buf = torch.empty(1, device="cuda")
    res = [{"kernel": "empty", "us": gpu_time([lambda: _empty[(1,)](buf)], target_s=0.01)[0] * 1e6}]
    print(f"empty Triton kernel: {res[0]['us']:.2f} us", flush=True)
    variants = {"gemv default": (T.gemv, {}), "gemv stages 1": (T.gemv, dict(stages=1)),
                "gemv stages 2": (T.gemv, dict(stages=2)), "gemv wide 1": (T.gemv, dict(wide=1)),
                "gemv fp32 math": (T.gemv, dict(h2=False)), "gemv step_sum": (T.gemv, dict(step_sum=True, h2=False))}
    variants.update({f"gemm bn{bn} split {sp}": (T.gemm, dict(block_n=bn, split=sp))
                     for bn in (128,) for sp in (None, 4, 8)})
    for k, n in ((128, 128), (4096, 4096), (11008, 4096), (4096, 12288), (4096, 22016)):
        awq = random_awq(k, n, GS, "cuda", seed=1)
        p0 = PackedInt4.from_awq(*awq, GS, device="cuda", dtype=torch.bfloat16)
        ps = [p0] + [copy_packed(p0) for _ in range(n_copies(n * k // 2, l2) - 1)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = T.gemv(x, p0).float()
        out = []
        for name, (kern, cfg) in variants.items():
            y = kern(x, p0, **cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            t, _ = gpu_time([lambda p=p: kern(x, p, **cfg) for p in ps], target_s=0.01)
            res.append({"k": k, "n": n, "variant": name, "us": t * 1e6, "rel_err_vs_gemv": err})
            out.append(f"{name} {t * 1e6:.1f}")
        print(f"K={k:5} N={n:6} M=1 | " + " | ".join(out), flush=True)
    save_sweep(out_dir, "kernels_floor_m1", res)


def row_major(p):
    """The same PackedInt4 with its codes stored the pre-tiling way, row-major (layout.row_major_view)."""
    from salience.kernels.layout import row_major_view

    return dataclasses.replace(p, qweight=row_major_view(p.qweight), locks=p.locks.clone())


def sweep_layout(out_dir, deadline_s=None):
    """Tiled layout (8 KiB tiles of 128 rows x 1 unit, layout.py) against the earlier row-major order,
    same kernels, same run: M = 1 GEMV over (BLOCK_N, units per step, split waves, stages) and the GEMM at
    M = 4, 16, 64, on the 7B/8B shapes, with tinygemm and cuBLAS bf16 as references. Writes
    kernels_sweep_layout.json; prints the best of each layout per shape."""
    from salience.kernels import triton_int4 as T

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gemv_cfgs = [dict(block_n=bn, wide=u, waves=wv, stages=st, num_warps=4)
                 for bn in (128, 64) for u in (1, 2) for wv in (1, 2, 4) for st in (2, 3, 4)]
    gemm_cfgs = [dict(block_n=bn, num_stages=ns, split=sp)
                 for bn in (128, 64) for ns in (3, 4) for sp in (None, 1)]
    res, t0 = [], time.time()
    for k, n in sweep_shapes(deadline_s, t0):
        awq, ps, ws, tgs = sweep_operands(k, n, l2)
        p0 = ps[0]
        lay = {"tiled": ps, "rowmajor": [row_major(p) for p in ps]}
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            byt = int4_bytes(n, k, m)
            ref = x.float() @ T.dequantize(p0, torch.float32).t()
            base = baseline_times(x, ws, tgs)
            for name, ps in lay.items():
                base[f"default_{name}"] = gpu_time([lambda p=p: int4_linear(x, p) for p in ps],
                                                   target_s=0.01)[0]
            best = {}
            for name, ps in lay.items():
                kern, cfgs = (T.gemv, gemv_cfgs) if m == 1 else (T.gemm, gemm_cfgs)
                for cfg in cfgs:
                    y = kern(x, ps[0], **cfg).float()
                    err = ((y - ref).norm() / ref.norm()).item()
                    t, _ = gpu_time([lambda p=p: kern(x, p, **cfg) for p in ps], target_s=0.01)
                    res.append({"k": k, "n": n, "m": m, "layout": name, "cfg": cfg, "us": t * 1e6,
                                "tbs": byt / t / 1e12, "rel_err": err})
                    if name not in best or t < best[name][0]:
                        best[name] = (t, cfg)
            res.append({"k": k, "n": n, "m": m, "baselines_us": {a: b * 1e6 for a, b in base.items()}})
            bt, br = best["tiled"][0], best["rowmajor"][0]
            print(f"K={k:5} N={n:6} M={m:2} | tiled best {bt * 1e6:7.1f} us {byt / bt / 1e12:4.2f} TB/s "
                  f"{best['tiled'][1]} | rowmajor best {br * 1e6:7.1f} us {byt / br / 1e12:4.2f} TB/s | "
                  f"tiled/rowmajor x{br / bt:4.2f} | default tiled {base['default_tiled'] * 1e6:7.1f} "
                  f"rowmajor {base['default_rowmajor'] * 1e6:7.1f} | x tiny {base['tiny'] / bt:4.2f} "
                  f"x bf16 {base['bf16'] / bt:4.2f}", flush=True)
        del lay, ws, tgs, p0, awq
        torch.cuda.empty_cache()
        save_sweep(out_dir, "kernels_sweep_layout", res)


# --------------------------------------------------------------------------------------------- CPU


def cpu_time(fns, target_s=0.3, min_passes=5):
    """Seconds per call on CPU: the median over single calls, cycling through the weight copies.
    (Per-call medians shrug off the scheduler's preemptions on a shared machine.)"""
    for f in fns:
        f()
    t0 = time.perf_counter()
    for f in fns:
        f()
    per_pass = time.perf_counter() - t0
    passes = max(min_passes, min(100, math.ceil(target_s / max(per_pass, 1e-7))))
    times = []
    for _ in range(passes):
        for f in fns:
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_cpu(threads):
    torch.set_num_threads(threads)
    l3 = 32 * 2**20
    rows = []
    for layer, k, n in CPU_SHAPES:
        awq = random_awq(k, n, 64, "cpu", seed=k + n)  # SmolLM2's K=576 takes group size 64 (or 32, 192)
        p = PackedInt4.from_awq(*awq, 64, device="cpu", dtype=torch.bfloat16)
        cp = n_copies(p.qweight.numel() + p.scales.numel() * 2, l3)
        ps = [p] + [copy_packed(p) for _ in range(cp - 1)]
        w32 = [torch.randn(n, k) * 0.02 for _ in range(n_copies(4 * n * k, l3))]
        w16 = [w.bfloat16() for w in w32[: n_copies(2 * n * k, l3)]]
        for m in CPU_MS:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            r = {"layer": layer, "k": k, "n": n, "m": m}
            r["ours_bf16_s"] = cpu_time([lambda p=p: int4_linear(xb, p) for p in ps])
            r["ours_fp32in_s"] = cpu_time([lambda p=p: int4_linear(x, p) for p in ps])
            r["fp32_s"] = cpu_time([lambda w=w: F.linear(x, w) for w in w32])
            r["bf16_s"] = cpu_time([lambda w=w: F.linear(xb, w) for w in w16])
            r["ours_gbs"] = int4_bytes(n, k, m, 64) / r["ours_bf16_s"] / 1e9
            rows.append(r)
            print(f"{layer:8} {k:5} {n:6} {m:4}  ours {r['ours_bf16_s'] * 1e6:9.1f} us"
                  f" {r['ours_gbs']:6.1f} GB/s"
                  f"  (fp32 x: {r['ours_fp32in_s'] * 1e6:9.1f})  fp32 {r['fp32_s'] * 1e6:9.1f}"
                  f"  bf16 {r['bf16_s'] * 1e6:9.1f}  x fp32 {r['fp32_s'] / r['ours_bf16_s']:5.2f}"
                  f"  x bf16 {r['bf16_s'] / r['ours_bf16_s']:5.2f}", flush=True)
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg": os.getloadavg()}
    return {"machine": info, "group_size": 64, "rows": rows}


def write_cpu(res, out_dir=RESULTS):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_cpu.json").write_text(json.dumps(res, indent=1))
    mi = res["machine"]
    lines = [f"# 4-bit linears on CPU: {mi['cpu']}", "",
             f"{mi['threads']} threads, torch {mi['torch']}, Python {mi['python']}, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in mi['loadavg'])} (a shared machine: expect noise). SmolLM2-135M "
             f"shapes, group size {res['group_size']}, weights rotated over > 4x the 32 MB L3, median of "
             "single calls.", "",
             "ours = int4_linear on a PackedInt4 for CPU in bf16 (tinygemm for CPU); `fp32 x` = the same "
             "with fp32 activations (cast to bf16 and back). GB/s = effective (AWQ bytes + x + y). "
             "`x fp32` = time(F.linear fp32) / time(ours).", "",
             "| layer | K | N | M | ours us | GB/s | ours, fp32 x, us | fp32 us | bf16 us | x fp32 "
             "| x bf16 |",
             "|" + "---|" * 11]
    for r in res["rows"]:
        lines.append(f"| {r['layer']} | {r['k']} | {r['n']} | {r['m']} | {r['ours_bf16_s'] * 1e6:.1f} | "
                     f"{r['ours_gbs']:.1f} | {r['ours_fp32in_s'] * 1e6:.1f} | {r['fp32_s'] * 1e6:.1f} | "
                     f"{r['bf16_s'] * 1e6:.1f} | {r['fp32_s'] / r['ours_bf16_s']:.2f} | "
                     f"{r['bf16_s'] / r['ours_bf16_s']:.2f} |")
    m1 = [r for r in res["rows"] if r["m"] == 1]
    ok = [r for r in m1 if r["fp32_s"] / r["ours_bf16_s"] >= 2]
    lines += ["", f"Target M=1 >= 2x fp32 F.linear: {len(ok)}/{len(m1)} shapes met ("
              + ", ".join(f"{r['layer']} {r['fp32_s'] / r['ours_bf16_s']:.2f}x" for r in m1) + ")."]
    (out_dir / "kernels_cpu.md").write_text("\n".join(lines) + "\n")


def run_one(spec):
    """Run one case a few times, untimed (to look at it under a profiler): 'kernel:K:N:M', kernel one
    of gemv, gemm, linear (the dispatcher)."""
    from salience.kernels import triton_int4 as T

    kind, k, n, m = spec.split(":")
    k, n, m = int(k), int(n), int(m)
    p = PackedInt4.from_awq(*random_awq(k, n, GS, "cuda"), GS, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    f = {"gemv": T.gemv, "gemm": T.gemm, "linear": int4_linear,
}[kind]
    for _ in range(3):
        f(x, p)
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU benchmark (SmolLM2 shapes)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1: steadier on a shared box)")
    ap.add_argument("--quick", action="store_true", help="GPU: a few shapes and Ms")
    ap.add_argument("--sweep", action="store_true", help="GPU: block-size sweep of each kernel")
    ap.add_argument("--sweep-regs", action="store_true", help="GPU: register caps for the small-M kernels")
    ap.add_argument("--sweep-gemv", action="store_true", help="GPU: M=1 GEMV configurations (BLOCK_N, units per step, stages, waves)")
    ap.add_argument("--sweep-layout", action="store_true",
                    help="GPU: tiled vs row-major code layout, GEMV and GEMM configurations, same kernels")
    ap.add_argument("--sweep-split", action="store_true",
                    help="GPU: GEMM split-K, BLOCK_N, BLOCK_M at M = 4..128; L2-hot vs rotated weights")
    ap.add_argument("--floor", action="store_true", help="GPU: fixed cost of the M=1 GEMV vs the GEMM at M=1")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files")
    ap.add_argument("--stem", default="kernels")
    ap.add_argument("--deadline", type=float, default=None, help="GPU: stop starting new shapes after s")
    ap.add_argument("--one", default=None, help="GPU: run one case untimed, kernel:K:N:M (for ncu)")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="GPU: only these token counts (use with --stem)")
    a = ap.parse_args()
    if a.one:
        run_one(a.one)
        return
    if a.cpu:
        res = bench_cpu(a.threads)
        write_cpu(res, a.out)
        return
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu")
    if a.sweep:
        sweep(a.out)
        return
    if a.sweep_regs:
        sweep_regs(a.out)
        return
    if a.sweep_gemv:
        sweep_gemv(a.out)
        return
    if a.sweep_layout:
        sweep_layout(a.out, a.deadline)
        return
    if a.sweep_split:
        sweep_split(a.out, a.deadline)
        return
    if a.floor:
        floor_m1(a.out)
        return
    models, ms = GPU_MODELS, GPU_MS
    if a.quick:
        models = {"Llama-2-7B": GPU_MODELS["Llama-2-7B"][:4]}
        ms = [1, 4, 16, 64, 512]
    ms = a.ms or ms
    print(GPU_HEADER, flush=True)
    res = bench_gpu(models, ms, with_gemlite=not a.no_gemlite, deadline_s=a.deadline,
                    save=lambda r: write_gpu(r, a.stem, a.out))
    write_gpu(res, a.stem, a.out)
    print()
    print(GPU_HEADER)
    for r in res["rows"]:
        print(fmt_gpu_row(r))
    print_targets(res["rows"])


if __name__ == "__main__":
    main()
