"""Untrusted JSON request bodies (the server's and `tinyllm batch`'s input lines) -> Python values.

Owns the one rule set every request body passes before any field is read:
- valid UTF-8 (the body is bytes) and valid JSON (json.loads);
- no NaN, Infinity or -Infinity, and no number that overflows a float (1e999): JSON has none
  of them, and a sampling parameter of Infinity would pass any `>= 0` check;
- no lone UTF-16 surrogate ("\\ud800" is legal JSON escape syntax but no character: such a
  string cannot be encoded back to UTF-8, so echoing it into an error, a log or an output line
  would raise later, far from here);
- nesting at most MAX_DEPTH deep: a request is a few levels deep, and `[` * 100000 otherwise
  ends in a RecursionError inside json or inside whoever walks the value.

Failures raise BodyError (one line; `code` is the OpenAI-style error code). The size of the
body is bounded by the caller before it is read (serve.py: --max-body-bytes).
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 64  # arrays/objects inside each other; a chat request needs about 5


class BodyError(ValueError):
    def __init__(self, message: str, code: str = "invalid_json"):
        super().__init__(message)
        self.message, self.code = message, code


def _no_constant(name: str):
    raise BodyError(f"{name} is not a JSON value (send a finite number)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise BodyError(f"the number {text[:40]} is out of range (send a finite number)")
    return v


def _surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_value(obj, what: str = "the request body"):
    """Walk a parsed value without recursion: bounded depth, no lone surrogates in any string
    (object keys included). Raises BodyError."""
    stack = [(obj, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _surrogate(v):
                raise BodyError(
                    f"{what} holds a lone UTF-16 surrogate (an escape like \\ud800 that is not "
                    "half of a pair): it is not text; send valid Unicode",
                    "invalid_unicode",
                )
        elif isinstance(v, (list, dict)):
            if depth > MAX_DEPTH:
                raise BodyError(f"{what} is nested more than {MAX_DEPTH} levels deep")
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)


def loads(raw: bytes | str, what: str = "the request body"):
    """Parse and check one JSON document (see the module docstring). Raises BodyError."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BodyError(f"{what} is not UTF-8 text (byte {e.start})") from None
    try:
        obj = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except BodyError as e:
        raise BodyError(f"{what}: {e.message}", e.code) from None
    except RecursionError:
        raise BodyError(f"{what} is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise BodyError(f"{what} is not valid JSON ({e})") from None
    check_value(obj, what)
    return obj
