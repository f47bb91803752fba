"""The generation engine: continuous batching over KV-cache slots.

Every step runs one forward over a ragged batch: each live sequence brings either its next
prompt chunk (prefill) or its last sampled token (decode). A sequence whose prompt is fully
cached gets a token sampled from its last logits. A finished sequence frees its slot, and
the next waiting request's prefill starts there in the following step.

Streaming text is produced here (the tokenizer's incremental decoder), because stop strings
are matched on text; text that could still become a stop string is held back.

Two ways to drive it: `run(requests)` generates for an iterable (pulled lazily, as slots
free up) and yields events; a long-lived caller (the HTTP server) instead calls `add(req)`,
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
from .kv_cache import KVCacheSpec
from .sampling import SamplingParams, sample, token_logprobs


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]                 # generated only
    text: str
    finish_reason: str                   # "stop" | "length"
    index: int = 0                       # position of the request in its input
    prefill_tokens: int = 0              # prompt tokens actually computed (the rest came from the cache)
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
    slot: int | None = None              # pin to a slot (chat sessions reuse it)


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
    slot: int
    ids: list[int]                       # prompt + generated
    n_prompt: int
    n_cached: int                        # ids[:n_cached] have K/V in the slot
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

    @property
    def generated(self) -> list[int]:
        return self.ids[self.n_prompt:]

    def completion(self) -> Completion:
        """What this sequence produced so far; finish_reason "interrupted" while unfinished."""
        t_first = self.t_first - self.t0 if self.t_first else 0.0
        return Completion(self.ids[:self.n_prompt], self.generated, self.text, self.finish or "interrupted",
                          self.req.index, self.prefill_tokens, t_first, time.perf_counter() - self.t0)


class _NoText:
    """The stream decoder of a model without a tokenizer: token ids only, no text."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def reusable_prefix(cached: list[int], ids: list[int], written_hi: int, spec: KVCacheSpec) -> int:
    """How many leading tokens of `ids` may keep the K/V already in a slot whose first
    len(cached) positions hold `cached`, and into which positions up to written_hi - 1 were
    written since it last started from position 0. At least one token is always recomputed
    (its logits are needed).

    Reusing a prefix p is sound when every key a query at p or later may see is still
    intact: a rolling cache lost the positions below written_hi - capacity to overwrites, so
    the window before p, max(0, p - W + 1), must lie above them. Entries at positions >= p
    that are left over from the old sequence are then masked by position (kv_cache)."""
    p = 0
    for a, b in zip(cached, ids[:-1]):
        if a != b:
            break
        p += 1
    first_needed = max(0, p - spec.window + 1) if spec.window else 0
    return p if first_needed >= written_hi - spec.capacity else 0


