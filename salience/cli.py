"""salience command line: quantize, eval, generate, demo."""

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
    p.add_argument("--clip-asym", action="store_true", help="shrink the min and max of the range separately")
    p.add_argument("--loss", choices=["output", "gram"], default="gram",
                   help="scale-search loss: the inspected module's output error (reference; attention and "
                   "MLP measured on --search-tokens tokens) or the group's linear-output error over all "
                   "tokens in Gram form (default: as good on SmolLM2, 1.8x faster on a CPU)")
    p.add_argument("--search-tokens", type=int, default=8192,
                   help="tokens on which attention/MLP output error is measured in the scale search")
    p.add_argument("--no-clip", action="store_true", help="skip the clip search")


def _add_run_args(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", help="compute dtype: bfloat16 (default), float16, float32")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading .bin/.pt pickle weights (they can run code; only for files you trust)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")


def _add_eval_args(p, default_windows="64"):
    p.add_argument("--data", default="wiki", help="evaluation text (default wiki)")
    p.add_argument("--windows", default=default_windows,
                   help="number of windows: 64 = quick mode, 'all' = full mode")


def _windows(v):
    return None if v == "all" else int(v)


def _search_config(a):
    from .awq import SearchConfig
    return SearchConfig(n_grid=a.n_grid, alpha_one=a.alpha_one, formula=a.formula, clip_asym=a.clip_asym,
                        loss=a.loss, search_tokens=a.search_tokens, clip_grid=0 if a.no_clip else 20)


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
    if a.eval or a.allow_pickle or a.trust_remote_code:
        from .models import load_fp

        m, tok, _ = load_fp(a.model, dtype=api.pick_dtype(a.dtype), allow_pickle=a.allow_pickle,
                            trust_remote_code=a.trust_remote_code)
        loaded = (m, tok) if a.allow_pickle or a.trust_remote_code else None
    if a.eval:
        # The comparison table needs the full-precision and RTN models too: load once, copy.
        rows.append(("full precision", api.ppl(m, tok, a.data, a.seqlen, _windows(a.windows), a.device,
                                               desc="ppl fp")))
        api.fake_quantize(m, qcfg, "rtn", device=a.device, dtype=a.dtype)
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
                                loaded=loaded, restart=a.restart)
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


def cmd_generate(a):
    from . import api

    m, tok = api.load_any(a.model, dtype=a.dtype, allow_pickle=a.allow_pickle,
                          trust_remote_code=a.trust_remote_code)
    if tok is None:
        raise SystemExit(f"error: {a.model} has no tokenizer files")
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    print(api.generate(m, tok, prompt, a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.seed, a.chat,
                       a.device))


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
    q.set_defaults(func=cmd_quantize)

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

    g = sub.add_parser("generate", help="generate text from a model (prompt in, text out)")
    g.add_argument("model", nargs="?", help="model folder, .gguf, checkpoint or hub id (default: smollm2)")
    g.add_argument("--prompt", help="prompt text (default: read standard input)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_run_args(g)
    g.set_defaults(func=cmd_generate)
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
