"""A request and the sequence the engine runs for it.

A `Request` is what a caller asks for: prompt ids and resolved sampling parameters, with an
`index` of the caller's own (its position in the caller's input; events carry it back). The
engine turns each request into a `Sequence` with an id of its own, unique for the engine's
life, so several callers (two interleaved streams, two threads, the server) never mix up
each other's requests even when their indexes coincide.

A sequence's life (nano-vllm's SequenceStatus):

    WAITING --admit--> RUNNING --finish--> FINISHED
                 ^          |
                 +-preempt--+        (blocks released; tokens, text and RNG kept)

Token bookkeeping, for ids = prompt + generated:

    ids       [p0 p1 p2 p3 p4 | g0 g1]      n_prompt = 5, len(ids) = 7
    n_cached  ids[:n_cached] have K/V in the sequence's blocks
    the next forward brings ids[n_cached : n_cached + n] (a prompt chunk, or the last token)

`block_hashes` caches the chained prefix-cache hash of every full block row of ids[:-1]
(paging.py), computed once as the sequence grows, never again per admission attempt.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from .paging import ROOT, SeqBlocks, salted_root
from .sampling import SamplingParams


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams  # fully resolved (defaults filled)
    index: int = 0  # the caller's own id; events carry it back
    cache_salt: str | None = None  # prefix-cache tenant: shares blocks only with the same salt


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()  # sequence ids: unique for the process (atomic under the GIL)


@dataclass
class Sequence:
    req: Request
    ids: list[int]  # prompt + generated
    n_prompt: int
    rng: np.random.Generator  # host sampling draws from it (it survives preemption)
    device_seed: int  # on-device sampling draws from (device_seed, step)
    decoder: object  # the tokenizer's incremental decoder (output.py)
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    n_cached: int = 0  # ids[:n_cached] have K/V in the blocks
    blocks: SeqBlocks | None = None  # its block table while it runs
    open_row: int = -1  # ... and its open row (int8/fp8 keys, kv_cache.py)
    started: bool = False  # it has computed K/V since it was (re)admitted
    block_hashes: list[bytes] = field(default_factory=list)  # see the module docstring
    root: bytes = ROOT  # the parent hash of its first block row (paging.salted_root)
    constraint: object = None  # constraints.Matcher of a constrained request (it survives
    # preemption: it has consumed exactly the generated tokens)
    # output (output.py)
    text: str = ""
    emitted: int = 0  # text[:emitted] has been handed out
    finish: str | None = None  # "stop" | "length" | "error"
    # accounting
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0
    prefill_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)

    @classmethod
    def start(cls, req: Request, decoder) -> Sequence:
        p = req.params
        seed = (
            p.seed % 2**63 if p.seed is not None else int(np.random.default_rng().integers(2**63))
        )
        s = cls(
            req,
            list(req.prompt_ids),
            len(req.prompt_ids),
            np.random.default_rng(p.seed),
            seed,
            decoder,
        )
        s.root = salted_root(req.cache_salt)
        return s

    @property
    def generated(self) -> list[int]:
        return self.ids[self.n_prompt :]

    @property
    def todo(self) -> int:
        """Tokens whose K/V is still to be computed (1 while decoding)."""
        return len(self.ids) - self.n_cached

    @property
    def prefilling(self) -> bool:
        return self.n_cached < self.n_prompt


def pool_full_message(spec, n: int) -> str:
    return (
        f"{n} tokens need {spec.blocks_for(n)} KV-cache blocks of {spec.block_size} and the cache "
        f"has {spec.n_blocks} ({spec.tokens()} tokens): raise --kv-cache-memory "
        f"(kv_cache_memory) or use a smaller --kv-dtype"
    )


def prompt_problem(
    ids: list[int], spec, vocab: int, allow_full: bool = False
) -> tuple[str, str] | None:
    """Why these prompt ids cannot become a sequence, as (code, message), or None if they can.
    A generation needs room for at least one new token; full-sequence logits (allow_full) do
    not; a prompt the whole KV pool cannot hold never can. The codes are the OpenAI-style ones
    batch output lines carry."""
    n, limit = len(ids), spec.max_seq_len
    if n == 0:
        return "invalid_prompt", "the prompt is empty: nothing to continue from"
    if n > limit or (n == limit and not allow_full):
        return (
            "context_length_exceeded",
            f"the prompt is {n} tokens and the context is "
            f"{limit}: shorten it or raise the context size (--ctx-size, max_seq_len)",
        )
    if min(ids) < 0 or max(ids) >= vocab:
        return "invalid_prompt", f"prompt token ids must lie in [0, {vocab})"
    if not allow_full and spec.blocks_for(n) > spec.n_blocks:
        return "context_length_exceeded", pool_full_message(spec, n)
    return None
