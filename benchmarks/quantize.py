"""Quantization speed and memory at real model shapes: build a random-weight checkpoint with a real
architecture on disk, quantize it with `salience.api.quantize` (lazy block-by-block path, AWQ w4 g128),
report wall time, time per block, peak GPU memory and peak host RSS.

    python3 benchmarks/quantize.py --models llama2-7b                 # ~3 min on an H100 incl. building
    python3 benchmarks/quantize.py --models llama3-8b,llama2-70b:3    # 70B shape: 3 of its 80 blocks
    python3 benchmarks/quantize.py --models llama2-7b,llama2-70b:2 --results DIR   # the issue's targets
    python3 benchmarks/quantize.py --models tiny --device cpu         # smoke test (seconds)

Weights are random (normal, std 0.02; norms 1 + noise), so only speed and memory are meaningful here;
calibration is random token ids (seed 0), `--rows` x `--seqlen` (default 128 x 512), because the bench
machine has no corpus and no network. A shape with fewer blocks than the real model (`name:blocks`) is
extrapolated per block: total = measured fixed cost + per-block median x real block count, marked as such.
Each model is quantized in a fresh child process so that its peak RSS is the quantizer's alone. On a GPU
the child also records the peak of allocated GPU memory per phase (salience.quantize.phase_hook: capture,
load, each pass over the calibration rows, each group's scale search, clip_quantize, write), printed under
the table. Results are merged into benchmarks/results/quantize.json (one entry per model and device) and
the table quantize.md is rewritten from it; results of a run elsewhere (`--results DIR`) are merged with
`--merge DIR/quantize.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"  # --results changes it
ROOT = Path(__file__).resolve().parents[1]

# name -> (LlamaConfig kwargs, stored dtype). Shapes of the public configs.
SHAPES = {
    "llama2-7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5), "float16"),
    "llama3-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5), "bfloat16"),
    "llama2-70b": (dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                        rope_theta=10000.0, rms_norm_eps=1e-5), "float16"),
    "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024), "float16"),  # CPU
    "tiny": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512), "float16"),
}


def build(name: str, n_blocks: int | None, folder: Path, device: str, shard_bytes: int = 5 << 30) -> dict:
    """Write a random-weight Llama-family checkpoint (config.json, safetensors shards of ~5 GB, index)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    kw, stored = SHAPES[name]
    kw = dict(kw)
    real_blocks = kw["num_hidden_layers"]
    kw["num_hidden_layers"] = n_blocks or real_blocks
    cfg = transformers.LlamaConfig(**kw, tie_word_embeddings=False, dtype=stored)
    dtype = getattr(torch, stored)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator(device=device).manual_seed(0)
    shard, size, weight_map, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        fname = f"model-{n:05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    t0 = time.time()
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02
        if len(shape) == 1:  # norms: 1 + noise
            t = 1 + t * 5
        shard[k] = t.to(dtype).cpu()
        size += shard[k].numel() * shard[k].element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if device == "cuda":
        torch.cuda.empty_cache()  # the quantizing child gets the whole GPU
    block_params = sum(v.numel() for k, v in shapes.items() if k.startswith("model.layers.0."))
    return {"build_seconds": round(time.time() - t0, 1), "bytes_on_disk": total, "blocks_built": len(
        [k for k in shapes if k.endswith("input_layernorm.weight")]), "blocks_real": real_blocks,
        "block_params": block_params, "block_bytes_16bit": block_params * 2, "hidden": kw["hidden_size"],
        "intermediate": kw["intermediate_size"], "vocab": kw["vocab_size"], "stored_dtype": stored}


