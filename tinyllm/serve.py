"""`tinyllm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Owns the HTTP surface (FastAPI routes, OpenAI response and error shapes, Server-Sent Events,
the API key, Prometheus metrics) and the thread that drives the engine. It does not own
request-body validation shared with `tinyllm batch` (batch.py: messages, prompt, sampling
fields), generation (engine.py) or chat templates (tokenizer.py).

Threads: the engine is not thread-safe, so exactly one thread (EngineWorker) touches it. It
loops: take commands from its inbox (add a request, abort one), run one engine step over
every live request, hand each request's events to that request's asyncio queue through
loop.call_soon_threadsafe. The ASGI handlers run on the event loop and only talk to the
worker through those queues; so concurrent requests share every decode step, and a client
that goes away aborts its requests, freeing their KV-cache blocks for the next step.

    request --> handler --submit--> inbox --> EngineWorker: engine.step()
            --events--> queue --> handler --> SSE
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' annotations,
# and `HTTPRequest` is imported inside create_app (fastapi is an optional extra).
import asyncio
import collections
import hmac
import ipaddress
import itertools
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from . import serve_limits
from .batch import Item, LineError, check_messages, check_prompt, request_params, tokenize
from .engine import Event, Request
from .errors import TinyLLMError
from .fair_queue import FairQueue
from .request_json import BodyError
from .request_json import loads as load_body
from .sampling import MAX_LOGPROBS, SamplingParams
from .serve_limits import LimitError, Limits
from .tools import TOOL_FIELDS, ToolStream, call_deltas, check_tool_fields, tool_prompt
from .tools import message as tool_message

# Body fields the server reads itself; everything else goes through batch.request_params.
SERVER_FIELDS = (
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "top_logprobs",
    "cache_salt",
    "return_token_ids",
)
MAX_N = 16  # choices per request
# How long SIGINT/SIGTERM waits for in-flight requests before they end with a 503.
GRACEFUL_SHUTDOWN_S = serve_limits.DEFAULT_SHUTDOWN_S
SHUTTING_DOWN = "the server is shutting down; the request was not completed: retry it elsewhere"
# Prometheus histogram buckets (seconds), after vLLM's (with finer ones below 10 ms for small
# models).
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class APIError(Exception):
    """An OpenAI-shaped error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientGone(Exception):
    """The client of a plain (non-streamed) request disconnected."""


# ---- metrics ---------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics in a registry of this server's own (prometheus_client is thread-safe:
    the engine thread observes token timings, the handlers count requests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "tinyllm_requests",
            "HTTP generation requests by outcome "
            "(ok, cancelled: the client went away, invalid: 4xx, error: 5xx)",
            ["outcome"],
            registry=r,
        )
        self.finished = Counter(
            "tinyllm_sequences_finished",
            "generated choices by finish_reason",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tinyllm_prompt_tokens", "prompt tokens of admitted choices", registry=r
        )
        self.generation_tokens = Counter(
            "tinyllm_generation_tokens", "generated tokens", registry=r
        )
        self.ttft = Histogram(
            "tinyllm_time_to_first_token_seconds",
            "from arrival to the first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tinyllm_inter_token_latency_seconds",
            "between consecutive tokens of a choice",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.steps = Counter(
            "tinyllm_engine_steps", "engine steps (one batched forward each)", registry=r
        )
        self.running = Gauge("tinyllm_requests_running", "choices in the running batch", registry=r)
        self.waiting = Gauge(
            "tinyllm_requests_waiting",
            "choices waiting for room in the batch or the KV cache (preempted ones included)",
            registry=r,
        )
        self.kv_blocks_used = Gauge(
            "tinyllm_kv_cache_blocks_used", "KV-cache blocks held by running choices", registry=r
        )
        self.kv_blocks = Gauge("tinyllm_kv_cache_blocks", "KV-cache blocks in the pool", registry=r)
        self.kv_tokens_used = Gauge(
            "tinyllm_kv_cache_tokens_used", "tokens whose K/V running choices hold", registry=r
        )
        self.queued = Gauge(
            "tinyllm_choices_queued",
            "choices waiting in the server's fair queue for an engine slot (fair_queue.py)",
            registry=r,
        )
        self.kv_usage = Gauge(
            "tinyllm_kv_cache_usage_ratio",
            "fraction of KV-cache blocks held (used / total)",
            registry=r,
        )
        self.prefix_hits = Counter(
            "tinyllm_prefix_cache_hit_tokens",
            "prompt tokens served from the prefix cache instead of computed",
            registry=r,
        )
        self.preemptions = Counter(
            "tinyllm_preemptions",
            "running choices preempted (recomputed later): the KV cache ran out, or another "
            "request had no slot (fair_queue.py)",
            registry=r,
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the engine thread ------------------------------------------------------------------


@dataclass
class _Tracked:
    sink: Callable[[list[Event]], None]  # called on the engine thread with this step's events
    arrival: float
    last: float = 0.0  # time of the latest token (0: none yet)


class EngineWorker:
    """The one thread that runs the engine. Other threads call submit/abort/stop only.

    An exception anywhere in a step (a bug) fails every in-flight request at once with a 500
    in OpenAI's shape and starts the engine afresh on a new block pool (Engine.reset(hard));
    if even that fails, the worker is `failed`: /health says so with a 503, every request is
    refused with a 503, and `on_fatal` (run_serve: stop the server, exit status 1) is called.
    No request ever waits on a thread that is gone."""

    FAULT = "internal error in the engine (see the server log); the request was not completed"

    def __init__(self, engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.tracked: dict[int, _Tracked] = {}  # engine thread only
        self.seq_of: dict[int, int] = {}  # request index -> engine sequence id
        self.group_of: dict[int, int] = {}  # engine sequence id -> its HTTP request (group)
        self.fair = FairQueue()  # choices not yet in the engine (engine thread only)
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="tinyllm-engine", daemon=True)
        self.failed: str | None = None  # why the engine is gone for good
        self.faults = 0
        self.fanout_slots = 0  # --fanout-slots: the cap _cap_fanout applies (0: none)
        self.on_fatal: Callable[[], None] | None = None

    def start(self):
        self.thread.start()

    def new_index(self) -> int:
        return next(self._ids)  # itertools.count is atomic under the GIL

    def submit(self, req: Request, sink: Callable[[list[Event]], None], group: int = 0):
        """Queue a request; `sink` receives its events, a list per engine step, on the engine
        thread, and must not block (requests handing the same sink get one list a step, their
        events together). The request's index must come from new_index(); `group`
        names the HTTP request it belongs to (the fair queue takes groups in turn)."""
        if self.failed:
            sink([Event("error", req.index, error=self.failed, code="engine_failed")])
            return
        self.inbox.put(("add", (group, req), sink, time.perf_counter()))

    def abort(self, index: int):
        self.inbox.put(("abort", index, None, 0.0))

    def stop(self, timeout: float = 30):
        """Abort whatever is left and end the thread."""
        if self.thread.is_alive():
            self.inbox.put(("stop", None, None, 0.0))
            self.thread.join(timeout)

    def _loop(self):
        eng = self.engine
        try:
            eng.ensure_cache()
            self.metrics.kv_blocks.set(eng.spec.n_blocks)
        except Exception:
            self._fault(recover=False)
        while self.turn(block=True):
            pass

    def turn(self, block: bool = False) -> bool:
        """One pass of the loop: apply the inbox's commands (with `block`, sleep until one
        comes when there is nothing to run), feed the engine, run one step; False on stop."""
        eng = self.engine
        cmds = []
        # (after a failed recovery the engine may still hold sequences it will never step:
        # sleep on the inbox then too, not spin)
        if block and (self.failed or not eng.has_work()) and not self.fair:
            cmds.append(self.inbox.get())
        try:
            while True:
                cmds.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        try:
            if self._commands(cmds):
                return False
            self._feed()
            self._cap_fanout()
            if eng.has_work() and not self.failed:
                self._step()
            self._publish()
        except Exception:
            self._fault()
        return True

    def _commands(self, cmds) -> bool:
        """Apply the inbox's commands; True on stop."""
        eng = self.engine
        for kind, a, sink, t in cmds:
            if kind == "add":
                group, req = a
                if self.failed:
                    sink([Event("error", req.index, error=self.failed, code="engine_failed")])
                    continue
                self.tracked[req.index] = _Tracked(sink, t)
                self.fair.put(group, req.index, req)
            elif kind == "abort":
                if self.tracked.pop(a, None) is not None and not self.fair.remove(a):
                    eng.abort(self._forget(a))
            else:  # stop
                self.fair.drain()
                for index in list(self.seq_of):
                    eng.abort(self._forget(index))
                self.tracked.clear()
                self._publish()
                return True
        return False

    def _feed(self):
        """Move choices from the fair queue into the engine while it has free batch slots (so
        the engine's own first-come-first-served queue never holds more than a batch), then
        make room for requests that have nothing in the engine (_make_room)."""
        eng = self.engine
        if self.failed or eng.scheduler is None:
            return
        sch = eng.scheduler
        for _ in range(eng.max_batch - len(sch.running) - len(sch.waiting)):
            if not self.fair:
                return
            self._add(next(self.fair.groups()))
        self._make_room()

    def _add(self, group: int):
        req = self.fair.pop(group)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.seq_of[req.index] = seq = self.engine.add(req)
        self.group_of[seq] = group

    def _forget(self, index: int) -> int:
        """The engine sequence of request index `index`, no longer tracked."""
        seq = self.seq_of.pop(index)
        self.group_of.pop(seq, None)
        return seq

    def _make_room(self):
        """With every slot running and nothing waiting in the engine, each request in the fair
        queue that has no choice in the engine takes the slot of the newest running choice of
        the request holding the most slots, while that one holds two or more: the choice is
        preempted (Scheduler.preempt: it keeps its tokens and waits behind the newcomers, then
        resumes before anything else enters). A newcomer so runs from the next step instead
        of waiting for a slot to free (up to max_tokens steps when a flood's choices end
        together); each move only evens the shares, so no request loses its last slot."""
        eng = self.engine
        sch = eng.scheduler
        if sch.waiting or len(sch.running) < eng.max_batch or not self.fair:
            return
        held: dict[int, list[int]] = {}  # group -> its running sequences, oldest first
        for s in sch.running:
            held.setdefault(self.group_of.get(s.id, -1), []).append(s.id)
        held.pop(-1, None)  # (sequences the server did not add: none today)
        spare = sum(len(seqs) - 1 for seqs in held.values())  # slots that can be given
        present = set(self.group_of.values())  # (at most a batch of requests: O(max_batch))
        newcomers = list(
            itertools.islice((g for g in self.fair.groups() if g not in present), spare)
        )
        victims = []
        for _ in newcomers:
            most = max(held.values(), key=len)
            victims.append(most.pop())  # the newest choice of the request holding the most
        for group in newcomers:  # queued before the victims, so admitted first
            self._add(group)
        for seq in victims:
            sch.preempt(seq)
        self.metrics.preemptions.inc(len(victims))

    def _cap_fanout(self):
        """--fanout-slots N: while a *single* choice is in the engine (a request of one choice,
        nothing of it queued), the requests with several choices there hold at most N batch
        slots between them (but each keeps one): the newest choices of the request holding the
        most are preempted, as _make_room does, the engine's queue puts the single choices
        first, and the engine runs at most singles + N sequences a step. With the cap on, a
        request that has nothing in the engine enters it at once (it waits for no slot).

        Why: on a backend where a step's cost grows with its batch (numpy: OpenBLAS's small-M
        GEMM costs ~2x a GEMV; a 64-wide model's per-sequence work), a short request decoding
        beside a flood pays for the flood's width every step, up to ~3x its latency alone,
        however fairly it was admitted. The price is the flood's throughput while a single
        runs: it decodes N (or one per request) sequences a step instead of max_batch - 1.
        Measured (BENCHMARKS.md, issue 25): tiny model on numpy, B's flooded/unloaded latency
        2.1-2.3x -> 1.6-1.8x at no flood throughput lost (before a step's rows were sampled
        together; after it, 1.8x either way); SmolLM2 on numpy 2.44x -> 2.29x for half the
        flood's throughput. Off by default: where a batch costs little more than one
        sequence (cpu GEMV, cuda, or OpenBLAS's GEMM on a real model) it mostly loses
        throughput."""
        eng, sch = self.engine, self.engine.scheduler
        if sch is None or self.failed:
            return
        width = eng.max_batch
        if self.fanout_slots <= 0:
            sch.max_batch = width
            return
        in_engine = collections.Counter(self.group_of.values())
        for g in [g for g in self.fair.groups() if g not in in_engine]:  # newcomers enter now
            self._add(g)
            in_engine[g] = 1
        queued = set(self.fair.groups())
        singles = {g for g, n in in_engine.items() if n == 1 and g not in queued}
        if not singles:
            sch.max_batch = width
            return
        held: dict[int, list[int]] = {g: [] for g in in_engine if g not in singles}
        for s in sch.running:  # fan-out group -> its running sequences, oldest first
            if self.group_of.get(s.id, -1) in held:
                held[self.group_of[s.id]].append(s.id)
        allowed = max(self.fanout_slots, len(held))  # each keeps (or gets) one slot
        # a group with nothing running counts for one: the largest gives it a slot
        victims = []
        while sum(max(1, len(v)) for v in held.values()) > allowed:
            most = max(held.values(), key=len)
            victims.append(most.pop())
        for seq in victims:
            sch.preempt(seq)
        self.metrics.preemptions.inc(len(victims))
        # (stable: singles first, then the others in the order they were queued)
        sch.waiting = collections.deque(
            sorted(sch.waiting, key=lambda s: self.group_of.get(s.id) not in singles)
        )
        sch.max_batch = min(width, len(singles) + allowed)

    def _fault(self, recover: bool = True):
        """A bug in the engine: fail every tracked request now, then start afresh (or give up)."""
        traceback.print_exc()
        self.faults += 1
        tracked, self.tracked = self.tracked, {}
        self.seq_of.clear()
        self.group_of.clear()
        self.fair.drain()
        for index, tr in tracked.items():
            try:
                tr.sink([Event("error", index, error=self.FAULT, code="server_error")])
            except Exception:
                traceback.print_exc()
        if recover:
            try:
                self.engine.reset(self.FAULT, hard=True)
                return
            except Exception:
                traceback.print_exc()
        self.failed = (
            "the engine failed and could not recover (see the server log); "
            "the server is shutting down: restart it"
        )
        if self.on_fatal is not None:
            self.on_fatal()

    def _step(self):
        eng = self.engine
        before = dict(eng.stats)
        events = eng.step()
        self.metrics.steps.inc(eng.stats["steps"] - before["steps"])
        self.metrics.prefix_hits.inc(eng.stats["cached_tokens"] - before["cached_tokens"])
        self.metrics.preemptions.inc(eng.stats["preemptions"] - before["preemptions"])
        now = time.perf_counter()
        by_req: dict[int, list[Event]] = {}  # (in step order within each choice)
        for ev in events:
            tr = self.tracked.get(ev.index)
            if tr is None:  # aborted meanwhile
                continue
            if ev.kind == "token":
                self.metrics.generation_tokens.inc()
                if tr.last:
                    self.metrics.itl.observe(now - tr.last)
                else:
                    self.metrics.ttft.observe(now - tr.arrival)
                tr.last = now
            elif ev.kind == "finish":
                self.metrics.finished.labels(ev.completion.finish_reason).inc()
            by_req.setdefault(ev.index, []).append(ev)
        by_sink: dict[Callable, list[Event]] = {}  # one call per sink (an HTTP request's
        for index, evs in by_req.items():  # choices share one): one wake-up of its reader
            if evs[-1].kind in ("finish", "error"):
                tr = self.tracked.pop(index)
                if index in self.seq_of:
                    self._forget(index)
            else:
                tr = self.tracked[index]
            by_sink.setdefault(tr.sink, []).extend(evs)
        for sink, evs in by_sink.items():
            sink(evs)

    def _publish(self):
        eng, m = self.engine, self.metrics
        if eng.scheduler is None:
            return
        m.running.set(len(eng.scheduler.running))
        m.queued.set(len(self.fair))
        m.waiting.set(len(eng.scheduler.waiting))
        m.kv_blocks_used.set(eng.pool.n_used)
        m.kv_tokens_used.set(sum(s.n_cached for s in eng.scheduler.running))
        m.kv_usage.set(eng.pool.n_used / eng.pool.spec.n_blocks)


# ---- requests ---------------------------------------------------------------------------


@dataclass
class Job:
    """One validated generation request: a prompt per choice group, and its options."""

    chat: bool
    prompts: list[list[int]]  # token ids; the choices of prompt p are p*n .. p*n+n-1
    params: SamplingParams  # resolved (model defaults filled)
    n: int
    stream: bool
    include_usage: bool
    model: str
    cache_salt: str | None = None  # requests share cached KV blocks only under the same salt
    return_ids: bool = False  # choices carry `token_ids` (always so without a tokenizer)
    tools: object = None  # tools.ToolRequest of a chat request with tools


def _typed(body: dict, key: str, kind, default):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        what = {bool: "true or false", int: "an integer", dict: "an object"}[kind]
        raise APIError(400, f"{key}={v!r} must be {what}", "invalid_parameter", key)
    return v


def parse_job(body, chat: bool, llm, served: tuple[str, ...], limits: Limits | None = None) -> Job:
    """Validate a request body into a Job; raises APIError (400, or 404 for the model)."""
    try:
        return _parse_job(body, chat, llm, served, limits or Limits())
    except LimitError as e:
        raise APIError(e.status, e.message, e.code, e.param) from None


def _parse_job(body, chat: bool, llm, served: tuple[str, ...], limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_request")
    model = body.get("model")
    if model is not None and model not in served:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {served[0]!r} "
            "(GET /v1/models lists it)",
            "model_not_found",
            "model",
        )
    try:
        if chat:
            if "messages" not in body:
                raise LineError(
                    "missing_messages",
                    'the request needs "messages": a non-empty list of {"role", "content"}',
                    "messages",
                )
            prompts = [check_messages(body["messages"])]
        else:
            if "prompt" not in body:
                raise LineError(
                    "missing_prompt",
                    'the request needs "prompt": a string or a list of '
                    "token ids (or a list of those)",
                    "prompt",
                )
            p = body["prompt"]
            many = isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p)
            serve_limits.check_prompt_count(len(p) if many else 1, limits)
            prompts = [check_prompt(x) for x in (p if many else [p])]
        params = request_params(
            {k: v for k, v in body.items() if k not in ("messages", "prompt")},
            extra=SERVER_FIELDS + (TOOL_FIELDS if chat else ()),
        )
        serve_limits.check_stops(params.stop, limits)
        treq = check_tool_fields(body) if chat else None
        if treq is None:
            ids = [tokenize(llm, Item(0, None, chat, x, params)) for x in prompts]
        else:  # tools rendered by the template; a forced call constrains the reply (tools.py)
            ids = [tool_prompt(llm, x, treq, params) for x in prompts]
    except LineError as e:
        raise APIError(400, e.message, e.code, e.param) from None
    stream = _typed(body, "stream", bool, False)
    opts = _typed(body, "stream_options", dict, {})
    if opts and not stream:
        raise APIError(
            400,
            "stream_options is only allowed with stream=true",
            "invalid_parameter",
            "stream_options",
        )
    if set(opts) - {"include_usage"}:
        bad = sorted(set(opts) - {"include_usage"})[0]
        raise APIError(
            400,
            f"stream_options.{bad} is not supported (only include_usage)",
            "unsupported_parameter",
            "stream_options",
        )
    include_usage = _typed(opts, "include_usage", bool, False)
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n={n} must be between 1 and {MAX_N}", "invalid_parameter", "n")
    params.logprobs = logprobs_wanted(body, chat, limits)
    salt = serve_limits.cache_salt(body)
    return_ids = _typed(body, "return_token_ids", bool, False) or llm.tokenizer is None
    try:
        params = llm.resolve_params(params)
    except TinyLLMError as e:
        raise APIError(400, str(e), "invalid_parameter") from None
    return Job(chat, ids, params, n, stream, include_usage, served[0], salt, return_ids, treq)


def logprobs_wanted(body: dict, chat: bool, limits: Limits | None = None) -> int | None:
    """How many alternatives per token the request wants logprobs for (None: no logprobs).
    Chat: `logprobs: true` and `top_logprobs: k`; completions: `logprobs: k`."""
    if chat:
        top = _typed(body, "top_logprobs", int, None)
        if not _typed(body, "logprobs", bool, False):
            if top is not None:
                raise APIError(
                    400, "top_logprobs needs logprobs=true", "invalid_parameter", "top_logprobs"
                )
            return None
        k, name = (top or 0), "top_logprobs"
    else:
        if body.get("top_logprobs") is not None:
            raise APIError(
                400,
                "top_logprobs is a chat parameter; /v1/completions takes logprobs=N",
                "unknown_parameter",
                "top_logprobs",
            )
        k, name = _typed(body, "logprobs", int, None), "logprobs"
        if k is None:
            return None
    if not 0 <= k <= MAX_LOGPROBS:
        raise APIError(
            400, f"{name}={k} must be from 0 to {MAX_LOGPROBS}", "invalid_parameter", name
        )
    if limits is not None:
        serve_limits.check_logprobs(k, name, limits)
    return k


def choice_params(job: Job, j: int) -> SamplingParams:
    """The params of choice j of a prompt: with a seed, choice j draws from seed + j, so the
    n choices differ and the request stays reproducible."""
    if job.params.seed is None or j == 0:
        return job.params
    return SamplingParams(**{**vars(job.params), "seed": job.params.seed + j})


class Generation:
    """The engine requests of one HTTP request, and their events as an async stream."""

    _groups = itertools.count(1)

    def __init__(self, worker: EngineWorker, job: Job, live: set | None = None):
        self.worker, self.job = worker, job
        self.live = live if live is not None else set()  # the server's running generations
        self.group = next(self._groups)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choice: dict[int, int] = {}  # engine index -> choice index
        self.open: set[int] = set()  # engine indexes not finished yet
        self.t0 = time.time()

    def start(self):
        # A plain (not streamed) response is built from the finish events alone (and the
        # token events, for logprobs): its reader is woken for nothing else.
        whole = not self.job.stream and self.job.params.logprobs is None

        def sink(evs: list[Event]):  # engine thread
            if whole:
                evs = [ev for ev in evs if ev.kind in ("finish", "error")]
                if not evs:
                    return
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, evs)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

        self.live.add(self)
        for p, ids in enumerate(self.job.prompts):
            for j in range(self.job.n):
                index = self.worker.new_index()
                self.choice[index] = p * self.job.n + j
                self.open.add(index)
                req = Request(ids, choice_params(self.job, j), index, self.job.cache_salt)
                self.worker.submit(req, sink, self.group)

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished (or failed)."""
        while self.open:
            for ev in await self.events.get():
                if ev.kind in ("finish", "error"):
                    self.open.discard(ev.index)
                yield self.choice[ev.index], ev

    def cancel(self):
        """Abort the choices still running (the client went away, or the server stops)."""
        self.live.discard(self)
        for index in self.open:
            self.worker.abort(index)
        self.open.clear()

    def fail(self, message: str, code: str):
        """End every open choice now with an error event (on the event loop: the server's
        shutdown deadline); the engine drops them."""
        evs = [Event("error", index, error=message, code=code) for index in self.open]
        for index in self.open:
            self.worker.abort(index)
        if evs:
            self.events.put_nowait(evs)


def usage(job: Job, done: dict) -> dict:
    """OpenAI usage of a finished job; `done` maps choice index -> Completion. The choices of
    one prompt share it, so it counts once (as OpenAI counts it for n > 1); cached_tokens are
    the prompt tokens its first choice took from the prefix cache (Completion.cached_tokens:
    whole KV blocks an earlier request computed) instead of computing them."""
    n_prompt = sum(len(ids) for ids in job.prompts)
    cached = sum(c.cached_tokens for i, c in done.items() if i % job.n == 0)
    n_gen = sum(len(c.token_ids) for c in done.values())
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_gen,
        "total_tokens": n_prompt + n_gen,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


# ---- responses ----------------------------------------------------------------------------


def _choice(
    job: Job,
    i: int,
    text: str,
    finish: str | None,
    delta: dict | None = None,
    logprobs: dict | None = None,
    token_ids: list[int] | None = None,
) -> dict:
    """One choice; `token_ids` (the generated ids, vLLM's `return_token_ids` extension) when the
    request asked for them or the model has no tokenizer (then it is the only output)."""
    ids = {"token_ids": token_ids} if token_ids is not None else {}
    if not job.chat:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish, **ids}
    if job.stream:
        body = {"delta": delta if delta is not None else ({"content": text} if text else {})}
    else:  # tool calls parsed out of the text (tools.py)
        message, finish = tool_message(text, finish, job.tools)
        body = {"message": message}
    return {"index": i, **body, "logprobs": logprobs, "finish_reason": finish, **ids}


class Logprobs:
    """The logprobs of one choice, gathered from its "token" events and rendered the OpenAI
    way: chat {"content": [{token, logprob, bytes, top_logprobs}]}, completions {tokens,
    token_logprobs, top_logprobs, text_offset}. take() renders what came since the last call
    (a stream chunk's share). Token strings are each id decoded alone (a piece of a multi-byte
    character shows as U+FFFD there); chat's `bytes` are the token's own bytes
    (Tokenizer.token_bytes), so they join to the text exactly. Without a tokenizer a token is
    spelled "token_id:N" (vLLM's return_tokens_as_token_ids) and its bytes are []."""

    def __init__(self, job: Job, tokenizer):
        self.chat, self.tok = job.chat, tokenizer
        self.wanted = job.params.logprobs is not None
        self.pending: list[Event] = []
        self.offset = 0  # completions: text_offset of the next token

    def add(self, ev: Event):
        if self.wanted:
            self.pending.append(ev)

    def _text(self, token_id: int) -> str:
        if self.tok is None:
            return f"token_id:{token_id}"
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        return [] if self.tok is None else list(self.tok.token_bytes(token_id))

    def take(self) -> dict | None:
        if not self.wanted:
            return None
        evs, self.pending = self.pending, []
        if self.chat:

            def entry(t, lp):
                return {"token": self._text(t), "logprob": lp, "bytes": self._bytes(t)}

            content = [
                {
                    **entry(e.token_id, e.logprob),
                    "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs],
                }
                for e in evs
            ]
            return {"content": content, "refusal": None}
        tokens = [self._text(e.token_id) for e in evs]
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in evs],
            "top_logprobs": [{self._text(t): lp for t, lp in e.top_logprobs} for e in evs],
            "text_offset": offsets,
        }


