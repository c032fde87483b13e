"""The engine's decode through the Triton decode-attention kernel (what CUDA runs) equals its SDPA path.

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
NAMES = ["llama", "qwen3", "mistral-window", "gemma3-mixed"]


def test_engine_attention_kernel_in_interpreter():
    """Without CUDA: this file's cases in a child process under Triton's interpreter."""
    if not RUN_HERE:
        print(rerun_under_interpreter(__file__))


def _model(name, dtype):
    from salience.engine.weights import from_hf_model
    try:
        from test_engine import _model as hf_model
    except ImportError:
        from tests.test_engine import _model as hf_model
    return from_hf_model(hf_model(name)).to(DEV, dtype)


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
@pytest.mark.parametrize("name", NAMES)
def test_decode_kernel_greedy_equals_sdpa_fp32(name):
    """fp32 (exact products in the kernel): greedy tokens of left-padded batched prompts (shared slots)
    and of rows joining a running loop (per-row slots, sliding windows shorter than the prompts) are
    the same with the kernel and with SDPA."""
    from salience.engine.generate import Runner, SamplingParams, generate_ids
    try:
        from test_engine import CB_PROMPTS, PROMPTS, _continuous
    except ImportError:
        from tests.test_engine import CB_PROMPTS, PROMPTS, _continuous
    model = _model(name, torch.float32)
    runs = {}
    for kernel in (False, True):
        model.attn_kernel = kernel
        r = Runner(model, cuda_graph=False, compile=False)
        runs[kernel] = (generate_ids(r, PROMPTS, SamplingParams(max_new_tokens=10)),
                        _continuous(r, CB_PROMPTS, [0, 2, 2, 5, 6], [8, 5, 9, 6, 7], rows=3))
    assert runs[True] == runs[False]


@pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child (or on CUDA)")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_logits_close_16bit(name, dtype):
    """fp16/bf16: six teacher-forced decode steps of a left-padded batch, logits within the dtype's
    rounding of the SDPA path (greedy tokens may flip on near-ties, so they are compared in fp32)."""
    from salience.engine.generate import Runner
    model = _model(name, dtype)
    out = {}
    for kernel in (False, True):
        model.attn_kernel = kernel
        r = Runner(model, cuda_graph=False, compile=False)
        r.reset(2, 40)
        ids = torch.tensor([[0, 0, 5, 6, 7, 9, 10, 11], [3, 4, 5, 6, 7, 9, 10, 11]], device=DEV)
        r.prefill(ids, torch.tensor([2, 0], device=DEV))
        out[kernel] = torch.stack([r.decode(torch.tensor([t, t + 1], device=DEV)).float() for t in range(8, 14)])
    err = (out[True] - out[False]).abs().max().item()
    assert err <= (0.03 if dtype == torch.bfloat16 else 0.004) * out[False].abs().max().item()
