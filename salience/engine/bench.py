"""Decode benchmark: decode tok/s, time to first token (TTFT) and peak memory, engine vs transformers.

GPU (default): random weights with Llama-2-7B and Llama-3-8B shapes (a 4-bit model's speed does not depend
on its values), batch 1/4/16, prompt 128/2048, for
    hf-eager     transformers FP16, default dynamic cache, eager
    hf-static    transformers FP16, cache_implementation="static" (transformers compiles the decode step)
    engine-fp16  our decoder, FP16 weights, static KV cache, CUDA-graph decode
    engine-w4    our decoder, AWQ 4-bit g128 weights (Triton kernels), same
  ablation of engine-w4 (only when named in --backends):
    engine-w4-unfused   norms, activation and residual adds as separate (compiled) kernels, not in the
                        batch-1 GEMVs (Transformer.fuse_linears off)
Most important cases first (the issue's targets); a time budget skips the tail (marked as skipped).
CPU (--cpu): the real SmolLM2-135M: transformers fp32, engine fp32 / bf16 / W4 (bf16 activations).

Decode tok/s = batch * (new tokens - 1) / (time after the first token), all rows generate exactly
`--new-tokens` tokens (EOS ignored). TTFT = prefill + first token, synchronized. Each figure is the
median of `--repeats` timed runs (3) after one warm-up run. Writes
benchmarks/results/decode[_cpu].md and .json naming the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ..machine import cpu_name
from .generate import Runner, SamplingParams, steps

GPU_BACKENDS = ["engine-w4", "engine-fp16", "hf-eager", "hf-static"]  # run order: compiles last
# engine-w4 variants (the same 4-bit model): Transformer attributes
# engine-w4 ablations: model attributes, or ("kernels", name) for a module default of triton_int4
W4_VARIANTS = {"engine-w4": {}, "engine-w4-unfused": {"fuse_linears": False},
               "engine-w4-fp32math": {("kernels", "GEMV_H2"): False}}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_engine(runner, prompts, new_tokens: int, dev) -> dict:
    """One generation: TTFT and decode time, exact token count (EOS ignored)."""
    p = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    _sync(dev)
    t0 = time.perf_counter()
    it = steps(runner, prompts, p)
    tok, _ = next(it)
    tok.cpu()  # the first token on the host: what a user waits for
    t1 = time.perf_counter()
    last = tok
    for last, _ in it:
        pass
    last.cpu()
    t2 = time.perf_counter()
    b = len(prompts)
    return {"ttft_ms": (t1 - t0) * 1e3, "decode_tok_s": b * (new_tokens - 1) / (t2 - t1)}


def median_of(timed, repeats: int) -> dict:
    """Run timed() `repeats` times; each figure is the median of its runs (a single run's TTFT, one
    prefill, varies by tens of percent between runs), the runs' values kept under "<key>_runs"."""
    runs = [timed() for _ in range(max(1, repeats))]
    out = {}
    for key in runs[0]:
        out[key] = statistics.median(r[key] for r in runs)
        if len(runs) > 1:
            out[key + "_runs"] = [r[key] for r in runs]
    return out


