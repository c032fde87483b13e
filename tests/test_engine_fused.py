"""The engine's fused one-token decode (norms, activation and residual adds inside the 4-bit GEMVs, see
Block.fused_forward) equals its unfused decode on 4-bit models in the Triton layout.

Without CUDA the cases run in a child process under Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported; see test_kernels_triton.py)."""

import os

import pytest
import torch

try:
    from interpreter import rerun_under_interpreter
except ImportError:  # tests/ imported as a package
    from tests.interpreter import rerun_under_interpreter

CUDA = torch.cuda.is_available()
RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if CUDA else "cpu"


def test_engine_fused_in_interpreter():
    """Without CUDA: this file's cases in a child process under Triton's interpreter."""
    if not RUN_HERE:
        print(rerun_under_interpreter(__file__))


@pytest.fixture(scope="module")
def w4_triton(tmp_path_factory):
    """name -> a loader of tiny RTN w4 g32 checkpoints as engine models in the Triton layout on DEV (on CPU
    that layout serves the interpreter; the engine would otherwise pick tinygemm's there)."""
    from salience import api
    from salience.engine import weights
    from salience.kernels import PackedInt4
    from salience.quant import QuantConfig
    try:
        from tiny import tiny_model, tiny_tokenizer
    except ImportError:
        from tests.tiny import tiny_model, tiny_tokenizer

    paths = {}

    def load(name, dtype):
        if name not in paths:
            paths[name] = tmp_path_factory.mktemp("w4") / name
            api.quantize(None, paths[name], QuantConfig(4, 32), "rtn", loaded=(tiny_model(name), tiny_tokenizer()),
                         progress=False, device="cpu", dtype="float32")
        mp = pytest.MonkeyPatch()
        mp.setattr(PackedInt4, "from_awq", classmethod(
            lambda cls, qw, qz, sc, gs, device=None, dtype=torch.float16:
            cls.for_triton(qw.to(DEV), qz.to(DEV), sc.to(DEV), gs, dtype)))
        try:
            return weights.from_folder(paths[name], device=DEV, dtype=dtype)
        finally:
            mp.undo()

    return load


def _decode_logits(model, steps: int = 6):
    """Prefill a 7-token prompt (batch 1), then `steps` teacher-forced decode steps: logits [steps, vocab]."""
    from salience.engine.generate import Runner

    r = Runner(model, cuda_graph=False, compile=False)
    r.reset(1, 32)
    ids = torch.tensor([[3, 4, 5, 6, 7, 9, 10]], device=DEV)
    r.prefill(ids, torch.tensor([0], device=DEV))
    return torch.stack([r.decode(torch.tensor([t], device=DEV))[0].float() for t in range(11, 11 + steps)])


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2"])  # qwen2: bias on q/k/v
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_decode_equals_unfused(w4_triton, name, dtype, monkeypatch):
    """Batch-1 decode logits with the fused kernels are within the dtype's rounding of the unfused ops,
    and the fused path did run (the GEMVs received the norms' RMS rows, the GLU, residuals and emits)."""
    from salience.kernels import triton_int4 as T

    model = w4_triton(name, dtype)
    x = torch.zeros(1, 1, model.c.dim, device=DEV, dtype=dtype)
    assert all(layer.fused(x) for layer in model.layers)
    seen = []
    gemv = T.gemv

    def spy(*a, **kw):
        seen.append(tuple(k for k in ("rms", "glu", "residual", "emit") if kw.get(k) is not None))
        return gemv(*a, **kw)

    monkeypatch.setattr(T, "gemv", spy)
    out = {}
    for fuse in (False, True):
        model.fuse_linears = fuse
        seen.clear()
        out[fuse] = _decode_logits(model)
        kinds = set(seen)
        if fuse:  # per block: wqkv (rms), wo (residual, emit), w13 (rms, glu), w2 (residual, emit; last: residual)
            assert kinds == {("rms",), ("residual", "emit"), ("rms", "glu"), ("residual",)}
        else:
            assert kinds == {()}
    err = (out[True] - out[False]).abs().max().item()
    assert err <= (0.03 if dtype == torch.bfloat16 else 0.004) * out[False].abs().max().item()


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
def test_sandwich_norms_are_not_fused(w4_triton):
    """gemma3 norms a linear's output before the residual add (and applies norm weights as 1 + w): its
    blocks keep the unfused ops."""
    model = w4_triton("gemma3_text", torch.bfloat16)
    x = torch.zeros(1, 1, model.c.dim, device=DEV, dtype=torch.bfloat16)
    assert not any(layer.fused(x) for layer in model.layers)
    assert torch.isfinite(_decode_logits(model, steps=2)).all()


if not RUN_HERE:  # the cases run in the child process (test_engine_fused_in_interpreter)
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        if _name != "test_engine_fused_in_interpreter":
            del globals()[_name]
