"""The generation engine: continuous batching over a paged KV cache.

Every step runs one forward over a ragged batch: each live sequence brings either its next
prompt chunk (prefill) or its last sampled token (decode). A sequence whose prompt is fully
cached gets a token sampled from its last logits. A finished sequence releases its blocks
(paging.py), and waiting requests are admitted while the pool has free blocks for their
prompts (and fewer than max_batch run). A request whose prompt starts with full blocks
another request already computed takes them from the prefix cache and prefills the rest.

When the pool runs dry mid-generation, the newest running sequence is preempted: its blocks
are released and it waits at the head of the queue, keeping its tokens, text and RNG; when
readmitted it recomputes its K/V (most of it usually straight from the prefix cache) and goes
on exactly where it stopped.

Streaming text is produced here (the tokenizer's incremental decoder), because stop strings
are matched on text; text that could still become a stop string is held back.

Two ways to drive it: `run(requests)` generates for an iterable (pulled lazily, as room
frees up) and yields events; a long-lived caller (the HTTP server) instead calls `add(req)`,
`abort(index)` and `step()` itself, one step at a time, from a single thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from .backends import Batch
from .errors import TinyLLMError
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCacheSpec
from .paging import BlockPool, SeqBlocks
from .sampling import SamplingParams, sample, token_logprobs


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]                 # generated only
    text: str
    finish_reason: str                   # "stop" | "length"
    index: int = 0                       # position of the request in its input
    prefill_tokens: int = 0              # prompt tokens computed (the rest came from the cache; a
                                         # preempted request counts what it recomputes again)
    cached_tokens: int = 0               # prompt tokens served from the prefix cache
    time_to_first_token: float = 0.0     # seconds
    elapsed: float = 0.0                 # seconds, from admission to finish

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.elapsed - self.time_to_first_token
        return (len(self.token_ids) - 1) / dt if dt > 0 and len(self.token_ids) > 1 else 0.0


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams               # fully resolved (defaults filled)
    index: int = 0


@dataclass
class Event:
    kind: str                            # "token" (step() only) | "text" | "finish" | "error"
    index: int
    text: str = ""
    completion: Completion | None = None
    error: str = ""
    code: str = "invalid_prompt"          # for errors: the OpenAI-style code batch output lines carry
    token_id: int = -1                   # "token": the id just appended to the output
    logprob: float | None = None         # "token", when the request asks for logprobs: log p(token_id)
    top_logprobs: list | None = None     # ... and its [(id, logprob)] alternatives, most likely first


@dataclass
class _Seq:
    req: Request
    ids: list[int]                       # prompt + generated
    n_prompt: int
    n_cached: int                        # ids[:n_cached] have K/V in the blocks
    rng: np.random.Generator
    decoder: object
    stops: list[str]
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    prefill_tokens: int = 0
    device_seed: int = 0                 # on-device sampling draws from (device_seed, step)
    blocks: SeqBlocks | None = None      # its block table while it runs
    open_row: int = 0                    # ... and its open row (int8/fp8 keys, kv_cache.py)
    started: bool = False                # it has computed K/V since it was (re)admitted
    cached_tokens: int = 0

    @property
    def generated(self) -> list[int]:
        return self.ids[self.n_prompt:]

    def completion(self) -> Completion:
        """What this sequence produced so far; finish_reason "interrupted" while unfinished."""
        t_first = self.t_first - self.t0 if self.t_first else 0.0
        return Completion(self.ids[:self.n_prompt], self.generated, self.text, self.finish or "interrupted",
                          self.req.index, self.prefill_tokens, self.cached_tokens, t_first,
                          time.perf_counter() - self.t0)


class _NoText:
    """The stream decoder of a model without a tokenizer: token ids only, no text."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class Engine:
    def __init__(self, model, tokenizer, backend, eos_ids: set[int], max_seq_len: int,
                 kv_dtype: str, max_batch: int = 8, prefill_chunk: int = 512,
                 block_size: int = DEFAULT_BLOCK_SIZE, n_blocks: int | None = None,
                 prefix_caching: bool = True):
        self.model, self.tok, self.ops = model, tokenizer, backend
        self.eos_ids = set(eos_ids)
        self.max_seq_len, self.kv_dtype = max_seq_len, kv_dtype
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.block_size, self.n_blocks, self.prefix_caching = block_size, n_blocks, prefix_caching
        self.cache = None
        self.pool: BlockPool | None = None
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "cached_tokens": 0,
                      "preemptions": 0}
        # The schedule (reset() starts it afresh): requests (and preempted sequences) not yet
        # running, in order; the running sequences, oldest first. len(live) <= max_batch.
        self.waiting: deque[Request | _Seq] = deque()
        self.live: list[_Seq] = []
        self.open_rows = list(range(max_batch))   # open rows no running sequence holds

    # ---- cache -----------------------------------------------------------------------
    def spec(self) -> KVCacheSpec:
        return KVCacheSpec.for_model(self.model.cfg, self.kv_dtype, self.max_seq_len, self.max_batch,
                                     chunk=self.prefill_chunk, block_size=self.block_size, n_blocks=self.n_blocks)

    def ensure_cache(self):
        if self.cache is None:
            self.cache = self.ops.alloc_kv(self.spec())
            self.pool = BlockPool(self.cache.spec, self.prefix_caching)

    def _batch(self, runs: list[tuple[SeqBlocks, int, int, int]]) -> Batch:
        """The Batch of runs (blocks, start, n, open row)."""
        return Batch(np.stack([r[0].table for r in runs]), [r[1] for r in runs], [r[2] for r in runs],
                     [r[3] for r in runs])

    # ---- full-sequence logits (no sampling) --------------------------------------------
    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits at every position, prefilled chunk by chunk
        (through the pool's blocks, released afterwards)."""
        bad = self.check_prompt(ids, allow_full=True)
        if bad:
            raise TinyLLMError(bad[1])
        self.ensure_cache()
        chunk = min(self.cache.spec.max_chunk, self.prefill_chunk)
        seq = self.pool.new_seq()
        out = []
        try:
            for s in range(0, len(ids), chunk):
                part = ids[s:s + chunk]
                if not self.pool.grow(seq, s + len(part)):
                    raise TinyLLMError(self._pool_full_message(len(ids)))
                batch = self._batch([(seq, s, len(part), self.max_batch)])   # the open row no sequence holds
                out.append(self.ops.to_numpy(self.model.forward(np.asarray(part, np.int32), batch, self.cache,
                                                                all_logits=True)))
                self.pool.commit(seq, ids, s + len(part))
        finally:
            self.pool.free_seq(seq)
        return np.concatenate(out, axis=0)

    def _pool_full_message(self, n: int) -> str:
        spec = self.cache.spec
        return (f"{n} tokens need {spec.blocks_for(n)} KV-cache blocks of {spec.block_size} and the cache has "
                f"{spec.n_blocks} ({spec.tokens()} tokens): raise --kv-cache-memory (kv_cache_memory) or "
                f"use a smaller --kv-dtype")

    # ---- generation --------------------------------------------------------------------
    def run(self, requests: Iterable[Request]) -> Iterator[Event]:
        """Generate for every request, max_batch at a time; yields text pieces as they are
        certain, then one finish (or error) event per request. Requests are pulled from the
        iterable only when there is room for them. Starts a fresh schedule (reset())."""
        pending = iter(requests)
        exhausted = False

        def pull() -> Request | None:
            nonlocal exhausted
            req = next(pending, None)
            exhausted = req is None
            return req
        self.reset()
        while True:
            events = self.step(pull)
            yield from (ev for ev in events if ev.kind != "token")
            if exhausted and not self.live and not self.waiting:
                return

    def partial(self, index: int) -> Completion | None:
        """The Completion so far of a request still running (after the consumer stopped run())."""
        return next((s.completion() for s in self.live if s.req.index == index), None)

    # ---- the schedule, step by step (the server's interface) ---------------------------
    def reset(self):
        """Forget every waiting and running request; their blocks go back to the pool (their
        full blocks stay in the prefix cache)."""
        self.ensure_cache()
        for s in list(self.live):
            self._release(s)
        self.waiting.clear()

    def add(self, req: Request):
        """Queue a request; a later step() admits it when there is room. Its `index` is the
        id that its events carry and that abort() takes: keep it unique among queued ones."""
        self.ensure_cache()
        self.waiting.append(req)

    def abort(self, index: int) -> bool:
        """Drop the request with this index, waiting or running, without an event. A running
        one's blocks are free for the next admission at once. True if it was found."""
        for item in self.waiting:
            if (item.req if isinstance(item, _Seq) else item).index == index:
                self.waiting.remove(item)
                return True
        for s in self.live:
            if s.req.index == index:
                self._release(s)
                return True
        return False

    def step(self, pull: Callable[[], Request | None] | None = None) -> list[Event]:
        """Admit waiting requests while the pool has blocks for their prompts (then ask `pull`
        for more, until it returns None), run one forward over the batch, and return its
        events: per request a "token" event for every token appended to its output, then
        "text" pieces, and "finish" (or "error": a prompt that cannot run, NaN logits) as it
        ends. A finished request's blocks are free for the next step."""
        events: list[Event] = []
        for s in self.live:                    # (hits appear only after a forward: the last step's)
            if not s.started:
                self._rematch(s)
        promised = sum(self._blocks_wanted(s) for s in self.live)   # blocks this step's runs may take
        while len(self.live) < self.max_batch:
            item = self.waiting.popleft() if self.waiting else pull() if pull else None
            if item is None:
                break
            if isinstance(item, Request):
                bad = self.check_prompt(item.prompt_ids)
                if bad:
                    events.append(Event("error", item.index, error=bad[1], code=bad[0]))
                    continue
                if self.cache.spec.blocks_for(len(item.prompt_ids)) > self.cache.spec.n_blocks:
                    events.append(Event("error", item.index, error=self._pool_full_message(len(item.prompt_ids)),
                                        code="context_length_exceeded"))
                    continue
                item = self._new_seq(item)
            matched = self.pool.match(item.ids)
            need = self.pool.blocks_to_admit(item.ids, matched)
            if need > self.pool.n_free - promised and self.live:
                self.waiting.appendleft(item)          # no room yet: it waits, in order
                break
            self._admit(item, matched)
            promised += need
        if self.live:
            events += self._step()
            for s in [s for s in self.live if s.finish]:
                self._release(s)
        return events

    def _release(self, s: _Seq):
        self.live.remove(s)
        self.pool.free_seq(s.blocks)
        s.blocks = None
        self.open_rows.append(s.open_row)

    def _blocks_wanted(self, s: _Seq) -> int:
        """Blocks a running sequence still takes to hold its prompt (or its next token)."""
        return max(0, self.cache.spec.blocks_for(len(s.ids)) - s.blocks.rows)

    def _rematch(self, s: _Seq):
        """Before a sequence computes anything (it holds only prefix-cache hits), take any
        longer prefix that requests ahead of it have cached since it was admitted: requests
        that arrive together then compute a shared prompt once, not each."""
        matched = self.pool.match(s.ids)
        if matched[0] * self.cache.spec.block_size > s.n_cached:
            old = s.blocks
            self._take_prefix(s, matched)
            self.pool.free_seq(old)

    def _admit(self, s: _Seq, matched: tuple[int, list[bytes]]):
        self._take_prefix(s, matched)
        s.open_row = self.open_rows.pop()
        self.live.append(s)

    def _take_prefix(self, s: _Seq, matched: tuple[int, list[bytes]]):
        """A new table for s holding its prefix-cache hits (`matched`: pool.match(s.ids)). The
        hits of its first admission are its cached_tokens (a readmitted sequence keeps its figure)."""
        s.blocks = self.pool.admit(s.ids, matched)
        s.n_cached = s.blocks.cached_tokens
        if not s.t_first:
            self.stats["cached_tokens"] += s.n_cached - s.cached_tokens
            s.cached_tokens = s.n_cached

    def _preempt(self, s: _Seq):
        """Take s off the batch: its blocks go back to the pool and it waits first in line
        to recompute them (its tokens, text and RNG stay)."""
        self._release(s)
        s.n_cached, s.started = 0, False
        self.waiting.appendleft(s)
        self.stats["preemptions"] += 1

    def check_prompt(self, ids: list[int], allow_full: bool = False) -> tuple[str, str] | None:
        """Why these prompt ids cannot run, as (code, message), or None if they can. A
        generation needs room for at least one new token; full-sequence logits (allow_full)
        do not. The codes are the OpenAI-style ones batch output lines carry."""
        n = len(ids)
        if n == 0:
            return "invalid_prompt", "the prompt is empty: nothing to continue from"
        if n > self.max_seq_len or (n == self.max_seq_len and not allow_full):
            return ("context_length_exceeded", f"the prompt is {n} tokens and the context is "
                    f"{self.max_seq_len}: shorten it or raise the context size (--ctx-size, max_seq_len)")
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            return "invalid_prompt", f"prompt token ids must lie in [0, {vocab})"
        return None

    def _new_seq(self, req: Request) -> _Seq:
        p = req.params
        rng = np.random.default_rng(p.seed)
        decoder = self.tok.stream(req.prompt_ids) if self.tok is not None else _NoText()
        seq = _Seq(req, list(req.prompt_ids), len(req.prompt_ids), 0, rng, decoder, list(p.stop or []))
        seq.device_seed = p.seed % 2**63 if p.seed is not None else int(np.random.default_rng().integers(2**63))
        return seq

    def _plan(self) -> list[tuple[_Seq, int]]:
        """(sequence, new tokens) of this step: decode tokens first (one each), then prompt
        chunks within the token budget; blocks for them are taken oldest sequence first,
        preempting the newest when the pool runs dry."""
        runs: dict[int, int] = {}
        budget = self.prefill_chunk
        max_chunk = self.cache.spec.max_chunk
        order = sorted(self.live, key=lambda s: s.n_cached < s.n_prompt)
        for s in order:
            todo = len(s.ids) - s.n_cached
            if todo == 1:
                runs[id(s)] = 1
            elif budget > 0:                   # else this prompt waits for the next step
                runs[id(s)] = min(todo, max_chunk, budget)
                budget -= runs[id(s)]
        for s in list(self.live):              # oldest first
            if id(s) not in runs or s.blocks is None:
                continue
            while not self.pool.grow(s.blocks, s.n_cached + runs[id(s)]):
                victim = self.live[-1]
                if victim is s and len(self.live) == 1:
                    raise _PoolFull(s)
                self._preempt(victim)
                if victim is s:
                    break
        return [(s, runs[id(s)]) for s in order if id(s) in runs and s.blocks is not None]   # (not preempted)

    def _step(self) -> Iterator[Event]:
        try:
            runs = self._plan()
        except _PoolFull as full:              # one sequence alone outgrows the pool: its context ends here
            self._flush_length(full.seq)
            yield from self._emit(full.seq)
            return
        if not runs:
            return
        tokens = np.concatenate([np.asarray(s.ids[s.n_cached:s.n_cached + n], np.int32) for s, n in runs])
        batch = self._batch([(s.blocks, s.n_cached, n, s.open_row) for s, n in runs])
        chosen = self._graph_decode(tokens, batch, [s for s, _ in runs]) if len(tokens) == len(runs) else None
        if chosen is None:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/inf are checked below
                logits = self.model.forward(tokens, batch, self.cache)   # (B, vocab), on the backend
        self.stats["steps"] += 1
        ready = []
        for row, (s, n) in enumerate(runs):
            s.started = True
            s.n_cached += n
            self.pool.commit(s.blocks, s.ids, s.n_cached)
            if s.n_cached <= s.n_prompt:
                s.prefill_tokens += n
                self.stats["prefill_tokens"] += n
            else:
                self.stats["decode_tokens"] += n
            if s.n_cached == len(s.ids):       # else: the prompt is not fully cached yet
                ready.append((row, s))
        # (A captured decode graph samples on the device and hands back no logits to check.)
        if chosen is None and ready and not bool(np.isfinite(logits).all()):  # NEP-18: on the device for cupy
            rows = np.asarray(self.ops.to_numpy(logits))
            bad = [(r, s) for r, s in ready if not np.isfinite(rows[r]).all()]
            why = self.nonfinite_reason()
            for _, s in bad:
                s.finish = "error"
                yield Event("error", s.req.index, error=why, code="model_error")
            ready = [(r, s) for r, s in ready if not s.finish]
            if not ready:
                return
        if chosen is None:
            chosen = self._choose(logits, ready)
        wants_lp = any(s.req.params.logprobs is not None for _, s in ready)   # then `logits` exists
        lps = self._logprobs(logits, ready, chosen) if wants_lp else {}
        for (_, s), tok in zip(ready, chosen):
            yield from self._accept(s, tok, *lps.get(id(s), (None, None)))

    def _logprobs(self, logits, ready: list[tuple[int, _Seq]], toks: list[int]) -> dict:
        """id(seq) -> (logprob of its chosen token, top alternatives), for the sequences whose
        request asks for logprobs; their logits rows are copied to the host for it. (Such a
        step never runs as a captured graph: see _graph_decode.)"""
        want = [(r, s, t) for (r, s), t in zip(ready, toks) if s.req.params.logprobs is not None]
        if not want:
            return {}
        rows = self.ops.to_numpy(self.ops.take_rows(logits, np.asarray([r for r, _, _ in want], np.int32)))
        return {id(s): token_logprobs(row, t, s.req.params.logprobs) for (_, s, t), row in zip(want, rows)}

    def nonfinite_reason(self) -> str:
        """The error for NaN/inf logits, naming the first weight tensor holding NaN or inf
        (one pass over the weights, only when this happens)."""
        for name, a in self.model.w.named():
            if not bool(np.isfinite(a).all()):
                return (f"the model produced NaN/inf logits: weight tensor {name} holds NaN or inf values; "
                        f"the checkpoint is corrupt, re-download it")
        return ("the model produced NaN/inf logits (its weights are finite: activations overflowed; "
                "try a wider compute dtype, e.g. --dtype bf16 instead of fp16, or --backend numpy)")

    def _on_device(self, s: _Seq) -> bool:
        return hasattr(self.ops, "sample") and (s.req.params.repetition_penalty or 1.0) == 1.0

    @staticmethod
    def _device_params(seqs: list[_Seq]) -> tuple[list, list, list, list, list]:
        """Per sequence: temperature, top_k, top_p, seed and RNG step of on-device sampling."""
        p = [s.req.params for s in seqs]
        return ([q.temperature or 0.0 for q in p], [q.top_k or 0 for q in p],
                [q.top_p if q.top_p is not None else 1.0 for q in p],
                [s.device_seed for s in seqs], [len(s.generated) for s in seqs])

    def _graph_decode(self, tokens: np.ndarray, batch: Batch, seqs: list[_Seq]) -> list[int] | None:
        """A step where every sequence brings one token, through the backend's captured decode
        graph (forward + on-device sampling, cuda_graphs.py): the sampled ids, or None where
        the backend has no graphs (or they are off) or a sequence samples on the host."""
        graphs = getattr(self.ops, "graphs", None)
        if graphs is None or not all(self._on_device(s) and s.req.params.logprobs is None for s in seqs):
            return None                        # (logprobs need the logits, which a graph keeps)
        toks = graphs.step(self.model, tokens, batch, self.cache, *self._device_params(seqs))
        return None if toks is None else [int(t) for t in toks]

    def _choose(self, logits, ready: list[tuple[int, _Seq]]) -> list[int]:
        """Next token of each ready sequence. A backend with on-device sampling (cuda) draws
        there from (seed, step), copying only token ids back; repetition penalty and the numpy
        backend use the host sampler with the request's own Generator."""
        out: dict[int, int] = {}
        host = [(r, s) for r, s in ready if not self._on_device(s)]
        dev = [(r, s) for r, s in ready if self._on_device(s)]
        if dev:
            toks = self.ops.sample(self.ops.take_rows(logits, np.asarray([r for r, _ in dev], np.int32)),
                                   *self._device_params([s for _, s in dev]))
            out.update({id(s): int(t) for (_, s), t in zip(dev, toks)})
        if host:
            rows = self.ops.to_numpy(self.ops.take_rows(logits, np.asarray([r for r, _ in host], np.int32)))
            for (_, s), row in zip(host, rows):
                out[id(s)] = sample(row, s.req.params, s.rng, np.asarray(s.ids, np.int64))
        return [out[id(s)] for _, s in ready]

    def _accept(self, s: _Seq, tok: int, logprob: float | None = None, top: list | None = None) -> Iterator[Event]:
        p = s.req.params
        if not s.t_first:
            s.t_first = time.perf_counter()
        stop_tok = (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids
        if stop_tok:
            s.finish = "stop"
            s.text += s.decoder.flush()
        else:
            s.ids.append(tok)
            yield Event("token", s.req.index, token_id=tok, logprob=logprob, top_logprobs=top)
            s.text += s.decoder.push(tok)
            # A stop string cannot start before `emitted` (it would have been found earlier).
            hits = [i for i in (s.text.find(x, s.emitted) for x in s.stops) if i >= 0]
            if hits:
                s.text, s.finish = s.text[:min(hits)], "stop"
            elif len(s.generated) >= p.max_tokens or len(s.ids) >= self.max_seq_len:
                self._flush_length(s)
        yield from self._emit(s)

    def _flush_length(self, s: _Seq):
        s.text += s.decoder.flush()
        s.finish = "length"
        hits = [i for i in (s.text.find(x, s.emitted) for x in s.stops) if i >= 0]
        if hits:
            s.text, s.finish = s.text[:min(hits)], "stop"

    def _emit(self, s: _Seq) -> Iterator[Event]:
        # Emit what can no longer become part of a stop string.
        hold = 0 if s.finish else max((len(x) for x in s.stops), default=1) - 1
        upto = max(s.emitted, len(s.text) - hold)
        if upto > s.emitted:
            yield Event("text", s.req.index, text=s.text[s.emitted:upto])
            s.emitted = upto
        if s.finish:
            yield Event("finish", s.req.index, completion=s.completion())


class _PoolFull(Exception):
    """The only running sequence needs a block and the pool has none left."""

    def __init__(self, seq: _Seq):
        self.seq = seq
