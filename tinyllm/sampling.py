"""Sampling: pure functions over one row of float32 logits, with an explicit RNG.

Order as in transformers' logits processors: repetition penalty -> temperature -> top-k ->
top-p -> draw. temperature 0 is greedy (argmax). Each request owns its own
np.random.Generator (seeded when the request has a seed), so its tokens do not depend on
what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import TinyLLMError

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
# Bounds that keep the float arithmetic finite (a logit is at most ~1e4 in magnitude):
PENALTY_RANGE = 1e4  # repetition_penalty in [1e-4, 1e4]
MAX_TEMPERATURE = 1e4  # (above this every distribution is uniform anyway)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


@dataclass
class SamplingParams:
    """None means "the model's default" (generation_config.json), resolved by the LLM."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # report each generated token's logprob and this many alternatives
    # Constraints (constraints.py, llguidance; at most one): the output is valid JSON for this
    # schema, matches this regex, is a sentence of this Lark grammar, or is any JSON object.
    json_schema: dict | str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False

    def validate(self) -> SamplingParams:
        def bad(what):
            raise TinyLLMError(f"invalid sampling parameter: {what}")

        for name in ("temperature", "top_p", "repetition_penalty"):  # Infinity, NaN, 10**400
            v = getattr(self, name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not _finite(v):
                bad(f"{name}={v!r:.40} (must be a finite number)")
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > MAX_TEMPERATURE:
            bad(f"temperature={self.temperature!r} (must be at most {MAX_TEMPERATURE:g})")
        rp = self.repetition_penalty
        if isinstance(rp, (int, float)) and rp > 0 and not 1 / PENALTY_RANGE <= rp <= PENALTY_RANGE:
            # logits / 1e-300 overflow to inf and every probability becomes NaN
            bad(
                f"repetition_penalty={rp!r} (must be from {1 / PENALTY_RANGE:g} to "
                f"{PENALTY_RANGE:g}; 1 disables it)"
            )

        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            bad(f"max_tokens={self.max_tokens!r} (must be an integer >= 1)")
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float)) and self.temperature >= 0
        ):
            bad(f"temperature={self.temperature!r} (must be >= 0; 0 is greedy)")
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            bad(f"top_p={self.top_p!r} (must be in (0, 1])")
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad(f"top_k={self.top_k!r} (must be an integer >= 0; 0 disables it)")
        if self.repetition_penalty is not None and not (
            isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0
        ):
            bad(f"repetition_penalty={self.repetition_penalty!r} (must be > 0; 1 disables it)")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0
        ):
            bad(f"seed={self.seed!r} (must be an integer >= 0)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not (
            isinstance(self.stop, (list, tuple))
            and all(isinstance(s, str) and s for s in self.stop)
        ):
            bad(f"stop={self.stop!r} (must be a string or a list of non-empty strings)")
        if not (
            isinstance(self.stop_token_ids, (list, tuple))
            and all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids)
        ):
            bad(f"stop_token_ids={self.stop_token_ids!r} (must be a list of token ids)")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad(f"logprobs={self.logprobs!r} (must be an integer from 0 to {MAX_LOGPROBS})")
        from .constraints import check_fields

        check_fields(self)
        return self

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or bool(self.regex or self.grammar or self.json_object)

    def with_defaults(self, defaults: dict) -> SamplingParams:
        """Fill the None fields from `defaults` (generation_config values)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in defaults.items():
            if kw.get(k) is None:
                kw[k] = v
        return SamplingParams(**kw).validate()


def unfiltered(params: SamplingParams) -> bool:
    """sample() applies no repetition penalty and no top-k/top-p filter for these params
    (greedy ignores the filters), so sample_rows can draw for them."""
    if not params.temperature:
        return (params.repetition_penalty or 1.0) == 1.0
    return (
        (params.repetition_penalty or 1.0) == 1.0
        and (params.top_k or 0) <= 0
        and (params.top_p if params.top_p is not None else 1.0) >= 1.0
    )


def sample_rows(logits: np.ndarray, temperature: float, rngs: list) -> list[int]:
    """sample() for rows (B, vocab) whose params are all `unfiltered` with this temperature,
    each row drawing from its own RNG: sample()'s operations along the last axis, so every row
    gets exactly the token sample() gives it alone (tests/test_sampling_rows.py)."""
    logits = np.asarray(logits, np.float32)
    if not temperature:
        return [int(t) for t in np.argmax(logits, axis=-1)]
    x = (logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)) / temperature
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)  # (B, vocab): softmax() per row
    u = np.array([rng.random() for rng in rngs])  # (B,)
    # searchsorted(cumsum, v, side="right") = how many cumulative sums are <= v
    at = (np.cumsum(probs, axis=-1) <= (u * probs.sum(axis=-1))[:, None]).sum(axis=-1)
    return [int(min(i, probs.shape[1] - 1)) for i in at]


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF semantics: for every token already seen, divide a positive logit by the penalty
    and multiply a negative one by it."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    logits = logits.copy()
    ids = np.unique(seen)
    s = logits[ids]
    logits[ids] = np.where(s > 0, s / penalty, s * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= len(logits):
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability mass reaches p
    (the top token always stays)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order].astype(np.float64))
    cum = np.cumsum(probs)
    keep_sorted = cum - probs < p
    keep = np.zeros(len(logits), bool)
    keep[order[keep_sorted]] = True
    return np.where(keep, logits, -np.inf)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def token_logprobs(logits: np.ndarray, tok: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(tok) under the model's own distribution, log_softmax(logits) (before penalty,
    temperature and filters: what vLLM reports by default), and the k most likely
    (id, logprob) pairs, most likely first (ties: lower id first)."""
    x = np.asarray(logits, np.float64)
    m = np.max(x)
    lp = x - (m + np.log(np.sum(np.exp(x - m))))
    top = np.argsort(-lp, kind="stable")[:k] if k else []
    return float(lp[tok]), [(int(i), float(lp[i])) for i in top]


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray
) -> int:
    """One token from one row of logits (vocab,). `seen` = prompt + generated ids."""
    logits = apply_repetition_penalty(
        np.asarray(logits, np.float32), seen, params.repetition_penalty or 1.0
    )
    if not params.temperature:
        return int(np.argmax(logits))
    # Subtract the max first: a tiny temperature then sends the others to -inf, not inf - inf.
    logits = (logits.astype(np.float64) - np.max(logits)) / params.temperature
    logits = top_k_filter(logits, params.top_k or 0)
    logits = top_p_filter(logits, params.top_p if params.top_p is not None else 1.0)
    probs = softmax(logits)
    # Inverse-CDF draw with one uniform per step: reproducible for a given seed.
    u = rng.random()
    return int(
        min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1)
    )
