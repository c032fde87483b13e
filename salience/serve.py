"""`salience serve`: an OpenAI-compatible HTTP server on the engine (FastAPI/Starlette + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with "stream": true as
server-sent events, `data: {...}\\n\\n` ... `data: [DONE]\\n\\n`), GET /health. Errors use OpenAI's schema,
`{"error": {"message", "type", "param", "code"}}`, with 4xx codes for the client's mistakes.

Layers, top to bottom:
    parse_request   bytes -> Request, or RequestError (pure: no model, no tokenizer; fuzzed)
    prepare         Request -> Jobs (token ids, per-request limits checked against the context, sampling)
    Scheduler       one thread owns the engine and runs the decode loop, with continuous batching (below),
                    streaming each row's text as it comes
    make_app        the routes, the API key check, SSE framing

Batching is continuous. The engine's KV cache is a static block of [rows, slots] per layer, and each row
holds one job's sequence from slot 0 (Runner.open/join/step/leave in engine/generate.py). One round of
the loop (Scheduler.tick):
  1. the oldest waiting jobs that fit take free rows and are prefilled into them together (one
     right-padded forward of at most PREFILL_TOKENS tokens);
  2. every running row decodes one token: one forward over rows 0..n-1, each row writing and attending
     to its own slots (the running rows are kept at the bottom of the cache: when a row below the top one
     frees, the top one's K/V moves into it);
  3. each row samples with its own job's settings (temperature, top_p, top_k and repetition penalty as
     per-row tensors; a generator per row seeded by the request's seed, so that what a row samples does
     not depend on the rows beside it), streams its text, and a row that ends (EOS, stop string,
     max_tokens, client gone) is freed at once for the next waiting job.
So a request that arrives while others decode starts at the next step, and requests with different
sampling settings share steps. A row's greedy output is that of its request run alone (tests).

Cache shape: rows of kv_tokens / max_batch slots (at most the model's context), as many rows as
--kv-tokens allows up to --max-batch (default 32 x 2048). A job that needs a longer row (prompt +
max_tokens; chat without max_tokens needs the whole context) waits, with every job behind it, until the
running rows finish; then the cache re-opens with fewer, longer rows, and an idle server goes back to
the default shape. The decode step has fixed shapes per bucket: on GPU, CUDA graphs for 1, 2, 4, ... rows
(up to all rows) x attended spans of 256, 512, ... slots (up to all slots), captured when the cache
opens; on CPU each step runs exactly n rows and the span of the longest row. An idle server first
collects requests that arrive together (--batch-window-ms) so that they prefill in one forward. The
transformers fallback (architectures without an engine entry) runs the same loop but decodes its rows
one at a time.
"""

import asyncio
import hmac
import json
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

MAX_BODY = 8 << 20  # bytes of one request body
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_PROMPTS = 64  # prompts in one /v1/completions request


# ---- errors

