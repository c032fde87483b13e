"""`salience serve` as a real subprocess on a loopback port, driven by the official `openai` client: completions,
chat, streaming, stop strings, max_tokens, usage, batching of concurrent requests, API key, and bad requests
that get 4xx OpenAI-schema errors while the server keeps serving. Plus the request parser on its own
(including a short hypothesis fuzz; benchmarks/fuzz.py runs the long one)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_model, tiny_tokenizer

from salience import api
from salience.quant import QuantConfig
from salience.serve import Request, RequestError, parse_request

KEY = "sk-test-123"
NAME = "tiny-w4"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, key=KEY):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read())


def _post(url, data: bytes, key=KEY):
    """-> (status, parsed JSON) also for 4xx."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny RTN w4 Llama checkpoint (with a chat template) served by `python -m salience.cli serve`."""
    path = tmp_path_factory.mktemp("serve") / NAME
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    api.quantize(None, path, QuantConfig(4, 32), "rtn", loaded=(tiny_model("llama"), tok), progress=False,
                 device="cpu", dtype="float32")
    port = _free_port()
    log = open(path.parent / "server.log", "w+")  # noqa: SIM115 - open for the server's lifetime
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "salience.cli", "serve", str(path), "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--api-key", KEY, "--max-batch", "8"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            _get(base + "/health")
            break
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"server did not start:\n{log.read()}") from None
            time.sleep(0.3)
    yield base, proc
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_max_tokens_and_usage(client):
    r = client.completions.create(model=NAME, prompt="the quick brown", max_tokens=7, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == 7 if c.finish_reason == "length" else r.usage.completion_tokens <= 7
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.completions.create(model=NAME, prompt="the quick brown", max_tokens=7, temperature=0)
    assert again.choices[0].text == c.text  # greedy is deterministic


def test_completion_several_prompts(client):
    r = client.completions.create(model=NAME, prompt=["the quick", "over the lazy dog and"], max_tokens=5,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    one = client.completions.create(model=NAME, prompt="over the lazy dog and", max_tokens=5, temperature=0)
    assert r.choices[1].text == one.choices[0].text  # batched (left-padded) == alone


def test_stop_string(client):
    full = client.completions.create(model=NAME, prompt="the sun sets", max_tokens=24, temperature=0).choices[0]
    assert len(full.text) >= 6, full.text
    stop = full.text[3:5]
    cut = client.completions.create(model=NAME, prompt="the sun sets", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[: full.text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_stream(client):
    ref = client.completions.create(model=NAME, prompt="birds sing", max_tokens=12, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=NAME, prompt="birds sing", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 12


def test_chat_and_chat_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_sse_framing(server):
    """Raw bytes: `data: {...}\\n\\n` events, `data: [DONE]` last."""
    req = urllib.request.Request(server[0] + "/v1/completions", method="POST", data=json.dumps(
        {"model": NAME, "prompt": "the", "max_tokens": 3, "temperature": 0, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and json.loads(e[6:])["object"] == "text_completion"


def test_concurrent_streams_are_batched(server, client):
    prompts = [f"the quick brown fox {'jumps ' * i}" for i in range(8)]
    ref = [client.completions.create(model=NAME, prompt=q, max_tokens=16, temperature=0).choices[0].text
           for q in prompts]
    before = _get(server[0] + "/health")[1]
    got = [None] * len(prompts)

    def one(i):
        s = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=16, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in s if c.choices)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = _get(server[0] + "/health")[1]
    assert got == ref
    assert after["rows"] - before["rows"] == 8
    assert after["batches"] - before["batches"] < 8  # at least some requests shared a batch


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ({"model": NAME, "prompt": "hi", "max_tokens": -1}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "hi", "temperature": "hot"}, 400, "invalid_type"),
    ({"model": NAME, "prompt": "hi", "n": 3}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "hi", "bogus": 1}, 400, "unknown_parameter"),
    ({"model": NAME}, 400, "missing_required_parameter"),
    ({"model": NAME, "prompt": ""}, 400, "invalid_value"),
    ({"model": NAME, "prompt": [1, 2, 99999]}, 400, "invalid_value"),
    ({"model": NAME, "prompt": "the quick brown fox " * 200}, 400, "context_length_exceeded"),
    ({"model": NAME, "prompt": "hi", "max_tokens": 10 ** 6}, 400, "context_length_exceeded"),
])
def test_bad_completion_requests(server, client, body, status, code):
    got, err = _post(server[0] + "/v1/completions", json.dumps(body).encode())
    assert got == status and err["error"]["code"] == code and err["error"]["message"]
    assert set(err["error"]) == {"message", "type", "param", "code"}
    test_models(client)  # still serving


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe", b"[" * 100000])
def test_malformed_json(server, client, raw):
    got, err = _post(server[0] + "/v1/chat/completions", raw)
    assert got == 400 and err["error"]["type"] == "invalid_request_error"
    test_models(client)


def test_bad_chat_requests_through_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x " * 400}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=-5)
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).usage.completion_tokens <= 2


def test_api_key(server):
    base = server[0]
    for key in (None, "wrong"):
        got, err = _post(base + "/v1/completions", json.dumps({"model": NAME, "prompt": "hi"}).encode(), key=key)
        assert got == 401 and err["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert _get(base + "/health", key=None)[0] == 200  # health needs no key


def test_unknown_route_and_method(server):
    got, err = _post(server[0] + "/v1/embeddings", b"{}")
    assert got == 404 and err["error"]["code"] == "not_found"
    req = urllib.request.Request(server[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


# ---- the parser alone

def test_parse_request_defaults_and_fields():
    r = parse_request("chat", json.dumps({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
        "presence_penalty": 0, "n": 1}).encode(), {"m"})
    assert r.messages == [{"role": "system", "content": "ab"}] and r.max_tokens == 5 and r.stop == ["x"]
    assert r.stream and r.include_usage and r.temperature == 1.0 and r.seed is None


def test_parse_request_rejects_numbers_out_of_range():
    for body in ({"temperature": 1e400}, {"top_p": 0}, {"max_tokens": True}, {"seed": -1}, {"max_tokens": 1.5},
                 {"presence_penalty": 0.5}, {"stop": ["a"] * 5}, {"stream_options": {"include_usage": True}}):
        raw = json.dumps({"model": "m", "prompt": "p", **body}).encode() if "temperature" not in body else \
            b'{"model": "m", "prompt": "p", "temperature": 1e400}'
        with pytest.raises(RequestError) as e:
            parse_request("completion", raw, {"m"})
        assert e.value.status == 400
    # found by benchmarks/fuzz.py: an unhashable role was looked up in a set (TypeError, a 500)
    with pytest.raises(RequestError, match="role"):
        parse_request("chat", b'{"model": "m", "messages": [{"role": [1], "content": "x"}]}', {"m"})


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                    max_leaves=12)
KEYS = st.sampled_from(sorted({"model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop",
                               "stream", "stream_options", "n", "seed", "top_k", "logprobs", "role", "content"}))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["completion", "chat"]), raw=st.binary(max_size=200)
       | st.dictionaries(KEYS, JSON, max_size=6).map(lambda d: json.dumps(d).encode()))
def test_fuzz_parse_request_short(kind, raw):
    """Any bytes: a Request or a RequestError with a 4xx status, never another exception."""
    try:
        parse_request(kind, raw, {"m"})
    except RequestError as e:
        assert 400 <= e.status < 500 and e.message


def test_body_too_large(server, client):
    got, err = _post(server[0] + "/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (9 << 20) + b'"}')
    assert got == 413 and err["error"]["message"]
    test_models(client)


def test_client_that_goes_away_frees_its_row(server, client):
    """Read two chunks of a long stream, hang up; the server stops that row and keeps serving."""
    s = client.completions.create(model=NAME, prompt="the quick", max_tokens=200, temperature=0, stream=True)
    it = iter(s)
    next(it), next(it)
    s.close()
    r = client.completions.create(model=NAME, prompt="the quick", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_chat_without_max_tokens_fills_the_context(client):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "the quick brown"}],
                                       temperature=0)
    assert r.usage.total_tokens <= 256  # the tiny model's positions
    assert r.choices[0].finish_reason == "stop" or r.usage.total_tokens == 256


def test_admit_fifo_rows_and_cache_shapes():
    """The scheduler's admission, without a thread or a model: FIFO into free rows; a job that needs longer
    rows than the cache has waits (with the jobs behind it) until the running rows end, then the cache
    re-opens with fewer, longer rows; an idle server goes back to the default shape; cancelled jobs go."""
    from types import SimpleNamespace

    from salience.engine import SamplingParams
    from salience.serve import Job, Scheduler

    s = Scheduler(SimpleNamespace(runner=SimpleNamespace(max_pos=1024)), max_batch=4, kv_tokens=2048,
                  start=False)

    def job(n_prompt, n):
        return Job(list(range(1, n_prompt + 1)), n, SamplingParams(max_new_tokens=n), [], 0, None)

    def end_all():
        s.running = [None] * len(s.running)

    a, b, c = job(50, 50), job(300, 300), job(10, 10)
    s.waiting = [a, b, c]
    assert s._admit() == ((4, 512), [(0, a)])  # default: 4 rows of 2048 / 4 slots; b needs 600: waits
    assert s._admit() == (None, []) and s.waiting == [b, c]  # c does not overtake b
    end_all()
    assert s._admit() == ((2, 768), [(0, b), (1, c)])  # 600 slots rounded up to 768: 2048 / 768 = 2 rows
    end_all()
    d = [job(10, 10) for _ in range(6)]
    d[1].cancelled = True
    s.waiting = list(d)
    assert s._admit() == ((4, 512), [(0, d[0]), (1, d[2]), (2, d[3]), (3, d[4])])  # back to the default
    assert s._admit() == (None, []) and s.waiting == [d[5]]  # every row taken
    s.running[2] = None
    assert s._admit() == (None, [(2, d[5])]) and s.joined == 1  # joins the running rows
    assert s.rows == 8


# ---- continuous batching, in process: the scheduler driven one tick (one decode step) at a time

class Events:
    """A Channel without an event loop: the scheduler's events of one request, in order."""

    def __init__(self):
        self.events = []

    def put(self, *event):
        self.events.append(event)

    def result(self):
        """-> (text, finish_reason, completion_tokens)."""
        assert [e[0] for e in self.events].count("end") == 1 and self.events[-1][0] == "end", self.events
        return "".join(e[2] for e in self.events if e[0] == "text"), self.events[-1][2], self.events[-1][3]


def _job(eng, ids, n, **sampling):
    from salience.serve import prepare

    out = Events()
    return prepare(Request("completion", "m", prompts=[ids], max_tokens=n, **sampling), eng, out,
                   threading.Lock())[0], out


def _drive(eng, arrivals, max_batch=8, kv_tokens=1 << 16):
    """arrivals: [(tick, job)]: each job is submitted before that tick. -> the scheduler, once all ended."""
    from salience.serve import Scheduler

    s = Scheduler(eng, max_batch=max_batch, kv_tokens=kv_tokens, start=False)
    t = 0
    while t <= max(a for a, _ in arrivals) or s.waiting or s.live():
        s.submit([j for a, j in arrivals if a == t])
        s.tick()
        t += 1
    return s


SETTINGS = [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.8, "seed": 5},
            {"temperature": 0.0, "repetition_penalty": 1.5}, {"temperature": 1.2, "top_k": 7, "seed": 11},
            {"temperature": 0.0}, {"temperature": 0.7, "seed": 3, "repetition_penalty": 1.3}]