def time_hf(model, ids, new_tokens: int, dev, **kw) -> dict:
    """transformers generate, n tokens, timed by a streamer: TTFT when the first new token reaches the host,
    decode = the rest. Callers warm up with a first call whose figures they drop (hf-static: it compiles
    the decode step for this cache size), as for time_engine."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # first call: the prompt; then one call per step, tokens already on the host
            self.times.append(time.perf_counter())

        def end(self):
            pass

    g = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids),
             max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    clock = Clock()
    _sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, streamer=clock, **g)
    _sync(dev)
    t2 = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    if n != new_tokens or len(clock.times) < 2:
        raise RuntimeError(f"transformers generated {n} tokens ({len(clock.times)} streamer calls), "
                           f"expected {new_tokens}")
    t1 = clock.times[1]
    return {"ttft_ms": (t1 - t0) * 1e3, "decode_tok_s": ids.shape[0] * (new_tokens - 1) / (t2 - t1)}


def _prompts(b: int, t: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 1, (b, t), generator=g).tolist()


def _peak_reset(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def machine(dev) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name} ({p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs)"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


# ---- GPU matrix

def gpu_cases(shapes, batches, prompt_lens, backends):
    """(shape, batch, prompt, backend) in run order: per shape, the issue's target cases first (batch 1 and
    16 at prompt 128, batch 1 at prompt 2048), then the rest; within each phase grouped by backend so
    that each model is built once per phase."""
    targets = [(1, 128), (16, 128), (1, 2048)]
    cases = []
    for shape in shapes:
        for phase in (0, 1):
            for be in backends:
                for prompt in prompt_lens:
                    for b in batches:
                        if ((b, prompt) in targets) == (phase == 0):
                            cases.append((shape, b, prompt, be))
    return cases


@contextlib.contextmanager
def _w4_variant(model, v: dict):
    """Run an engine-w4 ablation (W4_VARIANTS), then restore what it set."""
    from salience.kernels import triton_int4

    def target(k):
        return (triton_int4, k[1]) if isinstance(k, tuple) else (model, k)

    saved = {k: getattr(*target(k)) for k in v}
    for k, val in v.items():
        setattr(*target(k), val)
    try:
        yield
    finally:
        for k, val in saved.items():
            setattr(*target(k), val)


def run_gpu(a) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from .weights import hf_config, random_model

    dev = torch.device(a.device)
    torch.manual_seed(0)
    t_start = time.time()
    rows = []
    cases = gpu_cases(a.shapes, a.batch, a.prompt, a.backends)
    loaded = (None, None)  # (key, model)
    compiled_ok = True
    for shape, b, prompt, be in cases:
        row = {"model": shape, "backend": be, "batch": b, "prompt": prompt, "new_tokens": a.new_tokens}
        rows.append(row)
        new = a.hf_eager_tokens if be == "hf-eager" else a.new_tokens
        row["new_tokens"] = new
        if time.time() - t_start > a.budget:
            row["skipped"] = f"time budget ({a.budget} s) spent"
            continue
        if be == "hf-static" and not compiled_ok:
            row["skipped"] = "transformers static cache failed earlier"
            continue
        if be == "hf-static" and (b, prompt) not in a.hf_static_cases:
            row["skipped"] = "not in --hf-static (each case compiles for a minute)"
            continue
        key = (shape, "hf" if be.startswith("hf") else "engine-w4" if be in W4_VARIANTS else be)
        t0 = time.time()
        try:
            if loaded[0] != key:
                m = runner = None  # free the previous model before building the next
                loaded = (None, None)
                _peak_reset(dev)
                if be.startswith("hf"):
                    with torch.device(dev):
                        m = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.float16).eval()
                    m.generation_config.eos_token_id = None
                else:
                    m = random_model(shape, 128 if be in W4_VARIANTS else None, dev, torch.float16)
                loaded = (key, m)
            m = loaded[1]
            vocab = m.config.vocab_size if be.startswith("hf") else m.c.vocab
            prompts = _prompts(b, prompt, vocab)
            if be.startswith("hf"):
                ids = torch.tensor(prompts, device=dev)
                kw = {"cache_implementation": "static"} if be == "hf-static" else {}
                with torch.inference_mode():
                    _peak_reset(dev)
                    time_hf(m, ids, new, dev, **kw)  # warm-up (hf-static: compiles the decode step)
                    row.update(median_of(lambda: time_hf(m, ids, new, dev, **kw), a.repeats))
            else:
                with _w4_variant(m, W4_VARIANTS.get(be, {})):
                    runner = Runner(m, cuda_graph=not a.no_cuda_graph, compile=not a.no_compile,
                                    prefix_reuse=False)
                    time_engine(runner, prompts, new, dev)  # warm-up: Triton, torch.compile, graph capture
                    _peak_reset(dev)
                    row.update(median_of(lambda: time_engine(runner, prompts, new, dev), a.repeats))
                    runner.model.setup_cache(0, 0)  # free the KV cache
            row["peak_gib"] = _peak_gib(dev)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0]}"
            loaded = (None, None)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the rest of the matrix
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if be == "hf-static":
                compiled_ok = False
            loaded = (None, None)
        row["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        write(a, rows, dev, partial=True)
    return rows


# ---- CPU: the real SmolLM2

def run_cpu(a) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from .. import api
    from ..models import materialize
    from ..quant import QuantConfig
    from .weights import from_folder

    dev = torch.device("cpu")
    folder = materialize("smollm2")
    w4 = Path(a.w4) if a.w4 else None
    if w4 is None:  # RTN g64 (576 inputs: 128 does not divide); the values do not change the speed
        from ..data import cache_dir

        w4 = cache_dir() / "bench" / "smollm2-rtn-w4g64"
        if not (w4 / "config.json").exists():
            print(f"writing an RTN w4 g64 SmolLM2 checkpoint (once) -> {w4}", flush=True)
            api.quantize("smollm2", w4, QuantConfig(4, 64), "rtn", dtype="float32", device="cpu",
                         overwrite=True, progress=False)
    rows = []
    for b in a.batch:
        for prompt in a.prompt:
            prompts = _prompts(b, prompt, 49152)
            for be, src, dt in [("hf-fp32", folder, torch.float32), ("engine-fp32", folder, torch.float32),
                                ("engine-bf16", folder, torch.bfloat16), ("engine-w4", w4, torch.bfloat16)]:
                row = {"model": "smollm2-135m", "backend": be, "batch": b, "prompt": prompt,
                       "new_tokens": a.new_tokens}
                if be.startswith("hf"):
                    m = AutoModelForCausalLM.from_pretrained(src, dtype=dt).eval()
                    m.generation_config.eos_token_id = None
                    ids = torch.tensor(prompts)
                    with torch.inference_mode():
                        time_hf(m, ids, a.new_tokens, dev)  # warm-up
                        row.update(median_of(lambda: time_hf(m, ids, a.new_tokens, dev), a.repeats))
                else:
                    runner = Runner(from_folder(src, device=dev, dtype=dt), prefix_reuse=False)
                    time_engine(runner, prompts, a.new_tokens, dev)
                    row.update(median_of(lambda: time_engine(runner, prompts, a.new_tokens, dev), a.repeats))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


# ---- report

def table(rows: list[dict]) -> str:
    lines = ["| model | batch | prompt | backend | decode tok/s | TTFT ms | peak GiB | x engine fp16 (CPU: fp32) | note |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    ref = {(r["model"], r["batch"], r["prompt"]): r.get("decode_tok_s") for r in rows
           if r["backend"] in ("engine-fp16", "engine-fp32")}
    for r in rows:
        tps, base = r.get("decode_tok_s"), ref.get((r["model"], r["batch"], r["prompt"]))
        note = r.get("error") or r.get("skipped") or ""
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["batch"], r["prompt"], r["backend"],
            f"{tps:.1f}" if tps else "", f"{r['ttft_ms']:.1f}" if "ttft_ms" in r else "",
            f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "",
            f"{tps / base:.2f}" if tps and base else "", note))
    return "\n".join(lines)


def write(a, rows, dev, partial=False):
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine(dev), "versions": versions(), "args": {k: v for k, v in vars(a).items()},
            "complete": not partial, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    order = sorted(rows, key=lambda r: (r["model"], r["batch"], r["prompt"], r["backend"]))
    md = [f"# Decode benchmark on {meta['machine']}", "",
          ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f"; {meta['date']}"
          + ("" if not partial else " (partial: still running or stopped)"), "",
          f"New tokens per row: {a.new_tokens}" + (f" ({a.hf_eager_tokens} for hf-eager)" if dev.type == "cuda"
                                                    else "") + "; decode tok/s counts all rows. "
          "TTFT: prefill + first token. "
          + f"Each figure is the median of {a.repeats} timed runs after a warm-up. "
          + ("The real SmolLM2-135M; W4 = RTN w4 g64 checkpoint, bf16 activations"
                                             if a.cpu else "Random weights (speed does not depend on values); "
                                             "W4 = AWQ GEMM g128, lm_head FP16") + ". `python benchmarks/decode.py "
          + " ".join(a.argv) + "` made this table.", "",
          table(order), ""]
    out.with_suffix(".md").write_text("\n".join(md))


def parse(argv):
    p = argparse.ArgumentParser(prog="salience bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU benchmark on the real SmolLM2")
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"])
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--prompt", nargs="+", type=int, default=None)
    p.add_argument("--backends", nargs="+", default=GPU_BACKENDS, choices=GPU_BACKENDS + list(W4_VARIANTS)[1:])
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--hf-eager-tokens", type=int, default=32, help="new tokens for hf-eager (it is slow)")
    p.add_argument("--hf-static", nargs="+", default=["1x128", "16x128"],
                   help="batch x prompt cases for hf-static (each one compiles, ~1 min)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; the table gives medians")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; cases after this are skipped")
    p.add_argument("--no-cuda-graph", action="store_true", help="engine decode without CUDA graphs")
    p.add_argument("--no-compile", action="store_true", help="engine decode without torch.compile'd ops")
    p.add_argument("--device", default="cuda", help="GPU matrix on this device (cpu: a smoke test with "
                   "--shapes tiny)")
    p.add_argument("--w4", help="CPU: a 4-bit SmolLM2 checkpoint (default: write an RTN one once)")
    p.add_argument("--out", help="output path without suffix (default benchmarks/results/decode[_cpu])")
    a = p.parse_args(argv)
    a.argv = list(argv)
    a.batch = a.batch or ([1] if a.cpu else [1, 4, 16])
    a.prompt = a.prompt or [128]
    if not a.cpu and a.prompt == [128] and "--prompt" not in (argv or []):
        a.prompt = [128, 2048]
    a.new_tokens = a.new_tokens or (64 if a.cpu else 128)
    a.hf_static_cases = {tuple(int(x) for x in c.split("x")) for c in a.hf_static}
    a.out = a.out or ("benchmarks/results/decode_cpu" if a.cpu else "benchmarks/results/decode")
    return a


def main(argv=None):
    a = parse(argv if argv is not None else sys.argv[1:])
    if a.cpu:
        rows = run_cpu(a)
        write(a, rows, torch.device("cpu"))
    else:
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --cpu for the CPU benchmark")
        rows = run_gpu(a)
        write(a, rows, torch.device(a.device))
    print(Path(a.out).with_suffix(".md").read_text())
