"""Generation on the engine: sampling, batched prompts, stop strings and EOS, streaming, chat templates.

Layers, top to bottom:
    Engine      text in, text out: tokenizer, chat template, stop strings, streaming (`stream`, `generate`)
    steps       the token loop: prefill, then one decode step per token, sampling on the device
    Runner      our Transformer with its static KV cache; decode captured in a CUDA graph on GPU
    HFRunner    the fallback: any transformers model (QuantLinear inside for AWQ checkpoints), DynamicCache

A runner has: reset(batch, max_seq), prefill(ids [B, T], start [B]) -> logits [B, V] of the last
position, decode(tok [B]) -> logits [B, V]. Prompts of different lengths are left-padded; start[b] is the
number of pad slots of row b. For continuous batching (salience serve) it also has rows that sequences
join and leave one by one: open(rows, slots), join(rows, prompts) -> logits [R, V], step(tok [n]) ->
logits [n, V] of rows 0..n-1, leave(row), move(src, dst), warm(); sampling then takes per-row settings
(RowParams) and one generator per row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .model import EAGER, compiled_ops


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL / transformers: logit / p if > 0 else logit * p, on seen tokens
    stop: list = field(default_factory=list)  # strings; the output is cut before the first one
    ignore_eos: bool = False  # benchmarks: always max_new_tokens
    seed: int = 0


@dataclass
class Output:
    text: str
    token_ids: list
    finish_reason: str  # "eos", "stop" or "length"


# ---- sampling: [B, V] logits -> [B] tokens, all on the device, no host sync

@dataclass
class RowParams:
    """Sampling settings per row as [B, 1] tensors on the device (continuous batching mixes requests with
    different settings in one step), and host flags that say which stages some row needs (a batch without
    a top-p row skips the sort over the vocabulary)."""
    temperature: torch.Tensor  # [B, 1] fp32; 0: greedy
    top_p: torch.Tensor  # [B, 1] fp32
    penalty: torch.Tensor  # [B, 1] fp32 repetition penalty
    top_k: torch.Tensor  # [B, 1] int64; 0: off
    sampled: bool = False
    use_top_p: bool = False
    use_top_k: bool = False
    use_penalty: bool = False

    @classmethod
    def of(cls, ps: list[SamplingParams], vocab: int, device) -> "RowParams":
        """One row per SamplingParams (one host-to-device copy). Greedy rows ignore top-k/top-p."""
        rows = [(p.temperature, p.top_p, p.repetition_penalty, min(p.top_k, vocab)) if p.temperature > 0 else
                (0.0, 1.0, p.repetition_penalty, 0) for p in ps]
        x = torch.tensor(rows, dtype=torch.float32).to(device)  # [B, 4]; k <= vocab: exact in fp32
        return cls(x[:, 0:1], x[:, 1:2], x[:, 2:3], x[:, 3:4].long(), sampled=any(r[0] > 0 for r in rows),
                   use_top_p=any(r[1] < 1 for r in rows), use_top_k=any(r[3] > 0 for r in rows),
                   use_penalty=any(r[2] != 1 for r in rows))


def process_logits(logits: torch.Tensor, p: SamplingParams | RowParams, seen: torch.Tensor | None
                   ) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p -> fp32 logits ([B, V]; -inf where excluded). p: one
    setting for every row, or RowParams (greedy rows come out penalised only, for an argmax)."""
    x = logits.float()
    if isinstance(p, SamplingParams):
        p = RowParams.of([p] * x.shape[0], x.shape[-1], x.device)
    if p.use_penalty and seen is not None:
        x = torch.where(seen, torch.where(x > 0, x / p.penalty, x * p.penalty), x)
    if not p.sampled:
        return x
    x = x / torch.where(p.temperature > 0, p.temperature, 1.0)
    if p.use_top_k or p.use_top_p:
        sx, si = torch.sort(x, dim=-1, descending=True)  # [B, V]
        if p.use_top_k:  # keep logits >= the k-th largest (ties with it too); k = 0: the smallest, all kept
            k = torch.where(p.top_k > 0, p.top_k, x.shape[-1])
            kth = sx.gather(-1, k - 1)  # [B, 1]
            x = x.masked_fill(x < kth, float("-inf"))
            sx = sx.masked_fill(sx < kth, float("-inf"))
        if p.use_top_p:  # keep the smallest prefix whose mass reaches top_p (rows with top_p 1: all)
            prob = sx.softmax(-1)
            drop = (prob.cumsum(-1) - prob > p.top_p) & (p.top_p < 1)
            x = x.masked_fill(drop.scatter(-1, si, drop), float("-inf"))
    return x