class RequestError(Exception):
    """A client error with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- parsing: bytes -> Request (pure)

@dataclass
class Request:
    kind: str  # "completion" or "chat"
    model: str
    prompts: list = field(default_factory=list)  # completion: str or list[int] per choice
    messages: list = field(default_factory=list)  # chat: [{"role", "content"}] with text content
    max_tokens: int | None = None  # None: the default (16 for completions, the rest of the context for chat)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: a random seed per batch
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
          "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias", "user", "logprobs"}
FIELDS = {"completion": COMMON | {"prompt", "echo", "best_of", "suffix"},
          "chat": COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                            "tool_choice", "parallel_tool_calls"}}
ROLES = {"system", "developer", "user", "assistant"}


def _reject_constant(s):
    raise ValueError(f"{s} is not valid JSON")


def _finite_float(s):
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s} is out of range")
    return v


def _num(body, key, lo, hi, default, integer=False, lo_open=False):
    v = body.get(key)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                           param=key, code="invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise RequestError(f"'{key}' must be {lo_s} and <= {hi}, got {v}", param=key, code="invalid_value")
    return v


def _default_only(body, key, allowed):
    """Parameters we accept only at their neutral value (clients send them by default)."""
    if key in body and body[key] not in allowed:
        raise RequestError(f"'{key}' = {json.dumps(body[key])[:40]} is not supported by this server",
                           param=key, code="unsupported_parameter")


def _text_content(content, i):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                   "are supported", param=f"messages[{i}].content", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts",
                       param=f"messages[{i}].content", code="invalid_type")


def _prompts(p):
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def ids(x):
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p and ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or (ids(x) and x) for x in p):
        if len(p) > MAX_PROMPTS:
            raise RequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", param="prompt",
                               code="invalid_value")
        return list(p)
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids (non-empty)", param="prompt", code="invalid_type")


def parse_request(kind: str, raw: bytes, models: set[str]) -> Request:
    """Parse and validate one request body. Raises RequestError (and nothing else) for bad input."""
    if len(raw) > MAX_BODY:
        raise RequestError(f"request body of {len(raw)} bytes exceeds {MAX_BODY}", status=413)
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise RequestError(f"malformed JSON body: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(map(str, unknown))[:200]}",
                           param=str(unknown[0])[:100], code="unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("'model' is required and must be a string", param="model", code="invalid_type")
    if model not in models:
        raise RequestError(f"the model '{model[:100]}' does not exist; this server has {sorted(models)}",
                           status=404, param="model", code="model_not_found")
    r = Request(kind, model)
    if kind == "completion":
        if "prompt" not in body:
            raise RequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
        r.prompts = _prompts(body["prompt"])
        _default_only(body, "echo", (None, False))
        _default_only(body, "best_of", (None, 1))
        _default_only(body, "suffix", (None, ""))
        _default_only(body, "logprobs", (None, 0))
    else:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("'messages' is required and must be a non-empty list", param="messages",
                               code="invalid_type")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
                    or "content" not in m:
                raise RequestError(f"messages[{i}] must be an object with 'role' ({', '.join(sorted(ROLES))}) "
                                   "and 'content'", param=f"messages[{i}]", code="invalid_value")
            extra = sorted(set(m) - {"role", "content", "name"})
            if extra:
                raise RequestError(f"messages[{i}]: unsupported field(s) {extra}"[:200], param=f"messages[{i}]",
                                   code="unsupported_parameter")
            role = "system" if m["role"] == "developer" else m["role"]
            r.messages.append({"role": role, "content": _text_content(m["content"], i)})
        for key in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "top_logprobs"):
            _default_only(body, key, (None,) if key != "response_format" else (None, {"type": "text"}))
        _default_only(body, "logprobs", (None, False))
        if body.get("max_completion_tokens") is not None:
            r.max_tokens = _num(body, "max_completion_tokens", 1, 1 << 31, None, integer=True)
    if r.max_tokens is None:
        r.max_tokens = _num(body, "max_tokens", 1, 1 << 31, None, integer=True)
    r.temperature = float(_num(body, "temperature", 0, 2, 1.0))
    r.top_p = float(_num(body, "top_p", 0, 1, 1.0, lo_open=True))
    r.top_k = _num(body, "top_k", 0, 1 << 31, 0, integer=True)
    r.repetition_penalty = float(_num(body, "repetition_penalty", 0, 100, 1.0, lo_open=True))
    r.seed = _num(body, "seed", 0, (1 << 63) - 1, None, integer=True)
    _num(body, "n", 1, 1, 1, integer=True)
    for key in ("presence_penalty", "frequency_penalty"):
        _default_only(body, key, (None, 0, 0.0))
    _default_only(body, "logit_bias", (None, {}))
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("'user' must be a string", param="user", code="invalid_type")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
            raise RequestError(f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop",
                               code="invalid_value")
        r.stop = [s for s in stop if s]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream", code="invalid_type")
    r.stream = bool(stream)
    so = body.get("stream_options")
    if so is not None:
        if not r.stream:
            raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options",
                               code="invalid_value")
        if not isinstance(so, dict) or set(so) - {"include_usage"} or \
                not isinstance(so.get("include_usage", False), bool):
            raise RequestError("'stream_options' must be {\"include_usage\": bool}", param="stream_options",
                               code="invalid_value")
        r.include_usage = so.get("include_usage", False)
    return r


# ---- jobs and the scheduler

PREFILL_TOKENS = 8192  # padded prompt tokens of one prefill forward (rows x their longest prompt)


@dataclass
class Job:
    """One choice of one request: one row of the decode loop while it runs."""
    ids: list
    max_tokens: int
    sampling: object  # engine SamplingParams (max_new_tokens = max_tokens; a seed always set)
    stop: list
    index: int
    out: "Channel"
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)  # when it was queued

    @property
    def need(self) -> int:
        """Cache slots of its row: the prompt and the new tokens (the last one is never fed back: one spare)."""
        return len(self.ids) + self.max_tokens


@dataclass
class Row:
    """A running job: its text so far (stop strings) and its sampling generator (None: greedy)."""
    job: Job
    trim: object  # StopTrimmer
    gen: object  # torch.Generator | None


class Channel:
    """Events of one request from the scheduler thread to the event loop: ("text", index, piece),
    ("end", index, finish_reason, completion_tokens), ("error", message)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.q = loop, asyncio.Queue()

    def put(self, *event):
        self.loop.call_soon_threadsafe(self.q.put_nowait, event)

    async def get(self):
        return await self.q.get()


