"""Load test of `salience serve`: concurrent streaming clients, bounded in count and time. Two modes:

HTTP (default): the server as a subprocess on a free loopback port, clients through the official openai
client (needs fastapi, uvicorn, openai, httpx).
    python benchmarks/serve.py                     # SmolLM2 W4 (RTN g64) on the CPU, 32 clients, 64 requests
    python benchmarks/serve.py --device cuda --model out/my-model-awq --requests 256 --new-tokens 128

In process (--in-process): the same Scheduler (continuous batching, sampling, detokenisation, events per
request) driven by asyncio clients in this process, without HTTP, SSE or JSON: needs only torch (+ triton
on GPU) and transformers. With --random SHAPE the model is a random-weight AWQ W4 g128 model of that
shape (salience.engine.weights.SHAPES) built on the device, with token-id prompts and a stand-in
tokenizer (text = ids), EOS off: nothing to download.
    python benchmarks/serve.py --in-process --random llama2-7b --device cuda --dtype float16 \\
        --requests 256 --new-tokens 128 --kv-tokens 8192 --timeout 200

Reports requests/s, generated tokens/s, latency p50/p99 (request sent -> last event), time to first
token p50/p99, failed requests, and how the scheduler batched: decode steps, mean rows per step, requests
that joined a running loop, prefill forwards. Writes benchmarks/results/serve[_gpu].md and .json naming the
machine and its load average, with the previous result of the same file for comparison. Every request
asks for exactly --new-tokens tokens (--vary: 0.25x to 1.75x of it); a row that ends early (EOS) counts the
tokens it produced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = ("The ocean covers most of the planet and holds nearly all of its water. Its currents carry heat from "
        "the equator toward the poles, and its surface exchanges gases with the air above it. Beneath the "
        "waves live creatures of every size, from drifting plankton to the largest animals that have ever "
        "existed. Scientists study the sea with ships, buoys, satellites and robots that dive for months.")


def max_tokens(i: int, a) -> int:
    """Request i's max_tokens: --new-tokens, or with --vary 0.25x to 1.75x of it (mean 1x), cycling."""
    return max(1, round(a.new_tokens * (0.25 + 0.25 * ((i * 5) % 7)))) if a.vary else a.new_tokens


def prompt(i: int, vocab: int | None):
    """Request i's prompt: 12-60 words of TEXT, or (random model) 16-128 token ids."""
    if vocab is not None:
        return [(i * 7919 + k * 104729) % (vocab - 16) + 16 for k in range(16 + (i * 7) % 113)]
    words = TEXT.split()
    return " ".join(words[: 12 + (i * 7) % (len(words) - 12)])


def smollm2_w4() -> Path:
    """The decode benchmark's RTN w4 g64 SmolLM2 checkpoint (written once into the cache)."""
    from salience import api
    from salience.data import cache_dir
    from salience.quant import QuantConfig

    w4 = cache_dir() / "bench" / "smollm2-rtn-w4g64"
    if not (w4 / "config.json").exists():
        print(f"writing an RTN w4 g64 SmolLM2 checkpoint (once) -> {w4}", flush=True)
        api.quantize("smollm2", w4, QuantConfig(4, 64), "rtn", dtype="float32", device="cpu", overwrite=True,
                     progress=False)
    return w4


# ---- HTTP mode

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(a, model: Path, port: int, log):
    cmd = [sys.executable, "-m", "salience.cli", "serve", str(model), "--port", str(port), "--device",
           a.device, "--dtype", a.dtype, "--max-batch", str(a.max_batch), "--kv-tokens", str(a.kv_tokens),
           "--served-model-name", "bench"]
    env = dict(os.environ, PYTHONPATH=str(a.server_root or ROOT))
    env.setdefault("OMP_NUM_THREADS", "1")
    # cwd too: `python -m` puts it first on sys.path
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=a.server_root or ROOT)
    deadline = time.time() + 300
    while True:
        try:
            get(f"http://127.0.0.1:{port}/health")
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start (see {log.name})") from None
            time.sleep(0.5)


async def drain(queue: asyncio.Queue, results: list, request):
    """One client: takes request indices until the queue is empty and times each one.
    request(i, t0) -> (seconds to the first text or None, completion tokens, error or None)."""
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        t0 = time.perf_counter()
        ttft, tokens, err = await request(i, t0)
        results.append({"i": i, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens,
                        "error": err})


async def http_request(client, a, i: int, t0: float):
    ttft, tokens, err = None, 0, None
    try:
        stream = await client.completions.create(model="bench", prompt=prompt(i, None),
                                                 max_tokens=max_tokens(i, a), temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens == 0:
            err = "no usage chunk / no tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is counted and reported, not fatal
        err = f"{type(e).__name__}: {e}"
    return ttft, tokens, err


async def http_load(a, port: int, n: int, clients: int) -> tuple[list, float]:
    import httpx
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4), timeout=a.timeout)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                http_client=http)
    try:
        return await run_clients(lambda q, res: drain(q, res, lambda i, t0: http_request(client, a, i, t0)), n,
                                 clients, a.timeout)
    finally:
        await http.aclose()


