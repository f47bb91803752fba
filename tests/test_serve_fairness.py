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
        llm.engine.reset()  # (what an earlier test left running)
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


@pytest.mark.parametrize("fanout_slots,width", [(0, MAX_BATCH), (1, 3)])
def test_fanout_slots_narrow_the_batch_while_a_single_choice_runs(
    llm, monkeypatch, fanout_slots, width
):
    """--fanout-slots 1: while a one-choice request runs beside two flood requests of 8
    choices, the flood keeps one slot per request (2; the cap of 1 cannot take a request's
    last slot), so every step of the short request runs a batch of 3 instead of MAX_BATCH;
    once it ends the flood is back at full width the next step. Off (0): the short request
    decodes in a full batch. Either way it starts in the next step and takes one token a
    step, and nothing is lost: every output is the one the engine gives it alone."""
    tok = llm.tokenizer
    flood_ids, short_ids = tok.encode("tell me a story"), tok.encode("hi there")
    d = Driver(llm)
    d.w.fanout_slots = fanout_slots
    sizes: list[int] = []
    sch = llm.engine.scheduler
    real_ran = sch.ran
    monkeypatch.setattr(sch, "ran", lambda runs: (sizes.append(len(runs)), real_ran(runs)))
    flood = [d.submit(flood_ids, FLOOD, group) for group in (1, 2) for _ in range(8)]
    for _ in range(3):
        d.turn()
    assert sizes == [MAX_BATCH] * 3  # no single choice: the cap does not apply

    short = d.submit(short_ids, SHORT, group=3)
    start = len(sizes)
    while not d.finished(short):
        d.turn()
    assert len(sizes) - start == SHORT.max_tokens  # from the next step, one token a step
    assert sizes[start:] == [width] * SHORT.max_tokens
    d.turn()
    assert sizes[-1] == MAX_BATCH  # the flood's slots come back at once
    while not all(d.finished(i) for i in flood):
        d.turn()
        assert d.steps < 400, "the flood did not finish"
    want_flood, want_short = llm.generate([flood_ids, short_ids], [FLOOD, SHORT])
    assert all(d.tokens(i) == want_flood.token_ids for i in flood)
    assert d.tokens(short) == want_short.token_ids
    assert not d.w.group_of and not d.w.seq_of and not d.w.fair


# ---- /health while a request is heavy -------------------------------------------------------


def test_health_answers_while_a_body_arrives_is_parsed_and_the_engine_is_busy(tiny_factory):
    """/health (a load balancer's probe) answers while another request is at each heavy stage,
    held there on purpose so the order is certain: its body half sent, its parsing (a worker
    thread's) blocked, the engine thread blocked inside a step. Each time /health returns
    while that request is provably unfinished, and the request completes once let go. The
    timeouts only guard against a hang."""
    import socket
    import threading

    httpx = pytest.importorskip("httpx")
    from test_server_faults import Live

    llm = LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=4)
    live = Live(llm)
    srv, gate, entered = live.app.state.server, threading.Event(), threading.Event()

    def health():
        r = httpx.get(live.url + "/health", timeout=60)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text

    def held(fn):  # fn, but the first call waits at the gate
        def wrapper(*a, **k):
            if not gate.is_set():
                entered.set()
                assert gate.wait(60), "hang guard"
            return fn(*a, **k)

        return wrapper

    body = b'{"prompt": "' + b"x" * 100_000 + b'", "max_tokens": 1}'
    out = []

    def post():
        out.append(httpx.post(live.url + "/v1/completions", content=body, timeout=60))

    try:
        # 1. the body is still arriving: headers and half of it sent
        host, port = live.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            s.sendall(head.encode() + body[: len(body) // 2])
            health()
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)  # no answer yet: it cannot have one
            s.setblocking(True)
            s.sendall(body[len(body) // 2 :])
            assert s.recv(64).startswith(b"HTTP/1.1 400")  # far longer than the context

        # 2. parsing (on a worker thread) held, then 3. the engine thread held in a step
        for obj, name in ((srv, "_parse_sync"), (llm.engine, "step")):
            gate.clear()
            entered.clear()
            real = getattr(obj, name)
            setattr(obj, name, held(real))
            if name == "step":
                body = b'{"prompt": [5, 6, 7], "max_tokens": 4}'
            t = threading.Thread(target=post)
            t.start()
            assert entered.wait(60), "hang guard"
            health()
            assert t.is_alive() and len(out) == (0 if name == "_parse_sync" else 1)
            gate.set()
            t.join(60)
            setattr(obj, name, real)
        assert out[0].status_code == 400  # the long text, parsed once let go
        assert out[1].status_code == 200 and len(out[1].json()["choices"]) == 1
    finally:
        gate.set()
        live.stop()
