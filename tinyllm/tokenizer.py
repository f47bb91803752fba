"""Text <-> token ids: encode/decode, special tokens, chat prompts and streaming detokenization.

Owns the two tokenizer formats tinyllm reads: a Hugging Face `tokenizer.json` (through the
`tokenizers` library, chat template rendered with jinja2 the way transformers renders it) and
Mistral's native `tokenizer.model.v1|v2|v3` (SentencePiece, chat prompt built as token ids the
way mistral-common builds them). It does not pick generation defaults or stop ids from
config.json/generation_config.json (the engine merges those into `eos_token_ids`).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import itertools
import json
import re
import threading
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _TokenizersBackend

from tinyllm.errors import TinyLLMError
from tinyllm.jsonfile import MAX_JSON_BYTES, JsonObject, read_json_object

# Prompt tokens kept as context in front of the streamed text (vLLM uses 5 too). One is enough
# for the decoder to see that the first new token is not the first token (a Metaspace or
# SentencePiece decoder drops the leading space of the first token only).
STREAM_CONTEXT = 5

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) valid UTF-8


class ChatTemplateError(TinyLLMError):
    """The chat template refused the conversation (its `raise_exception(...)`) or failed to
    render."""


# --------------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the text that id made certain.

    Decoding token by token loses spaces (a SentencePiece/Metaspace decoder strips the leading
    space of whatever it is handed first) and splits multi-byte characters (byte-fallback and
    byte-level tokens carry single UTF-8 bytes). So each step decodes a short window of tokens
    twice, with and without the unread tail, and emits the difference:

        ids:    ... | prefix (already emitted, kept as context) | unread (not yet emitted) |
        emit    decode(prefix + unread)[len(decode(prefix)):]

    and holds it back while it ends in U+FFFD (a character still missing bytes). After an
    emission the emitted tokens become the next prefix, so the window stays a few tokens long
    and every push costs O(1) (this is vLLM's prefix_offset/read_offset scheme).

    The pieces join to exactly the one-shot decode whenever that decode is valid text. Bytes that
    never form a character may come out differently: `tokenizers`' ByteFallback decoder turns a
    whole run of byte tokens into U+FFFD once any of them is invalid, while a stream has already
    printed the valid bytes at the start of the run.
    """

    def __init__(self, decode, prompt_ids=None, context: int = STREAM_CONTEXT):
        self._decode = decode  # list[int] -> str
        tail = list(prompt_ids)[-context:] if prompt_ids is not None and context > 0 else []
        self._ids = [int(t) for t in tail]
        self._read = len(self._ids)  # ids[:read] were emitted (or are prompt)
        self._prefix_text = self._decode(self._ids) if self._ids else ""

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet (a skipped special token), or a character still incomplete
        new = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. bytes that never became a valid character)."""
        text = self._decode(self._ids) if len(self._ids) > self._read else self._prefix_text
        new = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._ids = self._ids[self._read :] if new else self._ids
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids) if self._ids else ""
        return new


# --------------------------------------------------------------------------------------------
# Common interface


class Tokenizer:
    """Encode/decode, special token ids, chat prompt rendering and streaming for one model.

    `Tokenizer.load(model_dir)` returns an `HFTokenizer` (tokenizer.json) or a
    `MistralNativeTokenizer` (tokenizer.model.v1/v2/v3); both implement this interface.
    """

    vocab_size: int
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: set[int]
    has_chat_template: bool = False

    @staticmethod
    def present(model_dir) -> bool:
        """Whether the directory holds any tokenizer file (load() says what is wrong with it)."""
        d = Path(model_dir)
        return any(
            (d / n).is_file() for n in ("tokenizer.json", "tekken.json", "tokenizer.model")
        ) or any(d.glob("tokenizer.model.v*"))

    @classmethod
    def load(cls, model_dir) -> Tokenizer:
        d = Path(model_dir)
        if not d.is_dir():
            raise TinyLLMError(f"tokenizer: {d} is not a directory; pass the model directory")
        if (
            d / "tokenizer.json"
        ).is_file():  # wins over tokenizer.model.v3: Mistral's HF repos ship both
            return HFTokenizer(d)
        native = sorted(p.name for p in d.glob("tokenizer.model.v*"))
        if len(native) > 1:
            raise TinyLLMError(
                f"tokenizer: {d} has several Mistral tokenizers ({', '.join(native)}); "
                "keep the one that matches the model"
            )
        if native:
            return MistralNativeTokenizer(d / native[0])
        if (d / "tekken.json").is_file():
            raise TinyLLMError(
                f"tokenizer: {d / 'tekken.json'} (Mistral Tekken tokenizer) is not supported yet; "
                "use a model directory with tokenizer.json"
            )
        if (d / "tokenizer.model").is_file():
            raise TinyLLMError(
                f"tokenizer: {d} has tokenizer.model but no tokenizer.json; write one with "
                "transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)), or rename "
                "a Mistral v0.1/v0.2 native tokenizer to tokenizer.model.v1"
            )
        raise TinyLLMError(f"tokenizer: no tokenizer.json or tokenizer.model.v1/v2/v3 in {d}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own (a byte-level or byte-fallback token may
        be part of a character: then decode() of it alone gives U+FFFD, these do not)."""
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def longest_token_chars(self) -> int:
        """An upper bound on the characters of text one token covers: a text of n characters
        is at least n / this many tokens (a context check before tokenizing a huge text)."""
        return 64

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        raise NotImplementedError

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        # The rendered prompt already holds BOS when the model wants one (`{{ bos_token }}`);
        # adding special tokens again would give two [Llama-3.1-8B-Instruct discussion 97].
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return self.encode(text, add_special_tokens=False)

    def stream(
        self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> StreamDecoder:
        """A `StreamDecoder` for the tokens that follow `prompt_ids` (its last few are context)."""
        return StreamDecoder(
            lambda ids: self.decode(ids, skip_special_tokens=skip_special_tokens), prompt_ids
        )


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character a byte-level vocabulary spells each
    byte with -> the byte (printable ASCII and Latin-1 map to themselves, the rest to 256+)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _client_spans(text: str, messages: list[dict], controls) -> list[tuple[int, int]]:
    """The character spans of `text` (a rendered prompt) that hold the messages' contents, in
    order. A content the template changed (trimmed, rewritten) is not found verbatim: if it
    spells no control token that is harmless; if it does, it cannot be kept apart from the
    markup, and the request is refused rather than encoded with forged control tokens."""
    spans, pos = [], 0
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, str) or not content:
            continue
        at = text.find(content, pos)
        if at < 0 and content.strip():
            content = content.strip()
            at = text.find(content, pos)
        if at < 0:
            if any(c and c in m.get("content", "") for c in controls):
                raise ChatTemplateError(
                    f"message {i} spells a control token of this model (e.g. <|im_end|>) and "
                    "the chat template changed its text, so it cannot be encoded as plain text: "
                    "remove the control-token text"
                )
            continue
        spans.append((at, at + len(content)))
        pos = at + len(content)
    return spans