def _status(ev: Event) -> int:
    """The HTTP status of a failed generation: 503 when the engine is gone or the server is
    shutting down, else 500 (a bug)."""
    return 503 if ev.code in ("engine_failed", "server_shutting_down") else 500


def _envelope(job: Job, rid: str, created: int, choices: list, **extra) -> dict:
    kind = ("chat.completion" if job.chat else "text_completion") + (
        ".chunk" if job.stream and job.chat else ""
    )
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": job.model,
        "choices": choices,
        **extra,
    }


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class Server:
    """The routes' shared state: the LLM, its worker, the names it answers to, the key."""

    def __init__(
        self,
        llm,
        names: tuple[str, ...],
        api_key: str | None,
        metrics: Metrics,
        limits: Limits | None = None,
    ):
        self.llm, self.names, self.api_key, self.metrics = llm, names, api_key, metrics
        self.limits = limits or Limits()
        self.worker = EngineWorker(llm.engine, metrics)
        self.live: set[Generation] = set()  # running generations (the shutdown deadline ends them)
        self.closing = False

    async def shutting_down(self):
        """SIGINT/SIGTERM: refuse new requests; at the deadline (--shutdown-timeout, less a
        margin for the responses to go out before uvicorn cancels what is left), end every
        running generation with a 503 in OpenAI's shape instead of a cancelled task."""
        self.closing = True
        margin = min(1.0, self.limits.shutdown_s / 2)
        await asyncio.sleep(self.limits.shutdown_s - margin)
        for gen in list(self.live):
            gen.fail(SHUTTING_DOWN, "server_shutting_down")

    def check_key(self, request):
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if not auth:
            raise APIError(
                401,
                "no API key: send the header 'Authorization: Bearer KEY' with the server's "
                "key (--api-key or TINYLLM_API_KEY)",
                "invalid_api_key",
            )
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401,
                "incorrect API key: send the server's key (--api-key or TINYLLM_API_KEY) as "
                "'Authorization: Bearer KEY'",
                "invalid_api_key",
            )

    async def parse(self, request, chat: bool) -> Job:
        """The request's Job: the key first, then the body (bounded while it is read), then
        parsing, validation and tokenization on a worker thread, so a large or slow body
        never holds up the event loop (every other client, /health included)."""
        self.check_key(request)
        try:
            raw = await serve_limits.read_body(request, self.limits.body_bytes)
        except LimitError as e:
            raise APIError(e.status, e.message, e.code, e.param) from None
        return await asyncio.to_thread(self._parse_sync, raw, chat)

    def _parse_sync(self, raw: bytes, chat: bool) -> Job:
        try:
            body = load_body(raw)
        except BodyError as e:
            raise APIError(400, e.message, e.code) from None
        return parse_job(body, chat, self.llm, self.names, self.limits)

    def refuse_if_closing(self):
        if self.closing:
            raise APIError(503, SHUTTING_DOWN, "server_shutting_down")

    async def generate(self, request, chat: bool):
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        self.refuse_if_closing()
        job = await self.parse(request, chat)
        self.refuse_if_closing()
        gen = Generation(self.worker, job, self.live)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if job.stream:  # _stream starts gen: then its `finally` cancels it
            return StreamingResponse(
                self._stream(gen, rid),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        outcome = "cancelled"
        try:
            gen.start()
            done: dict = {}
            lps = {i: Logprobs(job, self.llm.tokenizer) for i in range(len(job.prompts) * job.n)}
            async for i, ev in self._watch(gen, request):
                if ev.kind == "token":
                    lps[i].add(ev)
                elif ev.kind == "finish":
                    done[i] = ev.completion
                elif ev.kind == "error":
                    outcome = "error"
                    raise APIError(_status(ev), ev.error, ev.code)
            outcome = "ok"
        except ClientGone:
            return Response(status_code=499)  # nobody reads it (nginx's "client closed")
        finally:
            gen.cancel()
            self.metrics.requests.labels(outcome).inc()
        choices = [
            _choice(
                job,
                i,
                done[i].text,
                done[i].finish_reason,
                logprobs=lps[i].take(),
                token_ids=done[i].token_ids if job.return_ids else None,
            )
            for i in sorted(done)
        ]
        return JSONResponse(_envelope(job, rid, int(gen.t0), choices, usage=usage(job, done)))

    async def _watch(self, gen: Generation, request, every: float = 0.5):
        """gen's events; raises ClientGone when the client has disconnected, which is checked
        every `every` seconds (a plain response has no other signal of it)."""
        it = gen.__aiter__()
        checked = time.monotonic()
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            while True:
                await asyncio.wait({nxt}, timeout=max(0.0, checked + every - time.monotonic()))
                if time.monotonic() - checked >= every:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        nxt.cancel()
                        raise ClientGone()
                if nxt.done():
                    break
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return

    async def _stream(self, gen: Generation, rid: str):
        """SSE chunks (StreamChunks): for chat a first role delta per choice, then text
        deltas, a last chunk with finish_reason per choice, the usage chunk if asked, and
        `data: [DONE]`; an error event ends the stream with an OpenAI-shaped error chunk."""
        job = gen.job
        out = StreamChunks(job, rid, int(gen.t0), self.llm.tokenizer)
        outcome = "cancelled"
        try:
            gen.start()
            for chunk in out.roles():
                yield chunk
            async for i, ev in gen:
                if ev.kind == "error":
                    outcome = "error"
                    yield _sse(APIError(_status(ev), ev.error, ev.code).body())
                    break
                for chunk in out.event(i, ev):
                    yield chunk
            if job.include_usage and outcome != "error":
                yield out.usage()
            yield b"data: [DONE]\n\n"
            outcome = "ok" if outcome != "error" else outcome
        finally:  # also when the client disconnects (cancelled)
            gen.cancel()
            self.metrics.requests.labels(outcome).inc()


class StreamChunks:
    """The SSE chunks of one streamed job, built event by event (Server._stream sends them).
    Per choice: its logprobs gathered since its last chunk, its tool-call parser (chat with
    tools: text is held while it may be a call), and its Completion once finished (usage)."""

    def __init__(self, job: Job, rid: str, created: int, tokenizer):
        self.job, self.rid, self.created = job, rid, created
        self.extra = {"usage": None} if job.include_usage else {}
        self.lps = {i: Logprobs(job, tokenizer) for i in range(len(job.prompts) * job.n)}
        self.calls = {i: ToolStream(job.tools) for i in self.lps} if job.tools else {}
        self.done: dict = {}  # choice index -> Completion

    def chunk(self, i: int, text="", finish=None, delta=None, logprobs=None, token_ids=None):
        choice = _choice(self.job, i, text, finish, delta, logprobs, token_ids)
        return _sse(_envelope(self.job, self.rid, self.created, [choice], **self.extra))

    def roles(self) -> list[bytes]:
        """Chat's first chunk per choice: the assistant role, no content yet."""
        if not self.job.chat:
            return []
        return [self.chunk(i, delta={"role": "assistant", "content": ""}) for i in self.lps]

    def event(self, i: int, ev: Event) -> list[bytes]:
        """The chunks a token, text or finish event of choice i gives (often none)."""
        lps = self.lps[i]
        if ev.kind == "token":
            lps.add(ev)
            if self.job.return_ids:  # a chunk per token: its id
                return [self.chunk(i, logprobs=lps.take(), token_ids=[ev.token_id])]
            return []  # its logprobs ride on the next chunk
        if ev.kind == "text":
            text = self.calls[i].push(ev.text) if self.calls else ev.text
            # empty: held, it may be a tool call (sent when the choice ends)
            return [self.chunk(i, text, logprobs=lps.take())] if text else []
        if ev.kind == "finish":
            return self._finish(i, ev.completion)
        return []

    def _finish(self, i: int, completion) -> list[bytes]:
        self.done[i] = completion
        rest = self.lps[i].take() if self.lps[i].pending else None
        finish, out = completion.finish_reason, []
        if self.calls:  # held text: content, or tool-call deltas (tools.py)
            text, made = self.calls[i].finish()
            deltas = ([{"content": text}] if text else []) + call_deltas(made)
            out = [self.chunk(i, delta=d) for d in deltas]
            finish = "tool_calls" if made and finish == "stop" else finish
        return out + [self.chunk(i, finish=finish, logprobs=rest)]

    def usage(self) -> bytes:
        body = _envelope(self.job, self.rid, self.created, [], usage=usage(self.job, self.done))
        return _sse(body)


def create_app(
    llm,
    names: tuple[str, ...],
    api_key: str | None = None,
    on_ready: Callable[[], None] | None = None,
    limits: Limits | None = None,
    public_metrics: bool = False,
):
    """The FastAPI app serving `llm` under the model names `names` (the first is the one
    /v1/models lists). The engine thread starts with the app and stops with it. With an API
    key, /metrics needs it too unless public_metrics (its counts and timings tell an outsider
    how busy the server is and what it runs; Prometheus sends a bearer token with
    `authorization: {credentials: KEY}` in its scrape config)."""
    from fastapi import FastAPI

    srv = Server(llm, names, api_key, Metrics(), limits)

    @asynccontextmanager
    async def lifespan(app):
        srv.worker.start()
        if on_ready:
            on_ready()
        yield
        srv.worker.stop()

    app = FastAPI(
        title="tinyllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = srv
    _error_handlers(app, srv.metrics)
    _routes(app, srv, public_metrics)
    return app


def _error_handlers(app, metrics: Metrics):
    """Every error leaves as OpenAI's {"error": {...}} JSON: ours (APIError), an unknown path or
    method, and any other exception (a bug: a 500, never plain text)."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        if e.status < 500 and request.url.path in ("/v1/chat/completions", "/v1/completions"):
            metrics.requests.labels("invalid").inc()  # (generate() counts the rest)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # anything else is ours: a 500, still OpenAI-shaped
        # (starlette logs the traceback after this handler answers)
        return JSONResponse(
            APIError(
                500,
                f"internal error handling {request.method} {request.url.path} (see the server "
                "log); the request was not completed",
                "server_error",
            ).body(),
            status_code=500,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown path, wrong method
        return JSONResponse(
            APIError(
                e.status_code,
                f"{request.method} {request.url.path}: {e.detail}",
                "not_found" if e.status_code == 404 else None,
            ).body(),
            status_code=e.status_code,
        )


def _routes(app, srv: Server, public_metrics: bool):
    """The generation routes, /v1/models, /health (no key: a load balancer's probe) and
    /metrics (the key unless public_metrics)."""
    from fastapi import Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await srv.generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await srv.generate(request, chat=False)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        srv.check_key(request)
        # what the context and the KV pool can both hold
        longest = serve_limits.max_model_len(srv.llm.engine.spec, srv.llm.max_seq_len)
        model = {"id": srv.names[0], "object": "model", "created": 0, "owned_by": "tinyllm"}
        return {"object": "list", "data": [{**model, "max_model_len": longest}]}

    @app.get("/health")
    async def health():
        if srv.worker.failed or not srv.worker.thread.is_alive():
            why = srv.worker.failed or "the engine thread is not running"
            return JSONResponse(APIError(503, why).body(), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: HTTPRequest):
        if not public_metrics:
            srv.check_key(request)
        return Response(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---- the command ----------------------------------------------------------------------------


def served_names(a, llm) -> tuple[str, ...]:
    """The model names the server answers to, the public one first. --served-model-name
    replaces them all (a local path never becomes public); else the name given to --model when
    it is not a path, with the HF repo id and the directory's name as aliases (what vLLM users
    and `tinyllm batch` output say), or the directory's name for a path."""
    from .options import model_names

    given = getattr(a, "served_model_name", None)
    if given:
        return tuple(dict.fromkeys(given))
    return model_names(a.model, llm.model_dir)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the model loads: a port in use fails at once. Port 0
    picks a free one (the ready line says which)."""
    if not 0 <= port <= 65535:
        raise TinyLLMError(f"--port {port} is not a TCP port (0-65535)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise TinyLLMError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host/--port"
        ) from None
    return sock


def ready_lines(url: str, model: str, api_key: str | None, key_from_env: bool = True) -> str:
    """The ready line and a curl line that works when pasted: the key as the user gave it
    (a --api-key value is spelled out; one from the environment stays $TINYLLM_API_KEY)."""
    key = "$TINYLLM_API_KEY" if key_from_env else api_key
    auth = f' -H "Authorization: Bearer {key}"' if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return (
        f"tinyllm serve: ready at {url}/v1 (model {model!r}); Ctrl-C stops\n"
        f"try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
    )


def run_serve(a) -> int:
    """`tinyllm serve`: load the model, serve until SIGINT/SIGTERM, exit 0."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise TinyLLMError(f"tinyllm serve needs {e.name}: pip install 'tinyllm[serve]'") from None
    from .options import load_llm

    if a.max_batch < 1:
        raise TinyLLMError(f"--max-batch must be at least 1 (got {a.max_batch})")
    fanout = getattr(a, "fanout_slots", 0)
    if fanout < 0:
        raise TinyLLMError(f"--fanout-slots must be 0 (no cap) or more (got {fanout})")
    limits = Limits.from_args(a)
    api_key = a.api_key or os.environ.get("TINYLLM_API_KEY") or None
    sock = listen(a.host, a.port)
    llm = load_llm(a, max_batch=a.max_batch)
    names = served_names(a, llm)
    name = names[0]
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if api_key is None and not ipaddress.ip_address(host).is_loopback:
        print(
            f"tinyllm serve: warning: listening on {host} without an API key: anyone who can reach "
            "this port can use it (set --api-key or TINYLLM_API_KEY)",
            file=sys.stderr,
        )

    def on_ready():
        print(ready_lines(url, name, api_key, key_from_env=not a.api_key), flush=True)

    app = create_app(llm, names, api_key, on_ready, limits, getattr(a, "public_metrics", False))
    config = uvicorn.Config(
        app, log_level="info", timeout_graceful_shutdown=limits.shutdown_s, lifespan="on"
    )
    # uvicorn handles SIGINT/SIGTERM during serve() (stop accepting, let in-flight requests
    # finish for GRACEFUL_SHUTDOWN_S, cancel the rest), then restores the previous handlers and
    # re-raises the signal. No-op handlers here make that re-raise harmless: exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    srv = app.state.server

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            deadline = asyncio.ensure_future(srv.shutting_down())
            try:
                await super().shutdown(sockets)
            finally:
                deadline.cancel()

    server = Uvicorn(config)

    def on_fatal():  # the engine is gone: stop, exit status 1
        server.should_exit = True

    app.state.server.worker.on_fatal = on_fatal
    app.state.server.worker.fanout_slots = fanout
    server.run(sockets=[sock])
    if app.state.server.worker.failed:
        print(f"tinyllm serve: {app.state.server.worker.failed}", file=sys.stderr, flush=True)
        return 1
    print("tinyllm serve: stopped", file=sys.stderr, flush=True)
    return 0