class _RssSampler(threading.Thread):
    """Peaks of VmRSS, RssAnon (anonymous memory), RssFile (mapped file pages: the shards, when they were
    memory-mapped) and RssShmem (CUDA's pinned host memory may count here)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        self.stop = False

    def sample(self):
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def run(self):
        while not self.stop:
            self.sample()
            time.sleep(0.05)


def _status_bytes(key: str) -> int:
    """A '<key>: N kB' line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(a):
    """Quantize `a.folder` once and print one JSON line of measurements."""
    import torch

    sys.path.insert(0, str(ROOT))
    from salience import api
    from salience.quant import QuantConfig

    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.zeros(1, device=dev)  # CUDA context in the baseline
    # the modules a run imports, in the baseline too: what is over it is data
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from salience import lazy, quantize  # noqa: F401

    sampler = _RssSampler()
    sampler.sample()
    base = dict(sampler.peak)
    sampler.start()
    cfg = json.loads((Path(a.folder) / "config.json").read_text())
    rows = torch.randint(0, cfg["vocab_size"], (a.rows, a.seqlen), generator=torch.Generator().manual_seed(0))
    phase_peaks: dict[str, dict] = {}  # phase -> the largest peak of device memory over blocks
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

        def on_phase(block, phase):
            """Peak allocated since the last phase ended, then reset: where the peak of the run is."""
            peak, now = torch.cuda.max_memory_allocated(dev), torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            e = phase_peaks.setdefault(phase, {"peak": -1})
            if peak > e["peak"]:
                e.update(peak=peak, block=block, allocated_after=now)

        quantize.phase_hook = on_phase
    t0 = time.time()
    out, _, _ = api.quantize(a.folder, a.out, QuantConfig(4, 128), "awq", rows=rows, device=a.device,
                             dtype="bfloat16", overwrite=True, progress=True, restart=True)
    wall = time.time() - t0
    sampler.stop = True
    sampler.join()
    sampler.sample()
    report = json.loads((out / "salience_report.json").read_text())
    res = {
        "wall_seconds": round(wall, 2),
        "block_seconds": [b["seconds"] for b in report["blocks"]],
        "block_phases": [b.get("phases", {}) for b in report["blocks"]],
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child's ru_maxrss reports its
        # parent's peak when that is higher (the parent builds the checkpoint)
        "peak_vmhwm": _status_bytes("VmHWM"),
        "peak_vmrss_sampled": sampler.peak["VmRSS"], "peak_rss_anon_sampled": sampler.peak["RssAnon"],
        "baseline_vmrss": base["VmRSS"], "baseline_rss_anon": base["RssAnon"],
        "output_bytes": sum(f.stat().st_size for f in out.iterdir()),
    }
    res["peak_rss_file_sampled"], res["peak_rss_shmem_sampled"] = sampler.peak["RssFile"], sampler.peak["RssShmem"]
    if dev.type == "cuda":
        on_phase(-2, "end")  # writing the rest, closing
        quantize.phase_hook = None
        res["peak_gpu_allocated"] = max(e["peak"] for e in phase_peaks.values())
        res["peak_gpu_reserved"] = torch.cuda.max_memory_reserved(dev)
        res["gpu"] = torch.cuda.get_device_name(dev)
        res["gpu_phase_peaks"] = phase_peaks
    print("RESULT " + json.dumps(res), flush=True)


def machine(device: str) -> str:
    sys.path.insert(0, str(ROOT))
    from salience.machine import cpu_name

    gpu = ""
    if device.startswith("cuda"):
        import torch
        gpu = torch.cuda.get_device_name(torch.device(device)) + ", "
    return f"{gpu}{os.cpu_count()} x {cpu_name()}"


def gib(b):
    return b / 2**30


