"""The engine on a GPU (skips without one): logits vs transformers, CUDA-graph decode == eager decode (dense
and 4-bit Triton kernels, batched with left padding), random Llama-shaped models for the benchmark."""

import pytest
import torch

from salience import api
from salience.engine import SamplingParams, load
from salience.engine.generate import Runner, generate_ids
from salience.engine.weights import from_hf_model, random_model
from salience.quant import QuantConfig

from tiny import VOCAB, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]
DTYPES = {"llama": torch.float16, "qwen3": torch.float16, "gemma3_text": torch.bfloat16}  # gemma: no fp16


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_logits_on_cuda_match_transformers(name):
    m = tiny_model(name)
    e = from_hf_model(m, device="cuda", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    e.setup_cache(2, 64)
    with torch.no_grad():
        ref = m(ids).logits
        got = e(ids.cuda(), torch.arange(20, device="cuda"), kv_len=20, fresh=True).cpu()
        masked = e(ids.cuda(), torch.arange(20, device="cuda"), kv_len=20).cpu()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)  # TF32/SDPA kernels round differently
    torch.testing.assert_close(masked, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text"])
def test_cuda_graph_decode_equals_eager(name):
    e = from_hf_model(tiny_model(name), device="cuda", dtype=DTYPES[name])
    p = SamplingParams(max_new_tokens=16)
    eager = generate_ids(Runner(e, cuda_graph=False), PROMPTS, p)  # compiled ops, no graph
    graph = Runner(e, cuda_graph=True)
    assert generate_ids(graph, PROMPTS, p) == eager  # batched, left-padded
    assert graph.graph is not None and graph.ops.compiled
    assert [generate_ids(graph, [q], p)[0] for q in PROMPTS] == eager  # batch 1, re-captured


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_compiled_ops_equal_eager_ops(name):
    """fp32, so that fusion's different rounding cannot flip a greedy choice."""
    e = from_hf_model(tiny_model(name), device="cuda", dtype=torch.float32)
    p = SamplingParams(max_new_tokens=16)
    assert generate_ids(Runner(e, compile=False), PROMPTS, p) == generate_ids(Runner(e), PROMPTS, p)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_w4_on_cuda(name, tmp_path):
    """Triton kernels under a CUDA graph: the same tokens as eager; logits close to the exact fp32 CPU path."""
    path = tmp_path / name
    api.quantize(None, path, QuantConfig(4, 32), "rtn", loaded=(tiny_model(name), tiny_tokenizer()),
                 progress=False, device="cpu", dtype="float32")
    dt = "bfloat16" if name == "gemma3_text" else "float16"
    eng = load(str(path), device="cuda", dtype=dt)
    assert eng.kind == "engine" and eng.runner.model.layers[0].attn.wqkv.p.layout == "triton"
    p = SamplingParams(max_new_tokens=16)
    eager = generate_ids(Runner(eng.runner.model, cuda_graph=False), PROMPTS, p)
    assert generate_ids(eng.runner, PROMPTS, p) == eager
    ref = load(str(path), device="cpu", dtype="float32").runner.model
    ids = torch.tensor([PROMPTS[2]])
    ref.setup_cache(1, 64)
    e = eng.runner.model
    e.setup_cache(1, 64)
    with torch.no_grad():
        want = ref(ids, torch.arange(12), kv_len=12, fresh=True)
        got = e(ids.cuda(), torch.arange(12, device="cuda"), kv_len=12, fresh=True).float().cpu()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    text = "".join(eng.stream("the quick", SamplingParams(max_new_tokens=8)))
    assert isinstance(text, str)


@pytest.mark.parametrize("group_size", [None, 128])
def test_random_model_generates(group_size):
    m = random_model("tiny", group_size, "cuda", torch.float16)
    r = Runner(m)
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompts = [list(range(10, 50)), list(range(60, 70)), list(range(5, 105)), [7]]
    out = generate_ids(r, prompts, p)
    assert [len(o) for o in out] == [12] * 4
    assert out == generate_ids(Runner(m, cuda_graph=False), prompts, p)


def test_bench_smoke(tmp_path):
    from salience.engine import bench

    bench.main(["--shapes", "tiny", "--batch", "1", "4", "--prompt", "32", "--new-tokens", "8",
                "--hf-static", "1x32", "--out", str(tmp_path / "d")])
    text = (tmp_path / "d.md").read_text()
    assert "engine-w4" in text and "hf-static" in text and "error" not in text.lower()


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_continuous_batching_graphs(name):
    """Continuous batching on the GPU: rows joining and leaving (moved down into freed rows), decoded
    through CUDA graphs of row and span buckets == op by op == each prompt alone; warm() captures every
    bucket."""
    from test_engine import CB_PROMPTS, _continuous

    e = from_hf_model(tiny_model(name), device="cuda", dtype=DTYPES[name])
    n_tokens = [12, 5, 9, 14, 7]
    eager = Runner(e, cuda_graph=False)
    alone = [generate_ids(eager, [q], SamplingParams(max_new_tokens=n))[0] for q, n in zip(CB_PROMPTS, n_tokens)]
    graph = Runner(e)
    for rows, arrivals in [(3, [0, 0, 3, 4, 4]), (8, [0, 2, 2, 5, 11])]:
        assert _continuous(eager, CB_PROMPTS, arrivals, n_tokens, rows, slots=300, compact=True) == alone
        assert _continuous(graph, CB_PROMPTS, arrivals, n_tokens, rows, slots=300, compact=True) == alone
        assert graph.row_graphs and graph.graphs
    graph.open(6, 300)
    graph.warm()
    assert sorted(graph.row_graphs) == [(b, s) for b in (1, 2, 4, 6) for s in (256, 300)]