def _continuous_equals_alone(eng, prompts, n_tokens, settings, schedules):
    """Each job's text, finish reason and token count from the scheduler with others joining and leaving
    == from the scheduler alone; greedy ones also == Engine.generate (the token loop of `salience
    generate`)."""
    from salience.engine import SamplingParams

    alone = []
    for q, n, kw in zip(prompts, n_tokens, settings):
        j, out = _job(eng, q, n, **kw)
        _drive(eng, [(0, j)])
        alone.append(out.result())
        if kw.get("temperature") == 0:
            ref = eng.generate([q], SamplingParams(max_new_tokens=n, repetition_penalty=kw.get(
                "repetition_penalty", 1.0)))[0]
            assert (alone[-1][0], alone[-1][2]) == (ref.text, len(ref.token_ids))
    moves = 0
    for arrive, max_batch in schedules:
        jobs = [_job(eng, q, n, **kw) for q, n, kw in zip(prompts, n_tokens, settings)]
        s = _drive(eng, [(a, j) for a, (j, _) in zip(arrive, jobs)], max_batch=max_batch)
        assert [out.result() for _, out in jobs] == alone, (arrive, max_batch)
        assert s.row_steps > s.steps  # rows shared decode steps
        if len(set(arrive)) > 1:
            assert s.joined > 0  # some joined rows that were decoding
        moves += s.moves
    assert moves > 0  # some rows moved down into rows freed below them


