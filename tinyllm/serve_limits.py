"""What one HTTP request may ask of the server: the limits (`tinyllm serve` flags), the bounded
body read, and the checks of the fields those limits cover.

Every limit exists because a single request could otherwise stall or starve the others
(issue #25): a body is read and parsed before anything else can refuse it (--max-body-bytes,
checked while reading, before json sees a byte); stop strings are searched on the engine thread
after every token (--max-stop-strings, --max-stop-chars); a list of prompts fans out into
choices (--max-prompts-per-request, times n); logprobs cost a sort per token
(--max-logprobs). Errors are serve.APIError-shaped via `LimitError` (status, message, code,
param), so this module does not import the server."""

from __future__ import annotations

from dataclasses import dataclass

from .sampling import MAX_LOGPROBS

DEFAULT_BODY_BYTES = 8 * 2**20
DEFAULT_PROMPTS = 64
DEFAULT_STOP_STRINGS = 16
DEFAULT_STOP_CHARS = 256
DEFAULT_SHUTDOWN_S = 10.0


@dataclass
class Limits:
    body_bytes: int = DEFAULT_BODY_BYTES
    prompts: int = DEFAULT_PROMPTS
    stop_strings: int = DEFAULT_STOP_STRINGS
    stop_chars: int = DEFAULT_STOP_CHARS
    logprobs: int = MAX_LOGPROBS
    shutdown_s: float = DEFAULT_SHUTDOWN_S

    @classmethod
    def from_args(cls, a) -> Limits:
        from .errors import TinyLLMError
        from .memory import parse_memory

        body = getattr(a, "max_body_bytes", None)
        lim = cls(
            body_bytes=DEFAULT_BODY_BYTES
            if body is None
            else int(body)
            if str(body).isdigit()
            else parse_memory(str(body)),
            prompts=getattr(a, "max_prompts_per_request", DEFAULT_PROMPTS),
            stop_strings=getattr(a, "max_stop_strings", DEFAULT_STOP_STRINGS),
            stop_chars=getattr(a, "max_stop_chars", DEFAULT_STOP_CHARS),
            logprobs=getattr(a, "max_logprobs", MAX_LOGPROBS),
            shutdown_s=getattr(a, "shutdown_timeout", DEFAULT_SHUTDOWN_S),
        )
        for flag, v, lo in (
            ("--max-body-bytes", lim.body_bytes, 1024),
            ("--max-prompts-per-request", lim.prompts, 1),
            ("--max-stop-strings", lim.stop_strings, 0),
            ("--max-stop-chars", lim.stop_chars, 1),
            ("--max-logprobs", lim.logprobs, 0),
        ):
            if v < lo:
                raise TinyLLMError(f"{flag} must be at least {lo} (got {v})")
        if lim.logprobs > MAX_LOGPROBS:
            raise TinyLLMError(f"--max-logprobs is at most {MAX_LOGPROBS} (got {lim.logprobs})")
        if not 0 < lim.shutdown_s <= 3600:
            raise TinyLLMError(f"--shutdown-timeout must be in (0, 3600] s (got {lim.shutdown_s})")
        return lim


def add_limit_args(p):
    """The serve flags of this module (cli.py calls it)."""
    p.add_argument(
        "--max-body-bytes",
        default=None,
        metavar="SIZE",
        help="largest request body, with a unit (8MB, 512KB) or in bytes; a larger one gets a 413 "
        "before it is parsed (default: 8MB)",
    )
    p.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=DEFAULT_PROMPTS,
        metavar="N",
        help="prompts in one /v1/completions request (each runs n choices) "
        f"(default: {DEFAULT_PROMPTS})",
    )
    p.add_argument(
        "--max-stop-strings",
        type=int,
        default=DEFAULT_STOP_STRINGS,
        metavar="N",
        help=f"stop strings in one request (default: {DEFAULT_STOP_STRINGS})",
    )
    p.add_argument(
        "--max-stop-chars",
        type=int,
        default=DEFAULT_STOP_CHARS,
        metavar="N",
        help=f"characters in one stop string (default: {DEFAULT_STOP_CHARS})",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=MAX_LOGPROBS,
        metavar="K",
        help=f"largest logprobs (completions) / top_logprobs (chat) a request may ask for "
        f"(default: {MAX_LOGPROBS}, as OpenAI)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_S,
        metavar="S",
        help="on SIGINT/SIGTERM, seconds in-flight requests get to finish; the rest then end with "
        f"a 503 (default: {DEFAULT_SHUTDOWN_S:g})",
    )


class LimitError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def too_large(limit: int) -> LimitError:
    return LimitError(
        413,
        f"the request body is larger than {limit} bytes, the server's limit "
        "(--max-body-bytes); send a smaller request",
        "request_too_large",
    )


async def read_body(request, limit: int) -> bytes:
    """The body, refused with a 413 once it passes `limit` bytes: by its Content-Length before
    reading anything, and while reading (a chunked body has no length; a length may lie)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def check_stops(stop, lim: Limits):
    """The stop strings of a request (after request_params made them a list) within limits."""
    if not stop:
        return
    if len(stop) > lim.stop_strings:
        raise LimitError(
            400,
            f"stop has {len(stop)} strings; this server takes at most {lim.stop_strings} "
            "(--max-stop-strings)",
            "invalid_parameter",
            "stop",
        )
    longest = max(len(s) for s in stop)
    if longest > lim.stop_chars:
        raise LimitError(
            400,
            f"a stop string has {longest} characters; this server takes at most "
            f"{lim.stop_chars} (--max-stop-chars)",
            "invalid_parameter",
            "stop",
        )


def check_prompt_count(n: int, lim: Limits):
    if n > lim.prompts:
        raise LimitError(
            400,
            f"the request has {n} prompts; this server takes at most {lim.prompts} per request "
            "(--max-prompts-per-request): split it",
            "invalid_parameter",
            "prompt",
        )


def check_logprobs(k: int, name: str, lim: Limits):
    if k > lim.logprobs:
        raise LimitError(
            400,
            f"{name}={k}: this server returns at most {lim.logprobs} (--max-logprobs)",
            "invalid_parameter",
            name,
        )


def cache_salt(body: dict) -> str | None:
    """vLLM's `cache_salt`: a non-empty string; requests share cached KV blocks only with
    requests that carry the same salt (or, both, none)."""
    v = body.get("cache_salt")
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 1024:
        raise LimitError(
            400,
            f"cache_salt={str(v)[:40]!r} must be a non-empty string of at most 1024 characters",
            "invalid_parameter",
            "cache_salt",
        )
    return v


def max_model_len(spec, max_seq_len: int) -> int:
    """The longest sequence both the context and the KV pool can hold (what /v1/models
    advertises): the largest n <= max_seq_len with spec.blocks_for(n) <= spec.n_blocks."""
    lo, hi = 0, max_seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spec.blocks_for(mid) <= spec.n_blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo
