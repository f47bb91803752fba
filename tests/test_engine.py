"""The engine's parts under concurrent use, and the review findings of f27a620 (issue #19),
each reproduced here and failing on that commit:

- interleaved LLM.stream() generators, generate() inside a stream loop and two threads on
  one LLM each get their own output (equal to the same request run alone);
- a finished sequence frees its blocks tail first, so a chain's head outlives its tail in the
  LRU;
- a burst sharing a cached prompt is admitted in one step when the pool has room;
- a sequence hashes its prompt once however often a blocked admission re-matches it;
- the EOS path checks stop strings in the text it flushes; timers start at arrival;
- a planted fault in the server's engine (also during recovery) fails every in-flight request
  at once with a 500 in OpenAI's shape, never a hang.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from tinyllm import LLM, SamplingParams, paging
from tinyllm.engine import Request
from tinyllm.output import OutputProcessor
from tinyllm.sequence import Sequence

RNG = np.random.default_rng(19)
IDS = [int(t) for t in RNG.integers(3, 256, 400)]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_factory):
    return LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=4)


def alone(llm, prompts, params=GREEDY):
    return [llm.generate([p], params)[0].token_ids for p in prompts]


# ---- concurrent use of one LLM ---------------------------------------------------------------


def test_interleaved_streams_each_get_their_own_output(llm):
    """Two stream() generators advanced in turn each get the text they get alone."""
    m = llm
    a_ids, b_ids = IDS[:9], IDS[50:70]
    want = [m.generate([p], GREEDY)[0] for p in (a_ids, b_ids)]
    ra, rb = [], []
    ga, gb = m.stream(a_ids, GREEDY, ra), m.stream(b_ids, GREEDY, rb)
    ta, tb, live = [], [], {0: ga, 1: gb}
    while live:  # one piece of each in turn
        for k, g in list(live.items()):
            piece = next(g, None)
            if piece is None:
                del live[k]
            else:
                (ta if k == 0 else tb).append(piece)
    assert ra[0].token_ids == want[0].token_ids and rb[0].token_ids == want[1].token_ids
    assert "".join(ta) == want[0].text and "".join(tb) == want[1].text


def test_generate_inside_a_stream_loop(llm):
    want_outer, want_inner = alone(llm, [IDS[:20], IDS[100:105]])
    res, inner = [], []
    for i, _ in enumerate(llm.stream(IDS[:20], GREEDY, res)):
        if i in (0, 3):
            inner.append(llm.generate([IDS[100:105]], GREEDY)[0].token_ids)
    assert res[0].token_ids == want_outer and inner == [want_inner, want_inner]


def test_two_threads_on_one_llm(llm):
    prompts = [IDS[i * 30 : i * 30 + 5 + 3 * i] for i in range(6)]
    want = alone(llm, prompts)
    got: dict[int, list] = {}

    def work(k):
        got[k] = [c.token_ids for c in llm.generate(prompts[k::2], GREEDY)]

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got[0] == want[0::2] and got[1] == want[1::2]


def test_closing_a_stream_early_aborts_its_request(llm):
    res = []
    g = llm.stream(IDS[:10], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), res)
    next(g)
    g.close()
    assert res and res[0].finish_reason == "interrupted"
    assert not llm.engine.has_work() and llm.engine.pool.n_used == 0


# ---- the block manager -------------------------------------------------------------------------


def test_tail_first_freeing_keeps_the_chain_head_matchable(tiny_factory):
    """A 10-row prompt is cached; an unrelated request then takes k = 3 free blocks: the LRU
    evicts the chain's last 3 rows, so its first 10 - 3 = 7 rows still hit."""
    m = LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=2, block_size=4)
    m.engine.spec = dataclasses.replace(m.engine.spec, n_blocks=14)
    chain = IDS[:41]  # 10 full rows of 4 (+1: ids[:-1])
    m.generate([chain], SamplingParams(max_tokens=1, temperature=0))
    pool = m.engine.pool
    assert pool.match(chain)[0] == 10 and pool.n_free == 14
    other = pool.new_seq()  # unhashed blocks go first: 3 never used + the partial row
    assert pool.grow(other, 4 * 7)  # 4 unhashed + k = 3 of the chain's (its tail)
    assert pool.match(chain)[0] == 7
    pool.free_seq(other)