def test_continuous_batching_equals_alone_tiny():
    """Six requests of different prompt lengths and sampling settings (greedy, top-p, top-k, repetition
    penalty) arriving at different steps, into 3 or 8 rows: each one's output equals that request alone."""
    from salience.engine.generate import Engine, Runner
    from salience.engine.weights import from_hf_model

    eng = Engine(Runner(from_hf_model(tiny_model("llama"))), tiny_tokenizer(), "engine", eos=set())
    prompts = [eng.encode(t) for t in ["the quick brown fox", "over", "the sun sets slowly over the quiet river",
                                       "birds sing", "green hills where the sun", "the lazy dog and then it"]]
    _continuous_equals_alone(eng, prompts, [12, 5, 9, 14, 7, 10], SETTINGS,
                             [([0, 0, 3, 4, 4, 9], 3), ([0, 2, 2, 5, 11, 11], 8), ([0] * 6, 8)])


def test_continuous_batching_transformers_fallback(tmp_path):
    """An architecture without an engine entry (phi3: the transformers model, rows decoded one at a time)
    goes through the same loop, with the same outputs as alone."""
    from salience.engine import load

    tiny_model("phi3").save_pretrained(tmp_path / "phi3")
    tiny_tokenizer().save_pretrained(tmp_path / "phi3")
    eng = load(str(tmp_path / "phi3"), device="cpu", dtype="float32", quiet=True)
    assert eng.kind == "transformers"
    eng.eos = set()
    prompts = [eng.encode(t) for t in ["the quick brown fox", "over", "the sun sets slowly", "birds sing"]]
    _continuous_equals_alone(eng, prompts, [6, 3, 5, 7], SETTINGS[:4], [([0, 0, 0, 2], 3)])


