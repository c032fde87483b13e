"""The inference engine: a compact decoder for the Llama family and Gemma 3 (model.py), loading (weights.py),
generation (generate.py) and the decode benchmark (bench.py).

    from salience.engine import load, SamplingParams
    eng = load("out/my-model-awq", device="cuda", dtype="float16")
    print(eng.generate(["Hello"], SamplingParams(max_new_tokens=32))[0].text)
    for piece in eng.stream("Tell me a story", SamplingParams(temperature=0.8, top_p=0.9), chat=True):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import sys
from pathlib import Path


from .generate import Engine, HFRunner, Output, Runner, SamplingParams, eos_ids
from .model import FAMILIES, Config, Transformer, Unsupported

__all__ = ["load", "Engine", "SamplingParams", "Output", "Transformer", "Config", "Unsupported", "FAMILIES"]


def load(model: str | None, device=None, dtype=None, cuda_graph: bool = True, compile: bool = True,
         backend: str = "auto",
         allow_pickle: bool = False, trust_remote_code: bool = False, quiet: bool = False) -> Engine:
    """An Engine for a model folder (full precision or AWQ GEMM checkpoint, ours or another tool's), a .gguf,
    an embedded name (`smollm2`, `gemma3-270m`) or a hub id.

    cuda_graph / compile (GPU): capture decode in a CUDA graph / fuse its elementwise ops with torch.compile.
    backend: "auto" (the engine's decoder when the architecture has an entry, else transformers with a
    message), "engine" (error if unsupported) or "transformers"."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..api import pick_device, pick_dtype
    from ..models import materialize
    from .weights import from_folder

    dev, dt = pick_device(device), pick_dtype(dtype)
    folder = materialize(model)
    hf = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        gc = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: EOS from config and tokenizer only
        gc = None
    eos = eos_ids(tok, hf, gc)
    name = str(model or "smollm2")
    reason = None
    if backend in ("auto", "engine"):
        if not isinstance(folder, Path):
            reason = "a hub id (the engine reads local folders)"
        elif hf.model_type in FAMILIES and not any(folder.glob("*.safetensors")):
            reason = "no safetensors weights (the engine reads only safetensors)"
        else:
            try:
                m = from_folder(folder, device=dev, dtype=dt)
                return Engine(Runner(m, cuda_graph=cuda_graph, compile=compile), tok, "engine", eos, name)
            except Unsupported as e:
                reason = str(e)
        if backend == "engine":
            raise Unsupported(f"{name}: the engine cannot run it: {reason}")
    elif backend != "transformers":
        raise ValueError(f"backend {backend!r}: auto, engine or transformers")
    if reason and not quiet:
        print(f"salience: falling back to the transformers model ({reason})", file=sys.stderr)
    from ..api import load_any

    m, _ = load_any(model, dtype=dt, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return Engine(HFRunner(m.to(dev).eval()), tok, "transformers", eos, name)