def test_a_burst_sharing_a_cached_prompt_is_admitted_in_one_step(tiny_factory):
    """6 requests share a 12-block cached prefix (free in the pool) and each needs 1 more
    block: 12 + 6 = 18 blocks are there, so all 6 run in the first step."""
    m = LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=8, block_size=4)
    m.engine.spec = dataclasses.replace(m.engine.spec, n_blocks=20)
    system = IDS[:48]  # 12 full blocks
    m.generate([system + [7]], SamplingParams(max_tokens=1, temperature=0))
    eng = m.engine
    p = m.resolve_params(SamplingParams(max_tokens=1, temperature=0))
    for i in range(6):
        eng.add(Request(system + [10 + i, 20 + i], p, i))
    first = eng.step()
    assert sum(ev.kind == "finish" for ev in first) == 6  # one token each: all ran at once
    while eng.has_work():
        eng.step()
    assert eng.pool.n_used == 0


def test_matching_hashes_a_prompt_once(tiny_factory, monkeypatch):
    """A request blocked at the head of the queue is re-matched every step; its rows are
    hashed once in all (the hashes live on the sequence)."""
    m = LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=2, block_size=4)
    calls = []
    real = paging.chain_hash
    monkeypatch.setattr(paging, "chain_hash", lambda *a: calls.append(1) or real(*a))
    p = m.resolve_params(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    m.engine.spec = dataclasses.replace(m.engine.spec, n_blocks=60)
    eng = m.engine
    eng.add(Request(IDS[:200], p, 0))  # 50 (then 52) blocks of 60:
    eng.add(Request(IDS[200:390], p, 1))  # 48 more do not fit; 47 rows to hash
    eng.step()
    first = len(calls)
    for _ in range(5):
        eng.step()
    hashed_after = len(calls) - first
    assert hashed_after <= 6  # commits of new full rows only
    while eng.has_work():
        eng.step()


# ---- output --------------------------------------------------------------------------------------


class _Decoder:
    """Holds everything back until flush (as a decoder holding an incomplete character)."""

    def __init__(self):
        self.buf = ""

    def push(self, tok):
        self.buf += {5: "ab", 6: "c#"}.get(tok, "")
        return ""

    def flush(self):
        out, self.buf = self.buf + "#x", ""
        return out


def test_eos_path_checks_stop_strings():
    out = OutputProcessor(None, {2}, 100)
    req = Request([1], SamplingParams(max_tokens=10, stop=["##"]).validate(), 0)
    s = Sequence.start(req, _Decoder())
    evs = list(out.accept(s, 5)) + list(out.accept(s, 6)) + list(out.accept(s, 2))  # 2 = EOS
    fin = [e for e in evs if e.kind == "finish"][0].completion
    assert fin.text == "abc" and fin.finish_reason == "stop"


def test_timer_starts_at_arrival(llm):
    """With room for one sequence, the second request added waits for the first: its time to
    first token counts that wait (from add(), not from its admission)."""
    eng = llm.engine
    old, eng.max_batch = eng.max_batch, 1
    p = llm.resolve_params(SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    done = {}
    try:
        eng.add(Request(IDS[:10], p, 0))
        eng.add(Request(IDS[20:25], p, 1))
        while eng.has_work():
            done.update({ev.index: ev.completion for ev in eng.step() if ev.kind == "finish"})
    finally:
        eng.max_batch = old
    assert done[1].time_to_first_token >= 0.9 * done[0].elapsed