def prepare(r: Request, engine, out: Channel, lock: threading.Lock) -> list[Job]:
    """Token ids per choice, checked against the context; RequestError when they do not fit."""
    from jinja2 import TemplateError

    from .engine import SamplingParams
    from .engine.generate import _vocab

    max_pos = engine.runner.max_pos
    vocab = min(len(engine.tok), _vocab(engine.runner))  # ids the tokenizer knows and the model embeds
    with lock:
        if r.kind == "chat":
            try:
                rows = [engine.encode_chat(r.messages)]
            except ValueError as e:  # no chat template
                raise RequestError(str(e), param="messages", code="invalid_value") from None
            except TemplateError as e:  # the template's own checks (e.g. roles must alternate)
                raise RequestError(f"the model's chat template rejected the messages: {e}", param="messages",
                                   code="invalid_value") from None
        else:
            rows = [q if isinstance(q, list) else engine.encode(q) for q in r.prompts]
    param = "messages" if r.kind == "chat" else "prompt"
    jobs = []
    for i, ids in enumerate(rows):
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param=param, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param,
                               code="invalid_value")
        n = r.max_tokens
        if n is None:  # completions: OpenAI's 16; chat: the rest of the context
            n = 16 if r.kind == "completion" else max_pos - len(ids)
        if len(ids) + n > max_pos:
            raise RequestError(f"this model's maximum context length is {max_pos} tokens; the request has "
                               f"{len(ids)} prompt tokens and max_tokens {n}", param=param,
                               code="context_length_exceeded")
        if n < 1:
            raise RequestError(f"the prompt ({len(ids)} tokens) leaves no room in the {max_pos}-token context",
                               param=param, code="context_length_exceeded")
        # no seed: a random one per choice (each row samples from its own generator)
        seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        p = SamplingParams(max_new_tokens=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                           repetition_penalty=r.repetition_penalty, seed=seed)
        jobs.append(Job(ids, n, p, r.stop, i, out))
    return jobs


class Scheduler:
    """Owns the engine. One thread runs the decode loop over the rows of the engine's KV cache: at every
    step, waiting jobs join free rows, then all running rows decode one token (module docstring)."""

    def __init__(self, engine, max_batch: int = 32, kv_tokens: int = 1 << 16, window_ms: float = 20,
                 start: bool = True):
        self.engine, self.max_batch, self.kv_tokens = engine, max_batch, kv_tokens
        self.window = window_ms / 1000  # an idle server waits this long after an arrival for others to join
        self.lock = threading.Lock()  # the tokenizer: encode on request threads, decode here
        self.waiting: list[Job] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.shape: tuple[int, int] | None = None  # (rows, slots) of the open cache
        self.running: list[Row | None] = []  # per cache row
        self.tok = self.seen = None  # [rows] last token per row, [rows, V] bool seen tokens (penalty)
        # counters for /health and the benchmark
        self.rows = 0  # jobs started
        self.joined = 0  # of them, jobs that joined while other rows were decoding
        self.batches = 0  # prefill forwards (jobs that join at one step prefill together)
        self.sizes: list[int] = []  # rows of the last prefills
        self.steps = self.row_steps = 0  # decode steps, and rows decoded summed over them
        self.moves = 0  # rows moved down into free rows
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._loop, name="salience-scheduler", daemon=True)
            self.thread.start()

    def submit(self, jobs: list[Job]):
        with self.cv:
            self.waiting.extend(jobs)
            self.cv.notify()

    def stop(self):
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join()

    def live(self) -> int:
        return sum(x is not None for x in self.running)

    def _shape(self, need: int) -> tuple[int, int]:
        """(rows, slots) of a cache for jobs of up to `need` slots: rows of kv_tokens / max_batch slots or
        longer if `need` is (rounded up to 256), at most the model's positions; as many rows as the KV
        budget allows, at most max_batch and at least 1 (one job always runs)."""
        slots = min(self.engine.runner.max_pos, max(self.kv_tokens // self.max_batch, -(-need // 256) * 256))
        return max(1, min(self.max_batch, self.kv_tokens // slots)), slots

    def _admit(self) -> tuple[tuple[int, int] | None, list[tuple[int, Job]]]:
        """(Under self.cv.) FIFO: the oldest waiting jobs take free rows while they fit a row's slots.
        -> (the cache shape to open first, or None; [(row, job)]). With no row running, the cache takes the
        shape the oldest job needs (the default, unless it needs longer rows); while rows run, a job that
        needs longer rows than the cache has waits until they have finished, and so does every job behind
        it (nothing overtakes it)."""
        self.waiting = [j for j in self.waiting if not j.cancelled]
        if not self.waiting:
            return None, []
        reopen = None
        if not self.live():
            shape = self._shape(self.waiting[0].need)
            if shape != self.shape:
                reopen = self.shape = shape
                self.running = [None] * shape[0]
        rows, slots = self.shape
        free = [r for r in range(rows) if self.running[r] is None]
        busy = len(free) < rows
        joins = []
        while self.waiting and free and self.waiting[0].need <= slots:
            joins.append((free.pop(0), self.waiting.pop(0)))
        for r, j in joins:  # the row is theirs from now on (_join adds the text and generator)
            self.running[r] = Row(j, None, None)
        self.rows += len(joins)
        self.joined += len(joins) if busy else 0
        return reopen, joins

    def tick(self) -> bool:
        """One round of the decode loop (the thread calls it while there is work; tests call it directly):
        the waiting jobs that fit join free rows (prefilled together), then every running row decodes one
        token. A failure ends every running job with an error and re-opens the cache. -> whether any row
        ran."""
        with self.cv:
            reopen, joins = self._admit()
        try:
            if reopen:
                self._open(reopen)
            if joins:
                self._join(joins)
            if self.live():
                self._step()
        except Exception as e:  # noqa: BLE001 - a failed step must not take the server down
            failed = [x.job for x in self.running if x is not None]
            print(f"salience serve: a step of {len(failed)} rows failed: {type(e).__name__}: {e}",
                  file=sys.stderr)
            for j in failed:
                j.out.put("error", f"generation failed: {type(e).__name__}: {e}")
            self.running, self.shape = [None] * len(self.running), None  # open a fresh cache next time
        return bool(joins) or self.live() > 0

    def _loop(self):
        try:  # the default cache now (GPU: its decode graphs too), not when the first request comes
            with self.cv:
                self.shape = self._shape(0)
                self.running = [None] * self.shape[0]
            self._open(self.shape)
        except Exception as e:  # noqa: BLE001 - reported; the first request tries again
            print(f"salience serve: opening the KV cache ({self.shape[0]} rows x {self.shape[1]} slots) failed: "
                  f"{type(e).__name__}: {e} (a smaller --kv-tokens needs less memory)", file=sys.stderr)
            self.shape = None
        while True:
            with self.cv:
                while not self.waiting and not self.live() and not self.stopping:
                    self.cv.wait()
                # an idle server: requests sent together arrive spread over some milliseconds, collect them
                # until none has come for one window (at most 5 windows; not when they fill the rows) so
                # that they prefill together. A running loop takes arrivals at its next step instead.
                first = time.monotonic()
                while (not self.stopping and not self.live() and len(self.waiting) < self.max_batch
                       and first - self.waiting[0].since < self.window
                       and time.monotonic() - first < 5 * self.window):
                    quiet = self.waiting[-1].since + self.window - time.monotonic()
                    if quiet <= 0:
                        break
                    self.cv.wait(timeout=quiet)
                if self.stopping:
                    return
            self.tick()

    def _open(self, shape: tuple[int, int]):
        import torch

        rows, slots = shape
        r = self.engine.runner
        r.open(rows, slots)
        r.warm()
        self.tok = torch.zeros(rows, dtype=torch.long, device=r.device)
        self.seen = None

    def _join(self, joins: list[tuple[int, Job]]):
        import torch

        from .engine.generate import StopTrimmer, _vocab

        eng, dev = self.engine, self.engine.runner.device
        for row, j in joins:
            p = j.sampling
            x = self.running[row]
            x.trim = StopTrimmer(eng.tok, j.stop)
            x.gen = torch.Generator(device=dev).manual_seed(p.seed) if p.temperature > 0 else None
            if p.repetition_penalty != 1.0:
                if self.seen is None:
                    self.seen = torch.zeros(len(self.running), _vocab(eng.runner), dtype=torch.bool, device=dev)
                self.seen[row] = False
                self.seen[row, torch.tensor(j.ids, device=dev)] = True
        group: list[tuple[int, Job]] = []
        for row, j in joins:  # prefill groups of at most PREFILL_TOKENS padded tokens
            longest = max([len(j.ids)] + [len(g.ids) for _, g in group])
            if group and (len(group) + 1) * longest > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append((row, j))
        self._prefill(group)

    def _prefill(self, group: list[tuple[int, Job]]):
        rows = [r for r, _ in group]
        logits = self.engine.runner.join(rows, [j.ids for _, j in group])  # [R, V]
        self.batches += 1
        self.sizes = (self.sizes + [len(group)])[-64:]
        self._emit(rows, self._sample(logits, rows))

    def _step(self):
        self._compact()
        live = [r for r, x in enumerate(self.running) if x is not None]
        n = live[-1] + 1  # rows 0..n-1 decode: the running ones (_compact)
        logits = self.engine.runner.step(self.tok[:n])  # [n, V]
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(live)
        toks = self._sample(logits, list(range(n)))
        self._emit(live, [toks[r] for r in live])

    def _compact(self):
        """Move the highest running rows into the free rows below them, so that a step runs only running
        rows (one copy of a row's K/V, cheap next to a step)."""
        r = self.engine.runner
        while True:
            live = [i for i, x in enumerate(self.running) if x is not None]
            free = [i for i, x in enumerate(self.running) if x is None and live and i < live[-1]]
            if not free:
                return
            src, dst = live[-1], free[0]
            r.move(src, dst)
            self.moves += 1
            self.running[dst], self.running[src] = self.running[src], None
            self.tok[dst] = self.tok[src]
            if self.seen is not None:
                self.seen[dst] = self.seen[src]

    def _sample(self, logits, rows: list[int]) -> list[int]:
        """Tokens of `rows` from their logits [R, V], each row with its own job's settings and generator."""
        import torch

        from .engine import SamplingParams
        from .engine.generate import RowParams, sample

        run = [self.running[r] for r in rows]
        params = RowParams.of([x.job.sampling if x else SamplingParams() for x in run], logits.shape[-1],
                              logits.device)
        idx = torch.tensor(rows, device=logits.device)
        seen = self.seen[idx] if self.seen is not None and params.use_penalty else None
        tok = sample(logits, params, seen, [x.gen if x else None for x in run])
        if self.seen is not None:
            self.seen[idx, tok] = True
        self.tok[idx] = tok
        return tok.tolist()

    def _emit(self, rows: list[int], toks: list[int]):
        """Stream each row's new text; end the rows that hit EOS, a stop string or max_tokens, or whose
        client went away."""
        eos = self.engine.eos
        with self.lock:
            pieces = {}
            for r, t in zip(rows, toks):
                x = self.running[r]
                if x.job.cancelled:
                    self._free(r)
                elif t not in eos:
                    pieces[r] = x.trim.feed(t)
        for r in rows:
            x = self.running[r]
            if x is None:  # cancelled
                continue
            if r not in pieces:  # EOS
                self._finish(r, "stop")
                continue
            if pieces[r]:
                x.job.out.put("text", x.job.index, pieces[r])
            if x.trim.stopped:
                self._finish(r, "stop")
            elif len(x.trim.ids) >= x.job.max_tokens:
                self._finish(r, "length")

    def _finish(self, r: int, reason: str):
        x = self.running[r]
        with self.lock:
            piece = x.trim.feed(None)
        if piece:
            x.job.out.put("text", x.job.index, piece)
        x.job.out.put("end", x.job.index, reason, len(x.trim.ids))
        self._free(r)

    def _free(self, r: int):
        self.running[r] = None
        self.engine.runner.leave(r)


# ---- the HTTP app

def _error(e: RequestError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def make_app(engine, name: str, api_key: str | None = None, max_batch: int = 32, kv_tokens: int = 1 << 16,
             window_ms: float = 20):
    """The FastAPI app serving `engine` as model `name`. app.state.scheduler runs the batches."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    sched = Scheduler(engine, max_batch=max_batch, kv_tokens=kv_tokens, window_ms=window_ms)
    created = int(time.time())

    async def lifespan(app):
        yield
        sched.stop()

    app = FastAPI(title="salience", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = sched

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(RequestError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # a bug of ours: say so in the API's schema, and log it
        print(f"salience serve: {request.method} {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _error(RequestError(f"internal error: {type(exc).__name__}", 500, type="server_error"))

    @app.middleware("http")
    async def auth(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            got = request.headers.get("authorization", "")
            scheme, _, token = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return _error(RequestError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                                           401, code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        rows, slots = sched.shape or (0, 0)
        return {"status": "ok", "model": name, "rows": sched.rows, "running": sched.live(),
                "waiting": len(sched.waiting), "joined_running": sched.joined, "steps": sched.steps,
                "row_steps": sched.row_steps, "moved_rows": sched.moves, "batches": sched.batches, "last_batch_sizes": sched.sizes,
                "cache_rows": rows, "cache_slots": slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "salience"}]}

    async def body(request: HTTPRequest) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > 8 * MAX_BODY:  # not worth reading: hang up
            raise RequestError(f"request body of {size} bytes exceeds {MAX_BODY}", status=413)
        chunks, n = [], 0
        async for c in request.stream():  # a body up to 8x the limit is read and dropped, so that the
            n += len(c)                   # client gets the 413 rather than a reset connection
            if n <= MAX_BODY:
                chunks.append(c)
        if n > MAX_BODY:
            raise RequestError(f"request body of {n} bytes exceeds {MAX_BODY}", status=413)
        return b"".join(chunks)

    async def handle(kind: str, request: HTTPRequest):
        try:
            r = parse_request(kind, await body(request), {name})
            out = Channel(asyncio.get_running_loop())
            jobs = await asyncio.to_thread(prepare, r, engine, out, sched.lock)
        except RequestError as e:
            return _error(e)
        sched.submit(jobs)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        prompt_tokens = sum(len(j.ids) for j in jobs)
        head = {"id": rid, "object": obj + (".chunk" if kind == "chat" and r.stream else ""), "created":
                int(time.time()), "model": name}

        def usage(completion):
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def choice(i, text, reason):
            if kind == "chat":
                delta = {} if text is None else ({"role": "assistant", "content": text} if text == "" else
                                                 {"content": text})
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

        if not r.stream:
            texts, reasons, completion = [[] for _ in jobs], [None] * len(jobs), 0
            try:
                while None in reasons:
                    ev = await out.get()
                    if ev[0] == "error":
                        return _error(RequestError(ev[1], 500, type="server_error"))
                    if ev[0] == "text":
                        texts[ev[1]].append(ev[2])
                    else:
                        reasons[ev[1]] = {"eos": "stop"}.get(ev[2], ev[2])
                        completion += ev[3]
            finally:
                for j in jobs:  # a client that went away leaves nothing running
                    j.cancelled = True
            if kind == "chat":
                choices = [{"index": 0, "message": {"role": "assistant", "content": "".join(texts[0])},
                            "logprobs": None, "finish_reason": reasons[0]}]
            else:
                choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": reasons[i]}
                           for i, t in enumerate(texts)]
            return JSONResponse({**head, "choices": choices, "usage": usage(completion)})

        async def events():
            left, completion = len(jobs), 0
            try:
                if kind == "chat":
                    yield _sse({**head, "choices": [choice(0, "", None)]})
                while left:
                    ev = await out.get()
                    if ev[0] == "error":
                        yield _sse(RequestError(ev[1], 500, type="server_error").body())
                        break
                    if ev[0] == "text":
                        yield _sse({**head, "choices": [choice(ev[1], ev[2], None)]})
                    else:
                        left -= 1
                        completion += ev[3]
                        yield _sse({**head, "choices": [choice(ev[1], None if kind == "chat" else "", ev[2])]})
                if r.include_usage and not left:
                    yield _sse({**head, "choices": [], "usage": usage(completion)})
                yield "data: [DONE]\n\n"
            finally:
                for j in jobs:
                    j.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await handle("chat", request)

    return app


def serve(engine, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 32, kv_tokens: int = 1 << 16, log_requests: bool = False, window_ms: float = 20):
    import uvicorn

    app = make_app(engine, name, api_key, max_batch, kv_tokens, window_ms)
    print(f"salience serve: {name} ({engine.kind}, {engine.runner.device}) on http://{host}:{port}/v1"
          f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if log_requests else "warning",
                access_log=log_requests)
