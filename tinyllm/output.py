"""From sampled token ids to what callers see: text, stop strings, logprobs, events.

Streaming text comes from the tokenizer's incremental decoder (tokenizer.py), which never
splits a UTF-8 character. Stop strings are matched on that text, so text that could still
become the start of a stop string is held back:

    stops = ["###"], text so far "Hello #"  ->  emit "Hello", hold " #" (2 = len("###") - 1)
    next piece "## there"                   ->  text "Hello ### there": finish "stop", text "Hello "

A sequence ends on an EOS / stop token id (the token is not part of the output), on a stop
string (the text is cut before it), or by length (max_tokens, or the context is full); each
way, the text decoded so far is flushed and checked against the stop strings once more.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated only
    text: str
    finish_reason: str  # "stop" | "length" | "interrupted" (stopped by the caller)
    index: int = 0  # the request's index (its position in its input)
    prefill_tokens: int = 0  # prompt tokens computed (the rest came from the cache; a
    # preempted request counts what it recomputes again)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    time_to_first_token: float = 0.0  # seconds from arrival (Engine.add) to the first token
    elapsed: float = 0.0  # seconds from arrival to finish

    @property
    def decode_tokens_per_s(self) -> float:
        dt = self.elapsed - self.time_to_first_token
        return (len(self.token_ids) - 1) / dt if dt > 0 and len(self.token_ids) > 1 else 0.0


@dataclass
class Event:
    kind: str  # "token" (step() only) | "text" | "finish" | "error"
    index: int  # the request's own index
    text: str = ""
    completion: Completion | None = None
    error: str = ""
    code: str = "invalid_prompt"  # for errors: the OpenAI-style code batch output lines carry
    token_id: int = -1  # "token": the id just appended to the output
    logprob: float | None = None  # "token", when the request asks for logprobs: log p(token_id)
    top_logprobs: list | None = None  # ... and its [(id, logprob)] alternatives, most likely first
    seq_id: int = -1  # the engine's id of the sequence (sequence.py)


def completion(s: Sequence) -> Completion:
    """What a sequence produced so far; finish_reason "interrupted" while unfinished."""
    t_first = s.t_first - s.t_arrival if s.t_first else 0.0
    return Completion(
        s.ids[: s.n_prompt],
        s.generated,
        s.text,
        s.finish or "interrupted",
        s.req.index,
        s.prefill_tokens,
        s.cached_tokens,
        t_first,
        time.perf_counter() - s.t_arrival,
    )


def error(s: Sequence, message: str, code: str) -> Event:
    s.finish = "error"
    return Event("error", s.req.index, error=message, code=code, seq_id=s.id)


class NoText:
    """The stream decoder of a model without a tokenizer: token ids only, no text."""

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


class OutputProcessor:
    """Appends sampled tokens to sequences and turns them into events."""

    def __init__(self, tokenizer, eos_ids: set[int], max_seq_len: int):
        self.tok, self.eos_ids, self.max_seq_len = tokenizer, set(eos_ids), max_seq_len

    def decoder(self, prompt_ids: list[int]):
        return self.tok.stream(prompt_ids) if self.tok is not None else NoText()

    def accept(
        self, s: Sequence, tok: int, logprob: float | None = None, top: list | None = None
    ) -> Iterator[Event]:
        """s sampled `tok`: a "token" event (unless tok ends it), text, and "finish" if done."""
        p = s.req.params
        if not s.t_first:
            s.t_first = time.perf_counter()
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(s, "stop")
        else:
            s.ids.append(tok)
            yield Event(
                "token", s.req.index, token_id=tok, logprob=logprob, top_logprobs=top, seq_id=s.id
            )
            s.text += s.decoder.push(tok)
            # A constrained sequence ends ("stop") once its grammar is complete and nothing
            # may follow; the mask never lets it take a token that would break the grammar.
            done = s.constraint is not None and s.constraint.consume(tok) and s.constraint.done
            if self._cut_at_stop(s):
                pass
            elif done:
                self._finish(s, "stop")
            elif len(s.generated) >= p.max_tokens or len(s.ids) >= self.max_seq_len:
                self._finish(s, "length")
        yield from self.emit(s)

    def step_events(self, sampled: list, failed: list[Sequence], why: str) -> list[Event]:
        """The events of one forward's results (runner.execute): an "error" per sequence with
        NaN/inf logits, then the events of every sampled token."""
        events = [error(s, why, "model_error") for s in failed]
        for s, tok, lp, top in sampled:
            events += self.accept(s, tok, lp, top)
        return events

    def finish_length(self, s: Sequence) -> Iterator[Event]:
        """s cannot go on (alone, it outgrew the KV pool): it ends by length."""
        self._finish(s, "length")
        yield from self.emit(s)

    def _finish(self, s: Sequence, reason: str):
        s.text += s.decoder.flush()
        s.finish = reason
        self._cut_at_stop(s)

    @staticmethod
    def _cut_at_stop(s: Sequence) -> bool:
        """Cut s.text before the first stop string in it (finish "stop"); True if one was found.
        A stop string cannot start before `emitted` (it would have been found earlier)."""
        stops = s.req.params.stop or []
        hits = [i for i in (s.text.find(x, s.emitted) for x in stops) if i >= 0]
        if hits:
            s.text, s.finish = s.text[: min(hits)], "stop"
        return bool(hits)

    @staticmethod
    def emit(s: Sequence) -> Iterator[Event]:
        """The text that can no longer become part of a stop string, and the finish event."""
        hold = 0 if s.finish else max((len(x) for x in s.req.params.stop or []), default=1) - 1
        upto = max(s.emitted, len(s.text) - hold)
        if upto > s.emitted:
            yield Event("text", s.req.index, text=s.text[s.emitted : upto], seq_id=s.id)
            s.emitted = upto
        if s.finish:
            yield Event("finish", s.req.index, completion=completion(s), seq_id=s.id)


class Router:
    """Where events go. A run() generator registers its Inbox for each sequence it adds
    (`routes`: seq id -> the inbox's queue); events of other sequences go back to step()'s
    caller. Also holds the events due at the next step (`pending`: prompts rejected when added)
    and what the latest aborted sequences had (`aborted`, for Engine.partial)."""

    KEEP_ABORTED = 16

    def __init__(self):
        self.routes: dict[int, deque] = {}
        self.pending: list[Event] = []
        self.aborted: dict[int, Completion] = {}

    def take_pending(self) -> list[Event]:
        events, self.pending = self.pending, []
        return events

    def route(self, events: list[Event]) -> list[Event]:
        """Queue each event for the run() that owns its sequence; return the unclaimed ones."""
        out = []
        for ev in events:
            route = self.routes.get(ev.seq_id)
            (route.append if route is not None else out.append)(ev)
        return out

    def keep_aborted(self, s: Sequence):
        """What an aborted sequence had, for partial() (the latest KEEP_ABORTED)."""
        self.aborted[s.id] = completion(s)
        while len(self.aborted) > self.KEEP_ABORTED:
            del self.aborted[next(iter(self.aborted))]

    def partial(self, seq_id: int, running: list[Sequence]) -> Completion | None:
        """The Completion so far of a running sequence, or of a recently aborted one."""
        c = next((completion(s) for s in running if s.id == seq_id), None)
        return c or self.aborted.pop(seq_id, None)


class Inbox:
    """The events of one run() generator: Router.route queues those of the sequences it
    claimed here, in step order; `open_ids` are the claimed sequences not yet finished."""

    def __init__(self, router: Router):
        self.router, self.events, self.open_ids = router, deque(), set()

    def claim(self, seq_id: int):
        self.router.routes[seq_id] = self.events
        self.open_ids.add(seq_id)

    def drain(self) -> Iterator[Event]:
        """The queued events but "token" ones (step()'s own), in order; a sequence's "finish"
        or "error" closes it and ends its route. Events queued while the caller holds one
        (another run() stepping the engine) are drained in the same pass."""
        while self.events:
            ev = self.events.popleft()
            if ev.kind in ("finish", "error"):
                self.open_ids.discard(ev.seq_id)
                self.router.routes.pop(ev.seq_id, None)
            if ev.kind != "token":
                yield ev
