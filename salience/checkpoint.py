"""Writing and reading AWQ GEMM checkpoints (safetensors shards + index, config.json with
quantization_config, tokenizer files, a JSON report). The layout of the packed tensors is in
salience.packing.

Writes are atomic: everything goes to `<out>.partial/` and is renamed to `<out>` once complete, so a
folder named `<out>` is always a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .nn import QuantLinear, params_on_meta
from .packing import pack_linear

INDEX = "model.safetensors.index.json"
REPORT = "salience_report.json"
SEARCH = "salience_search.safetensors"
ARCH = "salience_arch.json"  # the structure used (table entry or discovered); the loader reads it


class CheckpointError(ValueError):
    """A model or checkpoint file that is unreadable or disagrees with itself; the message names the file
    or tensor."""


# ---- validating what we read (shared by the engine's loader, load_quantized and load_fp) ------------------

# A folder has a tokenizer if it holds one of these (fast tokenizer, sentencepiece, BPE vocab, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tokenizer_config.json")


def read_config(folder, trust_remote_code: bool = False):
    """transformers' config of a folder (or hub id); CheckpointError naming config.json if unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:  # bad JSON, no model_type, unknown model_type
        where = Path(folder) / "config.json" if isinstance(folder, Path) else folder
        raise CheckpointError(f"{where}: unreadable model config ({str(e).splitlines()[0][:300]})") from None


def read_tokenizer(folder, trust_remote_code: bool = False):
    """transformers' tokenizer of a folder (or hub id); CheckpointError naming the folder if there is none."""
    from transformers import AutoTokenizer

    if isinstance(folder, Path) and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({str(e).splitlines()[0][:300]})") from None


def supported_quant(qc: dict) -> bool:
    """The one quantized format we read: AWQ GEMM, 4-bit, with zero points."""
    return (qc.get("quant_method") == "awq" and str(qc.get("version", "gemm")).lower() == "gemm"
            and qc.get("bits", 4) == 4 and bool(qc.get("zero_point", True))
            and isinstance(qc.get("group_size", 128), int) and qc.get("group_size", 128) > 0)


