"""Golden checkpoints: the bytes of every tensor the quantizer writes, for tiny models of five families
(dense Llama, Gemma 3 with its 1+w norms and q/k norms, Phi-3 with fused qkv/gate_up, Qwen3-MoE, the Qwen2-VL
language model) with each rounding method, through the in-memory and the lazy (one block at a time from a
safetensors folder) paths, and with the Gram memory plan of an accelerator (several passes, paneled Grams).

A refactoring that changes no numerics keeps every hash. The hashes are floating-point results, so they are
recorded per machine (CPU model, torch build): on another machine the test skips and says so; record there
with `python tests/test_golden.py --record` on a commit known to be right (never to make a failing test pass).
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import calib_file, tiny_model, tiny_tokenizer, tiny_vlm

from salience import api
from salience.arch import arch_for
from salience.awq import SearchConfig
from salience.checkpoint import INDEX
from salience.quant import QuantConfig

HASHES = Path(__file__).with_name("golden_hashes.json")
ROUNDINGS = ("nearest", "gptq", "tune")
TEXT = ("llama", "gemma3_text", "phi3", "qwen3_moe")
# case name -> (model type, path, rounding). path: "memory" (the model object), "lazy" (a safetensors folder
# read one block at a time), "plan" (in memory, with the multi-pass Gram plan and paneled Grams)
CASES = {f"{m}-memory-{r}": (m, "memory", r) for m in (*TEXT, "qwen2_vl") for r in ROUNDINGS}
CASES.update({f"{m}-lazy-{r}": (m, "lazy", r) for m in ("llama", "gemma3_text", "phi3") for r in ROUNDINGS})
CASES.update({f"{m}-plan-{r}": (m, "plan", r) for m in ("llama", "qwen3_moe") for r in ("nearest", "gptq")})
CASES["llama-memory-rtn"] = ("llama", "memory", "rtn")


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{platform.machine()} {cpu} torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def digest(folder: Path) -> str:
    """sha256 over the quantization config and every tensor of the checkpoint (model shards and the search
    record), by name: dtype, shape and raw bytes. File layout, metadata and reports are left out."""
    h = hashlib.sha256()
    cfg = json.loads((folder / "config.json").read_text())
    h.update(json.dumps(cfg["quantization_config"], sort_keys=True).encode())
    files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    files += sorted(str(p.relative_to(folder)) for p in folder.rglob("salience_search*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(folder / f, "pt") as sf:
            for k in sf.keys():
                tensors[f"{'search:' if 'search' in f else ''}{k}"] = sf.get_tensor(k)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _quantize(case: str, tmp: Path) -> Path:
    model_type, path, rounding = CASES[case]
    vlm = model_type == "qwen2_vl"
    m = tiny_vlm(model_type) if vlm else tiny_model(model_type)
    arch = arch_for(m.config)
    dtype = getattr(torch, arch.dtype)
    m = m.to(dtype)
    tok = tiny_tokenizer()
    method = "rtn" if rounding == "rtn" else "awq"
    scfg = SearchConfig(rounding="nearest" if method == "rtn" else rounding, tune_steps=8, tune_rows=2)
    kw = dict(n_rows=8, seqlen=32, device="cpu", dtype=dtype, progress=False, scfg=scfg)
    out = tmp / "ckpt"
    if path == "lazy":
        src = tmp / "src"
        m.save_pretrained(src)
        tok.save_pretrained(src)
        api.quantize(str(src), out, QuantConfig(4, 32), method, calib_file(tmp), **kw)
    elif path == "plan":  # the accelerator's memory plan, on the CPU: one Gram a pass, Grams over 4 KiB paneled
        with _memory_plan(gram_bytes=1, gram_whole_max=4096, panel_rows=32):
            api.quantize(None, out, QuantConfig(4, 32), method, calib_file(tmp), loaded=(m, tok), **kw)
    else:
        api.quantize(None, out, QuantConfig(4, 32), method, calib_file(tmp), loaded=(m, tok), **kw)
    return out


@contextmanager
def _memory_plan(gram_bytes, gram_whole_max, panel_rows):
    """The driver's Gram budget, whole-Gram limit and panel height for the calls inside."""
    from salience import quantize as q
    old = api.quantize_model, q.PANEL_ROWS
    api.quantize_model = partial(q.quantize_model, gram_bytes=gram_bytes, gram_whole_max=gram_whole_max)
    q.PANEL_ROWS = panel_rows
    try:
        yield
    finally:
        api.quantize_model, q.PANEL_ROWS = old


def _recorded() -> dict:
    return json.loads(HASHES.read_text()) if HASHES.exists() else {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, tmp_path):
    rec = _recorded()
    here = machine()
    if here not in rec:
        pytest.skip(f"golden hashes recorded on {sorted(rec)}; this machine is {here!r}")
    assert digest(_quantize(case, tmp_path)) == rec[here][case], f"{case}: checkpoint bytes changed"


def _record():
    import tempfile
    rec = _recorded()
    hashes = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as d:
            hashes[case] = digest(_quantize(case, Path(d)))
            print(case, hashes[case])
    rec[machine()] = hashes
    HASHES.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record")
    _record()
