"""Writing and reading AWQ GEMM checkpoints (safetensors shards + index, config.json with
quantization_config, tokenizer files, a JSON report). The layout of the packed tensors is in
salience.packing.

Writes are atomic: everything goes to `<out>.partial/` and is renamed to `<out>` once complete, so a
folder named `<out>` is always a whole checkpoint. Shards are written block by block with a manifest, so a
killed run continues where it stopped (CheckpointWriter).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
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
RESUME = "salience_resume.json"  # only in an unfinished <out>.partial/
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


def check_finite(name: str, t: torch.Tensor, where, chunk: int = 1 << 24) -> torch.Tensor:
    """t unchanged, or CheckpointError naming the tensor and file if it holds NaN or inf. Checked `chunk`
    elements at a time with all() (a bool temporary of at most 16 MiB; sum() of the bool tensor would first
    copy it to int64: 8 bytes per weight, 1 GiB for a 7B embedding); counted only to report."""
    if t.is_floating_point():
        flat = t.reshape(-1)
        if not all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk)):
            bad = sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))
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
    """Writes `<out>.partial/` one shard at a time, then completes it and renames it to `<out>`.

    Shard 0 holds the non-block tensors, shard 1 + i decoder block i; n_shards is known up front, so each
    is written once, atomically (temporary file + rename), under its final name model-0000j-of-0000n.
    A manifest (salience_resume.json) records the finished shards, each block's report and search results,
    and, for a resumable run, the next block's input activations (one file, replaced block by block).

    run: what identifies this run (settings and hashes of the model and calibration data; JSON-able).
    With run given, an unfinished `<out>.partial/` of the same run is continued: `blocks_done` blocks are
    kept and `read_activations()` reads the input of the next one. One of a different run is refused
    (restart=True discards it). Without run, any leftover partial folder is discarded. The last block's
    write overlaps the next block's compute (one writer thread, at most one write pending). The activations
    are written from the caller's buffer itself (0.5 GiB for a 7B model at 128 x 512 rows: a copy for the
    thread would be the largest thing in host memory), so the caller calls wait() before overwriting it."""

    def __init__(self, out: str | Path, n_shards: int, run: dict | None = None, overwrite: bool = False,
                 restart: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.n_shards, self.run = n_shards, run
        self.manifest = {"format": 1, "run": run, "n_shards": n_shards, "rest": False, "blocks": [],
                         "activations": None}
        old = self._read_manifest()
        if old is not None and run is not None and old.get("run") == run and old.get("n_shards") == n_shards:
            self.manifest = old
        elif old is not None and run is not None and old.get("run") is not None and not restart:
            raise CheckpointError(_mismatch(self.tmp, old.get("run"), run))
        elif self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="writer")
        self._pending = None
        self._queued = self.blocks_done  # blocks handed to write_block (the writer thread may lag one)

    def _read_manifest(self):
        try:
            return json.loads((self.tmp / RESUME).read_text())
        except (OSError, ValueError):
            return None

    @property
    def rest_done(self) -> bool:
        return self.manifest["rest"]

    @property
    def blocks_done(self) -> int:
        return len(self.manifest["blocks"])

    @property
    def reports(self) -> list[dict]:
        return list(self.manifest["blocks"])

    def read_activations(self, out: torch.Tensor) -> bool:
        """Read the input of block `blocks_done` saved by the interrupted run into `out` (the activation
        buffer, pinned for a GPU: the file goes straight there, no second host copy). False at block 0."""
        a = self.manifest["activations"]
        if not self.blocks_done or a is None:
            return False
        if list(out.shape) != a["shape"] or str(out.dtype).removeprefix("torch.") != a["dtype"]:
            raise CheckpointError(f"{self.tmp / a['file']}: saved activations {a['dtype']} {a['shape']}, the "
                                  f"run needs {out.dtype} {list(out.shape)}; pass --restart")
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        with open(self.tmp / a["file"], "rb") as f:
            n = f.readinto(view)
        if n != len(view):
            raise CheckpointError(f"{self.tmp / a['file']}: {n} bytes, expected {len(view)}; pass --restart")
        return True

    def shard_name(self, j: int) -> str:
        return f"model-{j + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _save(self, name: str, tensors: dict[str, torch.Tensor]):
        tmp = self.tmp / (name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.tmp / name)

    def _commit(self):
        tmp = self.tmp / (RESUME + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1, default=str))
        os.replace(tmp, self.tmp / RESUME)

    def write_rest(self, entries: list[tuple]):
        """Shard 0 from (name, dtype, shape, chunks) entries (save_streamed): embeddings and head go to
        disk a slice at a time, never whole in host memory."""
        tmp = self.tmp / (self.shard_name(0) + ".tmp")
        save_streamed(tmp, entries, metadata={"format": "pt"})
        os.replace(tmp, self.tmp / self.shard_name(0))
        _test_stall("rest")
        self.manifest["rest"] = True
        self._commit()

    def write_block(self, i: int, tensors: dict[str, torch.Tensor], search: dict[str, torch.Tensor],
                    report: dict, x_next: torch.Tensor | None = None):
        """Queue block i's shard, search results, report and (resumable runs) the next block's input;
        the manifest says block i is done only once all of them are on disk."""
        if i != self._queued:
            raise CheckpointError(f"blocks must be written in order: got {i}, expected {self._queued}")
        self._queued += 1
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        search = {k: v.detach().to("cpu").contiguous() for k, v in search.items()}
        self.wait()  # one write pending at a time
        x = None
        if x_next is not None and self.run is not None:
            # the thread writes from the caller's buffer (it calls wait() before overwriting it); a tensor
            # on an accelerator is copied to the host now
            x = x_next.detach() if x_next.device.type == "cpu" else x_next.detach().to("cpu")
        self._pending = self._pool.submit(self._write_block, i, tensors, search, report, x)

    def _write_block(self, i, tensors, search, report, x):
        self._save(self.shard_name(1 + i), tensors)
        _test_stall(f"shard{i}")
        if search:
            self._save(f"resume-search-{i:05d}.safetensors", search)
        old = self.manifest["activations"]
        if x is not None:
            name = f"resume-x-{i + 1:05d}.bin"
            with open(self.tmp / (name + ".tmp"), "wb") as f:
                x.contiguous().view(torch.uint8).numpy().tofile(f)
            os.replace(self.tmp / (name + ".tmp"), self.tmp / name)
            self.manifest["activations"] = {"file": name, "shape": list(x.shape),
                                            "dtype": str(x.dtype).removeprefix("torch.")}
        self.manifest["blocks"].append(report)
        self._commit()
        if old is not None and x is not None:
            (self.tmp / old["file"]).unlink(missing_ok=True)
        _test_stall(f"commit{i}")

    def wait(self):
        if self._pending is not None:
            p, self._pending = self._pending, None
            p.result()  # re-raises a failed write

    def abort(self):
        """Remove the partial folder (the run failed); `out` is left as it was."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)

    def close(self, config: dict, tokenizer=None, report: dict | None = None) -> Path:
        self.wait()
        self._pool.shutdown()
        if not self.rest_done or self.blocks_done != self.n_shards - 1:
            raise CheckpointError(f"{self.tmp}: closing with {self.blocks_done} of {self.n_shards - 1} blocks")
        weight_map, total = {}, 0
        for j in range(self.n_shards):
            name = self.shard_name(j)
            total += (self.tmp / name).stat().st_size
            with safe_open(self.tmp / name, "pt") as sf:
                weight_map.update({k: name for k in sf.keys()})
        (self.tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        search = {}
        for f in sorted(self.tmp.glob("resume-search-*.safetensors")):
            with safe_open(f, "pt") as sf:
                search.update({k: sf.get_tensor(k) for k in sf.keys()})
        if search:
            save_file(search, self.tmp / SEARCH)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        if report is not None:
            (self.tmp / REPORT).write_text(json.dumps(report, indent=2, default=str))
        for f in list(self.tmp.glob("resume-*")) + [self.tmp / RESUME]:
            f.unlink(missing_ok=True)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out


def _test_stall(point: str):
    """Test hook for the kill -9 test: SALIENCE_TEST_STALL="commit1:/path/marker" makes the writer touch the
    marker and hang when it reaches that point (rest: shard 0 written, no manifest yet; shard<i>: block i's
    shard written, manifest not yet;
    commit<i>: block i recorded as done)."""
    spec = os.environ.get("SALIENCE_TEST_STALL")
    if spec and spec.split(":", 1)[0] == point:
        Path(spec.split(":", 1)[1]).touch()
        time.sleep(3600)


def _mismatch(tmp: Path, old: dict, new: dict) -> str:
    def flat(d, p=""):
        return {k2: v2 for k, v in d.items() for k2, v2 in (flat(v, f"{p}{k}.").items() if isinstance(v, dict)
                                                              else [(p + k, v)])}
    a, b = flat(old or {}), flat(new)
    diff = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return (f"{tmp} holds an unfinished run of different settings or inputs ({'; '.join(diff[:6])}). "
            "Rerun the command that started it to continue it, or pass --restart to discard it.")


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


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def save_streamed(path: str | Path, entries: list[tuple], metadata: dict | None = None):
    """Write a safetensors file from (name, dtype, shape, chunks) entries: chunks() yields the tensor's
    leading-dim slices in order, as CPU tensors of `dtype`, each written and dropped before the next
    is made (safetensors.torch.save_file needs every tensor, and then a bytes copy of each, at once).
    Layout: u64 header length, JSON header (dtype, shape, data_offsets; padded to 8 bytes), data."""
    header = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, dtype, shape, _ in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, dtype, shape, chunks in entries:
            start = f.tell()
            for c in chunks():
                if c.dtype != dtype:
                    raise TypeError(f"{name}: chunk of dtype {c.dtype}, header says {dtype}")
                f.write(memoryview(c.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            a, b = header[name]["data_offsets"]
            if f.tell() - start != b - a:
                raise ValueError(f"{name}: wrote {f.tell() - start} bytes, header says {b - a}")


def tensor_entries(tensors: dict[str, torch.Tensor]) -> list[tuple]:
    """save_streamed entries of tensors already in memory (one chunk each)."""
    return [(k, v.dtype, tuple(v.shape), (lambda v=v: [v])) for k, v in tensors.items()]


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

_FROM_ST = {name: dtype for dtype, name in _ST_DTYPES.items()}  # "BF16" -> torch.bfloat16


class SafetensorsFile:
    """A safetensors file read with plain reads (os.preadv into fresh tensors), never memory-mapped.

    safe_open maps the file, and every page a read touches then counts in the process's RSS (a 7B model's
    shards: +4 GiB of file pages over a run). Read here, the bytes go through the page cache, which is
    not part of the process, into one anonymous tensor per read.

    Layout (the writer is save_streamed): u64 little-endian header length n, n bytes of JSON
    {name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}, then the
    data, offsets relative to its start, row-major, little-endian. Every entry is checked when the file is
    opened (size = prod(shape) * itemsize, inside the file), its dtype when it is read: a truncated or
    malformed file fails with a CheckpointError naming it (and the tensor)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.entries = self._read_header()
            if hasattr(os, "posix_fadvise"):  # larger kernel read-ahead: tensors are read front to back
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(self._fd)
            raise

    def _fail(self, what: str):
        raise CheckpointError(f"{self.path}: not a readable safetensors file ({what})")

    def _pread(self, n: int, offset: int) -> bytes:
        b = os.pread(self._fd, n, offset)
        if len(b) != n:
            self._fail(f"{n} bytes expected at byte {offset}, the file ends first")
        return b

    def _read_header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """name -> (dtype name, shape, start, end), start/end absolute byte offsets in the file."""
        size = os.fstat(self._fd).st_size
        if size < 8:
            self._fail("shorter than its 8-byte header length")
        n = int.from_bytes(self._pread(8, 0), "little")
        if n > 100 << 20:  # safetensors' own limit
            self._fail(f"header length {n} is over 100 MB")
        if n > size - 8:
            self._fail(f"header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(self._pread(n, 8))
        except (UnicodeDecodeError, ValueError) as e:
            self._fail(f"header is not JSON: {e}")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        start = 8 + n
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, end) = e["dtype"], e["shape"], e["data_offsets"]
                shape = tuple(shape)
                ok = isinstance(dtype, str) and all(type(d) is int and d >= 0 for d in (*shape, b, end))
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                self._fail(f"tensor {name}: malformed entry {str(e)[:200]}")
            if dtype in _FROM_ST and (end - b != math.prod(shape) * _FROM_ST[dtype].itemsize or b > end):
                self._fail(f"tensor {name}: data_offsets {[b, end]} do not hold shape {list(shape)} of {dtype}")
            if b > end or start + end > size:
                self._fail(f"tensor {name} ends at byte {start + end}, the file has {size} (truncated?)")
            entries[name] = (dtype, shape, start + b, start + end)
        return entries

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype; CheckpointError for one salience does not read (checked here, not at open: a
        stray tensor of another dtype that nothing reads is no error)."""
        d = self.entries[name][0]
        if d not in _FROM_ST:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {d}, which salience does not read")
        return _FROM_ST[d]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` (rows r0:r1 of its leading dim if given) in new host memory, its stored dtype."""
        dtype, (_, shape, b, e) = self.dtype(name), self.entries[name]
        if rows is not None:
            row = (e - b) // shape[0] if shape and shape[0] else 0  # bytes per row (row-major)
            r0, r1 = max(0, rows[0]), min(shape[0], rows[1])
            shape, b, e = (max(0, r1 - r0), *shape[1:]), b + r0 * row, b + max(r0, r1) * row
        buf = torch.empty(e - b, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < e - b:  # Linux reads at most ~2 GiB per call (a 128K-vocabulary embedding is more)
            got = os.preadv(self._fd, [view[done:]], b + done)
            if got == 0:
                self._fail(f"tensor {name}: the file ends at byte {b + done}, {e - b - done} bytes short")
            done += got
        return buf.view(dtype).reshape(shape)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    if (path / RESUME).exists() or path.name.endswith(".partial"):
        raise CheckpointError(f"{path} is an unfinished quantization run, not a checkpoint: rerun the "
                              "quantize command that started it to finish it")
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
