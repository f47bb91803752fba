"""The one validation layer for the JSON files a model directory brings (config.json,
params.json, generation_config.json, tokenizer_config.json, special_tokens_map.json,
model.safetensors.index.json; the safetensors header is checked in weights.py with the rules
of the safetensors library).

Model files come from strangers, so every value is checked for type and range before use.
A failure is one TinyLLMError line naming the file, the key, the value (shortened) and what
is allowed:

    config.json: num_hidden_layers=0 is not allowed: must be an integer >= 1

Nothing is echoed from a file that is not a JSON object (an arbitrary file named like a
config says only that it is not JSON).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import TinyLLMError

# Config files are a few kB; a chat template inside tokenizer_config.json may be tens of kB.
# Anything this large is not a config file, and reading it could exhaust memory.
MAX_JSON_BYTES = 32 * 2**20
# Sizes are indexed with int32 on the GPU; no real model comes near this.
MAX_SIZE = 2**31 - 1

_REQUIRED = object()


def _show(value) -> str:
    """A value as JSON, at most 60 characters (values come from untrusted files)."""
    try:
        s = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def read_json_object(path: Path, what: str | None = None) -> dict:
    """A file's top-level JSON object; TinyLLMError (without the file's contents) otherwise."""
    name = what or path.name
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise TinyLLMError(
                f"{path}: {size:,} bytes is too large for {name} "
                f"(limit {MAX_JSON_BYTES // 2**20} MiB); is it the right file?"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise TinyLLMError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TinyLLMError(
            f"{path} is not UTF-8 text, so not a valid {name}; re-download it"
        ) from None
    except (ValueError, RecursionError) as e:
        where = (
            f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        )
        raise TinyLLMError(
            f"{path} is not valid JSON{where}, so not a valid {name}; re-download it"
        ) from None
    if not isinstance(obj, dict):
        raise TinyLLMError(f"{path}: {name} must be a JSON object, not {_json_type(obj)}")
    return obj


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class JsonObject:
    """Typed, range-checked access to one JSON object read from `source` (a file name, or
    'file: key' for a nested block). `get(key)` is the raw value (None when absent)."""

    def __init__(self, data: dict, source: str):
        self.data, self.source = data, source

    @classmethod
    def read(cls, path: Path, what: str | None = None) -> JsonObject:
        return cls(read_json_object(path, what), path.name)

    def __contains__(self, key) -> bool:
        return key in self.data

    def get(self, key, default=None):
        return self.data.get(key, default)

    def error(self, key: str, value, allowed: str) -> TinyLLMError:
        return TinyLLMError(f"{self.source}: {key}={_show(value)} is not allowed: {allowed}")

    def _value(self, key, default):
        v = self.data.get(key)
        if v is None:
            if default is _REQUIRED:
                raise TinyLLMError(f"{self.source} lacks the required key {key!r}")
            return default, False
        return v, True

    def int(self, key: str, default=_REQUIRED, lo: int = 1, hi: int = MAX_SIZE):
        """An integer in [lo, hi] (a JSON null counts as absent)."""
        v, given = self._value(key, default)
        if given and not (is_int(v) and lo <= v <= hi):
            raise self.error(
                key, v, f"must be an integer >= {lo}" + (f" and <= {hi:,}" if hi < MAX_SIZE else "")
            )
        return v

    def number(
        self,
        key: str,
        default=_REQUIRED,
        positive: bool = True,
        lo: float | None = None,
        hi: float | None = None,
    ):
        """A finite number (> 0 when positive; within [lo, hi] when given)."""
        v, given = self._value(key, default)
        if not given:
            return v
        ok = (
            is_number(v)
            and math.isfinite(v)
            and (not positive or v > 0)
            and (lo is None or v >= lo)
            and (hi is None or v <= hi)
        )
        if not ok:
            rng = "> 0" if positive else ""
            rng += (" and " if rng and lo is not None else "") + (
                f">= {lo:g}" if lo is not None else ""
            )
            rng += (" and " if rng and hi is not None else "") + (
                f"<= {hi:g}" if hi is not None else ""
            )
            raise self.error(key, v, "must be a finite number" + (f" {rng}" if rng else ""))
        return float(v)

    def bool(self, key: str, default: bool = False) -> bool:
        v, given = self._value(key, default)
        if given and not isinstance(v, bool):
            raise self.error(key, v, "must be true or false")
        return v

    def str(self, key: str, default=None):
        v, given = self._value(key, default)
        if given and not isinstance(v, str):
            raise self.error(key, v, "must be a string")
        return v

    def object(self, key: str) -> JsonObject | None:
        v, given = self._value(key, None)
        if not given:
            return None
        if not isinstance(v, dict):
            raise self.error(key, v, "must be a JSON object")
        return JsonObject(v, f"{self.source}: {key}")

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (eos_token_id); () when absent."""
        v, given = self._value(key, None)
        if not given:
            return ()
        ids = v if isinstance(v, list) else [v]
        if not all(is_int(t) and 0 <= t <= MAX_SIZE for t in ids):
            raise self.error(key, v, "must be a token id (an integer >= 0) or a list of them")
        return tuple(ids)
