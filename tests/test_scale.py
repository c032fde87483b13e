"""Lazy block-by-block loading and resume: the lazy path writes the same checkpoint as the in-memory one,
and a run killed with SIGKILL at any point, restarted with the same command, writes the same bytes as an
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from salience import api, awq
from salience.checkpoint import INDEX, REPORT, RESUME, SEARCH, CheckpointError, load_quantized
from salience.models import ModelError, load_fp
from salience.quant import QuantConfig

from tiny import CONFIGS, perturb_norms, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"story {i}: the quick brown fox jumps over the lazy dog near the river bank." * 4
                   for i in range(60))


def _folder(tmp_path, model_type="llama", layers=2, dtype=torch.float32):
    if layers == 2:
        m = tiny_model(model_type, dtype=dtype)
    else:
        torch.manual_seed(0)
        cfg = CONFIGS[model_type]()
        cfg.num_hidden_layers = layers
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        perturb_norms(m)
    path = tmp_path / f"tiny-{model_type}"
    m.save_pretrained(path, max_shard_size="100KB")  # several shards + index: blocks span shards
    tiny_tokenizer().save_pretrained(path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    return path, text


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            out.update({f"{f.name == SEARCH}:{k}": sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.mark.parametrize("model_type,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16),
                                              ("gemma3_text", torch.bfloat16), ("phi3", torch.float32)])
def test_lazy_checkpoint_equals_in_memory(tmp_path, model_type, dtype):
    folder, text = _folder(tmp_path, model_type, dtype=dtype)
    kw = dict(calib=str(text), n_rows=8, seqlen=32, device="cpu", dtype="bfloat16", progress=False)
    lazy_out, fq, _ = api.quantize(str(folder), tmp_path / "lazy", QuantConfig(4, 32), **kw)
    assert fq is None  # nothing of the model was kept
    report = json.loads((lazy_out / REPORT).read_text())
    assert report["compute"]["lazy"] and len(list(lazy_out.glob("model-*-of-00003.safetensors"))) == 3
    mem_out, _, _ = api.quantize(None, tmp_path / "mem", QuantConfig(4, 32),
                                 loaded=load_fp(str(folder), dtype=torch.bfloat16)[:2], **kw)
    a, b = _tensors(lazy_out), _tensors(mem_out)
    assert a.keys() == b.keys() and any(k.endswith("qweight") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((lazy_out / INDEX).read_text()) == json.loads((mem_out / INDEX).read_text())
    load_quantized(lazy_out)


def test_paneled_grams_give_a_valid_checkpoint(tmp_path, monkeypatch):
    """The lazy, resumable path with every Gram kept as panels of its upper triangle (a 0-byte threshold,
    32-row panels): a checkpoint that loads, with the tensors of the default run up to rounding flips."""
    from salience import quantize as Q

    folder, text = _folder(tmp_path)
    kw = dict(calib=str(text), n_rows=8, seqlen=32, device="cpu", dtype="bfloat16", progress=False)
    ref, _, _ = api.quantize(str(folder), tmp_path / "ref", QuantConfig(4, 32), **kw)
    monkeypatch.setattr(Q, "PANEL_ROWS", 32)
    monkeypatch.setattr(api, "quantize_model", lambda *a, **k: Q.quantize_model(*a, **k, gram_whole_max=0))
    out, _, _ = api.quantize(str(folder), tmp_path / "panels", QuantConfig(4, 32), **kw)
    a, b = _tensors(ref), _tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] == b[k]).float().mean() > 0.99, k
    ra, rb = ([g["loss"] for blk in json.loads((d / REPORT).read_text())["blocks"]
               for g in blk["groups"].values()] for d in (ref, out))
    assert len(ra) == 8 and ra != rb  # 4 groups a block (MHA: v -> o too); not bit-equal: panels ran
    torch.testing.assert_close(torch.tensor(rb), torch.tensor(ra), rtol=1e-4, atol=0)
    load_quantized(out)


def test_resume_activations_round_trip(tmp_path):
    """The writer saves the caller's activation buffer (no copy of its own: the caller waits before
    overwriting it) and a rerun reads it back into a buffer of the same shape and dtype, refusing others."""
    from salience.checkpoint import CheckpointWriter

    x = torch.randn(3, 5, 8).bfloat16()
    w = CheckpointWriter(tmp_path / "out", n_shards=3, run={"id": 1})
    w.write_block(0, {"a": torch.ones(2)}, {}, {"block": 0}, x)
    w.wait()
    w2 = CheckpointWriter(tmp_path / "out", n_shards=3, run={"id": 1})
    buf = torch.empty_like(x)
    assert w2.blocks_done == 1 and w2.read_activations(buf) and torch.equal(buf, x)
    with pytest.raises(CheckpointError, match="saved activations"):
        w2.read_activations(torch.empty(3, 5, 8))
    assert not CheckpointWriter(tmp_path / "other", n_shards=3, run={"id": 1}).read_activations(buf)


def _cli(folder, text, out, *extra, env=None):
    cmd = [sys.executable, "-m", "salience.cli", "quantize", "--model", str(folder), "--out", str(out),
           "--group-size", "32", "--calib", str(text), "--calib-rows", "8", "--seqlen", "32", "--device", "cpu",
           *extra]
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _same_checkpoint(a: Path, b: Path):
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        if f == REPORT:
            ra, rb = (json.loads((d / f).read_text()) for d in (a, b))
            for r in (ra, rb):
                r.pop("seconds"), r.pop("resumed_at_block")
                for blk in r["blocks"]:
                    blk.pop("seconds"), blk.pop("phases")
            assert ra == rb
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    folder, text = _folder(tmp, layers=4)
    out = tmp / "ref"
    p = _cli(folder, text, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return folder, text, out


@pytest.mark.parametrize("point", ["rest", "shard1", "commit1", "commit3"])
def test_kill9_and_rerun_gives_identical_checkpoint(tmp_path, uninterrupted, point):
    """SIGKILL after the first shard is written but before any manifest (rest: the rerun starts over),
    while block 1's shard is on disk but not recorded (shard1), after block 1 is recorded (commit1), or
    after the last block, before the folder is completed (commit3); then the same command."""
    folder, text, ref = uninterrupted
    out = tmp_path / "out"
    marker = tmp_path / "stalled"
    p = _cli(folder, text, out, env={"SALIENCE_TEST_STALL": f"{point}:{marker}"})
    t0 = time.time()
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = out.with_name("out.partial")
    assert not out.exists() and partial.exists()
    # an unfinished run is never taken for a checkpoint
    with pytest.raises(ModelError, match="unfinished"):
        api.load_any(str(partial))
    with pytest.raises(CheckpointError, match="unfinished"):
        load_quantized(partial)
    done = len(json.loads((partial / RESUME).read_text())["blocks"]) if point != "rest" else 0
    assert done == {"rest": 0, "shard1": 1, "commit1": 2, "commit3": 4}[point]
    assert (partial / RESUME).exists() == (point != "rest")
    p = _cli(folder, text, out)
    stdout, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert (f"resuming {partial}: {done} of 4 blocks already done" in stdout) == (done > 0)
    assert json.loads((out / REPORT).read_text())["resumed_at_block"] == done
    assert not partial.exists()
    _same_checkpoint(out, ref)


def test_rerun_with_other_settings_is_refused(tmp_path, uninterrupted):
    folder, text, ref = uninterrupted
    out = tmp_path / "out"
    marker = tmp_path / "stalled"
    p = _cli(folder, text, out, env={"SALIENCE_TEST_STALL": f"commit0:{marker}"})
    while not marker.exists():
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    p = _cli(folder, text, out, "--calib-rows", "4")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "unfinished run" in err and "--restart" in err and "rows: 8 there, 4 now" in err
    p = _cli(folder, text, out, "--restart")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    _same_checkpoint(out, ref)


def test_chunked_gram_error_matches_one_chunk():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(500, 64)
    s = torch.rand(64) + 0.5
    g = x.t() @ x
    cfg = QuantConfig(4, 32)
    one = awq.scaled_gram_error(w, s, cfg, g)
    assert torch.equal(one, awq.gram_loss(awq.scaled_fake_quant(w, s, cfg) - w, g))
    torch.testing.assert_close(awq.scaled_gram_error(w, s, cfg, g, max_elems=64 * 10), one, rtol=1e-5, atol=0)


def test_quantize_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/quantize.py end to end on a tiny shape, 2 of its 4 blocks (extrapolated)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quantize.py"), "--models", "tiny:2", "--device",
                        "cpu", "--rows", "4", "--seqlen", "64", "--dir", str(tmp_path / "work"), "--results",
                        str(tmp_path / "res")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    e = json.loads((tmp_path / "res" / "quantize.json").read_text())[0]
    assert e["extrapolated"] and e["blocks_measured"] == 2 and e["blocks_real"] == 4
    assert e["peak_vmhwm"] > 0 and len(e["block_seconds"]) == 2
    assert "extrapolated to 4" in (tmp_path / "res" / "quantize.md").read_text()
    assert not (tmp_path / "work" / "tiny-random").exists()  # scratch deleted
