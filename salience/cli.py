"""salience command line: quantize, eval, generate, chat, serve, bench, demo, discover."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_PROMPT = "The three most important things to know about the ocean are"


def _add_quant_args(p, group_size=128):
    p.add_argument("--bits", type=int, default=4, help="weight bits (checkpoints: 4; eval --fake-quant: 2..8)")
    p.add_argument("--group-size", type=int, default=group_size,
                   help="weights per scale along the input dim: 32, 64, 128, or -1 (per channel)")


def _add_calib_args(p):
    p.add_argument("--calib", default="lee", help="calibration text: lee, wiki-calib, austen, a .txt/.jsonl "
                   "file, or a Hugging Face dataset name (default: lee)")
    p.add_argument("--calib-rows", type=int, default=128, help="calibration rows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration row / eval window")
    p.add_argument("--n-grid", type=int, default=20, help="alpha grid points of the scale search")
    p.add_argument("--formula", choices=["x", "duo", "both"], default="x",
                   help="scale formula: x_mean^a (llm-awq), x_mean^a / w_mean^(1-a) (AutoAWQ), or search both")
    p.add_argument("--alpha-one", action="store_true", help="also try alpha = 1")
    p.add_argument("--clip-asym", action=argparse.BooleanOptionalAction, default=True,
                   help="clip search: shrink the min and max of the range separately (default), or "
                   "--no-clip-asym for the reference's symmetric shrink")
    p.add_argument("--loss", choices=["output", "gram"], default="gram",
                   help="scale-search loss: the inspected module's output error (reference; attention and "
                   "MLP measured on --search-tokens tokens) or the group's linear-output error over all "
                   "tokens in Gram form (default: as good on SmolLM2, 1.8x faster on a CPU)")
    p.add_argument("--search-tokens", type=int, default=8192,
                   help="tokens on which attention/MLP output error is measured in the scale search")
    p.add_argument("--no-clip", action="store_true", help="skip the clip search")
    p.add_argument("--refine", type=int, default=0,
                   help="after the alpha grid, try this many finer alphas each side of the best (default 0)")
    p.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=None,
                   help="feed each block the previous block's quantized output (default: on with --rounding "
                   "tune, which then tunes each block against the full-precision model's output; off otherwise)")
    p.add_argument("--rounding", choices=["nearest", "gptq", "tune"], default="nearest",
                   help="codes on the searched grid: round-to-nearest (default, the reference), GPTQ's "
                   "column-by-column rounding with error feedback through the input Gram (keeps the block's "
                   "full Grams: Llama-2-7B +0.64 GiB, 70B +3.8 GiB), or tune: codes and ranges tuned by signed "
                   "gradient descent on each block's output error (--tune-steps forward and backward passes "
                   "of the block a block; a copy of the block's input)")
    p.add_argument("--tune-steps", type=int, default=None,
                   help="--rounding tune: steps per block (default SearchConfig.tune_steps)")
    p.add_argument("--tune-rows", type=int, default=None,
                   help="--rounding tune: calibration rows per step (default SearchConfig.tune_rows)")
    p.add_argument("--search-damp", type=float, default=None,
                   help="ridge added to each input Gram before the scale and clip searches, a multiple of "
                   "its mean diagonal: the loss gains a calibration-free weight error (default: 0.3 at 4 "
                   "bits, chosen on a held-out text; 0 at other widths: salience.awq.damp_for)")
    p.add_argument("--gptq-damp", type=float, default=None,
                   help="GPTQ damping, a multiple of the Gram's mean diagonal added to it (default: "
                   "SearchConfig.gptq_damp, the damping with the lowest perplexity on a held-out text, "
                   "benchmarks/results/ablation-choice-heldout.md; GPTQ's usual 0.01 overfits the calibration "
                   "text)")


def _add_run_args(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="compute dtype: bfloat16 (default), float16, float32")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading .bin/.pt pickle weights (they can run code; only for files you trust)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")


def _add_sampling_args(p, max_new_tokens):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off; 1.1-1.3 is typical")
    p.add_argument("--stop", action="append", help="stop string (repeatable); the output ends before it")
    p.add_argument("--seed", type=int, default=0)


def _add_engine_args(p):
    p.add_argument("--backend", choices=["auto", "engine", "transformers"], default="auto",
                   help="auto: the engine's decoder when the architecture has one, else transformers (says so)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on GPU (no CUDA graph)")
    p.add_argument("--no-compile", action="store_true",
                   help="GPU: do not fuse the decode step's elementwise ops with torch.compile")


def _add_eval_args(p, default_windows="64"):
    p.add_argument("--data", default="wiki", help="evaluation text (default wiki)")
    p.add_argument("--windows", default=default_windows,
                   help="number of windows: 64 = quick mode, 'all' = full mode")


def _windows(v):
    return None if v == "all" else int(v)


def _search_config(a):
    from .awq import SearchConfig
    return SearchConfig(n_grid=a.n_grid, alpha_one=a.alpha_one, formula=a.formula, clip_asym=a.clip_asym,
                        loss=a.loss, search_tokens=a.search_tokens, clip_grid=0 if a.no_clip else 20,
                        refine=a.refine, propagate=a.propagate,
                        rounding=a.rounding,
                        **{k: v for k, v in (("gptq_damp", a.gptq_damp), ("search_damp", a.search_damp),
                                             ("tune_steps", a.tune_steps),
                                             ("tune_rows", a.tune_rows)) if v is not None})  # else SearchConfig's


def _default_out(model, bits, gs, method):
    name = Path(model).name.replace(".gguf", "") if model else "smollm2-135m"
    return Path("out") / f"{name}-{method}-w{bits}g{gs if gs > 0 else 'ch'}"


def cmd_quantize(a):
    from . import api
    from .quant import QuantConfig

    qcfg = QuantConfig(a.bits, a.group_size)
    out = Path(a.out) if a.out else _default_out(a.model, a.bits, a.group_size, a.method)
    t0 = time.time()
    rows = []
    loaded = None
    arch = _load_arch(getattr(a, "arch", None))
    if a.eval or a.allow_pickle or a.trust_remote_code:
        from .models import load_fp

        m, tok, _ = load_fp(a.model, dtype=api.pick_dtype(a.dtype), allow_pickle=a.allow_pickle,
                            trust_remote_code=a.trust_remote_code)
        loaded = (m, tok) if a.allow_pickle or a.trust_remote_code else None
    if a.eval:
        # The comparison table needs the full-precision and RTN models too: load once, copy.
        rows.append(("full precision", api.ppl(m, tok, a.data, a.seqlen, _windows(a.windows), a.device,
                                               desc="ppl fp")))
        api.fake_quantize(m, qcfg, "rtn", device=a.device, dtype=a.dtype, arch=arch)
        rows.append((f"RTN w{a.bits} g{a.group_size}", api.ppl(m, tok, a.data, a.seqlen, _windows(a.windows),
                                                                a.device, desc="ppl rtn")))
        if loaded is None:
            del m
        else:  # the quantizer needs the full-precision weights again
            m, tok, _ = load_fp(a.model, dtype=api.pick_dtype(a.dtype), allow_pickle=a.allow_pickle,
                                trust_remote_code=a.trust_remote_code)
            loaded = (m, tok)
    # Local safetensors folders are read one block at a time, and the run resumes after a crash.
    path, _, tok = api.quantize(a.model, out, qcfg, a.method, a.calib, a.calib_rows, a.seqlen,
                                scfg=_search_config(a), device=a.device, dtype=a.dtype, overwrite=a.overwrite,
                                loaded=loaded, restart=a.restart, arch=arch)
    print(f"\n4-bit checkpoint written to {path.resolve()}")
    if a.eval or a.prompt:
        qm, qtok = api.load_any(str(path), dtype=a.dtype)
    if a.eval:
        rows.append((f"{a.method.upper()} w{a.bits} g{a.group_size} (reloaded checkpoint)",
                     api.ppl(qm, qtok, a.data, a.seqlen, _windows(a.windows), a.device, desc="ppl awq")))
        mode = "quick: first 64 windows" if a.windows == "64" else f"{a.windows} windows"
        print(f"\n{a.data} perplexity ({mode} of {a.seqlen} tokens; calibration: {a.calib})")
        print(_table(rows))
    if a.prompt:
        print(f"\nprompt: {a.prompt}")
        print("4-bit greedy:", api.generate(qm, qtok, a.prompt, a.max_new_tokens, device=a.device))
    print(f"\ndone in {time.time() - t0:.0f} s; checkpoint: {path.resolve()}")


def _load_arch(path):
    """An architecture entry saved by `salience discover --json` (None: the built-in table)."""
    if path is None:
        return None
    import json

    from .arch import arch_from_dict
    return arch_from_dict(json.loads(Path(path).read_text()))


def cmd_discover(a):
    import json

    import torch

    from .arch import arch_to_dict
    from .discover import arch_to_python, discover
    from .models import load_fp

    m, _, _ = load_fp(a.model, dtype=torch.float32, allow_pickle=a.allow_pickle,
                      trust_remote_code=a.trust_remote_code)  # fp32: the fold tests compare to 1e-4
    arch = discover(m, n_rows=a.rows, seqlen=a.seqlen)
    name = a.model_type or m.config.model_type
    print(f"# scaling groups found for {name} ({type(m).__name__}); paste into ARCHS in salience/arch.py")
    print(arch_to_python(arch, name))
    if a.json:
        Path(a.json).write_text(json.dumps(arch_to_dict(arch), indent=2))
        print(f"# saved as JSON to {a.json}: salience quantize --arch {a.json} ...")


def _table(rows):
    fp = rows[0][1]
    w = max(len(r[0]) for r in rows)
    lines = [f"| {'model':<{w}} | perplexity | vs full precision |", f"|{'-' * (w + 2)}|-----------:|------------------:|"]
    for name, v in rows:
        lines.append(f"| {name:<{w}} | {v:10.3f} | {v - fp:+17.3f} |")
    return "\n".join(lines)


def cmd_eval(a):
    from . import api
    from .quant import QuantConfig

    m, tok = api.load_any(a.model, dtype=a.dtype, allow_pickle=a.allow_pickle,
                          trust_remote_code=a.trust_remote_code)
    label = "model"
    if a.fake_quant:
        qcfg = QuantConfig(a.bits, a.group_size)
        rows = None
        if a.fake_quant == "awq":
            from .data import calibration_rows, load_text
            rows = calibration_rows(tok, load_text(a.calib), a.calib_rows, a.seqlen)
        api.fake_quantize(m, qcfg, a.fake_quant, rows, _search_config(a), a.device, a.dtype)
        label = f"{a.fake_quant} w{a.bits} g{a.group_size} (in memory)"
    v = api.ppl(m, tok, a.data, a.seqlen, _windows(a.windows), a.device)
    print(f"{a.data} perplexity of {a.model or 'smollm2'} [{label}], {a.windows} windows of {a.seqlen}: {v:.4f}")


def _sampling(a):
    from .engine import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, repetition_penalty=a.repetition_penalty, stop=a.stop or [],
                          seed=a.seed)


def _engine(a):
    from .engine import load

    return load(a.model, device=a.device, dtype=a.dtype, cuda_graph=not a.no_cuda_graph,
                compile=not a.no_compile, backend=a.backend,
                allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code)


def cmd_generate(a):
    from .engine.generate import print_stream

    eng = _engine(a)
    prompts = a.prompt if a.prompt else [sys.stdin.read()]
    p = _sampling(a)
    if len(prompts) == 1 and not a.no_stream:
        print_stream(eng.stream(prompts[0], p, chat=a.chat))
        print()
        return
    for i, out in enumerate(eng.generate(prompts, p, chat=a.chat)):
        if len(prompts) > 1:
            print(f"--- [{i}] ({len(out.token_ids)} tokens, {out.finish_reason})")
        print(out.text)


def cmd_chat(a):
    eng = _engine(a)
    p = _sampling(a)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    print(f"salience chat: {eng.name} on the {eng.kind} ({eng.runner.device}); /reset clears the "
          "conversation, /exit (or end of input) quits", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(system)
            print("(conversation reset)")
            continue
        messages.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        pieces = []
        try:
            for piece in eng.stream(eng.encode_chat(messages), p):
                print(piece, end="", flush=True)
                pieces.append(piece)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print(" [interrupted]", end="")
        print()
        reply = "".join(pieces)
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(a):
    import importlib.util

    from .serve import serve

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # before loading the model
        raise ValueError(f"salience serve needs {' and '.join(missing)}: pip install 'salience[serve]'")
    if not 1 <= a.port <= 65535:
        raise ValueError(f"--port {a.port}: must be 1..65535")
    if a.max_batch < 1 or a.kv_tokens < 1 or a.batch_window_ms < 0:
        raise ValueError("--max-batch and --kv-tokens must be >= 1, --batch-window-ms >= 0")
    key = a.api_key or os.environ.get("SALIENCE_API_KEY")
    if a.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(f"salience serve: warning: listening on {a.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    name = a.served_model_name or (Path(a.model).name.replace(".gguf", "") if a.model else "smollm2")
    serve(_engine(a), name, a.host, a.port, key, a.max_batch, a.kv_tokens, a.log_requests, a.batch_window_ms)


def cmd_bench(a):
    from .engine import bench

    bench.main(a.bench_args)


def cmd_demo(a):
    a.model, a.method, a.bits, a.group_size = None, "awq", 4, 64
    a.eval, a.prompt = True, DEMO_PROMPT
    a.out = a.out or "out/smollm2-135m-awq-w4g64"
    a.overwrite = True
    cmd_quantize(a)


def build_parser():
    p = argparse.ArgumentParser(prog="salience", description="Activation-aware 4-bit weight quantization (AWQ).")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model into an AWQ GEMM 4-bit checkpoint",
                       description="Quantize a Hugging Face model (folder, hub id, or .gguf; default: the "
                       "embedded SmolLM2-135M) into an AWQ GEMM checkpoint that transformers and vLLM load.")
    q.add_argument("--model", help="model folder, .gguf file, or hub id (default: embedded SmolLM2-135M)")
    q.add_argument("--out", help="output folder (default: out/<model>-<method>-w<bits>g<group>)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq")
    _add_quant_args(q)
    _add_calib_args(q)
    _add_run_args(q)
    q.add_argument("--eval", action="store_true", help="also print the perplexity of full precision, RTN "
                   "and the written checkpoint")
    _add_eval_args(q)
    q.add_argument("--prompt", help="print a greedy generation from the written checkpoint")
    q.add_argument("--max-new-tokens", type=int, default=40)
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--restart", action="store_true", help="discard an unfinished run in <out>.partial/ "
                   "instead of continuing it (a rerun of the same command continues it by default)")
    q.add_argument("--arch", help="architecture entry saved by `salience discover --json` (for a model_type "
                   "the built-in table lacks)")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("discover", help="find the scaling groups of an architecture from one forward pass",
                       description="Trace one forward pass of each block on random tokens, keep the scaling "
                       "groups whose fold is exact, and print them as a table entry (Python for "
                       "salience/arch.py; --json to save one for `salience quantize --arch`).")
    v.add_argument("model", help="model folder, .gguf file, or hub id")
    v.add_argument("--json", help="also save the entry as JSON here")
    v.add_argument("--model-type", help="name of the entry (default: config.model_type)")
    v.add_argument("--rows", type=int, default=2, help="random token rows (default 2)")
    v.add_argument("--seqlen", type=int, default=32, help="tokens per row (default 32)")
    v.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle weights")
    v.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    v.set_defaults(func=cmd_discover)

    d = sub.add_parser("demo", help="quantize the embedded SmolLM2 (AWQ w4 g64), compare perplexity, generate",
                       description="The main job on the embedded default: AWQ w4 g64 SmolLM2-135M calibrated on "
                       "lee, wiki perplexity (quick) of full precision / RTN / AWQ, a greedy generation.")
    d.add_argument("--out")
    _add_calib_args(d)
    _add_run_args(d)
    _add_eval_args(d)
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--restart", action="store_true", help=argparse.SUPPRESS)
    # 64 x 512 calibration tokens: the paper's 16 x 2048 token count, and the demo stays within minutes
    d.set_defaults(func=cmd_demo, calib_rows=64)

    e = sub.add_parser("eval", help="perplexity of a full-precision or quantized model")
    e.add_argument("model", nargs="?", help="model folder, .gguf, checkpoint or hub id (default: smollm2)")
    _add_eval_args(e)
    e.add_argument("--fake-quant", choices=["rtn", "awq"], help="quantize in memory first (any bits 2..8)")
    _add_quant_args(e)
    _add_calib_args(e)
    _add_run_args(e)
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a model (prompt in, text out) on the engine",
                       description="Generate on the engine (Llama family and Gemma 3: compact decoder, static "
                       "KV cache, CUDA-graph decode; other architectures: the transformers model). One prompt "
                       "streams; several (--prompt repeated) run as one batch.")
    g.add_argument("model", nargs="?", help="model folder, .gguf, checkpoint or hub id (default: smollm2)")
    g.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: standard input)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-stream", action="store_true", help="print the text once complete")
    _add_sampling_args(g, max_new_tokens=64)
    _add_run_args(g)
    _add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (streaming; /reset, /exit)",
                       description="Chat with a model through its tokenizer's chat template. Lines from standard "
                       "input are user turns; /reset starts a new conversation, /exit or end of input quits.")
    c.add_argument("model", nargs="?", help="model folder, .gguf, checkpoint or hub id (default: smollm2)")
    c.add_argument("--system", help="system message")
    _add_sampling_args(c, max_new_tokens=256)
    _add_run_args(c)
    _add_engine_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                       description="Serve a model over HTTP with OpenAI's API (streaming, usage, error schema). "
                       "Concurrent requests with the same sampling settings run as one batch.")
    s.add_argument("model", nargs="?", help="model folder, .gguf, checkpoint or hub id (default: smollm2)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $SALIENCE_API_KEY, else none)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the folder/file name)")
    s.add_argument("--max-batch", type=int, default=32,
                   help="rows of the decode loop: requests that decode together (default 32)")
    s.add_argument("--kv-tokens", type=int, default=1 << 16,
                   help="KV cache, rows x slots, allocated at start (default 65536: 32 rows of 2048 tokens; a "
                   "request that needs longer rows gets fewer of them)")
    s.add_argument("--batch-window-ms", type=float, default=20,
                   help="after a request arrives at an idle server, wait this long for others to batch with it")
    s.add_argument("--log-requests", action="store_true", help="uvicorn's access log")
    _add_run_args(s)
    _add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks: `salience bench decode --help`",
                       description="`salience bench decode [...]` runs the decode benchmark (benchmarks/decode.py).")
    b.add_argument("what", choices=["decode"])
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments of the decode benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .arch import UnsupportedArchitecture
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelError
    from .quant import GroupSizeError
    from .quantize import NonFiniteActivation

    try:
        args.func(args)
    except (ModelError, DataError, CheckpointError, UnsupportedArchitecture, GroupSizeError,
            NonFiniteActivation, FileNotFoundError, ValueError) as e:
        print(f"salience: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
