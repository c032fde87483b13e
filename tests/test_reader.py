"""The lazy loader's safetensors reader (plain reads, no memory map): the same bytes as safetensors' own
reader for every dtype we read, whole tensors and row slices; a clear CheckpointError for truncated or
malformed files; and no mapping of the file in the process."""

import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from salience.checkpoint import _ST_DTYPES, CheckpointError, SafetensorsFile


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in _ST_DTYPES:  # bf16, fp16, fp32, fp64, int64/32/16/8, uint8, bool
        if dtype.is_floating_point:
            t = torch.randn(37, 24, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(37, 24, generator=g) > 0.5
        else:
            info = torch.iinfo(dtype)
            t = torch.randint(max(info.min, -2**40), min(info.max, 2**40), (37, 24), generator=g, dtype=torch.int64)
            t = t.to(dtype)
        out[f"t.{str(dtype)[6:]}"] = t
    out["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 8, dtype=torch.float16)
    out["cube"] = torch.randn(3, 4, 5, generator=g).half()
    return out


@pytest.fixture
def file(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file(_tensors(), f, metadata={"format": "pt"})
    return f


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def test_bit_identical_to_safetensors(file):
    with safe_open(file, "pt") as ref, SafetensorsFile(file) as sf:
        assert set(sf.keys()) == set(ref.keys())
        for k in ref.keys():  # noqa: SIM118
            want = ref.get_tensor(k)
            got = sf.get(k)
            _same(got, want)
            assert sf.dtype(k) == want.dtype and sf.shape(k) == tuple(want.shape)
            if want.dim() >= 1:
                for r0, r1 in [(0, 1), (5, 17), (30, 99), (0, want.shape[0])]:
                    _same(sf.get(k, (r0, r1)), ref.get_slice(k)[r0:r1])


def test_no_memory_map(file):
    with SafetensorsFile(file) as sf:
        kept = [sf.get(k) for k in sf.keys()]  # noqa: SIM118 (not a dict)
        maps = Path(f"/proc/{os.getpid()}/maps")
        if maps.exists():
            assert str(file) not in maps.read_text()
    assert len(kept) == len(_tensors())


@pytest.mark.parametrize("cut", [4, 12, -1, -100])
def test_truncated(file, cut):
    raw = file.read_bytes()
    file.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        SafetensorsFile(file)
    assert str(file) in str(e.value)


def test_truncated_after_open(file):
    """The file shrinks between reading its header and reading a tensor: the error names the tensor."""
    with SafetensorsFile(file) as sf:
        last = max(sf.keys(), key=lambda k: sf.entries[k][3])
        os.truncate(file, sf.entries[last][3] - 3)
        with pytest.raises(CheckpointError, match=f"tensor {last}: the file ends"):
            sf.get(last)


BAD_HEADERS = [
    b"[1, 2]",
    b"not json",
    b'{"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 6]}}',
    b'{"a": {"dtype": 3, "shape": [1], "data_offsets": [0, 2]}}',
    b'{"a": {"dtype": "F16", "shape": [-1], "data_offsets": [0, 2]}}',
    b'{"a": "F16"}',
]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_malformed_header(tmp_path, header):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        SafetensorsFile(f)
    f.write_bytes(struct.pack("<Q", 1 << 20) + b"{}")
    with pytest.raises(CheckpointError, match="past the end"):
        SafetensorsFile(f)


def test_unknown_dtype_fails_when_read(tmp_path):
    f = tmp_path / "f8.safetensors"
    save_file({"f8": torch.zeros(4, dtype=torch.float8_e4m3fn), "ok": torch.ones(2)}, f)
    with SafetensorsFile(f) as sf:
        _same(sf.get("ok"), torch.ones(2))  # a stray tensor of another dtype is no error by itself
        with pytest.raises(CheckpointError, match="tensor f8 has dtype F8_E4M3"):
            sf.get("f8")