class Engine:
    def __init__(self, model, tokenizer, backend, eos_ids: set[int], max_seq_len: int,
                 kv_dtype: str, max_batch: int = 8, prefill_chunk: int = 512):
        self.model, self.tok, self.ops = model, tokenizer, backend
        self.eos_ids = set(eos_ids)
        self.max_seq_len, self.kv_dtype = max_seq_len, kv_dtype
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.cache = None
        self.slot_ids: list[list[int]] = []   # tokens whose K/V each slot holds
        self.slot_hi: list[int] = []          # highest position written + 1, since position 0
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        # The schedule (reset() starts it afresh): requests not yet admitted, in order; the
        # sequences holding a slot; the slots holding none. len(live) <= max_batch.
        self.waiting: deque[Request] = deque()
        self.live: list[_Seq] = []
        self.free: list[int] = []

    # ---- cache -----------------------------------------------------------------------
    def spec(self, n_slots: int) -> KVCacheSpec:
        return KVCacheSpec.for_model(self.model.cfg, self.kv_dtype, self.max_seq_len, n_slots,
                                     chunk=self.prefill_chunk)

    def ensure_cache(self, n_slots: int):
        if self.cache is None or self.cache.spec.n_slots < n_slots:
            self.cache = None                  # free the old one before allocating
            self.cache = self.ops.alloc_kv(self.spec(n_slots))
            self.slot_ids = [[] for _ in range(n_slots)]
            self.slot_hi = [0] * n_slots

    def _will_write(self, slot: int, start: int, n: int):
        """Record, before a forward writes positions start .. start+n-1 into a slot, that only
        ids[:start] are known good; after it, call _wrote. An interrupted forward thus never
        leaves the slot claiming K/V it may have overwritten."""
        del self.slot_ids[slot][start:]
        self.slot_hi[slot] = start + n if start == 0 else max(self.slot_hi[slot], start + n)

    def _wrote(self, slot: int, ids: list[int]):
        self.slot_ids[slot].extend(ids)

    # ---- full-sequence logits (no sampling) --------------------------------------------
    def logits(self, ids: list[int], slot: int = 0) -> np.ndarray:
        """(len(ids), vocab) float32 logits at every position, prefilled chunk by chunk."""
        bad = self.check_prompt(ids, allow_full=True)
        if bad:
            raise TinyLLMError(bad[1])
        self.ensure_cache(max(1, slot + 1))
        chunk = min(self.cache.spec.max_chunk, self.prefill_chunk)
        out = []
        for s in range(0, len(ids), chunk):
            part = ids[s:s + chunk]
            self._will_write(slot, s, len(part))
            batch = Batch([slot], [s], [len(part)])
            out.append(self.ops.to_numpy(self.model.forward(np.asarray(part, np.int32), batch, self.cache,
                                                            all_logits=True)))
            self._wrote(slot, part)
        return np.concatenate(out, axis=0)

    # ---- generation --------------------------------------------------------------------
    def run(self, requests: Iterable[Request]) -> Iterator[Event]:
        """Generate for every request, max_batch at a time; yields text pieces as they are
        certain, then one finish (or error) event per request. Requests are pulled from the
        iterable only when a slot is free for them. Starts a fresh schedule (reset())."""
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
            if exhausted and not self.live:
                return

    def partial(self, index: int) -> Completion | None:
        """The Completion so far of a request still running (after the consumer stopped run())."""
        return next((s.completion() for s in self.live if s.req.index == index), None)

    # ---- the schedule, step by step (the server's interface) ---------------------------
    def reset(self):
        """Forget every waiting and running request; all slots become free (their K/V stays
        valid for prefix reuse)."""
        self.ensure_cache(self.max_batch)
        self.waiting.clear()
        self.live.clear()
        self.free = list(range(self.cache.spec.n_slots))

    def add(self, req: Request):
        """Queue a request; a later step() admits it when a slot is free. Its `index` is the
        id that its events carry and that abort() takes: keep it unique among queued ones."""
        if self.cache is None or not (self.free or self.live):     # no schedule started yet
            self.reset()
        self.waiting.append(req)

    def abort(self, index: int) -> bool:
        """Drop the request with this index, waiting or running, without an event. A running
        one's slot is free for the next admission at once. True if it was found."""
        for req in self.waiting:
            if req.index == index:
                self.waiting.remove(req)
                return True
        for s in self.live:
            if s.req.index == index:
                self._release(s)
                return True
        return False

    def step(self, pull: Callable[[], Request | None] | None = None) -> list[Event]:
        """Admit waiting requests into free slots (then ask `pull` for more, until it returns
        None), run one forward over the batch, and return its events: per request a "token"
        event for every token appended to its output, then "text" pieces, and "finish" (or
        "error": a prompt that cannot run, NaN logits) as it ends. A finished request's slot is
        free for the next step."""
        events: list[Event] = []
        while len(self.live) < self.max_batch and self.free:
            req = self.waiting.popleft() if self.waiting else pull() if pull else None
            if req is None:
                break
            bad = self.check_prompt(req.prompt_ids)
            if bad:
                events.append(Event("error", req.index, error=bad[1], code=bad[0]))
                continue
            slot = req.slot if req.slot is not None and req.slot in self.free else self.free[0]
            self.free.remove(slot)
            self.live.append(self._admit(req, slot))
        if self.live:
            events += self._step(self.live)
            for s in [s for s in self.live if s.finish]:
                self._release(s)
        return events

    def _release(self, s: _Seq):
        self.live.remove(s)
        self.free.append(s.slot)
        self.free.sort()

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

    def _admit(self, req: Request, slot: int) -> _Seq:
        p = req.params
        rng = np.random.default_rng(p.seed)
        cached = reusable_prefix(self.slot_ids[slot], req.prompt_ids, self.slot_hi[slot], self.cache.spec)
        decoder = self.tok.stream(req.prompt_ids) if self.tok is not None else _NoText()
        seq = _Seq(req, slot, list(req.prompt_ids), len(req.prompt_ids), cached, rng, decoder, list(p.stop or []))
        seq.device_seed = p.seed % 2**63 if p.seed is not None else int(np.random.default_rng().integers(2**63))
        return seq

    def _step(self, live: list[_Seq]) -> Iterator[Event]:
        # Decode tokens first (one each), then prompt chunks within the token budget.
        runs = []
        budget = self.prefill_chunk
        max_chunk = self.cache.spec.max_chunk
        for s in sorted(live, key=lambda s: s.n_cached < s.n_prompt):
            todo = len(s.ids) - s.n_cached
            if todo == 1:
                n = 1
            elif budget <= 0:
                continue                       # this prompt waits for the next step
            else:
                n = min(todo, max_chunk, budget)
                budget -= n
            runs.append((s, n))
        tokens = np.concatenate([np.asarray(s.ids[s.n_cached:s.n_cached + n], np.int32) for s, n in runs])
        batch = Batch([s.slot for s, _ in runs], [s.n_cached for s, _ in runs], [n for _, n in runs])
        for s, n in runs:
            self._will_write(s.slot, s.n_cached, n)
        chosen = self._graph_decode(tokens, batch, [s for s, _ in runs]) if len(tokens) == len(runs) else None
        if chosen is None:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # NaN/inf are checked below
                logits = self.model.forward(tokens, batch, self.cache)   # (B, vocab), on the backend
        self.stats["steps"] += 1
        ready = []
        for row, (s, n) in enumerate(runs):
            self._wrote(s.slot, s.ids[s.n_cached:s.n_cached + n])
            s.n_cached += n
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
                s.text += s.decoder.flush()
                s.finish = "length"
                hits = [i for i in (s.text.find(x, s.emitted) for x in s.stops) if i >= 0]
                if hits:
                    s.text, s.finish = s.text[:min(hits)], "stop"
        # Emit what can no longer become part of a stop string.
        hold = 0 if s.finish else max((len(x) for x in s.stops), default=1) - 1
        upto = max(s.emitted, len(s.text) - hold)
        if upto > s.emitted:
            yield Event("text", s.req.index, text=s.text[s.emitted:upto])
            s.emitted = upto
        if s.finish:
            yield Event("finish", s.req.index, completion=s.completion())
