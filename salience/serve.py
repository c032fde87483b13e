"""`salience serve`: an OpenAI-compatible HTTP server on the engine (FastAPI/Starlette + uvicorn).

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with "stream": true as
server-sent events, `data: {...}\\n\\n` ... `data: [DONE]\\n\\n`), GET /health. Errors use OpenAI's schema,
`{"error": {"message", "type", "param", "code"}}`, with 4xx codes for the client's mistakes.

Layers, top to bottom:
    parse_request   bytes -> Request, or RequestError (pure: no model, no tokenizer; fuzzed)
    prepare         Request -> Jobs (token ids, per-request limits checked against the context)
    Scheduler       one thread owns the engine: it takes the waiting jobs that can share a batch (same
                    sampling settings, within --max-batch and the KV budget) and runs them through the
                    engine's token loop as one left-padded batch, streaming each row's text as it comes
    make_app        the routes, the API key check, SSE framing

Batching is request-level, not continuous: the engine's static KV cache writes one shared slot per step
for all rows (rows differ only by their left padding), so a row cannot join a running batch. Requests
that arrive while a batch runs wait for it and then go together as the next batch; rows that finish
early (EOS, stop string, their own max_tokens) stop streaming at once and the batch ends when all rows
have finished.
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

@dataclass
class Job:
    """One choice of one request: a row of a batch."""
    ids: list
    max_tokens: int  # for a `fill` job: the most it may get, alone
    key: tuple  # the sampling settings; only jobs with equal keys share a batch
    stop: list
    index: int
    out: "Channel"
    cancelled: bool = False
    since: float = field(default_factory=time.monotonic)  # when it was queued
    fill: bool = False  # no max_tokens given (chat): up to the context, which the batch's longest prompt sets


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
    # greedy ignores top_p/top_k/seed: all greedy requests with one repetition penalty share a batch
    key = (r.temperature, r.top_p, r.top_k, r.repetition_penalty, r.seed) if r.temperature > 0 else \
        (0.0, 1.0, 0, r.repetition_penalty, 0)
    jobs = []
    for i, ids in enumerate(rows):
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", param=param, code="invalid_value")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param,
                               code="invalid_value")
        n = r.max_tokens
        fill = n is None and r.kind == "chat"
        if n is None:
            n = 16 if r.kind == "completion" else max_pos - len(ids)
        if len(ids) + n > max_pos:
            raise RequestError(f"this model's maximum context length is {max_pos} tokens; the request has "
                               f"{len(ids)} prompt tokens and max_tokens {n}", param=param,
                               code="context_length_exceeded")
        if n < 1:
            raise RequestError(f"the prompt ({len(ids)} tokens) leaves no room in the {max_pos}-token context",
                               param=param, code="context_length_exceeded")
        jobs.append(Job(ids, n, key, r.stop, i, out, fill=fill))
    return jobs


class Scheduler:
    """Owns the engine. One thread: take the waiting jobs that can share a batch, run them, repeat."""

    def __init__(self, engine, max_batch: int = 32, kv_tokens: int = 1 << 16, window_ms: float = 20):
        self.engine, self.max_batch, self.kv_tokens = engine, max_batch, kv_tokens
        self.window = window_ms / 1000  # after the first arrival, wait this long for others to join
        self.lock = threading.Lock()  # the tokenizer: encode on request threads, decode here
        self.waiting: list[Job] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.batches = 0  # counters for /health and the benchmark
        self.rows = 0
        self.sizes: list[int] = []  # rows of the last batches
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
        self.thread.join()

    def _take(self) -> list[Job]:
        """FIFO: the oldest job, then later ones with its key while the batch fits max_batch, the model's
        positions and the KV budget (rows x slots)."""
        max_pos = self.engine.runner.max_pos

        def need(lo, nw, fill):  # slots per row: a `fill` job stretches the batch to the whole context
            return max_pos if fill else lo + nw

        first, rest = self.waiting[0], self.waiting[1:]
        batch, longest, new, fill = [first], len(first.ids), 0 if first.fill else first.max_tokens, first.fill
        keep = []
        for j in rest:
            lo, nw, fl = max(longest, len(j.ids)), max(new, 0 if j.fill else j.max_tokens), fill or j.fill
            if (j.key == first.key and len(batch) < self.max_batch and lo + nw <= max_pos and lo < max_pos
                    and (len(batch) + 1) * need(lo, nw, fl) <= self.kv_tokens):
                batch.append(j)
                longest, new, fill = lo, nw, fl
            else:
                keep.append(j)
        self.waiting = keep
        for j in batch:  # a fill job gets what the batch's longest prompt leaves of the context
            if j.fill:
                j.max_tokens = max_pos - longest
        return batch

    def _loop(self):
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    self.cv.wait()
                # requests sent together arrive spread over some milliseconds: collect them until none has
                # come for one window (at most 5 windows; not when the batch is full, nor for jobs that
                # already waited through a batch)
                first = time.monotonic()
                while not self.stopping and len(self.waiting) < self.max_batch and first - self.waiting[0].since \
                        < self.window and time.monotonic() - first < 5 * self.window:
                    quiet = self.waiting[-1].since + self.window - time.monotonic()
                    if quiet <= 0:
                        break
                    self.cv.wait(timeout=quiet)
                if self.stopping:
                    return
                batch = self._take()
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not take the server down
                print(f"salience serve: batch of {len(batch)} failed: {type(e).__name__}: {e}", file=sys.stderr)
                for j in batch:
                    j.out.put("error", f"generation failed: {type(e).__name__}: {e}")

    def _run(self, batch: list[Job]):
        from .engine import SamplingParams
        from .engine.generate import StopTrimmer, steps

        eng = self.engine
        t, top_p, top_k, rp, seed = batch[0].key
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        p = SamplingParams(max_new_tokens=max(j.max_tokens for j in batch), temperature=t, top_p=top_p,
                           top_k=top_k, repetition_penalty=rp, seed=seed)
        trims = [StopTrimmer(eng.tok, j.stop) for j in batch]
        left = set(range(len(batch)))
        self.batches, self.rows = self.batches + 1, self.rows + len(batch)
        self.sizes = (self.sizes + [len(batch)])[-64:]

        def finish(i, reason):
            with self.lock:
                piece = trims[i].feed(None)
            if piece:
                batch[i].out.put("text", batch[i].index, piece)
            batch[i].out.put("end", batch[i].index, reason, len(trims[i].ids))
            left.discard(i)

        for tok, done in steps(eng.runner, [j.ids for j in batch], p, eng.eos):
            toks, dones = tok.tolist(), done.tolist()
            with self.lock:
                pieces = {}
                for i in list(left):
                    if batch[i].cancelled:
                        left.discard(i)
                    elif not (dones[i] and toks[i] in eng.eos):
                        pieces[i] = trims[i].feed(toks[i])
            for i in list(left):
                if i not in pieces:  # EOS
                    finish(i, "stop")
                    continue
                if pieces[i]:
                    batch[i].out.put("text", batch[i].index, pieces[i])
                if trims[i].stopped:
                    finish(i, "stop")
                elif len(trims[i].ids) >= batch[i].max_tokens:
                    finish(i, "length")
            if not left:
                break
        for i in list(left):  # only reached if the loop ran out first (it should not)
            finish(i, "length")


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
        return {"status": "ok", "model": name, "batches": sched.batches, "rows": sched.rows,
                "last_batch_sizes": sched.sizes, "waiting": len(sched.waiting)}

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