def check_messages(messages) -> list[dict]:
    """OpenAI-style messages -> [{"role": str, "content": str, ...}]: content given as a list
    of text parts is joined; anything else raises TinyLLMError naming the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TinyLLMError('messages must be a non-empty list of {"role", "content"} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TinyLLMError(f'message {i} must be an object with a string "role"')
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise TinyLLMError(f"message {i}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise TinyLLMError(
                f'message {i} must have string "content", not {type(content).__name__}'
            )
        out.append({**m, "content": content})
    return out


def _read_template(path: Path) -> str:
    """A chat_template.jinja file: UTF-8 text of bounded size."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise TinyLLMError(
                f"tokenizer: {path} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a chat "
                "template"
            )
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise TinyLLMError(f"tokenizer: {path} is not UTF-8 text") from None
    except OSError as e:
        raise TinyLLMError(
            f"tokenizer: cannot read {path}: {e.strerror or type(e).__name__}"
        ) from None


def _token_str(value) -> str | None:
    """A special token as written in tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# --------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json + chat template


def _encode(tok, text: str, add_special_tokens: bool = False):
    """tokenizers' Encoding of one text, through encode_batch: it releases the GIL while it
    runs and encode does not (tokenizers 0.23: a 640 KB text held the GIL for 0.7 s, stalling
    the server's engine thread and event loop, i.e. every client; through encode_batch the
    other threads were held at most 47 ms). Same ids and offsets as encode."""
    return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, read the way transformers (>= 5) reads it.

    - ids come from `tokenizer.json` as the `tokenizers` library runs it; its post-processor
      decides what `add_special_tokens=True` adds (Llama/Mistral: BOS; Qwen2: nothing).
      transformers 5 ignores tokenizer_config's `add_bos_token`/`add_eos_token` when a
      tokenizer.json is present, and so do we (transformers 4's LlamaTokenizerFast rebuilt the
      post-processor from them).
    - no `clean_up_tokenization_spaces`: transformers 5 skips it for BPE models, which all the
      LLaMA-family tokenizers are.
    - named special tokens (`bos_token`, `eos_token`, ... any `*_token` string) come from
      tokenizer_config.json, overridden by special_tokens_map.json when the config has no
      `added_tokens_decoder` (transformers' legacy rule).
    - the chat template comes from chat_template.jinja (and additional_chat_templates/*.jinja)
      if present, else tokenizer_config.json's `chat_template` (a string, or a list of
      {name, template}); with several, "default" is used ("tool_use" when tools are passed).
    """

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        try:
            self._tok = _TokenizersBackend.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception on a malformed file
            raise TinyLLMError(f"tokenizer: cannot load {path}: {e}".replace("\n", " ")) from None
        self._tok.no_truncation()
        self._tok.no_padding()

        cfg_path = self.model_dir / "tokenizer_config.json"
        cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
        named = {
            k: _token_str(v)
            for k, v in cfg.items()
            if k.endswith("_token") and _token_str(v) is not None
        }
        map_path = self.model_dir / "special_tokens_map.json"
        if map_path.is_file() and "added_tokens_decoder" not in cfg:
            for k, v in read_json_object(map_path).items():
                if k.endswith("_token") and _token_str(v) is not None:
                    named[k] = _token_str(v)
        self.special_tokens = (
            named  # e.g. {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        )

        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = self.token_to_id(named.get("bos_token"))
        self.eos_token_id = self.token_to_id(named.get("eos_token"))
        self.eos_token_ids = {self.eos_token_id} if self.eos_token_id is not None else set()

        self._templates = self._find_chat_templates(cfg)
        self.has_chat_template = bool(self._templates)
        self._compiled: dict[str, object] = {}

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._tok, text, add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def _added(self) -> dict[int, str]:
        """id -> text of every added token (control tokens and the like), which `encode`
        parses out of text."""
        return {int(i): t.content for i, t in self._tok.get_added_tokens_decoder().items()}

    @functools.cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    def token_bytes(self, token_id: int) -> bytes:
        """From the vocabulary, not a decode: a byte-level token's characters map back to
        bytes through GPT-2's table, a byte-fallback token <0xHH> is that byte, a
        SentencePiece piece has its U+2581 as a space; an added token is its own text."""
        token_id = int(token_id)
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _byte_level_table()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _longest(self) -> int:
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def longest_token_chars(self) -> int:
        return max(self._longest, 1)

    @functools.cached_property
    def _plain(self):
        """A second backend that encodes special tokens' text as text (client text goes
        through it; a separate instance because the flag is not per call)."""
        tok = _TokenizersBackend.from_str(self._tok.to_str())
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        return tok

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        """The rendered prompt's ids, where only the template's own markup yields control
        tokens: text from the messages (any role, tool results included) that spells a
        control token (`<|im_end|>`) is encoded as ordinary text, so a user cannot close
        their turn and forge a system one. A prompt without such text encodes exactly as
        apply_chat_template + encode (the common case pays one scan of the offsets)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        enc = _encode(self._tok, text)
        added = self._added
        if not added:
            return enc.ids
        spans = _client_spans(text, messages, added.values())
        forged = [
            (a, b)
            for t, (a, b) in zip(enc.ids, enc.offsets)
            if t in added and any(s <= a and b <= e for s, e in spans)
        ]
        if not forged:
            return enc.ids
        ids, pos = [], 0
        for s, e in spans:  # markup (parsed) and client text (not parsed), in turn
            ids += _encode(self._tok, text[pos:s]).ids
            ids += _encode(self._plain, text[s:e]).ids
            pos = e
        return ids + _encode(self._tok, text[pos:]).ids

    # ---- chat template

    def _find_chat_templates(self, cfg: dict) -> dict[str, str]:
        templates: dict[str, str] = {}
        jinja = self.model_dir / "chat_template.jinja"
        extra = self.model_dir / "additional_chat_templates"
        if jinja.is_file():
            templates["default"] = _read_template(jinja)
        if extra.is_dir():
            for p in sorted(extra.glob("*.jinja")):
                templates[p.name.removesuffix(".jinja")] = _read_template(p)
        if templates:  # separate template files take priority over the config entry
            return templates
        tpl = cfg.get("chat_template")
        if tpl is None:
            return {}
        if isinstance(tpl, str):
            return {"default": tpl}
        if isinstance(tpl, list) and all(
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
            for t in tpl
        ):
            return {t["name"]: t["template"] for t in tpl}
        raise JsonObject(cfg, "tokenizer_config.json").error(
            "chat_template",
            tpl,
            'must be a template string or a list of {"name", "template"} strings',
        )

    def chat_template(self, tools=None) -> str:
        """The template source that `apply_chat_template` would use."""
        if not self._templates:
            raise TinyLLMError(
                f"tokenizer: {self.model_dir} has no chat template (no chat_template.jinja and no "
                "chat_template in tokenizer_config.json); use `tinyllm generate` with a raw prompt"
            )
        if len(self._templates) == 1:
            return next(iter(self._templates.values()))
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise TinyLLMError(
            f"tokenizer: {self.model_dir} has several chat templates "
            f"({', '.join(sorted(self._templates))}) and none named 'default'"
        )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        source = self.chat_template(kwargs.get("tools"))
        if source not in self._compiled:
            try:
                self._compiled[source] = _jinja_env().from_string(source)
            except Exception as e:  # TemplateSyntaxError, RecursionError on deep nesting, ...
                raise ChatTemplateError(
                    f"chat template of {self.model_dir} does not compile: {_one_line(e)}"
                ) from None
        variables = {
            "tools": None,
            "documents": None,
            **self.special_tokens,
            **kwargs,
        }  # kwargs win, as in HF
        template = self._compiled[source]
        return render_bounded(
            lambda: template.generate(
                messages=copy.deepcopy(list(messages)),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        )


# Rendering limits: a real chat template renders in milliseconds into a prompt that must fit a
# context window; a hostile one must not hang or exhaust memory.
TEMPLATE_TIME_LIMIT = 5.0  # seconds
TEMPLATE_OUTPUT_LIMIT = (
    16 * 2**20
)  # characters, for the prompt and for any string or list built on the way


class _TemplateTimeout(BaseException):
    """Raised inside a render that ran past TEMPLATE_TIME_LIMIT (delivered asynchronously)."""


class _TemplateLimit(Exception):
    """A render tried to build something larger than TEMPLATE_OUTPUT_LIMIT."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return (text[:200] + "...") if len(text) > 200 else text


def render_bounded(generate) -> str:
    """Join the chunks of `generate()` (a jinja render) within the time and size limits; every
    failure becomes one ChatTemplateError. The time limit is enforced by a watchdog thread that
    raises _TemplateTimeout in this thread (PyThreadState_SetAsyncExc), so it also stops a
    loop that never calls back into our code, and works off the main thread."""
    tid = threading.get_ident()
    lock, state = threading.Lock(), {"active": True}

    def fire():
        with lock:
            if state["active"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(tid), ctypes.py_object(_TemplateTimeout)
                )

    timer = threading.Timer(TEMPLATE_TIME_LIMIT, fire)
    timer.daemon = True
    try:
        timer.start()
        try:
            out, n = [], 0
            for chunk in generate():
                n += len(chunk)
                if n > TEMPLATE_OUTPUT_LIMIT:
                    raise _TemplateLimit(
                        f"the prompt grew past {TEMPLATE_OUTPUT_LIMIT:,} characters"
                    )
                out.append(chunk)
            return "".join(out)
        finally:
            with lock:
                state["active"] = False
            timer.cancel()
    except _TemplateTimeout:
        raise ChatTemplateError(
            f"chat template rendering took longer than {TEMPLATE_TIME_LIMIT:g} s and was stopped"
        ) from None
    except _TemplateRaised as e:
        raise ChatTemplateError(str(e)) from None
    except _TemplateLimit as e:
        raise ChatTemplateError(f"chat template rendering stopped: {e}") from None
    except MemoryError:
        raise ChatTemplateError("chat template rendering ran out of memory") from None
    except RecursionError:
        raise ChatTemplateError("chat template rendering recursed too deeply") from None
    except (
        Exception
    ) as e:  # jinja errors, ZeroDivisionError, TypeError, OverflowError, a missing loader, ...
        raise ChatTemplateError(
            f"chat template failed to render: {type(e).__name__}: {_one_line(e)}"
        ) from None


def _check_size(value):
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > TEMPLATE_OUTPUT_LIMIT:
        raise _TemplateLimit(f"a value grew past {TEMPLATE_OUTPUT_LIMIT:,} elements")
    return value


def _check_args(args, kwargs):
    """Integer arguments past the size limit (str.center(10**9), |indent(10**9)) would
    allocate before any result could be checked."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > TEMPLATE_OUTPUT_LIMIT:
            raise _TemplateLimit(
                f"an argument of {a:.3g} exceeds the {TEMPLATE_OUTPUT_LIMIT:,} limit"
            )


_FORMAT_NUMBER = re.compile(r"\d{8,}")


def _check_format(fmt: str):
    """A %- or {}-format string whose widths would build a huge string."""
    for m in _FORMAT_NUMBER.finditer(fmt):
        if int(m.group()) > TEMPLATE_OUTPUT_LIMIT:
            raise _TemplateLimit(
                f"a format width of {m.group()[:20]} exceeds the {TEMPLATE_OUTPUT_LIMIT:,} limit"
            )
    if isinstance(fmt, str) and re.search(r"%[-#0 +]*\*", fmt):
        raise _TemplateLimit("'*' widths in % formats are not allowed in chat templates")


def _bounded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marker
    def bounded(*args, **kwargs):
        _check_args(args[1:], kwargs)
        return _check_size(f(*args, **kwargs))

    return bounded


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus size limits on what a template can build: the operators
    that grow sequences or numbers (*, **, +, %), method calls and filters check sizes before
    and after (memory), and render_bounded stops it in time."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        seqs = (str, list, tuple)
        if operator == "*":
            for a, b in ((left, right), (right, left)):
                if (
                    isinstance(a, seqs)
                    and isinstance(b, int)
                    and len(a) * b > TEMPLATE_OUTPUT_LIMIT
                ):
                    raise _TemplateLimit(
                        f"repeating a value {b:.3g} times exceeds the {TEMPLATE_OUTPUT_LIMIT:,} "
                        "limit"
                    )
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and right > 0
                and max(left.bit_length(), 1) * right > 64 * 1024
            ):
                raise _TemplateLimit("a power that large is not computed in a chat template")
        elif operator == "+":
            if (
                isinstance(left, seqs)
                and isinstance(right, seqs)
                and len(left) + len(right) > TEMPLATE_OUTPUT_LIMIT
            ):
                raise _TemplateLimit(f"a value grew past {TEMPLATE_OUTPUT_LIMIT:,} elements")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_args(args, kwargs)
        if (
            getattr(__obj, "__name__", None) == "replace"
            and isinstance(getattr(__obj, "__self__", None), str)
            and len(args) >= 2
            and isinstance(args[1], str)
        ):
            if (len(__obj.__self__) + 1) * max(len(args[1]), 1) > TEMPLATE_OUTPUT_LIMIT:
                raise _TemplateLimit(
                    f"a replace() result could exceed the {TEMPLATE_OUTPUT_LIMIT:,} limit"
                )
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format(value.__self__)
        return wrapped


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by a template's own `raise_exception(message)`."""


class _GenerationTag(jinja2.ext.Extension):
    # transformers marks assistant text with {% generation %} to build training masks; for
    # inference the tag only has to render what is inside it.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise _TemplateRaised(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change the prompt
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (chat_template_utils.py): sandboxed
    (templates come from the Hub), trim_blocks + lstrip_blocks, loop controls, plus the globals
    and filter above."""
    env = _BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# --------------------------------------------------------------------------------------------
# Mistral native (SentencePiece tokenizer.model.v1/v2/v3)


class MistralNativeTokenizer(Tokenizer):
    """Mistral's own tokenizer files, with the chat prompt built as ids like mistral-common.

    v1 (Mistral-7B v0.1/v0.2, Mixtral-8x7B): `[INST]` is plain text, so a turn is
    sp("[INST] {user} [/INST]") and the prompt reads `<s> [INST] Hello [/INST] Fine</s> [INST] ...`.
    v2/v3 (v0.3, 8x22B): `[INST]`=3 and `[/INST]`=4 are control tokens around sp(user), giving
    `<s>[INST] Hello[/INST] Fine</s>[INST] ...` (no space before [/INST], on purpose).
    There is no system role: system messages are joined and put in front of the first user
    message (v1) or the last one (v2/v3). Consecutive messages of one role are merged with
    "\\n\\n", and an empty user turn is inserted if the conversation does not start with one.
    Tool calls and tool results (v2/v3) are not supported.
    """

    def __init__(self, path: Path):
        self.model_dir = path.parent
        self.version = path.name.rsplit(".", 1)[-1]  # "v1", "v2", "v3"
        if self.version not in ("v1", "v2", "v3"):
            raise TinyLLMError(
                f"tokenizer: {path} is not supported yet (tinyllm reads tokenizer.model.v1, "
                "v2 and v3)"
            )
        try:
            import sentencepiece
        except ImportError:
            raise TinyLLMError(
                f"tokenizer: {path} needs the sentencepiece package: pip install 'tinyllm[mistral]'"
            ) from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TinyLLMError(f"tokenizer: cannot load {path}: {e}".replace("\n", " ")) from None
        sp = self._sp
        self.vocab_size = sp.vocab_size()
        self.bos_token_id = sp.bos_id()
        self.eos_token_id = sp.eos_id()
        self.eos_token_ids = {self.eos_token_id}
        self.has_chat_template = True
        if self.version == "v1":
            self._inst = self._end_inst = None
        else:
            self._inst, self._end_inst = sp.piece_to_id("[INST]"), sp.piece_to_id("[/INST]")
            if not (sp.IsControl(self._inst) and sp.IsControl(self._end_inst)):
                raise TinyLLMError(
                    f"tokenizer: {path} has no [INST]/[/INST] control tokens; "
                    "is it really a v2/v3 tokenizer?"
                )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Control tokens ([INST], </s>) written in the text stay text: mistral-common never
        # parses them out of strings, and neither do we.
        ids = self._sp.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self._sp.decode(ids)  # SentencePiece drops control tokens itself
        # Control tokens as their text. A run of ordinary tokens keeps its leading space unless
        # it starts the output (what sp.decode and HF's Strip decoder do for the first token).
        out, run = [], []
        for i in ids + [None]:
            if i is not None and not self._sp.IsControl(i):
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                if out and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run = []
            if i is not None:
                out.append(self._sp.id_to_piece(i))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        sp, token_id = self._sp, int(token_id)
        piece = sp.id_to_piece(token_id)
        if sp.IsByte(token_id):
            return bytes([int(piece[3:5], 16)])  # "<0xHH>"
        return piece.replace("\u2581", " ").encode("utf-8")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """The prompt as readable text (control tokens spelled out); generate from `encode_chat`,
        since re-encoding this text would not give the control tokens back."""
        return self.decode(
            self.encode_chat(messages, add_generation_prompt, **kwargs), skip_special_tokens=False
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        # The prompt always ends in [/INST], which is the generation prompt; add_generation_prompt
        # has nothing to add. A final assistant message with "prefix": True is left open.
        if kwargs.get("tools"):
            raise ChatTemplateError("tools are not supported with Mistral native tokenizers yet")
        system, turns = _mistral_turns(messages)
        users = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
        system_turn = users[0] if self.version == "v1" else users[-1]
        ids = [self.bos_token_id]
        for i, (role, content, prefix) in enumerate(turns):
            if role == "user":
                if system and i == system_turn:
                    content = system + "\n\n" + content
                if self.version == "v1":
                    ids += self._sp.encode(f"[INST] {content} [/INST]")
                else:
                    ids += [self._inst, *self._sp.encode(content), self._end_inst]
            else:
                if not content:
                    raise ChatTemplateError(f"assistant message {i} has no content")
                ids += self._sp.encode(content if self.version == "v1" else content.rstrip(" "))
                if not prefix:
                    ids.append(self.eos_token_id)
        return ids


def _message_text(message: dict) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []  # OpenAI-style content chunks: only text is supported here
    for chunk in content:
        if not (isinstance(chunk, dict) and chunk.get("type") == "text"):
            raise ChatTemplateError(
                f"only text content is supported for Mistral native chat, got {chunk!r:.60}"
            )
        parts.append(chunk.get("text") or "")
    return "\n\n".join(p for p in parts if p)


def _mistral_turns(messages: list[dict]) -> tuple[str | None, list[tuple[str, str, bool]]]:
    """mistral-common's normalisation: (system prompt, [(role, text, prefix)]) with runs of one
    role merged ("\\n\\n", empty texts dropped) and system messages taken out (they still
    break runs)."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ChatTemplateError(
                f"role {m.get('role')!r} is not supported by Mistral native chat "
                "(use system, user and assistant)"
            )
    system = [t for m in messages if m["role"] == "system" and (t := _message_text(m))]
    turns: list[tuple[str, str, bool]] = []
    for role, run in itertools.groupby(messages, key=lambda m: m["role"]):
        if role != "system":
            run = list(run)
            text = "\n\n".join(t for m in run if (t := _message_text(m)))
            turns.append((role, text, any(m.get("prefix", False) for m in run)))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", "", False))
    return ("\n\n".join(system) if system else None), turns