def run_http(a, model: Path) -> tuple[list, float, dict]:
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"salience-serve-bench-{port}.log"  # the server's stderr
    with open(log_path, "w") as log:
        proc = start_server(a, model, port, log)
        try:
            asyncio.run(http_load(a, port, 1, 1))  # warm-up (allocator, kernels), not counted
            h0 = get(f"http://127.0.0.1:{port}/health")
            results, wall = asyncio.run(http_load(a, port, a.requests, a.clients))
            h1 = get(f"http://127.0.0.1:{port}/health")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    # a server from before continuous batching (--server-root) counts batches only
    c = {k: h1.get(k, 0) - h0.get(k, 0) for k in ("steps", "row_steps", "joined_running", "batches")}
    return results, wall, c, "continuous" if "steps" in h1 else "request-level"


# ---- in-process mode

class IdTokenizer:
    """A stand-in tokenizer for random-weight models: prompts are token ids, text is the ids."""

    chat_template = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


def random_engine(shape: str, device: str, dtype: str):
    import torch

    from salience.engine.generate import Engine, Runner
    from salience.engine.weights import random_model

    m = random_model(shape, 128, device, getattr(torch, dtype))
    return Engine(Runner(m), IdTokenizer(m.c.vocab), "engine", eos=set(), name=f"random {shape} W4 g128")


async def inproc_request(sched, eng, a, vocab, i: int, t0: float):
    from salience.serve import Channel, Request, prepare

    ttft, tokens, err = None, 0, None
    out = Channel(asyncio.get_running_loop())
    r = Request("completion", "bench", prompts=[prompt(i, vocab)], max_tokens=max_tokens(i, a), temperature=0.0)
    jobs = prepare(r, eng, out, sched.lock)
    sched.submit(jobs)
    try:
        while True:
            ev = await out.get()
            if ev[0] == "text" and ttft is None:
                ttft = time.perf_counter() - t0
            elif ev[0] == "end":
                tokens = ev[3]
                break
            elif ev[0] == "error":
                err = ev[1]
                break
    finally:
        for j in jobs:
            j.cancelled = True  # the load timed out: nothing left running
    return ttft, tokens, err


def run_inproc(a, model: Path | None) -> tuple[list, float, dict, object]:
    from salience.engine import load
    from salience.serve import Scheduler

    if a.random:
        eng = random_engine(a.random, a.device, a.dtype)
    else:
        eng = load(str(model), device=a.device, dtype=a.dtype)
    vocab = eng.runner.model.c.vocab if a.random else None
    t0 = time.perf_counter()
    sched = Scheduler(eng, max_batch=a.max_batch, kv_tokens=a.kv_tokens)
    try:
        async def go(n, clients):
            return await run_clients(
                lambda q, res: drain(q, res, lambda i, t0: inproc_request(sched, eng, a, vocab, i, t0)), n,
                clients, a.timeout)

        asyncio.run(go(1, 1))  # waits for the cache to open (GPU: graphs captured) and warms up
        print(f"cache open and warm in {time.perf_counter() - t0:.1f} s", flush=True)
        c0 = counters(sched)
        results, wall = asyncio.run(go(a.requests, a.clients))
        c1 = counters(sched)
    finally:
        sched.stop()
    return results, wall, {k: c1[k] - c0[k] for k in c0}, eng


def counters(s) -> dict:
    return {"steps": s.steps, "row_steps": s.row_steps, "joined_running": s.joined, "batches": s.batches}


# ---- both

async def run_clients(client, n: int, clients: int, timeout: float) -> tuple[list, float]:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    results: list = []
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(client(queue, results) for _ in range(clients))), timeout=timeout)
    except asyncio.TimeoutError:  # the hard bound: what finished counts, the rest is reported as failed
        print(f"the load ran out of its {timeout} s: {len(results)} of {n} requests finished", flush=True)
    return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def machine(device: str) -> str:
    import torch

    from salience.engine.bench import machine as m

    return m(torch.device(device)) + f" ({os.cpu_count()} cores)"


