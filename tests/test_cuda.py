"""The CUDA path end to end (runs on a GPU machine; CI has none, so these skip there): blocks quantized on
the GPU give the same checkpoint as on the CPU up to float rounding, and the reloaded model runs its
Triton kernels on the GPU with logits matching the dequantized reference."""

import pytest
import torch

from salience import api
from salience.checkpoint import load_quantized
from salience.nn import QuantLinear
from salience.quant import QuantConfig

from tiny import calib_file, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "phi3"])
def test_quantize_on_cuda_and_run_kernels(model_type, tmp_path):
    dtype = torch.bfloat16
    tok = tiny_tokenizer()
    calib = calib_file(tmp_path)
    ckpts = {}
    for device in ("cuda", "cpu"):
        m = tiny_model(model_type, dtype=dtype)
        out = tmp_path / f"ckpt-{device}"
        api.quantize(None, out, QuantConfig(4, 32), "awq", calib, n_rows=8, seqlen=32, device=device,
                     dtype=dtype, loaded=(m, tok), progress=False)
        ckpts[device] = out
    qm, _ = load_quantized(ckpts["cuda"], dtype=dtype, device="cuda")
    text = api.generate(qm, tok, "the fox", max_new_tokens=4, device="cuda")  # the Triton GEMV at M = 1
    assert isinstance(text, str)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        y = qm(ids.cuda()).logits.float().cpu()  # Triton GEMM at M = 48
        ref = {d: _dequantized_fp32(load_quantized(ckpts[d], dtype=dtype)[0])(ids).logits for d in ckpts}
        fp = tiny_model(model_type, dtype=torch.float32)(ids).logits
    # the kernels compute what the checkpoint says
    torch.testing.assert_close(y, ref["cuda"], rtol=0.05, atol=0.05)
    # bf16 matmuls round differently on the GPU and flip near-ties of the grid searches, so the two
    # checkpoints differ in places; their error against full precision must be alike
    err = {d: float(((r - fp) ** 2).mean()) for d, r in ref.items()}
    assert err["cuda"] < 1.5 * err["cpu"] + 1e-6, err


def _dequantized_fp32(model):
    """The model on the CPU in fp32, QuantLinears computing with their dequantized weights (the spec)."""
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.forward = (lambda m: lambda x: torch.nn.functional.linear(
                x, m.dequantized_weight(x.dtype), None if m.bias is None else m.bias.to(x.dtype)))(mod)
    return model.float()


def test_lazy_and_resume_on_cuda(tmp_path):
    """On the GPU too: the lazy path writes the in-memory path's bytes, and a run killed after block 1 and
    rerun writes the uninterrupted run's bytes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_scale import _folder, _same_checkpoint, _tensors
    from salience.models import load_fp

    folder, text = _folder(tmp_path, layers=4)
    kw = dict(calib=str(text), n_rows=8, seqlen=32, device="cuda", dtype="bfloat16", progress=False)
    lazy, _, _ = api.quantize(str(folder), tmp_path / "lazy", QuantConfig(4, 32), **kw)
    mem, _, _ = api.quantize(None, tmp_path / "mem", QuantConfig(4, 32),
                             loaded=load_fp(str(folder), dtype=torch.bfloat16)[:2], **kw)
    a, b = _tensors(lazy), _tensors(mem)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "salience.cli", "quantize", "--model", str(folder), "--group-size", "32",
           "--calib", str(text), "--calib-rows", "8", "--seqlen", "32", "--device", "cuda"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    assert subprocess.run(cmd + ["--out", str(tmp_path / "ref")], env=env).returncode == 0
    marker = tmp_path / "stalled"
    p = subprocess.Popen(cmd + ["--out", str(tmp_path / "out")],
                         env={**env, "SALIENCE_TEST_STALL": f"commit1:{marker}"})
    while not marker.exists():
        assert p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert subprocess.run(cmd + ["--out", str(tmp_path / "out")], env=env).returncode == 0
    _same_checkpoint(tmp_path / "out", tmp_path / "ref")


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_passes_and_host_activations_on_cuda(model_type):
    """The GPU default (Grams of a few groups per pass, activations in pinned host memory) computes the same
    bits as one pass with all Grams at once: repeated forward passes are deterministic on the GPU too."""
    from salience import quantize as Q
    from salience.arch import arch_for

    rows = torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(1))
    out = {}
    for gram_bytes in (None, float("inf"), 0):
        m = tiny_model(model_type, dtype=torch.bfloat16)
        reps = Q.quantize_model(m, arch_for(m.config), QuantConfig(4, 32), rows, Q.awq.SearchConfig(),
                                device="cuda", dtype=torch.bfloat16, batch_size=4, progress=False,
                                gram_bytes=gram_bytes)
        out[gram_bytes] = (m.state_dict(), [r["passes"] for r in reps])
    assert out[None][1][0] > 1 and out[float("inf")][1] == [1, 1]
    ref = out[float("inf")][0]
    for sd, _ in out.values():
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_gptq_rounding_on_cuda():
    """GPTQ rounding (opt-in) runs on the GPU: the quantized model's error against full precision is like
    the CPU run's (bf16 matmuls and the Cholesky round differently on the GPU, so codes may differ)."""
    from salience import quantize as Q
    from salience.arch import arch_for

    rows = torch.randint(0, 300, (6, 40), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    fp = tiny_model("llama", dtype=torch.float32)(ids).logits
    err = {}
    for device in ("cuda", "cpu"):
        m = tiny_model("llama", dtype=torch.bfloat16)
        Q.quantize_model(m, arch_for(m.config), QuantConfig(4, 32), rows, Q.awq.SearchConfig(rounding="gptq"),
                         device=device, dtype=torch.bfloat16, batch_size=4, progress=False)
        with torch.no_grad():
            err[device] = float(((m.float()(ids).logits - fp) ** 2).mean())
    assert err["cuda"] < 1.5 * err["cpu"] + 1e-6, err
