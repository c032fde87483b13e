"""The jobs behind the CLI, as functions: quantize a model to a checkpoint, fake-quantize in memory,
measure perplexity, generate text."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from . import __version__, moe
from .arch import Arch, arch_for, arch_to_dict, disk_name, get_module
from .awq import SearchConfig
from .checkpoint import (
    ARCH,
    TOKENIZER_FILES,
    CheckpointError,
    CheckpointWriter,
    block_tensors,
    check_finite,
    check_quant_config,
    load_quantized,
    not_converted,
    quant_config,
    read_config,
    read_tokenizer,
    rest_tensors,
    tensor_entries,
)
from .data import DataError, calibration_rows, eval_windows, load_text
from .evaluate import perplexity
from .lazy import LazyBlocks, LazyUnsupported, ShardedTensors, fixed_mmap_threshold, skeleton
from .models import is_quantized_checkpoint, load_fp, materialize, resolve
from .quant import QuantConfig
from .quantize import fp32_names, quantizable_linears, quantize_model


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Compute dtype: bf16 by default (fast AVX-512 bf16 matmuls on CPU; fp16 overflows on Gemma)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def check_group_size(model, qcfg: QuantConfig, arch: Arch | None = None) -> None:
    """Fail before any work when the group size does not divide some quantized linear's input dim.
    Fused experts are unfused here (per-expert linears, same weights) so that their shapes are checked."""
    arch = arch or arch_for(model.config)
    for i, block in enumerate(get_module(model, arch.layers)):
        moe.unfuse(block, arch)
        for name, lin in quantizable_linears(block, arch).items():
            qcfg.groups(lin.in_features, f"{arch.layers}.{i}.{name}")


def fake_quantize(model, qcfg: QuantConfig, method: str = "awq", rows: torch.Tensor | None = None,
                  scfg: SearchConfig | None = None, device=None, dtype=None, on_block=None,
                  progress: bool = True, arch: Arch | None = None):
    """Quantize `model` in place (weights become their dequantized 4-bit values). Returns block reports.
    arch: the structure (default: the table entry of the model's config; see salience.discover)."""
    arch = arch or arch_for(model.config)
    check_group_size(model, qcfg, arch)
    if method == "awq":
        if rows is None:
            raise ValueError("AWQ needs calibration rows")
        scfg = scfg or SearchConfig()
    elif method == "rtn":
        scfg = None
    else:
        raise ValueError(f"unknown method {method!r} (awq or rtn)")
    return quantize_model(model, arch, qcfg, rows, scfg, device=pick_device(device), dtype=pick_dtype(dtype),
                          on_block=on_block, progress=progress)


def quantize(model: str | None, out: str | Path, qcfg: QuantConfig, method: str = "awq", calib: str = "lee",
             n_rows: int = 128, seqlen: int = 512, seed: int = 0, scfg: SearchConfig | None = None,
             device=None, dtype=None, overwrite: bool = False, progress: bool = True, loaded=None,
             rows: torch.Tensor | None = None, restart: bool = False, lazy: bool = True,
             arch: Arch | None = None):
    """Quantize a model into an AWQ GEMM checkpoint at `out`. Returns (out path, the fake-quantized model
    in memory or None, tokenizer).

    A local safetensors folder (a GGUF file: its cached folder) is read lazily, one block at a time
    (salience.lazy), and the run is resumable: rerun after a crash to continue from the last finished
    block (restart=True discards an unfinished run instead). The in-memory model is then not kept (None).
    `loaded` = (model, tokenizer) quantizes that model in place instead (returned; not resumable), as does
    lazy=False or a source that cannot be read lazily (see _open_lazy). rows [n, seqlen]: calibration
    token ids given directly (calib, n_rows, seqlen and seed are then unused).
    arch: the structure (default: the table entry of the model's config; see salience.discover)."""
    t0 = time.time()
    if qcfg.bits != 4:
        raise ValueError("the AWQ GEMM checkpoint stores 4-bit weights; other bit widths are for "
                         "in-memory evaluation (salience eval --fake-quant)")
    cdtype, dev = pick_dtype(dtype), pick_device(device)
    m, tok, blocks, fingerprint = None, None, None, None
    if loaded is not None:
        m, tok = loaded
        for k, v in m.state_dict().items():
            check_finite(k, v, "the model in memory")
    elif lazy:
        m, tok, blocks, fingerprint = _open_lazy(model, cdtype, arch)
        if blocks is not None and dev.type != "cpu":
            fixed_mmap_threshold()
    if m is None:
        m, tok = load_fp(model, dtype=cdtype)[:2]
    arch = arch or arch_for(m.config)
    check_group_size(m, qcfg, arch)
    save_dtype = getattr(torch, arch.dtype)
    t_data = time.time()
    calib_info = None
    if method == "awq":
        if rows is None:
            if tok is None:
                raise CheckpointError(f"{model}: no tokenizer files (expected one of "
                                      f"{', '.join(TOKENIZER_FILES)}); one is needed to tokenize the calibration text")
            try:
                rows = calibration_rows(tok, load_text(calib), n_rows=n_rows, seqlen=seqlen, seed=seed)
            except DataError as e:
                raise DataError(f"calibration text {calib}: {e}") if calib not in str(e) else e from None
            calib_info = {"source": calib, "rows": n_rows, "seqlen": seqlen, "seed": seed}
        else:
            calib_info = {"source": "token ids given", "rows": rows.shape[0], "seqlen": rows.shape[1]}
    t_data = time.time() - t_data
    scfg = scfg or SearchConfig()
    settings = {"method": method, "bits": qcfg.bits, "group_size": qcfg.group_size,
                "search": dict(scfg.__dict__) if method == "awq" else None, "calibration": calib_info,
                "compute": {"device": dev.type, "dtype": str(cdtype)}, "arch": arch_to_dict(arch),
                "salience_version": __version__}
    run = None
    if fingerprint is not None:
        run = {"settings": settings, "model_fingerprint": fingerprint, "calibration_sha256":
               hashlib.sha256(rows.numpy().tobytes()).hexdigest() if rows is not None else None}
    n_blocks = len(get_module(m, arch.layers))
    writer = CheckpointWriter(out, n_shards=1 + n_blocks, run=run, overwrite=overwrite, restart=restart)
    keep_fp32 = fp32_names(m)

    def on_disk(tensors, module, prefix=""):
        # tensors the model class keeps in fp32 (DeepSeek-V3's router) are written in fp32
        tensors.update({prefix + k: v.float() for k, v in module.state_dict().items()
                        if v.is_floating_point() and keep_fp32(prefix + k) and prefix + k in tensors})
        return {disk_name(arch, k): v for k, v in tensors.items()}

    start = writer.blocks_done
    if start and progress:
        print(f"resuming {writer.tmp}: {start} of {n_blocks} blocks already done")
    if not writer.rest_done:
        writer.write_rest(blocks.rest_entries(save_dtype, keep_fp32, lambda k: disk_name(arch, k))
                          if blocks is not None else tensor_entries(on_disk(rest_tensors(m, arch.layers,
                                                                                         save_dtype), m)))

    def on_block(res, block, x_next):
        prefix = f"{arch.layers}.{res.index}."
        writer.write_block(res.index, on_disk(block_tensors(prefix, block, res, save_dtype), block, prefix),
                           {prefix + k: v for k, v in res.search.items()}, res.report,
                           x_next if res.index + 1 < n_blocks else None)
        return writer.wait  # the writer thread reads x_next until then

    t_q = time.time()
    if method not in ("awq", "rtn"):
        raise ValueError(f"unknown method {method!r} (awq or rtn)")
    quantize_model(m, arch, qcfg, rows, scfg if method == "awq" else None, device=dev, dtype=cdtype,
                   on_block=on_block, progress=progress, blocks=blocks, start=start,
                   x=writer.read_activations if method == "awq" and 0 < start < n_blocks else None)
    writer.wait()
    t_q = time.time() - t_q
    config = m.config.to_dict()
    config["quantization_config"] = quant_config(qcfg.bits, qcfg.group_size, not_converted(arch, m))
    config["dtype"] = arch.dtype
    config["architectures"] = [type(m).__name__]  # the class that loads it back (a VLM's, not a CausalLM)
    config.pop("torch_dtype", None)
    report = {
        "salience_version": __version__, "model": str(model or "smollm2"), "method": method,
        "bits": qcfg.bits, "group_size": qcfg.group_size, "calibration": calib_info,
        "search": scfg.__dict__ if method == "awq" else None,
        "compute": {"device": str(dev), "dtype": str(cdtype), "machine": platform.machine(),
                    "torch": torch.__version__, "lazy": blocks is not None},
        "resumed_at_block": start,
        "seconds": {"calibration_data": round(t_data, 2), "quantize": round(t_q, 2),
                    "total": round(time.time() - t0, 2)},
        "blocks": writer.reports,
    }
    (writer.tmp / ARCH).write_text(json.dumps(arch_to_dict(arch), indent=2))
    path = writer.close(config, tok, report)
    return path, (None if blocks is not None else m), tok


def _open_lazy(model: str | None, dtype: torch.dtype, arch: Arch | None = None):
    """(meta skeleton, tokenizer or None, LazyBlocks, fingerprint of the weights) for a local safetensors
    folder of a dense text model; (None, None, None, None) for anything else, which load_fp loads whole
    (hub ids, pickles, tensors named otherwise than in the module tree, VLMs, fused-expert MoE: not yet)."""
    from .arch import VLMS

    src = materialize(model)
    if not isinstance(src, Path) or is_quantized_checkpoint(src) or not any(src.glob("*.safetensors")):
        return None, None, None, None  # load_fp loads it or says what is wrong
    config = read_config(src)
    check_quant_config(config, src)
    if config.model_type in VLMS:
        return None, None, None, None
    try:
        shards = ShardedTensors(src)
        m = skeleton(src, dtype)
        arch = arch or arch_for(m.config)
        if arch.experts is not None or arch.disk_names:
            return None, None, None, None
        blocks = LazyBlocks(m, arch, shards)
    except LazyUnsupported as e:
        print(f"note: reading the whole model into memory ({e})")
        return None, None, None, None
    # no tokenizer is fine when the caller gives token ids (rows); quantize says so when it needs one
    tok = read_tokenizer(src) if any((src / f).exists() for f in TOKENIZER_FILES) else None
    return m, tok, blocks, shards.fingerprint()


def load_any(model: str | None, dtype=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """A quantized checkpoint (QuantLinear) or a full-precision model. -> (model, tokenizer)."""
    folder, gguf = resolve(model)
    dt = pick_dtype(dtype)
    if gguf is None and is_quantized_checkpoint(folder):
        return load_quantized(folder, dtype=dt)
    m, tok, _ = load_fp(model, dtype=dt, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return m, tok


def ppl(model, tok, source: str = "wiki", seqlen: int = 512, max_windows: int | None = 64, device=None,
        desc: str = "ppl", progress: bool = True) -> float:
    windows, n_prefix = eval_windows(tok, load_text(source), seqlen=seqlen, max_windows=max_windows,
                                     source=source)
    dev = pick_device(device)
    model.to(dev)
    try:
        return perplexity(model, windows, n_prefix, device=dev, desc=desc, progress=progress)
    finally:
        model.to("cpu")


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, chat: bool = False, device=None) -> str:
    """Greedy (temperature 0) or sampled continuation of `prompt`."""
    dev = pick_device(device)
    model.to(dev)
    if chat and tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
    else:
        ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    torch.manual_seed(seed)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(ids, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def clone(model):
    return copy.deepcopy(model)
