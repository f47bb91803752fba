"""A planted fault in the server's engine thread (issue #19): every in-flight request fails at
once with a 500 in OpenAI's error shape, /health tells, and the engine comes back on a fresh
block pool; when the recovery itself fails, the server refuses with 503s and asks to exit
(status 1) — never a hang. The server runs in this process (uvicorn on a loopback socket) so
the engine can be broken from here."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tinyllm import LLM  # noqa: E402
from tinyllm.serve import create_app, listen  # noqa: E402


class Live:
    def __init__(self, llm):
        self.app = create_app(llm, ("tiny",))
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.worker = self.app.state.server.worker

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def live(tiny_factory):
    s = Live(LLM(str(tiny_factory("llama_gqa")), max_seq_len=256, max_batch=4))
    yield s
    s.stop()


def complete_all(url: str, n: int, max_tokens: int = 200) -> list[httpx.Response]:
    """n concurrent completions; their responses (each within 60 s: a hang fails here)."""
    out: list = [None] * n

    def one(i):
        out[i] = httpx.post(
            url + "/v1/completions",
            json={
                "model": "tiny",
                "prompt": [5 + i, 6, 7],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
            timeout=60,
        )

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(70)
    return out


def plant(worker, monkeypatch, in_flight: int, reset_fails: bool = False):
    """engine.step raises once, at the first step with `in_flight` requests tracked (and
    engine.reset too, if asked). Until then the engine thread steps nothing: its first step
    waits until `in_flight` requests are submitted (they are in its inbox then, tracked at
    its next turn), so however late the clients' requests arrive, none can finish before the
    fault and the fault always meets all `in_flight` of them."""
    engine, real, fired = worker.engine, worker.engine.step, []
    real_submit, submitted, all_in = worker.submit, itertools.count(1), threading.Event()

    def submit(*a, **k):
        real_submit(*a, **k)
        if next(submitted) >= in_flight:
            all_in.set()

    def step(*a, **k):
        if fired:
            return real(*a, **k)
        if len(worker.tracked) < in_flight:
            all_in.wait(60)  # (then they are all in the inbox)
            return []
        fired.append(1)
        raise RuntimeError("planted fault")

    monkeypatch.setattr(worker, "submit", submit)
    monkeypatch.setattr(engine, "step", step)
    if reset_fails:

        def reset(*a, **k):
            raise RuntimeError("planted fault during recovery")

        monkeypatch.setattr(engine, "reset", reset)


def is_openai_500(r: httpx.Response) -> bool:
    err = r.json().get("error", {})
    return (
        r.status_code == 500
        and err.get("type") == "server_error"
        and "internal error" in err["message"]
    )


def is_refused(r: httpx.Response) -> bool:
    return r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def test_fault_fails_every_in_flight_request_and_the_engine_comes_back(live, monkeypatch):
    plant(live.worker, monkeypatch, in_flight=3)
    rs = complete_all(live.url, 3)
    assert all(is_openai_500(r) for r in rs), [r.text for r in rs]
    assert live.worker.faults == 1 and live.worker.failed is None
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    again = complete_all(live.url, 2, max_tokens=5)
    assert all(r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0 for r in again)
    assert live.worker.engine.pool.n_used == 0


def test_fault_during_recovery_refuses_with_503_and_asks_to_exit(live, monkeypatch):
    # The clients get their 500s before the engine thread gives up (it fails the requests
    # first, then tries the reset, then sets `failed` and calls on_fatal): wait for on_fatal.
    fatal, gave_up = [], threading.Event()
    live.worker.on_fatal = lambda: (fatal.append(1), gave_up.set())
    plant(live.worker, monkeypatch, in_flight=3, reset_fails=True)
    rs = complete_all(live.url, 3)
    assert all(is_openai_500(r) for r in rs), [r.text for r in rs]
    assert gave_up.wait(60), "the engine thread never gave up after the failed recovery"
    assert fatal == [1] and live.worker.failed
    # the engine thread now sleeps on its inbox (it does not spin on the sequences left behind)
    turns, real_turn = [], live.worker.turn
    monkeypatch.setattr(live.worker, "turn", lambda **k: (turns.append(1), real_turn(**k))[1])
    time.sleep(0.3)
    assert len(turns) <= 2, f"the failed engine thread spun {len(turns)} times in 0.3 s"
    h = httpx.get(live.url + "/health")
    assert h.status_code == 503 and "could not recover" in h.json()["error"]["message"]
    r = httpx.post(
        live.url + "/v1/completions",
        json={"model": "tiny", "prompt": [5], "max_tokens": 2},
        timeout=30,
    )
    assert is_refused(r)
