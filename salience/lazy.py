"""Lazy loading: a model skeleton on the meta device, filled one decoder block at a time straight from the
safetensors shards, so host memory holds a block or two and the calibration activations, never the model.

    skeleton (meta params, real buffers) <- embeddings, final norm   (what the block-input capture runs)
    for block i:  shards --pread--> CPU (compute dtype, next block prefetched in a thread)
                  -> device -> quantize -> write -> params back to meta (freed)

Each tensor takes the path `from_pretrained(dtype=...)` gives it (stored dtype -> the skeleton's dtype
for that parameter), so the lazy and in-memory paths produce bit-identical checkpoints.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .arch import Arch, get_module
from .checkpoint import CheckpointError, SafetensorsFile, check_finite, read_config, tensor_shapes
from .nn import params_on_meta

INDEX = "model.safetensors.index.json"


def fixed_mmap_threshold(nbytes: int = 1 << 20):
    """glibc only: serve allocations >= nbytes by mmap, returned to the OS when freed. glibc's default
    threshold rises to 32 MiB after the first large free, after which block-sized tensors read in one
    thread and freed in another fragment the heap: host RSS then creeps up block after block (measured:
    16 blocks of 128 MiB, +1.6 GiB creeping vs +0.75 GiB flat). Used when the compute runs on a GPU, where
    the host only stages I/O; on the CPU the extra page faults cost ~25% time."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class LazyUnsupported(ValueError):
    """The folder's tensor names do not match the model transformers builds (renamed keys, VLM wrappers):
    the caller falls back to loading the whole model."""


class ShardedTensors:
    """Tensor name -> shard file of a safetensors folder (index.json, or every *.safetensors)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        # every shard's header read and checked here (a truncated or corrupted file fails naming it)
        found = tensor_shapes(self.folder)
        self.file_of = {k: f for k, (f, _) in found.items()}
        self.shapes = {k: shape for k, (_, shape) in found.items()}

    def read(self, names, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Load `names` to host memory, each converted to dtypes[name], with plain file reads
        (checkpoint.SafetensorsFile): no memory map, so no file page counts in the process's RSS."""
        by_file: dict[Path, list[str]] = {}
        for k in names:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, keys in by_file.items():
            with SafetensorsFile(f) as sf:
                for k in keys:
                    t = check_finite(k, sf.get(k), f)
                    out[k] = t.to(dtypes[k]) if t.is_floating_point() and k in dtypes else t
        return out

    def fingerprint(self) -> str:
        """sha256 over config.json, and per shard: name, size, safetensors header (names, shapes, dtypes,
        offsets) and 4 samples of 64 KiB of data. Cheap (no full read); catches a different model or
        shape and most edits of weights, not every single changed value."""
        h = hashlib.sha256()
        cfg = self.folder / "config.json"
        if cfg.exists():
            h.update(cfg.read_bytes())
        for f in sorted(set(self.file_of.values())):
            size = f.stat().st_size
            h.update(f"{f.name}|{size}|".encode())
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
                for frac in (0.2, 0.4, 0.6, 0.8):
                    fh.seek(int(size * frac))
                    h.update(fh.read(1 << 16))
        return h.hexdigest()