def sample(logits: torch.Tensor, p: SamplingParams | RowParams, seen, gen) -> torch.Tensor:
    """-> tokens [B]. gen: one torch.Generator for the whole batch (or None), or a list with one per row
    (continuous batching: a row's samples then depend on its own seed and logits only; None: greedy row)."""
    if isinstance(p, SamplingParams):
        p = RowParams.of([p] * logits.shape[0], logits.shape[-1], logits.device)
    x = process_logits(logits, p, seen)
    greedy = x.argmax(-1)
    if not p.sampled:
        return greedy
    # Gumbel-max through exponential noise: argmax(prob / E), E ~ Exp(1); no multinomial, no host sync
    probs = x.softmax(-1)
    if isinstance(gen, list):
        e = torch.ones_like(probs)
        for i, g in enumerate(gen):
            if g is not None:
                e[i].exponential_(1, generator=g)
    else:
        e = torch.empty_like(probs).exponential_(1, generator=gen)
    return torch.where(p.temperature[:, 0] > 0, (probs / e).argmax(-1), greedy)


# ---- runners

def _round_up(n: int, m: int = 256) -> int:
    return -(-n // m) * m


class Runner:
    """Our Transformer: static KV cache; on GPU, decode with its elementwise ops compiled (compile=False:
    eager ops) and captured as a CUDA graph (cuda_graph=False: launched op by op)."""

    def __init__(self, model, cuda_graph: bool = True, compile: bool = True, prefix_reuse: bool = True):
        self.model = model
        self.prefix_reuse = prefix_reuse  # benchmarks turn it off: a repeated prompt would cost one token
        self.device = model.device
        self.graphs = cuda_graph and self.device.type == "cuda"
        self.ops = compiled_ops() if compile and self.device.type == "cuda" else EAGER
        self.graph = None
        self.ops_ok = False  # the compiled ops ran once
        self.cached: list[int] = []  # batch 1: tokens whose K/V sit in slots 0..len-1 (prefix reuse)
        self.opened = None  # (cache version, rows, slots) while the rows of open() are in use

    @property
    def max_pos(self):
        return self.model.c.max_pos

    def reset(self, batch: int, max_seq: int):
        """Make room for `batch` rows of `max_seq` slots (rounded up, so that a graph serves many calls)."""
        need = max(min(_round_up(max_seq), self.max_pos), max_seq)
        if batch != self.model.batch or need > self.model.max_seq:
            self.model.setup_cache(batch, need)
            self.graph, self.cached = None, []
        if batch != 1:
            self.cached = []
        self.start, self.opened = None, None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """ids [B, T] left-padded, start [B] pad counts -> logits [B, V] of the last position."""
        b, t = ids.shape
        dev = self.device
        ids, start = ids.to(dev), start.to(dev)
        padded = bool(start.any())
        reuse = 0
        if getattr(self.model, "owner", None) is not self or not self.prefix_reuse:  # or someone else wrote it
            self.cached = []
        self.model.owner = self
        if b == 1 and self.cached:  # multi-turn chat: keep the K/V of the common prefix
            new = ids[0].tolist()
            while reuse < min(len(self.cached), t - 1) and self.cached[reuse] == new[reuse]:
                reuse += 1
        pos = torch.arange(reuse, t, device=dev)
        logits = self.model(ids[:, reuse:], pos, start if padded else None, kv_len=t,
                            fresh=reuse == 0 and not padded, last=True)
        self.cached = ids[0].tolist() if b == 1 and not padded else []
        self.start = start if padded else None
        self.pos = t  # next slot
        self.pos_t = torch.tensor([t], device=dev)
        return logits[:, -1]

    def _step(self, tok):
        return self.model(tok[:, None], self.pos_t, self.start, ops=self.ops)[:, -1]

    def _first_compiled_step(self, step):
        """Run the first decode step with compiled ops; if compilation fails, say so and go eager."""
        try:
            return step()
        except Exception as e:  # noqa: BLE001 - inductor/triton failures come in many types
            print(f"salience: compiling the decode ops failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  "decoding with eager ops (pass --no-compile to skip the attempt)", file=sys.stderr)
            self.ops = EAGER
            return step()

    @torch.inference_mode()
    def decode(self, tok: torch.Tensor) -> torch.Tensor:
        """tok [B] (on the device) -> logits [B, V]; writes slot self.pos."""
        if self.pos >= self.model.max_seq:
            raise RuntimeError(f"KV cache full ({self.model.max_seq} slots)")
        if self.cached:
            self.cached.append(-1)  # that slot's token is known only on the device; never reused
        out = self._replay(tok) if self.graphs else None
        if out is None:
            out = self._step(tok) if self.ops is EAGER or self.ops_ok else self._first_compiled_step(
                lambda: self._step(tok))
            self.ops_ok = True
        self.pos += 1
        self.pos_t += 1
        return out

    def _replay(self, tok):
        """One decode step through the CUDA graph for this batch/cache (captured on first use); None if
        capture failed (then graphs stay off, with a message)."""
        key = (tok.shape[0], self.start is not None, self.model.cache_version)
        if self.graph is None or self.graph[0] != key:
            try:
                self._capture(tok, key)
            except RuntimeError as e:  # e.g. an op that syncs with the host, which capture forbids
                return self._graphs_off(e)
        _, g, st_tok, st_pos, st_start, out = self.graph
        st_tok.copy_(tok)
        st_pos.copy_(self.pos_t)
        if self.start is not None:
            st_start.copy_(self.start)
        g.replay()
        return out.clone()

    def _graphs_off(self, e: RuntimeError):
        print(f"salience: CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without graphs "
              "(pass --no-cuda-graph to skip the attempt)", file=sys.stderr)
        self.graphs, self.graph, self.row_graphs = False, None, {}

    def _capture(self, tok, key):
        """Capture one decode step with static inputs (token, slot, pad starts)."""
        st_tok, st_pos = tok.clone(), self.pos_t.clone()
        st_start = self.start.clone() if self.start is not None else None
        m = self.model
        g, out = self._graph(lambda: m(st_tok[:, None], st_pos, st_start, ops=self.ops)[:, -1])
        self.graph = (key, g, st_tok, st_pos, st_start, out)

    def _graph(self, step, pool=None):
        """step() (one decode step on static inputs) captured in a CUDA graph -> (graph, its output). Two
        warm-up runs first (Triton compiles, kernels repack, the allocator settles); they write K/V at the
        step's slots, which every replay overwrites before reading them. pool: a memory pool shared with
        other graphs (safe here: replays never overlap, and each output is copied out at once)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._first_compiled_step(step)
            step()
        self.ops_ok = True
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = step()
        return g, out

    # ---- continuous batching (salience serve): sequences join and leave the decode loop one by one

    def open(self, rows: int, slots: int):
        """A cache of `rows` rows of `slots` slots, all free. A row holds one sequence from slot 0: join()
        prefills prompts into free rows, step() decodes rows 0..n-1 together, each at its own slot, leave()
        frees a row. Free rows below n run in step() as dummies (slot 0; their output means nothing)."""
        self.model.setup_cache(rows, slots)
        self.model.owner, self.cached, self.graph = self, [], None
        dev = self.device
        self.row_pos = torch.zeros(rows, dtype=torch.long, device=dev)  # [rows] the slot each row writes next
        self.live = torch.zeros(rows, dtype=torch.long, device=dev)  # [rows] 1 where a row holds a sequence
        self.row_len = [None] * rows  # host mirror of row_pos for live rows (None: free), for bounds checks
        self.row_graphs = {}  # (rows, kv_len) bucket -> (graph, static tokens [rows], logits); read row_pos
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.opened = (self.model.cache_version, rows, slots)

    def _check_open(self):
        if self.opened is None or self.model.owner is not self or self.opened[0] != self.model.cache_version:
            raise RuntimeError("the rows are not open (open() them; a generate call on this model since "
                               "reuses the cache)")

    @torch.inference_mode()
    def join(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Prefill prompts into free rows (slots 0..len-1) in one forward, right-padded to the longest: a
        pad token's K/V lands in slots that its row's own steps overwrite before attending to them.
        -> logits [R, V] of each prompt's last token."""
        self._check_open()
        lens = [len(q) for q in prompts]
        busy = [r for r in rows if self.row_len[r] is not None]
        if busy or max(lens) > self.opened[2] or min(lens) < 1:
            raise ValueError(f"join: rows {busy} are taken, or a prompt is empty or longer than "
                             f"{self.opened[2]} slots ({lens})")
        t, dev = max(lens), self.device
        ids = torch.zeros(len(prompts), t, dtype=torch.long)
        for i, q in enumerate(prompts):
            ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
        r, n = torch.tensor(rows, device=dev), torch.tensor(lens, device=dev)
        logits = self.model(ids.to(dev), torch.arange(t, device=dev), kv_len=t, fresh=True, last=n - 1, rows=r)
        self.row_pos[r] = n
        self.live[r] = 1
        for row, n_i in zip(rows, lens):
            self.row_len[row] = n_i
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok [n] (on the device): the next token of rows 0..n-1 -> logits [n, V]. Row b writes slot
        row_pos[b] and attends to slots 0..row_pos[b]; then live rows advance and free rows stay at slot 0
        (free rows below n run as dummies: move() live rows down to avoid them).
        Attention reads only slots < kv_len = the longest live row + 1 (on GPU rounded up to a bucket): the
        cache's unused tail would otherwise cost as much bandwidth as it is long."""
        self._check_open()
        n, slots = tok.shape[0], self.opened[2]
        top = max((x for x in self.row_len[:n] if x is not None), default=0)  # the furthest slot written now
        if top >= slots:
            raise RuntimeError(f"KV cache row full ({slots} slots)")
        out = self._replay_rows(tok, top + 1) if self.graphs else None
        if out is None:
            def fn():
                return self.model(tok[:, None], self.row_pos[:n, None], kv_len=top + 1, ops=self.ops)[:, -1]
            out = fn() if self.ops is EAGER or self.ops_ok else self._first_compiled_step(fn)
            self.ops_ok = True
        self.row_pos[:n] += self.live[:n]
        for r in range(n):
            if self.row_len[r] is not None:
                self.row_len[r] += 1
        return out

    def leave(self, row: int):
        """Free a row: it runs as a dummy at slot 0 until a prompt joins it."""
        self.live[row] = 0
        self.row_pos[row] = 0
        self.row_len[row] = None

    @torch.inference_mode()
    def move(self, src: int, dst: int):
        """Move the sequence of row src to free row dst (the K/V of its slots, its position); src is free
        then. Keeps the live rows at the bottom of the cache, so that step() runs no free rows."""
        n = self.row_len[src]
        if n is None or self.row_len[dst] is not None:
            raise ValueError(f"move: row {src} is free or row {dst} is taken")
        for layer in self.model.layers:
            a = layer.attn
            a.k_cache[dst, :, :n] = a.k_cache[src, :, :n]  # [Hkv, n, D]
            a.v_cache[dst, :, :n] = a.v_cache[src, :, :n]
        self.row_pos[dst] = self.row_pos[src]
        self.live[dst] = 1
        self.row_len[dst] = n
        self.leave(src)

    def buckets(self) -> tuple[list[int], list[int]]:
        """The CUDA graphs of step(): row counts (powers of two, and all rows) x attended spans (powers of
        two from 256, and all slots)."""
        _, rows, slots = self.opened
        return ([1 << i for i in range(rows.bit_length()) if 1 << i < rows] + [rows],
                [256 << i for i in range(slots.bit_length()) if 256 << i < slots] + [slots])

    def warm(self):
        """Capture every graph of step() now (GPU; each row count also compiles the ops once), so that no
        request waits for it. Only while no row is live: the dummy steps write slot 0 of free rows."""
        if not self.graphs:
            return
        self._check_open()
        if any(x is not None for x in self.row_len):
            raise RuntimeError("warm() needs all rows free")
        rows, spans = self.buckets()
        for b in reversed(rows):  # the largest first: the shared memory pool is sized by it
            for kv in spans:
                if self._replay_rows(torch.zeros(b, dtype=torch.long, device=self.device), kv) is None:
                    return

    def _replay_rows(self, tok, kv_len: int):
        """step() through the CUDA graph of the smallest buckets that hold n rows (rows n.. of it are free)
        and kv_len slots; None if capture failed (then graphs stay off, with a message)."""
        n = tok.shape[0]
        rows, spans = self.buckets()
        key = (next(b for b in rows if b >= n), next(k for k in spans if k >= kv_len))
        if key not in self.row_graphs:
            b, kv = key
            st_tok = torch.zeros(b, dtype=torch.long, device=self.device)
            pos = self.row_pos[:b, None]  # a view: replays read the current slots
            try:
                g, out = self._graph(lambda: self.model(st_tok[:, None], pos, kv_len=kv, ops=self.ops)[:, -1],
                                     self.pool)
            except RuntimeError as e:
                return self._graphs_off(e)
            self.row_graphs[key] = (g, st_tok, out)
        g, st_tok, out = self.row_graphs[key]
        st_tok[:n].copy_(tok)
        g.replay()
        return out[:n].clone()


class HFRunner:
    """Fallback for architectures without an engine entry: the transformers model (QuantLinear swapped in
    for AWQ checkpoints), its DynamicCache, left padding through attention_mask and position_ids."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.max_pos = getattr(model.config, "max_position_embeddings", 1 << 30)

    def reset(self, batch, max_seq):
        self.past = None

    @torch.inference_mode()
    def prefill(self, ids, start):
        t = ids.shape[1]
        ids, start = ids.to(self.device), start.to(self.device)
        self.mask = (torch.arange(t, device=self.device)[None] >= start[:, None]).long()
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1)
        self.past, self.next_pos = out.past_key_values, pos[:, -1] + 1
        return out.logits[:, -1]

    # continuous batching: the interface of Runner's, one row at a time (each row its own DynamicCache and
    # batch-1 forward: rows of different lengths would need re-padding the cache at every join)

    def open(self, rows: int, slots: int):
        self.row_runners: list[HFRunner | None] = [None] * rows

    def join(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        out = []
        for r, q in zip(rows, prompts):
            if self.row_runners[r] is not None:
                raise ValueError(f"join: row {r} is taken")
            one = HFRunner(self.model)
            out.append(one.prefill(torch.tensor([q]), torch.zeros(1, dtype=torch.long)))
            self.row_runners[r] = one
        return torch.cat(out)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok [n] -> logits [n, V]; free rows get zeros."""
        got = {r: one.decode(tok[r:r + 1])[0] for r, one in enumerate(self.row_runners[: tok.shape[0]])
               if one is not None}
        v = next(iter(got.values())).shape[-1] if got else _vocab(self)  # the logits' width, maybe > vocab
        out = torch.zeros(tok.shape[0], v, device=self.device)
        for r, x in got.items():
            out[r] = x
        return out

    def leave(self, row: int):
        self.row_runners[row] = None

    def move(self, src: int, dst: int):
        self.row_runners[dst], self.row_runners[src] = self.row_runners[src], None

    def warm(self):
        pass

    @torch.inference_mode()
    def decode(self, tok):
        self.mask = torch.cat([self.mask, self.mask.new_ones(tok.shape[0], 1)], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         past_key_values=self.past, use_cache=True)
        self.past, self.next_pos = out.past_key_values, self.next_pos + 1
        return out.logits[:, -1]


# ---- the token loop

def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, T] (left-padded), start [B] (pad counts)."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([t - len(p) for p in prompts], dtype=torch.long)


def steps(runner, prompts: list[list[int]], p: SamplingParams, eos: set[int] = frozenset()
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The token loop: prefill, then per step yield (tok [B], done [B]) on the device (no host sync here);
    rows that finished repeat an EOS token. The consumer decides when to look at them and when to stop."""
    if not prompts or any(len(q) == 0 for q in prompts):
        raise ValueError("empty prompt: nothing to condition on (add a BOS token)")
    b = len(prompts)
    longest = max(len(q) for q in prompts)
    if longest + p.max_new_tokens > runner.max_pos:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                         f"model's {runner.max_pos} positions")
    dev = runner.device
    runner.reset(b, longest + p.max_new_tokens)
    ids, start = left_pad(prompts)
    gen = torch.Generator(device=dev).manual_seed(p.seed) if p.temperature > 0 else None
    rp = RowParams.of([p] * b, _vocab(runner), dev)  # once: building it copies to the device
    seen = None
    if p.repetition_penalty != 1.0:
        seen = torch.zeros(b, _vocab(runner), dtype=torch.bool, device=dev)
        for i, q in enumerate(prompts):
            seen[i, torch.tensor(q, device=dev)] = True
    eos_t = torch.tensor(sorted(eos) or [-1], device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    logits = runner.prefill(ids, start)
    for n in range(p.max_new_tokens):
        tok = sample(logits, rp, seen, gen)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        if not p.ignore_eos:
            tok = torch.where(done, eos_t[0], tok)
            done = done | torch.isin(tok, eos_t)
        yield tok, done
        if n + 1 < p.max_new_tokens:
            logits = runner.decode(tok)


def generate_ids(runner, prompts: list[list[int]], p: SamplingParams, eos: set[int] = frozenset(),
                 sync_every: int = 16) -> list[list[int]]:
    """New tokens of each row (EOS excluded); checks for all-rows-done every `sync_every` steps only."""
    toks = []
    for n, (tok, done) in enumerate(steps(runner, prompts, p, eos)):
        toks.append(tok)
        if not p.ignore_eos and (n + 1) % sync_every == 0 and bool(done.all()):
            break
    rows = torch.stack(toks, dim=1).tolist()
    if p.ignore_eos:
        return rows
    return [row[: next((j for j, t in enumerate(row) if t in eos), len(row))] for row in rows]


def _vocab(runner) -> int:
    m = runner.model
    return m.c.vocab if hasattr(m, "c") else m.config.vocab_size


# ---- text level

def eos_ids(tok, config=None, generation_config=None) -> set[int]:
    ids = set()
    for src in (generation_config, config, tok):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(i) for i in ids}


class StopTrimmer:
    """Incremental detokenisation with stop strings: feed token ids, get the text that is safe to show
    (complete characters, no possible beginning of a stop string held back)."""

    def __init__(self, tok, stop: list[str]):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = 0
        self.text = ""
        self.stopped = False

    def feed(self, token: int | None) -> str:
        if token is not None and not self.stopped:
            self.ids.append(token)
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._emit(final=token is None)

    def _emit(self, final: bool) -> str:
        text = self.text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, text, final = True, text[:cut], True
            self.text = text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                end -= 1
            for s in self.stop:  # hold back a suffix that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        piece = text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece


class Engine:
    """Text generation over a runner and a tokenizer. `kind` says what runs: "engine" or "transformers"."""

    def __init__(self, runner, tok, kind: str, eos: set[int] | None = None, name: str = ""):
        self.runner, self.tok, self.kind, self.name = runner, tok, kind, name
        self.eos = eos if eos is not None else eos_ids(tok)

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.tok(prompt, add_special_tokens=True).input_ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use `salience generate` without --chat")
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False).input_ids

    def generate(self, prompts: list, p: SamplingParams, chat: bool = False) -> list[Output]:
        """Batched: prompts (text or token ids) of any lengths, left-padded."""
        ids = [q if isinstance(q, list) else self.encode(q, chat) for q in prompts]
        if not p.stop:
            outs = []
            for t in generate_ids(self.runner, ids, p, self.eos):
                reason = "length" if len(t) >= p.max_new_tokens else "eos"
                outs.append(Output(self.tok.decode(t, skip_special_tokens=True), t, reason))
            return outs
        # stop strings: look at every step's tokens (one host sync a step)
        trims = [StopTrimmer(self.tok, p.stop) for _ in ids]
        ended = [False] * len(ids)
        for tok, done in steps(self.runner, ids, p, self.eos):
            for i, (t, d) in enumerate(zip(tok.tolist(), done.tolist())):
                if ended[i]:
                    continue
                if d and t in self.eos:
                    ended[i] = "eos"
                    continue
                trims[i].feed(t)
                if trims[i].stopped:
                    ended[i] = "stop"
            if all(ended):
                break
        outs = []
        for tr, e in zip(trims, ended):
            tr.feed(None)
            reason = e or "length"
            outs.append(Output(tr.text, tr.ids, reason))
        return outs

    def stream(self, prompt, p: SamplingParams, chat: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens arrive (batch 1; one host sync a token)."""
        ids = prompt if isinstance(prompt, list) else self.encode(prompt, chat)
        tr = StopTrimmer(self.tok, p.stop)
        self.last_ids = []
        for tok, done in steps(self.runner, [ids], p, self.eos):
            t = tok.item()
            if bool(done.item()) and t in self.eos:
                break
            piece = tr.feed(t)
            if piece:
                yield piece
            if tr.stopped:
                break
        piece = tr.feed(None)
        self.last_ids = tr.ids
        if piece:
            yield piece


def print_stream(pieces: Iterator[str], out=None) -> str:
    out = out or sys.stdout
    text = []
    for piece in pieces:
        out.write(piece)
        out.flush()
        text.append(piece)
    return "".join(text)
