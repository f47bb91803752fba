"""Constrained decoding: JSON schema, regex, Lark grammar and JSON-object modes via llguidance.

Owns the bridge to llguidance (the optional extra `tinyllm[structured]`): the llguidance
tokenizer built from the tokenizer.json we already load, turning a request's constraint
fields (SamplingParams.json_schema / regex / grammar / json_object) into an llguidance
grammar, checking it (an invalid schema, an unsupported keyword, a bad regex or grammar is a
TinyLLMError naming it: llguidance's `lenient` mode, which drops unknown keywords, is never
used), and the per-sequence `Matcher` the runner asks for a token mask each step.

    request fields  --grammar_text-->  llguidance grammar (JSON text)
                    --Constraints.check-->  validated once per distinct grammar (cached)
    Sequence.constraint = Constraints.matcher(params)        (engine.py, one per sequence)
    each step:      allowed = matcher.allowed()   (vocab,) bool: the runner masks the row
                    matcher.consume(token)        output.py, after the token is appended

JSON is generated compactly with json.dumps' separators (", " and ": ") and no free
whitespace, as OpenAI's structured outputs read: a sampled small model otherwise spends its
tokens on newlines. The masked row is what is sampled from; reported logprobs stay those of
the model's own distribution (runner.py).
"""

from __future__ import annotations

import json
import threading

import numpy as np

from .errors import TinyLLMError

# The fields of SamplingParams that ask for a constraint (at most one per request).
CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "json_object")

# llguidance JSON options: compact JSON, as json.dumps writes it (see the module docstring).
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
INSTALL_HINT = "pip install 'tinyllm[structured]'"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise TinyLLMError(
            f"structured output (json_schema, regex, grammar, json_object, tools) needs the "
            f"llguidance package: {INSTALL_HINT}"
        ) from None
    return llguidance


def constraint_of(params) -> tuple[str, object] | None:
    """(field, value) of the one constraint `params` asks for, or None."""
    given = [
        (f, v)
        for f in CONSTRAINT_FIELDS
        if (v := getattr(params, f)) is not None and v is not False
    ]
    if len(given) > 1:
        raise TinyLLMError(
            f"give one constraint per request, not {' and '.join(f for f, _ in given)}"
        )
    return given[0] if given else None


def check_fields(params):
    """Type checks of the constraint fields (SamplingParams.validate); no llguidance needed."""
    if params.json_schema is not None:
        s = params.json_schema
        if isinstance(s, str):
            try:
                s = json.loads(s)
            except ValueError as e:
                raise TinyLLMError(f"invalid json_schema: not valid JSON ({e})") from None
        if not isinstance(s, (dict, bool)):
            raise TinyLLMError(
                f"invalid json_schema: a JSON schema is an object, not {type(s).__name__}"
            )
        params.json_schema = s
    for f in ("regex", "grammar"):
        v = getattr(params, f)
        if v is not None and (not isinstance(v, str) or not v):
            raise TinyLLMError(f"invalid {f}={v!r}: must be a non-empty string")
    if not isinstance(params.json_object, bool):
        raise TinyLLMError(f"invalid json_object={params.json_object!r}: must be true or false")
    constraint_of(params)


def grammar_text(field: str, value) -> str:
    """The llguidance grammar of one constraint field (not yet checked)."""
    M = _llguidance().LLMatcher
    if field == "json_schema":
        return M.grammar_from_json_schema(json.dumps(value), overrides=JSON_OPTIONS)
    if field == "json_object":
        return M.grammar_from_json_schema(json.dumps({"type": "object"}), overrides=JSON_OPTIONS)
    if field == "regex":
        return M.grammar_from_regex(value)
    return M.grammar_from_lark(value)


