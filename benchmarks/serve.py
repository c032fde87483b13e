"""Load test of `salience serve`: concurrent streaming clients (the official openai client) against a server
started here as a subprocess on a free loopback port. Bounded in count and time.

    python benchmarks/serve.py                       # SmolLM2 W4 (RTN g64) on the CPU, 32 clients, 64 requests
    python benchmarks/serve.py --device cuda --model out/my-model-awq --requests 256 --new-tokens 128

Reports requests/s, generated tokens/s, latency p50/p99 (request sent -> [DONE]), time to first token
p50/p99, failed requests, and the server's batches (from /health); writes benchmarks/results/serve.md and
.json naming the machine and its load average. Every request asks for exactly --new-tokens tokens;
a row that ends early (EOS) counts the tokens it produced (usage.completion_tokens).
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_server(a, model: Path, port: int, log):
    cmd = [sys.executable, "-m", "salience.cli", "serve", str(model), "--port", str(port), "--device", a.device,
           "--dtype", a.dtype, "--max-batch", str(a.max_batch), "--served-model-name", "bench"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
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


async def client_loop(client, queue: asyncio.Queue, a, results: list):
    while True:
        try:
            i = queue.get_nowait()
        except asyncio.QueueEmpty:
            return
        words = TEXT.split()
        prompt = " ".join(words[: 12 + (i * 7) % (len(words) - 12)])  # prompts of different lengths
        t0 = time.perf_counter()
        ttft, tokens, err = None, 0, None
        try:
            stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=a.new_tokens,
                                                     temperature=0, stream=True,
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
        results.append({"i": i, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "error": err})


async def load(a, port: int) -> tuple[list, float]:
    import httpx
    import openai

    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=a.clients + 4), timeout=a.timeout)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                http_client=http)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(a.requests):
        queue.put_nowait(i)
    results: list = []
    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client_loop(client, queue, a, results) for _ in range(a.clients))),
                           timeout=a.timeout)
    wall = time.perf_counter() - t0
    await http.aclose()
    return results, wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def machine(device: str) -> str:
    import torch

    from salience.engine.bench import machine as m

    return m(torch.device(device)) + f" ({os.cpu_count()} cores)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model to serve (default: SmolLM2 W4 RTN g64, written once)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole load (a hard bound)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve"))
    a = p.parse_args(argv)
    model = Path(a.model) if a.model else smollm2_w4()
    port = free_port()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"salience-serve-bench-{port}.log"  # the server's stderr
    load_before = os.getloadavg()
    with open(log_path, "w") as log:
        proc = start_server(a, model, port, log)
        try:
            # one warm-up request (first-call costs: allocator, kernels), not counted
            asyncio.run(load(argparse.Namespace(**{**vars(a), "requests": 1, "clients": 1}), port))
            h0 = get(f"http://127.0.0.1:{port}/health")
            results, wall = asyncio.run(load(a, port))
            h1 = get(f"http://127.0.0.1:{port}/health")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    load_after = os.getloadavg()
    ok = [r for r in results if r["error"] is None]
    failed = [r for r in results if r["error"] is not None] + [None] * (a.requests - len(results))
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    batches, rows = h1["batches"] - h0["batches"], h1["rows"] - h0["rows"]
    res = {
        "machine": machine(a.device), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after], "model": str(model if a.model else
                                                                             "smollm2-135m W4 (RTN g64)"),
        "device": a.device, "dtype": a.dtype, "clients": a.clients, "requests": a.requests,
        "new_tokens": a.new_tokens, "max_batch": a.max_batch, "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "tokens": sum(r["tokens"] for r in ok),
        "latency_p50_s": round(pct(lat, 50), 3), "latency_p99_s": round(pct(lat, 99), 3),
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p99_s": round(pct(ttft, 99), 3),
        "failed": len(failed), "errors": sorted({r["error"] for r in failed if r})[:5],
        "server_batches": batches, "mean_batch_rows": round(rows / batches, 1) if batches else 0,
        "batch_sizes": h1["last_batch_sizes"][-batches:] if batches else [],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "python": platform.python_version(),
    }
    md = [f"# `salience serve` load test on {res['machine']}", "",
          f"{res['model']}, {a.device} {a.dtype}; {a.clients} concurrent streaming clients (openai client, "
          f"loopback), {a.requests} completion requests of {a.new_tokens} new tokens (greedy), prompts of "
          f"12-60 words; server OMP_NUM_THREADS={res['omp_num_threads']}, --max-batch {a.max_batch}. "
          f"`python benchmarks/serve.py {' '.join(argv or sys.argv[1:])}`".rstrip(), "",
          f"Load average before / after: {res['load_average_before']} / {res['load_average_after']} "
          "(the machine is shared: other jobs ran alongside).", "",
          "| requests/s | tokens/s | latency p50 | latency p99 | TTFT p50 | TTFT p99 | failed | batches (mean rows) |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|",
          f"| {res['requests_per_s']} | {res['tokens_per_s']} | {res['latency_p50_s']} s | {res['latency_p99_s']} s "
          f"| {res['ttft_p50_s']} s | {res['ttft_p99_s']} s | {res['failed']} | {batches} ({res['mean_batch_rows']}) |",
          "", f"Wall {res['wall_s']} s for {res['tokens']} generated tokens; batch sizes {res['batch_sizes']}."]
    if res["errors"]:
        md += ["", "Errors: " + "; ".join(res["errors"])]
    for suffix, text in ((".md", "\n".join(md) + "\n"), (".json", json.dumps(res, indent=2))):
        tmp = out.with_suffix(suffix + ".partial")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print("\n".join(md))
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
