"""Every input the project reads, broken on purpose: each gives one clear error naming the file or tensor
(CheckpointError / ModelError / DataError, never a raw library exception), through the engine's loader,
load_any (eval) and quantize; and nothing is written half-way."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from salience import api
from salience.checkpoint import CheckpointError, load_quantized, tensor_shapes
from salience.data import DataError
from salience.engine import load
from salience.models import ModelError
from salience.quant import QuantConfig

from tiny import tiny_model, tiny_tokenizer

ERRORS = (CheckpointError, ModelError)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    fp = root / "fp"
    tiny_model("llama").save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    w4 = root / "w4"
    api.quantize(None, w4, QuantConfig(4, 32), "rtn", loaded=(tiny_model("llama"), tiny_tokenizer()),
                 progress=False, device="cpu", dtype="float32")
    return {"fp": fp, "w4": w4}


def _copy(good, kind, tmp_path, tensor="model.layers.0.input_layernorm.weight"):
    """A copy of a good folder, and the shard in it that holds `tensor` (checkpoints: one shard a block)."""
    d = tmp_path / f"{kind}-broken"
    shutil.copytree(good[kind], d)
    return d, tensor_shapes(d)[tensor][0]


def _readers(kind):
    """The loaders that read this kind of folder."""
    engine = lambda d: load(str(d), device="cpu", dtype="float32")
    anyl = lambda d: api.load_any(str(d))
    if kind == "w4":
        return [engine, anyl, lambda d: load_quantized(d)]
    return [engine, anyl]


def _all_fail(kind, d, *needles):
    for read in _readers(kind):
        with pytest.raises(ERRORS) as e:
            read(d)
        for n in needles:
            assert n in str(e.value), (read, str(e.value))


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_truncated_safetensors(good, tmp_path, kind):
    d, f = _copy(good, kind, tmp_path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _all_fail(kind, d, str(f), "not a readable safetensors file")


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_corrupted_safetensors_header(good, tmp_path, kind):
    d, f = _copy(good, kind, tmp_path)
    b = bytearray(f.read_bytes())
    b[8:40] = b"\x00" * 32  # the JSON header
    f.write_bytes(bytes(b))
    _all_fail(kind, d, str(f))
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # a header length far past the end
    _all_fail(kind, d, str(f))


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_shapes_disagree_with_config(good, tmp_path, kind):
    k = "model.layers.1.mlp.down_proj." + ("weight" if kind == "fp" else "qweight")
    d, f = _copy(good, kind, tmp_path, k)
    t = load_file(f)
    t[k] = t[k][:, :-1].contiguous() if kind == "fp" else t[k][:-32].contiguous()
    save_file(t, f, metadata={"format": "pt"})
    _all_fail(kind, d, "model.layers.1.mlp.down_proj")


def test_config_shape_change_is_caught_too(good, tmp_path):
    """The other side: config.json edited, files unchanged."""
    d, _ = _copy(good, "w4", tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 160
    (d / "config.json").write_text(json.dumps(c))
    _all_fail("w4", d, "mlp")


@pytest.mark.parametrize("qc", [{"quant_method": "gptq", "bits": 4}, {"quant_method": "awq", "bits": 3},
                                {"quant_method": "awq", "version": "gemv"}, {"quant_method": "awq",
                                                                             "zero_point": False}])
def test_unsupported_quantization_config(good, tmp_path, qc):
    d, _ = _copy(good, "w4", tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(c))
    for read in (lambda: load(str(d), device="cpu"), lambda: load_quantized(d)):
        with pytest.raises(CheckpointError, match="is not supported") as e:
            read()
        assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_missing_tokenizer_files(good, tmp_path, kind):
    d, _ = _copy(good, kind, tmp_path)
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    _all_fail(kind, d, str(d), "no tokenizer files")


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_broken_config_and_index(good, tmp_path, kind):
    d, _ = _copy(good, kind, tmp_path)
    (d / "config.json").write_text("{not json")
    _all_fail(kind, d, "config.json")
    if kind == "w4":
        shutil.copy(good[kind] / "config.json", d / "config.json")
        (d / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
        _all_fail(kind, d, "model.safetensors.index.json")
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
        _all_fail(kind, d, "model.safetensors.index.json")


@pytest.mark.parametrize("change", ["int_norm", "int_qweight", "stray_qweight", "flat_qweight"])
def test_wrong_dtypes_and_stray_tensors(good, tmp_path, change):
    """What the fuzzer found: dtypes the loaders once passed on to the kernels, names that are no layer."""
    q = "model.layers.0.mlp.down_proj.qweight"
    d, f = _copy(good, "w4", tmp_path, q)
    t = load_file(f)
    name = {"int_norm": "model.layers.0.input_layernorm.weight",
            "stray_qweight": "model.layers.0.mlp.down_proj.scales.qweight"}.get(change, q)
    if change == "int_norm":
        t[name] = t[name].to(torch.int16)
    elif change == "int_qweight":
        t[q] = t[q].float()
    elif change == "stray_qweight":
        t[name] = t[q].clone()
    else:
        t[q] = t[q].flatten().contiguous()
    save_file(t, f, metadata={"format": "pt"})
    _all_fail("w4", d, name)


@pytest.mark.parametrize("kind", ["fp", "w4"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights(good, tmp_path, kind, value):
    d, f = _copy(good, kind, tmp_path)
    t = load_file(f)
    k = "model.layers.0.input_layernorm.weight"
    t[k][3] = value
    save_file(t, f, metadata={"format": "pt"})
    _all_fail(kind, d, k, "NaN/inf")


def test_nonfinite_weights_quantize_writes_nothing(good, tmp_path):
    d, f = _copy(good, "fp", tmp_path, "model.layers.1.self_attn.o_proj.weight")
    t = load_file(f)
    t["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="o_proj"):
        api.quantize(str(d), out, QuantConfig(4, 32), "rtn", progress=False, device="cpu", dtype="float32")
    m = tiny_model("llama")  # in memory too
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[1, 2] = float("inf")
    with pytest.raises(CheckpointError, match="up_proj"):
        api.quantize(None, out, QuantConfig(4, 32), "rtn", loaded=(m, tiny_tokenizer()), progress=False,
                     device="cpu", dtype="float32")
    assert not out.exists()  # out.partial may hold the resume state of the lazy run, never `out`


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    """A run that dies while writing (here: in the quantizer after the writer opened) leaves an existing
    `out` untouched; what it wrote is in `out.partial`, which no loader takes for a checkpoint."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(api, "quantize_model", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        api.quantize(None, out, QuantConfig(4, 32), "rtn", loaded=(tiny_model("llama"), tiny_tokenizer()),
                     progress=False, device="cpu", dtype="float32", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep"] and (out / "keep").read_text() == "old"
    partial = tmp_path / "out.partial"
    if partial.exists():
        for read in (lambda: load_quantized(partial), lambda: load(str(partial), device="cpu")):
            with pytest.raises(ERRORS):
                read()