def json_grammar_rule(schema: dict) -> str:
    """A Lark right-hand side matching JSON valid for `schema` (compact, as JSON_OPTIONS), for
    grammars that embed JSON (tools.py)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _one_line(msg: str) -> str:
    return " ".join(msg.split())[:400]


class Matcher:
    """One sequence's grammar state: the tokens it may take next, and what it took."""

    def __init__(self, ll_matcher, vocab: int, eos_ids: list[int]):
        self.m, self.vocab, self.eos_ids = ll_matcher, vocab, eos_ids
        self.bits = np.zeros((vocab + 31) // 32, np.int32)  # llguidance's bitmask layout

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: True where a token keeps the output valid (EOS once it is complete)."""
        self.m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        bits = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab]
        allowed = bits.view(bool)
        if not allowed.any():  # (an error state: end the sequence rather than sample from nothing)
            allowed[[t for t in self.eos_ids if t < self.vocab]] = True
        return allowed

    def consume(self, token: int) -> bool:
        return bool(self.m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (only EOS would)."""
        return bool(self.m.is_stopped())

    def error(self) -> str:
        return _one_line(self.m.get_error()) if self.m.is_error() else ""


class Constraints:
    """The llguidance tokenizer of one model and the grammars checked against it (cached by
    their text). Built on first use (llguidance reads the tokenizer in ~0.5 s)."""

    MAX_CACHED = 256  # distinct grammars kept checked

    def __init__(self, tokenizer, vocab: int, eos_ids):
        self.tok, self.vocab, self.eos_ids = tokenizer, vocab, sorted(eos_ids)
        self._ll = None
        self._checked: dict[str, str] = {}  # grammar text -> "" (fine) or its error
        self._lock = threading.Lock()  # (the server checks on its handlers' thread)

    def ll_tokenizer(self):
        if self._ll is None:
            llg = _llguidance()
            backend = getattr(self.tok, "_tok", None)  # HFTokenizer's tokenizers.Tokenizer
            if backend is None:
                raise TinyLLMError(
                    "structured output needs a Hugging Face tokenizer.json; this model's "
                    "tokenizer is not one (Mistral native tokenizers are not supported yet)"
                )
            n = max(self.vocab, self.tok.vocab_size)
            self._ll = llg.LLTokenizer(backend.to_str(), n_vocab=n, eos_token=self.eos_ids or None)
        return self._ll

    def grammar(self, params) -> str | None:
        """The checked grammar of params' constraint (None without one); raises TinyLLMError
        naming what llguidance rejects."""
        c = constraint_of(params)
        if c is None:
            return None
        field, value = c
        try:
            text = grammar_text(field, value)
        except ValueError as e:
            raise TinyLLMError(f"invalid {field}: {_one_line(str(e))}") from None
        with self._lock:
            if text not in self._checked:
                llg = _llguidance()
                is_err, msgs = llg.LLMatcher.validate_grammar_with_warnings(
                    text, self.ll_tokenizer()
                )
                if len(self._checked) >= self.MAX_CACHED:
                    self._checked.pop(next(iter(self._checked)))
                self._checked[text] = _one_line(msgs[0]) if is_err else ""
            err = self._checked[text]
        if err:
            what = {"json_object": "json_object"}.get(field, field)
            raise TinyLLMError(f"invalid {what}: {err}")
        return text

    def check(self, params):
        self.grammar(params)

    def matcher(self, params) -> Matcher | None:
        text = self.grammar(params)
        if text is None:
            return None
        m = _llguidance().LLMatcher(self.ll_tokenizer(), text, log_level=0)
        if m.is_error():
            raise TinyLLMError(f"invalid {constraint_of(params)[0]}: {_one_line(m.get_error())}")
        return Matcher(m, self.vocab, self.eos_ids)


# ---- request bodies (server and batch lines) ----------------------------------------------

# Body fields that ask for a constraint: OpenAI's response_format, and vLLM's guided_* extras.
BODY_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_grammar")


def body_constraint(key: str, value) -> dict:
    """SamplingParams fields for one constraint field of a request body; ValueError naming
    the problem. response_format: {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (OpenAI's shapes)."""
    if key == "guided_json":
        return {"json_schema": value}
    if key == "guided_regex":
        return {"regex": value}
    if key == "guided_grammar":
        return {"grammar": value}
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError('response_format must be an object with a "type"')
    kind = value["type"]
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind != "json_schema":
        raise ValueError(
            f'response_format type {kind!r} is not supported ("text", "json_object", "json_schema")'
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError(
            'response_format json_schema needs "json_schema": {"name", "schema", "strict"}'
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("response_format json_schema needs a string name")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise ValueError("response_format json_schema strict must be true or false")
    schema = spec.get("schema")
    if schema is None:
        return {"json_object": True}
    if not isinstance(schema, dict):
        raise ValueError(f"response_format json_schema {name!r}: schema must be an object")
    return {"json_schema": schema}