def history(path: Path, res: dict) -> list[dict]:
    """The last results in this file (up to 3, oldest first) if they measured the same thing (files from
    before continuous batching have no "batching" key: request-level)."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    same = ("mode", "model", "device", "dtype", "clients", "requests", "new_tokens", "vary", "max_batch")
    if any(prev.get(k, {"mode": "HTTP", "vary": False}.get(k)) != res[k] for k in same):
        return []
    prev.setdefault("batching", "request-level")
    return (prev.pop("history", []) + [prev])[-3:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model to serve (default: SmolLM2 W4 RTN g64, written once)")
    p.add_argument("--random", metavar="SHAPE", help="a random-weight W4 g128 model of this shape (llama2-7b, "
                   "llama3-8b, tiny) built on the device; implies --in-process")
    p.add_argument("--in-process", action="store_true", help="drive the Scheduler in this process (no HTTP)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--vary", action="store_true", help="max_tokens from 0.25x to 1.75x --new-tokens (mean 1x) "
                   "instead of all equal")
    p.add_argument("--server-root", help="HTTP mode: serve with the salience of this checkout (a baseline)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--kv-tokens", type=int, default=1 << 16, help="the server's KV budget (rows x slots)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole load (a hard bound)")
    p.add_argument("--out", help="results path without suffix (default: benchmarks/results/serve, or "
                   "serve_gpu with --random)")
    a = p.parse_args(argv)
    a.in_process = a.in_process or bool(a.random)
    model = None if a.random else Path(a.model) if a.model else smollm2_w4()
    out = Path(a.out or ROOT / "benchmarks" / "results" / (("serve_gpu" if a.random else "serve")
                                                           + ("_mixed" if a.vary else "")))
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if a.in_process:
        results, wall, c, eng = run_inproc(a, model)
        batching = "continuous"
    else:
        results, wall, c, batching = run_http(a, model)
    load_after = os.getloadavg()
    ok = [r for r in results if r["error"] is None]
    failed = [r for r in results if r["error"] is not None] + [
        {"error": f"unfinished after --timeout {a.timeout} s"}] * (a.requests - len(results))
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    name = eng.name if a.random else str(model) if a.model else "smollm2-135m W4 (RTN g64)"
    res = {
        "machine": machine(a.device), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after], "model": name,
        "mode": "in-process (Scheduler, no HTTP)" if a.in_process else "HTTP", "batching": batching,
        "server_root": a.server_root, "device": a.device, "dtype": a.dtype, "clients": a.clients,
        "requests": a.requests, "new_tokens": a.new_tokens, "vary": a.vary, "max_batch": a.max_batch, "kv_tokens": a.kv_tokens, "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "tokens": sum(r["tokens"] for r in ok),
        "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
        "failed": len(failed), "errors": sorted({r["error"] for r in failed if r})[:5],
        "decode_steps": c["steps"], "mean_rows_per_step": round(c["row_steps"] / c["steps"], 1) if c["steps"] else 0,
        "joined_running": c["joined_running"], "prefills": c["batches"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "python": platform.python_version(),
    }
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    hist = history(out.with_suffix(".json"), res)
    prompts = "16-128 token ids" if a.random else "12-60 words"
    md = [f"# `salience serve` load test on {res['machine']}", "",
          f"{res['model']}, {a.device} {a.dtype}; {res['mode']}; {a.clients} concurrent streaming clients, "
          f"{a.requests} greedy completion requests of "
          + (f"{max_tokens(0, a)}-{max(max_tokens(i, a) for i in range(7))} (mean {a.new_tokens})" if a.vary
             else f"{a.new_tokens}") + f" new tokens, prompts of {prompts}; "
          f"OMP_NUM_THREADS={res['omp_num_threads']}, --max-batch {a.max_batch}, --kv-tokens {a.kv_tokens}. "
          f"`python benchmarks/serve.py {' '.join(argv or sys.argv[1:])}`".rstrip(), "",
          f"Load average before / after: {res['load_average_before']} / {res['load_average_after']}.", "",
          "| run | batching | requests/s | tokens/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 | failed "
          "| load average before |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in hist + [res]:
        md.append(f"| {r.get('date', 'earlier')}{' (this run)' if r is res else ''} | {r['batching']}"
                  + (f", served from {r['server_root']}" if r.get("server_root") else "")
                  + f" | {r['requests_per_s']} | {r['tokens_per_s']} | {r['latency_p50_s']} s "
                  f"| {r['latency_p99_s']} s | {r['ttft_p50_s']} s | {r['ttft_p99_s']} s | {r['failed']} "
                  f"| {r['load_average_before']} |")
    md += ["", f"Wall {res['wall_s']} s for {res['tokens']} generated tokens. " + (
        f"Scheduler: {res['decode_steps']} decode steps of {res['mean_rows_per_step']} rows on average; "
        f"{res['joined_running']} of {a.requests} requests joined a running decode loop; {res['prefills']} "
        "prefill forwards." if batching == "continuous" else f"Scheduler: {res['prefills']} batches.")]
    if hist:
        md += ["", "Rows above the last: earlier results of this file with the same settings (request-level: the "
               "scheduler from before continuous batching; served from another checkout: run back to back with "
               "this one). The machine is shared, so compare runs made back to back."]
    if res["errors"]:
        md += ["", "Errors: " + "; ".join(res["errors"])]
    res["history"] = hist
    for suffix, text in ((".md", "\n".join(md) + "\n"), (".json", json.dumps(res, indent=2))):
        tmp = out.with_suffix(suffix + ".partial")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print("\n".join(md))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
