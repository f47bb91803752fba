"""The server's admission under a flood (issue #25), counted in engine steps, not seconds: the
engine thread (serve.EngineWorker) is driven one pass at a time in this process, so every
assertion is about which step a choice runs in. The timing figures are scripts/bench_fairness.py's
(BENCHMARKS.md)."""

from __future__ import annotations

from collections import defaultdict

import pytest

pytest.importorskip("prometheus_client")

from tinyllm import LLM, SamplingParams  # noqa: E402
from tinyllm.engine import Request  # noqa: E402
from tinyllm.serve import EngineWorker, Metrics  # noqa: E402

MAX_BATCH = 4
FLOOD = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=7)
SHORT = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.8, seed=11)


@pytest.fixture(scope="module")
def llm(tiny_factory):
    return LLM(str(tiny_factory("llama_gqa")), backend="numpy", max_batch=MAX_BATCH)


class Driver:
    """An EngineWorker whose loop this test turns by hand; events gathered per choice."""

    def __init__(self, llm):
        self.w = EngineWorker(llm.engine, Metrics())
        llm.engine.ensure_cache()
        self.events = defaultdict(list)
        self.steps = 0

    def sink(self, evs):
        for ev in evs:
            self.events[ev.index].append(ev)

    def submit(self, ids, params, group) -> int:
        index = self.w.new_index()
        self.w.submit(Request(ids, params, index), self.sink, group)
        return index

    def turn(self):
        before = self.w.engine.stats["steps"]
        assert self.w.turn()
        self.steps += self.w.engine.stats["steps"] - before

    def tokens(self, index) -> list[int]:
        return [e.token_id for e in self.events[index] if e.kind == "token"]

    def finished(self, index) -> bool:
        return any(e.kind == "finish" for e in self.events[index])


def test_a_newcomer_runs_in_the_next_step_while_a_flood_holds_every_slot(llm):
    """Two flood requests of 8 choices each fill the batch, their choices in lockstep (same
    prompt, same length), so no slot frees for 12 steps. A third request's one choice then
    runs in the very next step: the request holding the most slots gives up its newest choice,
    which resumes later and still produces exactly the tokens it would have alone."""
    tok = llm.tokenizer
    flood_ids, short_ids = tok.encode("tell me a story"), tok.encode("hi there")
    d = Driver(llm)
    flood = [d.submit(flood_ids, FLOOD, group) for group in (1, 2) for _ in range(8)]
    for _ in range(3):
        d.turn()
    sch = llm.engine.scheduler
    assert len(sch.running) == MAX_BATCH and len(d.w.fair) == 16 - MAX_BATCH
    assert all(len(d.tokens(i)) == 3 for i in flood[:2] + flood[8:10])  # both requests run

    short = d.submit(short_ids, SHORT, group=3)
    start, preempted = d.steps, llm.engine.stats["preemptions"]
    d.turn()
    assert d.steps == start + 1 and len(d.tokens(short)) == 1  # its first token, this step
    assert llm.engine.stats["preemptions"] == preempted + 1
    while not d.finished(short):
        d.turn()
    assert d.steps - start == SHORT.max_tokens  # one token a step, from the first

    while not all(d.finished(i) for i in flood):
        d.turn()
        assert d.steps < 400, "the flood did not finish"
    # nothing lost or repeated by the preemption: each choice as the engine gives it alone
    want_flood, want_short = llm.generate([flood_ids, short_ids], [FLOOD, SHORT])
    for i in flood:
        assert d.tokens(i) == want_flood.token_ids, i
    assert d.tokens(short) == want_short.token_ids
    assert not d.w.group_of and not d.w.seq_of and not d.w.fair  # nothing left behind


def test_a_request_never_loses_its_last_slot(llm):
    """Preemption only evens shares: with MAX_BATCH requests of one choice each running, a
    newcomer waits for a slot to free (no running request holds two), and nobody is
    preempted."""
    tok = llm.tokenizer
    ids = tok.encode("tell me a story")
    d = Driver(llm)
    first = [d.submit(ids, FLOOD, group) for group in range(1, MAX_BATCH + 1)]
    d.turn()
    late = d.submit(ids, SHORT, group=MAX_BATCH + 1)
    before = llm.engine.stats["preemptions"]
    while not d.tokens(late):
        d.turn()
        assert d.steps < 100
    assert llm.engine.stats["preemptions"] == before
    assert all(d.finished(i) for i in first)  # it ran only once one of them had ended
