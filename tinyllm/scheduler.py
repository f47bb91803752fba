"""The scheduler: which sequences run in the next forward, and how many tokens each brings.

It sees only the sequences (sequence.py) and the block manager (paging.py): no model, no
backend, no tokenizer. Each step (continuous batching, as vLLM and nano-vllm):

1. Re-match: a running sequence that has computed nothing yet (it holds only prefix-cache
   hits) takes any longer prefix that sequences ahead of it cached since its admission, so
   requests arriving together compute a shared prompt once.
2. Admit waiting sequences, oldest first, while fewer than max_batch run and the pool has
   the blocks they take beyond those already owed to running sequences:
       owed  = sum over running of (blocks for all their ids - rows they hold)
       admit s if  hits_free(s) + fresh(s) <= n_free - owed      (paging.admit_cost)
   After admission only `fresh` is owed: its free hits left the free list as it took them.
   The first sequence that does not fit stops admission (order is kept, no overtaking).
3. Plan: every decoding sequence brings its one token; prompts bring chunks within a token
   budget of prefill_chunk (and max_chunk of a window ring). Blocks are taken oldest
   sequence first; when the pool runs dry the newest running sequence is preempted (its
   blocks go back, it waits first in line and recomputes them later, mostly from the
   prefix cache). A sequence that alone outgrows the pool is handed back as `outgrown`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .paging import BlockPool
from .sequence import Sequence, Status


def new_stats() -> dict[str, int]:
    """Engine.stats: forwards run, prompt and decode tokens computed, prompt tokens served from
    the prefix cache, preemptions. The scheduler counts them; they outlive its replacement."""
    keys = ("steps", "prefill_tokens", "decode_tokens", "cached_tokens", "preemptions")
    return dict.fromkeys(keys, 0)


@dataclass
class Plan:
    runs: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    outgrown: Sequence | None = None  # the only running sequence, and the pool has no block for it


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, prefill_chunk: int, stats: dict):
        self.pool, self.spec = pool, pool.spec
        self.max_batch, self.prefill_chunk, self.stats = max_batch, prefill_chunk, stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.open_rows = list(self.spec.seq_open_rows)  # open rows no running sequence holds

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, s: Sequence):
        self.waiting.append(s)

    def abort(self, seq_id: int) -> Sequence | None:
        """Take the sequence with this id out of the schedule (its blocks back to the pool)."""
        for s in self.waiting:
            if s.id == seq_id:
                self.waiting.remove(s)
                s.status = Status.FINISHED
                return s
        for s in self.running:
            if s.id == seq_id:
                self.finish(s)
                return s
        return None

    def finish(self, s: Sequence):
        """s is done (or aborted): its blocks go back to the pool, tail first."""
        self.running.remove(s)
        self.pool.free_seq(s.blocks)
        s.blocks = None
        self.open_rows.append(s.open_row)
        s.status = Status.FINISHED

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self, pull: Callable[[], Sequence | None] | None = None) -> Plan:
        for s in self.running:  # (hits appear only after a forward: the last step's)
            if not s.started:
                self._rematch(s)
        self._admit_waiting(pull)
        return self._plan()

    def _admit_waiting(self, pull):
        owed = sum(self._owed(s) for s in self.running)
        while len(self.running) < self.max_batch and self.open_rows:
            s = self.waiting.popleft() if self.waiting else pull() if pull else None
            if s is None:
                return
            matched = self.pool.match(s.ids, s.block_hashes, s.root)
            hits, fresh = self.pool.admit_cost(matched, len(s.ids))
            if hits + fresh > self.pool.n_free - owed and self.running:
                self.waiting.appendleft(s)  # no room yet: it waits, in order
                return
            self._take_prefix(s, matched)
            s.open_row, s.status = self.open_rows.pop(), Status.RUNNING
            self.running.append(s)
            owed += fresh

    def _owed(self, s: Sequence) -> int:
        """Blocks a running sequence still takes to hold all its ids."""
        return max(0, self.spec.blocks_for(len(s.ids)) - s.blocks.rows)

    def _rematch(self, s: Sequence):
        matched = self.pool.match(s.ids, s.block_hashes, s.root)
        if matched[0] * self.spec.block_size > s.n_cached:
            old = s.blocks
            self._take_prefix(s, matched)
            self.pool.free_seq(old)

    def _take_prefix(self, s: Sequence, matched: tuple[int, list[bytes]]):
        """A new table for s holding its prefix-cache hits. The hits of its first admission are
        its cached_tokens (a readmitted sequence keeps its figure)."""
        s.blocks = self.pool.admit(s.ids, matched, s.root)
        s.n_cached = s.blocks.cached_tokens
        if not s.t_first:
            self.stats["cached_tokens"] += s.n_cached - s.cached_tokens
            s.cached_tokens = s.n_cached

    def preempt(self, seq_id: int) -> bool:
        """Send a running sequence back to wait behind those already waiting (its blocks go
        back to the pool; it recomputes them later, mostly from the prefix cache): the
        server's fair queue makes a slot for a newcomer this way (serve.EngineWorker)."""
        s = next((s for s in self.running if s.id == seq_id and not s.finish), None)
        if s is not None:
            self._preempt(s, first=False)
        return s is not None

    def _preempt(self, s: Sequence, first: bool = True):
        self.finish(s)
        s.n_cached, s.started, s.status = 0, False, Status.WAITING
        (self.waiting.appendleft if first else self.waiting.append)(s)
        self.stats["preemptions"] += 1

    def _plan(self) -> Plan:
        """Decode tokens first (one each), then prompt chunks within the token budget; blocks
        oldest sequence first, preempting the newest when the pool runs dry."""
        want: dict[int, int] = {}
        budget = self.prefill_chunk
        order = sorted(self.running, key=lambda s: s.prefilling)
        for s in order:
            if s.todo == 1:
                want[s.id] = 1
            elif budget > 0:  # else this prompt waits for the next step
                want[s.id] = min(s.todo, self.spec.max_chunk, budget)
                budget -= want[s.id]
        for s in list(self.running):  # oldest first
            if s.id not in want or s.blocks is None:
                continue
            while not self.pool.grow(s.blocks, s.n_cached + want[s.id]):
                victim = self.running[-1]
                if victim is s and len(self.running) == 1:
                    return Plan(outgrown=s)
                self._preempt(victim)
                if victim is s:
                    break
        return Plan([(s, want[s.id]) for s in order if s.id in want and s.blocks is not None])

    def ran(self, runs: list[tuple[Sequence, int]]):
        """A forward computed K/V for the runs' tokens: advance each sequence, and count."""
        self.stats["steps"] += 1
        for s, n in runs:
            self.advance(s, n)
            kind = "prefill_tokens" if s.n_cached <= s.n_prompt else "decode_tokens"
            self.stats[kind] += n
            s.prefill_tokens += n if kind == "prefill_tokens" else 0

    def finish_done(self):
        """Release the running sequences that finished (their blocks back to the pool)."""
        for s in [s for s in self.running if s.finish]:
            self.finish(s)

    def advance(self, s: Sequence, n: int):
        """A forward wrote K/V for s's next n tokens: offer its newly full blocks to the cache."""
        s.started = True
        s.n_cached += n
        self.pool.commit(s.blocks, s.ids, s.n_cached)