def run_one(spec: str, a) -> dict:
    name, _, nb = spec.partition(":")
    nb = int(nb) if nb else None
    work = Path(a.dir)
    folder, out = work / f"{name}-random", work / f"{name}-awq"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"== {spec}: building a random-weight checkpoint in {folder}", flush=True)
    info = build(name, nb, folder, "cuda" if a.device.startswith("cuda") else "cpu")
    print(f"   built {gib(info['bytes_on_disk']):.1f} GiB in {info['build_seconds']} s; quantizing", flush=True)
    cmd = [sys.executable, __file__, "--child", str(folder), "--out", str(out), "--device", a.device,
           "--rows", str(a.rows), "--seqlen", str(a.seqlen)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"quantizing {spec} failed (exit {p.returncode}):\n{p.stdout[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    if not a.keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    per_block = statistics.median(r["block_seconds"])
    fixed = r["wall_seconds"] - sum(r["block_seconds"])  # load, capture, head/embeddings, close
    h, n_tok, inter = info["hidden"], a.rows * a.seqlen, info["intermediate"]
    cache = n_tok * h * 2  # the one bf16 activation buffer [rows, seqlen, hidden]
    grams = 4 * (3 * h * h + inter ** 2)  # fp32 X^T X of the 4 distinct linear inputs
    # The expected device peak (salience.quantize.quantize_model): the pass that accumulates down_proj's
    # Gram, at the MLP of a batch (8 rows): the block, that Gram (whole while within the activation
    # buffer's bytes, else the panels of its upper triangle, as the driver decides), act(gate), up and their
    # product [tokens, inter] and ~3 [tokens, hidden] tensors of the residual stream, all 16-bit but the Gram.
    sys.path.insert(0, str(ROOT))
    from salience import awq
    from salience import quantize as Q

    panel_rows = 128 * max(1, Q.PANEL_ROWS // 128)  # group size 128
    down_gram = awq.gram_bytes(inter, panel_rows if Q.paneled(inter, cache, panel_rows) else None)
    batch_tok = 8 * a.seqlen
    expected = info["block_bytes_16bit"] + down_gram + 2 * batch_tok * (3 * inter + 3 * h)
    budget_gpu = 2 * info["block_bytes_16bit"] + cache
    budget_host = 4 * info["block_bytes_16bit"] + cache
    host_over = r["peak_vmrss_sampled"] - r["baseline_vmrss"]
    entry = {
        "model": spec, "shape": name, "device": a.device, "machine": machine(a.device),
        "calibration": f"{a.rows} x {a.seqlen} random token ids", "weights": "random, " + info["stored_dtype"],
        "blocks_measured": len(r["block_seconds"]), "blocks_real": info["blocks_real"],
        "wall_seconds": r["wall_seconds"], "seconds_per_block_median": round(per_block, 3),
        "seconds_fixed": round(fixed, 2),
        "extrapolated": info["blocks_built"] != info["blocks_real"],
        "wall_seconds_full_model": round(fixed + per_block * info["blocks_real"], 1)
        if info["blocks_built"] != info["blocks_real"] else r["wall_seconds"],
        "block_bytes_16bit": info["block_bytes_16bit"], "activation_cache_bytes": cache, "gram_bytes": grams,
        "expected_gpu_bytes": expected, "down_gram_bytes_on_device": down_gram,
        "budget_gpu_bytes": budget_gpu, "budget_host_bytes": budget_host,
        "host_over_baseline_bytes": host_over,
        "host_anon_over_baseline_bytes": r["peak_rss_anon_sampled"] - r["baseline_rss_anon"],
        "within_budget": {"gpu": r["peak_gpu_allocated"] <= budget_gpu if "peak_gpu_allocated" in r else None,
                          "host": host_over <= budget_host},
        "build_seconds": info["build_seconds"], "checkpoint_bytes_in": info["bytes_on_disk"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **{k: v for k, v in r.items() if k not in ("wall_seconds",)},
    }
    return entry


def write_tables(entries: list[dict]):
    lines = [
        "# Quantization speed and memory (`benchmarks/quantize.py`)", "",
        "AWQ w4 g128, bf16 compute, lazy block-by-block loading, resumable writes (activations saved per "
        "block). Random weights with the real shapes, random calibration token ids (the bench machine has "
        "no corpus): speed and memory only. `block` = one decoder block's 16-bit weights; `cache` = the bf16 "
        "activation buffer [rows, seqlen, hidden] (pinned host memory since the memory work; on the GPU "
        "before). `expected` = block + down_proj's fp32 Gram (whole while it is within the cache's bytes, "
        "else the row panels of its upper triangle, ~half) + the MLP activations of one 8-row batch "
        "(salience.quantize.quantize_model). Host: the child process's peak RSS (VmHWM; `-` for runs that "
        "recorded ru_maxrss instead, which Linux carries over from the parent across execve, so it showed "
        "the parent's peak while building the checkpoint), and over the baseline after imports and CUDA "
        "initialisation (0.9-1 GiB: CUDA context and libraries): sampled VmRSS and, in brackets, its "
        "anonymous part; the budget applies to the latter pair. `within`: peak GPU <= its budget, host RSS "
        "over baseline <= its budget.", "",
        "| model | machine | blocks | wall (s) | s/block | peak GPU alloc (GiB) | expected (GiB) | GPU budget "
        "2 blocks + cache (GiB) | peak host RSS (GiB): VmHWM, over baseline [anon] | host budget 4 blocks "
        "+ cache (GiB) | within (GPU, host) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        wall = f"{e['wall_seconds']}"
        if e["extrapolated"]:
            wall += f" (measured, {e['blocks_measured']} blocks); **{e['wall_seconds_full_model']} extrapolated " \
                    f"to {e['blocks_real']}**"
        gpu = f"{gib(e['peak_gpu_allocated']):.2f}" if "peak_gpu_allocated" in e else "-"
        expected = f"{gib(e['expected_gpu_bytes']):.2f}" if "expected_gpu_bytes" in e else "-"
        budget_gpu = gib(2 * e["block_bytes_16bit"] + e["activation_cache_bytes"])
        budget_host = gib(4 * e["block_bytes_16bit"] + e["activation_cache_bytes"])
        over = gib(e["peak_vmrss_sampled"] - e["baseline_vmrss"])
        anon = gib(e["peak_rss_anon_sampled"] - e["baseline_rss_anon"])
        hwm = f"{gib(e['peak_vmhwm']):.2f}" if "peak_vmhwm" in e else "-"
        ok_gpu = "-" if gpu == "-" else "yes" if e["peak_gpu_allocated"] <= 2 * e["block_bytes_16bit"] + \
            e["activation_cache_bytes"] else "**no**"
        within = ok_gpu + ", " + ("yes" if over <= budget_host else "**no**")
        lines.append(f"| {e['model']} | {e['machine']} | {e['blocks_measured']}/{e['blocks_real']} | {wall} | "
                     f"{e['seconds_per_block_median']} | {gpu} | {expected} | {budget_gpu:.2f} | "
                     f"{hwm}, {over:.2f} [{anon:.2f}] | {budget_host:.2f} | {within} |")
    lines += ["", "Per-block phases (median seconds): forward = the passes of the block over the calibration "
              "rows (statistics, Grams), scale_search, clip_quantize = clip search + quantize.", ""]
    for e in entries:
        ph = {k: statistics.median(p.get(k, 0) for p in e["block_phases"]) for k in e["block_phases"][0]}
        lines.append(f"- {e['model']} ({e['device']}): " + ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    peaks = [e for e in entries if e.get("gpu_phase_peaks")]
    if peaks:
        lines += ["", "Peak GPU memory allocated per phase (GiB; the largest over blocks, torch.cuda."
                  "max_memory_allocated reset at each phase boundary). `pass p`: the block over the calibration "
                  "rows accumulating the Grams of some scaling groups (the last pass writes the output); "
                  "`search g`: the scale search of group g; `write`: packing, copy to the host.", ""]
        for e in peaks:
            lines.append(f"- {e['model']}: " + ", ".join(
                f"{k} {gib(v['peak']):.2f}" for k, v in e["gpu_phase_peaks"].items()))
    (RESULTS / "quantize.md").write_text("\n".join(lines) + "\n")


def main():
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama2-7b", help="comma list of shape[:blocks]: " + ", ".join(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--dir", default="bench-work", help="scratch folder for checkpoints (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the built and quantized checkpoints")
    ap.add_argument("--results", default=str(RESULTS), help="folder for quantize.md/.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge these result files (e.g. fetched "
                    "from separate runs) into --results and rewrite the table")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.folder = a.child
        return child(a)
    RESULTS = Path(a.results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    js = RESULTS / "quantize.json"
    entries = json.loads(js.read_text()) if js.exists() else []
    if a.merge:
        for f in a.merge:
            for e in json.loads(Path(f).read_text()):
                entries = [x for x in entries if (x["model"], x["device"]) != (e["model"], e["device"])] + [e]
        js.write_text(json.dumps(entries, indent=1))
        write_tables(entries)
        print((RESULTS / "quantize.md").read_text())
        return
    work = Path(a.dir)
    for old in [*work.glob("*-random"), *work.glob("*-awq"), *work.glob("*-awq.partial")]:
        shutil.rmtree(old, ignore_errors=True)  # left by an interrupted run: free the disk first
    for spec in a.models.split(","):
        e = run_one(spec, a)
        print(json.dumps({k: v for k, v in e.items() if k not in ("block_seconds", "block_phases")}), flush=True)
        entries = [x for x in entries if (x["model"], x["device"]) != (e["model"], e["device"])] + [e]
        js.write_text(json.dumps(entries, indent=1))
        write_tables(entries)
    print((RESULTS / "quantize.md").read_text())


if __name__ == "__main__":
    main()