@pytest.mark.slow
def test_continuous_batching_equals_alone_smollm2():
    """The real SmolLM2-135M (fp32, CPU): four greedy requests joining at different steps, each == alone."""
    from salience.engine import load

    eng = load("smollm2", device="cpu", dtype="float32")
    prompts = [eng.encode(t) for t in ["The capital of France is", "Once upon a time, in a small village,",
                                       "def fibonacci(n):", "The three most important things to know about"]]
    _continuous_equals_alone(eng, prompts, [10, 14, 8, 12], [{"temperature": 0.0}] * 4, [([0, 0, 3, 6], 3),
                                                                                          ([0, 0, 0, 2], 3)])


def test_request_joins_a_running_stream(server, client):
    """Through HTTP: a request sent while a long stream decodes joins its steps (/health's joined_running)
    and gets the text it gets alone; the long stream is unaffected."""
    long_ref = client.completions.create(model=NAME, prompt="the quick", max_tokens=200, temperature=0)
    short_ref = client.completions.create(model=NAME, prompt="over the lazy dog", max_tokens=8, temperature=0)
    assert long_ref.choices[0].finish_reason == "length"  # no EOS: it runs 200 steps
    before = _get(server[0] + "/health")[1]
    s = client.completions.create(model=NAME, prompt="the quick", max_tokens=200, temperature=0, stream=True)
    it = iter(s)
    text = next(it).choices[0].text
    short = client.completions.create(model=NAME, prompt="over the lazy dog", max_tokens=8, temperature=0)
    text += "".join(c.choices[0].text for c in it if c.choices)
    after = _get(server[0] + "/health")[1]
    assert short.choices[0].text == short_ref.choices[0].text and text == long_ref.choices[0].text
    assert after["joined_running"] > before["joined_running"]


def test_load_test_in_process_smoke(tmp_path):
    """benchmarks/serve.py's GPU mode (the Scheduler in process, a random-weight W4 model built on the
    device) on the CPU with the tiny shape: it runs, nothing fails, the scheduler counts are reported."""
    out = tmp_path / "serve"
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "serve.py"), "--in-process",
                        "--random", "tiny", "--device", "cpu", "--requests", "12", "--clients", "4",
                        "--new-tokens", "6", "--vary", "--kv-tokens", "4096", "--timeout", "120", "--out",
                        str(out)], capture_output=True, text=True, timeout=300, check=False,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["failed"] == 0 and res["tokens"] > 0 and res["decode_steps"] > 0 and res["batching"] == "continuous"