def skeleton(folder: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The CausalLM of `folder` with parameters on the meta device (buffers real, as a load creates them)."""
    from transformers import AutoModelForCausalLM

    config = read_config(Path(folder), trust_remote_code=trust_remote_code)
    with params_on_meta():
        m = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return m.eval()


class LazyBlocks:
    """The decoder blocks of a meta skeleton, materialised one at a time from the shards.

    load(i) returns block i in host memory (read ahead if prefetch(i) was called: the driver asks for
    block i+1 once block i is on the device, so that the host holds one block, not two);
    release(i) turns its parameters back into meta tensors. `rest_entries` streams the non-block tensors
    (embeddings, final norm, untied head) from the shards for the writer."""

    def __init__(self, model: nn.Module, arch: Arch, src: ShardedTensors, prefetch: bool = True):
        self.model, self.arch, self.src = model, arch, src
        self.layers = get_module(model, arch.layers)
        self.tied = getattr(model.config, "tie_word_embeddings", False)
        self.dtypes = {k: v.dtype for k, v in model.state_dict().items()}  # what from_pretrained loads to
        need = [k for k in self.dtypes if not (self.tied and k == "lm_head.weight")]
        missing = [k for k in need if k not in src.file_of]
        if missing:
            raise LazyUnsupported(f"{src.folder}: {len(missing)} tensors the model expects are not in the "
                                  f"shards under the same name (e.g. {missing[:3]})")
        expected = model.state_dict()
        for k in need:
            if tuple(expected[k].shape) != src.shapes[k]:
                raise CheckpointError(f"{src.file_of[k]}: tensor {k} has shape {src.shapes[k]}, config.json "
                                      f"implies {tuple(expected[k].shape)}")
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._ahead: dict[int, object] = {}
        self._materialise_base()

    def __len__(self):
        return len(self.layers)

    def _keys(self, i: int) -> list[str]:
        p = f"{self.arch.layers}.{i}."
        return [p + k for k in self.layers[i].state_dict()]

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        p = f"{self.arch.layers}.{i}."
        return {k[len(p):]: v for k, v in self.src.read(self._keys(i), self.dtypes).items()}

    def _materialise_base(self):
        """Embeddings, final norm etc.: everything of the base model outside the blocks (lm_head stays meta:
        block inputs never need it)."""
        base = self.model.base_model
        prefix = next(n for n, mod in self.model.named_modules() if mod is base)
        prefix = prefix + "." if prefix else ""
        keys = [prefix + k for k in base.state_dict() if not (prefix + k).startswith(self.arch.layers + ".")]
        sd = self.src.read(keys, self.dtypes)
        self.model.load_state_dict(sd, strict=False, assign=True)

    def rest_entries(self, dtype: torch.dtype, keep_fp32=lambda name: False, name_of=lambda name: name,
                     chunk_bytes: int = 64 << 20) -> list[tuple]:
        """checkpoint.save_streamed entries of the non-block tensors in `dtype` (fp32 where keep_fp32(name)),
        named name_of(name) (embeddings, final norm, untied head), read from the shards ~64 MiB of rows at
        a time: a 128K-token vocabulary never sits in host memory. Each value takes the path stored ->
        load dtype -> dtype, as in the in-memory path."""
        keys = [k for k in self.dtypes if not k.startswith(self.arch.layers + ".")
                and not (self.tied and k == "lm_head.weight")]
        out = []
        for k in keys:
            f = self.src.file_of[k]
            with SafetensorsFile(f) as sf:
                stored, shape = sf.dtype(k), sf.shape(k)
            final = (torch.float32 if keep_fp32(k) else dtype) if stored.is_floating_point else stored

            def chunks(k=k, f=f, shape=shape, final=final):
                with SafetensorsFile(f) as sf:
                    if len(shape) < 2:
                        yield self._cast(sf.get(k), k, final)
                        return
                    step = max(1, chunk_bytes // (math.prod(shape[1:]) * 4))
                    for r in range(0, shape[0], step):
                        yield self._cast(sf.get(k, (r, r + step)), k, final)
            out.append((name_of(k), final, shape, chunks))
        return out

    def _cast(self, t, k, final):
        check_finite(k, t, self.src.file_of[k])
        return t.to(self.dtypes[k]).to(final) if t.is_floating_point() else t

    def drop_base(self):
        """After the block inputs are captured: the embeddings etc. back to meta (their memory freed)."""
        layers = self.arch.layers + "."
        for name, mod in self.model.named_modules():
            if name.startswith(layers) or name + "." == layers:
                continue
            for leaf, p in list(mod.named_parameters(recurse=False)):
                mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)

    def prefetch(self, i: int):
        """Start reading block i in a thread (load(i) takes it)."""
        if self._pool is not None and i < len(self.layers) and i not in self._ahead:
            self._ahead[i] = self._pool.submit(self._read, i)

    def load(self, i: int) -> nn.Module:
        fut = self._ahead.pop(i, None)
        sd = fut.result() if fut is not None else self._read(i)
        block = self.layers[i]
        block.load_state_dict(sd, strict=True, assign=True)
        return block

    def release(self, i: int, block: nn.Module):
        self.layers[i] = block.to("meta")

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._ahead.clear()


class InMemoryBlocks:
    """The decoder blocks of a model held in host memory: moved to the device and back (fake-quantized)."""

    def __init__(self, model: nn.Module, arch: Arch):
        self.layers = get_module(model, arch.layers)

    def __len__(self):
        return len(self.layers)

    def load(self, i: int) -> nn.Module:
        return self.layers[i]

    def prefetch(self, i: int):
        pass

    def release(self, i: int, block: nn.Module):
        self.layers[i] = block.to("cpu")

    def drop_base(self):
        pass

    def close(self):
        pass