def check_quant_config(config, where) -> int | None:
    """The group size of a supported quantization_config, None when there is none; else CheckpointError."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if not supported_quant(qc):
        shown = {k: qc.get(k) for k in ("quant_method", "version", "bits", "group_size", "zero_point") if k in qc}
        raise CheckpointError(f"{where}/config.json: quantization_config {shown} is not supported (salience reads "
                              "AWQ GEMM 4-bit checkpoints with zero points, and full-precision models)")
    return qc.get("group_size", 128)


def check_finite(name: str, t: torch.Tensor, where) -> torch.Tensor:
    """t unchanged, or CheckpointError naming the tensor and file if it holds NaN or inf."""
    if t.is_floating_point():
        bad = t.numel() - int(torch.isfinite(t).sum())
        if bad:
            raise CheckpointError(f"{where}: tensor {name} has {bad} NaN/inf value(s) of {t.numel()}")
    return t


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a folder: those of the index if there is one, else *.safetensors."""
    idx = path / INDEX
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
            names = sorted(set(wm.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{idx}: malformed index ({type(e).__name__}: {e})") from None
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise CheckpointError(f"{idx}: weight_map values must be file names in the folder")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    return [f for f in files if f.name != SEARCH]


class CheckpointWriter:
    """Streams tensors into shards of about max_shard_bytes, then writes index, config and tokenizer."""

    def __init__(self, out: str | Path, max_shard_bytes: int = 2 << 30, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.search: dict[str, torch.Tensor] = {}

    def add(self, tensors: dict[str, torch.Tensor]):
        for k, v in tensors.items():
            self.pending[k] = v.detach().to("cpu").contiguous()
            self.pending_bytes += v.numel() * v.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self):
        if not self.pending:
            return
        i = len(self.shards)
        save_file(self.pending, self.tmp / f"shard-{i:05d}.safetensors", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def abort(self):
        """Remove the partial folder (the run failed); `out` is left as it was."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def close(self, config: dict, tokenizer=None, report: dict | None = None) -> Path:
        self._flush()
        n = len(self.shards)
        weight_map, total = {}, 0
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / final)
            total += (self.tmp / final).stat().st_size
            weight_map.update({k: final for k in names})
        (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        if self.search:
            save_file(self.search, self.tmp / SEARCH)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        if report is not None:
            (self.tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out


def block_tensors(prefix: str, block: nn.Module, result, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized block: packed linears, everything else in `dtype`."""
    out = {}
    for name, lr in result.linears.items():
        qweight, qzeros, scales = pack_linear(lr.codes, lr.scales, lr.zeros)
        out[f"{prefix}{name}.qweight"], out[f"{prefix}{name}.qzeros"] = qweight, qzeros
        out[f"{prefix}{name}.scales"] = scales
    for name, t in block.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if mod in result.linears and leaf == "weight":
            continue
        if mod in result.linears and leaf == "bias":
            out[f"{prefix}{name}"] = t.to(torch.float16)
        else:
            out[f"{prefix}{name}"] = t.to(dtype) if t.is_floating_point() else t
    return out


def rest_tensors(model: nn.Module, layers_path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Non-block tensors (embeddings, final norm, untied lm_head) in `dtype`."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    skip = {"lm_head.weight"} if tied else set()
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()
            if not k.startswith(layers_path + ".") and k not in skip}


def not_converted(arch, model) -> list[str]:
    """modules_to_not_convert: lm_head, the model-level 16-bit modules (VLM vision tower, projector) and each
    block's (routers, shared-expert gates) by full name. Full names because loaders match differently:
    transformers by prefix or suffix, vLLM and AutoAWQ by substring, where "mlp.gate" would also match a
    dense layer's "mlp.gate_up_proj"; "model.layers.3.mlp.gate" matches only that router."""
    from .arch import disk_name, get_module

    names = ["lm_head", *arch.not_convert_model]
    for i, block in enumerate(get_module(model, arch.layers)):
        for n in arch.not_convert:
            try:
                present = get_module(block, n) is not None
            except AttributeError:
                present = False
            if present:
                names.append(disk_name(arch, f"{arch.layers}.{i}.{n}"))
    return names


def quant_config(bits: int, group_size: int, not_converted=("lm_head",)) -> dict:
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(not_converted)}


# ---- reading ---------------------------------------------------------------------------------------------

def tensor_shapes(path: Path) -> dict[str, tuple[Path, tuple]]:
    """name -> (file, shape) over a folder's safetensors files, every header checked (a truncated or
    corrupted file fails here, naming it)."""
    files = safetensors_files(path)
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights")
    shapes = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{path}: shard {f.name} listed in the index is missing")
        try:
            with safe_open(f, "pt") as sf:
                for k in sf.keys():
                    if k in shapes:
                        raise CheckpointError(f"{f}: tensor {k} is also in {shapes[k][0].name}")
                    shapes[k] = (f, tuple(sf.get_slice(k).get_shape()))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return shapes


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device="cpu"):
    """Load an AWQ GEMM checkpoint (ours or another tool's) into a transformers model whose quantized
    linears are QuantLinear. Returns (model, tokenizer)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from .arch import UnsupportedArchitecture, arch_for, arch_from_dict, disk_name, get_module
    from .moe import unfuse

    path = Path(path)
    config = read_config(path)
    group_size = check_quant_config(config, path)
    if group_size is None:
        raise CheckpointError(f"{path}/config.json: no quantization_config (not a 4-bit checkpoint)")
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    shapes = tensor_shapes(path)
    # the class that was quantized (a VLM's ...ForConditionalGeneration, not its text-only CausalLM)
    # (a class registered with AutoModelForCausalLM by the user is not in transformers' namespace: the
    # auto class maps its config to it, or raises naming what it supports)
    names = getattr(config, "architectures", None) or []
    cls = (getattr(transformers, names[0], None) if names else None) or AutoModelForCausalLM
    with params_on_meta():
        model = cls.from_config(config, dtype=dtype) if cls is AutoModelForCausalLM \
            else cls._from_config(config, dtype=dtype)
    if (path / ARCH).exists():  # written by salience: the structure it quantized with
        arch = arch_from_dict(json.loads((path / ARCH).read_text()))
    else:
        try:
            arch = arch_for(config)
        except UnsupportedArchitecture:
            arch = None  # another tool's checkpoint of a family outside our table: plain linears only
    if arch is not None and arch.experts is not None:
        for block in get_module(model, arch.layers):
            unfuse(block, arch)  # the checkpoint holds one AWQ linear per expert
    # module-tree name -> name in the file (they differ where the family's checkpoints use other names)
    file_key = {disk_name(arch, k, reverse=True) if arch is not None else k: k for k in shapes}
    shapes = {k: shapes[fk] for k, fk in file_key.items()}
    for name in [k[: -len(".qweight")] for k in shapes if k.endswith(".qweight")]:
        parent, _, leaf = name.rpartition(".")
        f, shape = shapes[name + ".qweight"]
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{f}: tensor {file_key[name + '.qweight']} names no linear layer of the model "
                                  "built from config.json")
        if len(shape) != 2 or (old.in_features, old.out_features) != (shape[0], shape[1] * 8):
            raise CheckpointError(f"{f}: {name}.qweight has shape {shape} but the model built from "
                                  f"config.json has {old}")
        k, n8 = shape
        setattr(model.get_submodule(parent), leaf,
                QuantLinear(k, n8 * 8, old.bias is not None, group_size, dtype=dtype, device="meta"))
    expected = model.state_dict()
    sd = {}
    by_file: dict[Path, list[str]] = {}
    for k, (f, _) in shapes.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(f, "pt", device=str(device)) as sf:
            for k in keys:
                t = check_finite(file_key[k], sf.get_tensor(file_key[k]), f)
                if k in expected and expected[k].is_floating_point() != t.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {file_key[k]} has dtype {t.dtype}, the model expects "
                                          f"{expected[k].dtype}")
                if k.endswith((".qweight", ".qzeros")) and t.dtype != torch.int32 or \
                        k.endswith(".scales") and not t.is_floating_point():
                    raise CheckpointError(f"{f}: tensor {file_key[k]} has dtype {t.dtype}, AWQ GEMM stores "
                                          "int32 qweight/qzeros and floating-point scales")
                # floating tensors take the dtype the model gives them (dtype, or fp32 where the class
                # keeps a module in fp32); packed scales stay fp16
                want = expected[k].dtype if k in expected and expected[k].is_floating_point() else dtype
                sd[k] = t.to(want) if t.is_floating_point() and not k.endswith(".scales") else t
    for k, t in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: tensor {k} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}")
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    tok = read_tokenizer(path)
    return model.to(device).eval(), tok