def test_gguf_that_is_not_a_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("SALIENCE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ModelError, match="not a GGUF file"):
        load(str(fake), device="cpu")
    trunc = tmp_path / "trunc.gguf"  # right magic, then cut short
    trunc.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 2) + b"\x00" * 9)
    for read in (lambda: load(str(trunc), device="cpu"), lambda: api.load_any(str(trunc))):
        with pytest.raises(ModelError, match="not a readable GGUF") as e:
            read()
        assert str(trunc) in str(e.value)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="must be a .gguf"):
        load(str(txt), device="cpu")


def test_pickle_only_folder_is_refused(good, tmp_path):
    d, f = _copy(good, "fp", tmp_path)
    f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelError, match="--allow-pickle"):
        api.load_any(str(d))


@pytest.mark.parametrize("text, match", [("", "no text"), ("a few words only", "fewer than seqlen")])
def test_empty_or_tiny_calibration_text(tmp_path, text, match):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match) as e:
        api.quantize(None, out, QuantConfig(4, 32), "awq", calib=str(calib), seqlen=64, n_rows=4,
                     loaded=(tiny_model("llama"), tiny_tokenizer()), progress=False, device="cpu", dtype="float32")
    assert str(calib) in str(e.value)
    assert not out.exists()


def test_cli_reports_one_line(good, tmp_path, capsys):
    from salience.cli import main

    d, f = _copy(good, "w4", tmp_path)
    f.write_bytes(f.read_bytes()[:100])
    assert main(["generate", str(d), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("salience: error: ") and str(f) in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["fp", "w4"])
def test_missing_tensor(good, tmp_path, kind):
    """transformers would fill a missing weight with random values and go on; every loader refuses."""
    k = "model.layers.1.mlp.up_proj." + ("weight" if kind == "fp" else "qweight")
    d, f = _copy(good, kind, tmp_path, k)
    t = load_file(f)
    del t[k]
    save_file(t, f, metadata={"format": "pt"})
    _all_fail(kind, d, "model.layers.1.mlp.up_proj")
    if kind == "fp":
        with pytest.raises(ERRORS, match="up_proj"):
            api.quantize(str(d), tmp_path / "out", QuantConfig(4, 32), "rtn", progress=False, device="cpu",
                         dtype="float32")
