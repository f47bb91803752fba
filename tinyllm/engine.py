"""The generation engine: continuous batching over a paged KV cache, in four parts.

    Engine.step():  scheduler.schedule()  ->  runner (forward, sample)  ->  output (text, events)
                    which sequences run        one batched forward          stop strings, finish
                    (scheduler.py, paging.py)  (runner.py, model.py)        (output.py)

Every step runs one forward over a ragged batch: each running sequence brings its next
prompt chunk (prefill) or its last sampled token (decode); a sequence whose ids are all
cached after it gets a token sampled from its last logits. Finished sequences give their
blocks back to the pool at once.

Two ways to drive it, both safe to mix on one engine:
- `run(requests)` generates for an iterable (pulled lazily, as room frees up) and yields the
  events of *its own* requests. Several run() generators may be interleaved in one thread
  or run in several threads: each step (under the engine's lock) advances every running
  sequence, and events are routed to the generator that added the sequence.
- a long-lived caller (the HTTP server) calls `add(req)`, `abort(seq_id)` and `step()` itself;
  step() returns the events of sequences no run() generator claims.
Sequences are known by the id add() returns (sequence.py); events carry both that `seq_id` and
the request's own `index`. The engine is handed its KVCacheSpec, decided once by its owner
(LLM's memory plan; tools and tests: memory.engine_for_model).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property

from .errors import TinyLLMError
from .kv_cache import KVCacheSpec
from .output import Completion, Event, Inbox, OutputProcessor, Router, error
from .paging import BlockPool
from .runner import ModelRunner
from .scheduler import Scheduler, new_stats
from .sequence import Request, Sequence, prompt_problem

__all__ = ["Completion", "Engine", "Event", "Request"]


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        backend,
        eos_ids: set[int],
        spec: KVCacheSpec,
        max_batch: int = 8,
        prefill_chunk: int = 512,
        prefix_caching: bool = True,
    ):
        self.model, self.ops, self.spec = model, backend, spec
        self.cache = self.pool = self.scheduler = self.runner = None  # ensure_cache() makes them
        self.max_seq_len, self.prefill_chunk = spec.max_seq_len, prefill_chunk
        self.max_batch, self.prefix_caching = max_batch, prefix_caching
        self.output = OutputProcessor(tokenizer, eos_ids, spec.max_seq_len)
        self.router = Router()  # events to the run() that added their sequence (output.py)
        self.stats = new_stats()  # counted by the scheduler
        self._lock = threading.RLock()

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @max_batch.setter
    def max_batch(self, n: int):  # (lowered by tests and benchmarks; the spec's open
        self._max_batch = n  # rows bound it from above: scheduler.py)
        if self.scheduler is not None:
            self.scheduler.max_batch = n

    def ensure_cache(self):
        """Allocate the KV cache and its block pool (once, at first use)."""
        if self.cache is None:
            self.cache = self.ops.alloc_kv(self.spec)
            self._new_schedule()

    def _new_schedule(self):
        self.pool = BlockPool(self.spec, self.prefix_caching)
        self.scheduler = Scheduler(self.pool, self.max_batch, self.prefill_chunk, self.stats)
        self.runner = ModelRunner(self.model, self.ops, self.cache)

    @cached_property
    def constraints(self):
        """The llguidance bridge of this model (constraints.py), built at first use."""
        from .constraints import Constraints

        return Constraints(self.output.tok, self.model.cfg.vocab_size, self.output.eos_ids)

    # ---- requests ---------------------------------------------------------------------------
    def add(self, req: Request) -> int:
        """Queue a request; a later step admits it and returns its events. Returns the
        sequence id abort() and partial() take."""
        with self._lock:
            s = self._start(req)
            if not s.finish:
                self.scheduler.add(s)
            return s.id

    def _start(self, req: Request, inbox: Inbox | None = None) -> Sequence:
        """The sequence of a request (its events to `inbox`, a run()'s); if it cannot run, it
        is finished ("error") and its error event is pending for the next step."""
        self.ensure_cache()
        s = Sequence.start(req, self.output.decoder(req.prompt_ids))
        if inbox is not None:
            inbox.claim(s.id)
        bad = self.check_prompt(req.prompt_ids)
        if bad:
            self.router.pending.append(error(s, bad[1], bad[0]))
        elif req.params.constrained:
            try:
                s.constraint = self.constraints.matcher(req.params)
            except TinyLLMError as e:
                self.router.pending.append(error(s, str(e), "invalid_constraint"))
        return s

    def abort(self, seq_id: int) -> bool:
        """Drop a sequence, waiting or running, without an event; its blocks are free at once."""
        with self._lock:
            self.router.routes.pop(seq_id, None)
            s = self.scheduler.abort(seq_id) if self.scheduler is not None else None
            if s is not None:
                self.router.keep_aborted(s)
            return s is not None

    def partial(self, seq_id: int) -> Completion | None:
        """The Completion so far (finish_reason "interrupted") of a sequence still running or
        just aborted (a run() generator closed, or interrupted by an exception)."""
        with self._lock:
            running = self.scheduler.running if self.scheduler is not None else []
            return self.router.partial(seq_id, running)

    def has_work(self) -> bool:
        return bool(self.router.pending) or (self.scheduler is not None and len(self.scheduler) > 0)

    def reset(self, message: str = "", hard: bool = False) -> list[Event]:
        """Fail every waiting and running sequence ("server_error" events carrying `message`,
        routed like any other) and free their blocks; hard: start from a new, empty block pool
        (after a fault the old one cannot be trusted). Returns the unrouted events."""
        with self._lock:
            self.ensure_cache()
            live = list(self.scheduler.waiting) + list(self.scheduler.running)
            events = [error(s, message or "the engine was reset", "server_error") for s in live]
            if hard:
                self._new_schedule()
            else:
                for s in live:
                    self.scheduler.abort(s.id)
            return self.router.route(events)

    # ---- steps ------------------------------------------------------------------------------
    def run(
        self, requests: Iterable[Request], added: Callable[[int], None] | None = None
    ) -> Iterator[Event]:
        """Generate for every request; yields its text pieces as they are certain, then one
        finish (or error) event per request. Requests are pulled from the iterable only when
        the batch has room; `added(seq_id)` is told each one's id. Closing the generator
        early aborts its unfinished requests."""
        pending, inbox, exhausted = iter(requests), Inbox(self.router), False

        def pull() -> Sequence | None:  # called by the scheduler, under the lock
            nonlocal exhausted
            for req in pending:
                s = self._start(req, inbox)
                if added:
                    added(s.id)
                if not s.finish:
                    return s
            exhausted = True
            return None

        try:
            while not exhausted or inbox.open_ids or inbox.events:
                if not inbox.events:
                    self.step(None if exhausted else pull)
                    if not inbox.events and exhausted and not self.has_work():
                        return  # (its sequences were aborted from outside)
                yield from inbox.drain()
        finally:
            for sid in inbox.open_ids:
                self.abort(sid)

    def step(self, pull: Callable[[], Sequence | None] | None = None) -> list[Event]:
        """One scheduling step and forward. Returns the events of sequences no run() claims:
        per sequence a "token" event for every token appended to its output, then "text"
        pieces, and "finish" (or "error": a prompt that cannot run, NaN logits) as it ends."""
        with self._lock:
            self.ensure_cache()
            events = self.router.take_pending()
            plan = self.scheduler.schedule(pull)
            if plan.outgrown is not None:  # one sequence alone outgrows the pool: it ends here
                events += self.output.finish_length(plan.outgrown)
            elif plan.runs:
                sampled, failed, why = self.runner.execute(plan.runs)
                self.scheduler.ran(plan.runs)
                events += self.output.step_events(sampled, failed, why)
            self.scheduler.finish_done()
            events += self.router.take_pending()  # (rejected while pulling)
            return self.router.route(events)

    # ---- full-sequence logits (no sampling), and prompt checks ------------------------------
    def logits(self, ids: list[int]):
        """(len(ids), vocab) float32 logits at every position (runner.full_logits: through the
        pool's blocks and the spec's logits row, so safe between steps of running sequences)."""
        bad = self.check_prompt(ids, allow_full=True)
        if bad:
            raise TinyLLMError(bad[1])
        with self._lock:
            self.ensure_cache()
            chunk = min(self.spec.max_chunk, self.prefill_chunk)
            return self.runner.full_logits(ids, self.pool, chunk)

    def check_prompt(self, ids: list[int], allow_full: bool = False) -> tuple[str, str] | None:
        """Why these prompt ids cannot run, as (code, message), or None
        (sequence.prompt_problem)."""
        return prompt_problem(ids, self.spec, self.model.cfg.vocab_size, allow_full)
