"""`tinyllm chat`: the conversation and the terminal loop around it.

Owns the chat history (whole user/assistant turns), system-prompt folding for templates that
reject a system role, dropping old turns before the context overflows, KV reuse between turns
(earlier turns come back from the prefix cache), `/set` parsing and multi-line input assembly.
`ChatSession` is a plain class (testable without a terminal); `run_chat` is a thin REPL over it.
Rendering and tokenization belong to tokenizer.py, generation to the engine.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import sys
from collections.abc import Callable, Iterator

from .errors import TinyLLMError
from .sampling import SamplingParams
from .tokenizer import ChatTemplateError

HELP = """\
Commands:
  /set key=value ...  change sampling for the next replies (pairs separated by spaces or ';'):
                      temperature, top_p, top_k, repetition_penalty, seed, max_tokens,
                      stop (comma-separated, \\n allowed). key=default restores the default;
                      seed=none unseeds, stop=none removes stop strings. /set alone shows them.
  /system TEXT        set the system prompt (keeps the conversation); /system shows it,
                      /system none removes it
  /reset, /clear      forget the conversation (the system prompt stays)
  /stats              tokens and speed of the last reply
  /help, /?           this help
  /bye, /exit         quit (Ctrl-D too)
Input:
  \""" starts a multi-line message, a line ending in \""" ends it; a trailing \\ continues the line.
  Pasted lines arrive as one message.
  Ctrl-C stops a reply; the part already shown stays in the conversation as the reply.
  To send a message that starts with '/', begin it with a space."""

HINT = "/help for commands, Ctrl-C stops a reply, Ctrl-D or /bye quits"
QUIT_HINT = "(to quit, press Ctrl-D or type /bye)"

# What a reply may need at least: the prompt must leave min(max_tokens, context // 4) free.
REPLY_RESERVE_FRACTION = 4

# The transcript used when the model has no chat template (base models).
PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant:"

# /set keys, and the spellings other tools (ollama, HF) use for some of them.
SET_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens", "stop")
SET_ALIASES = {
    "temp": "temperature",
    "repeat_penalty": "repetition_penalty",
    "num_predict": "max_tokens",
    "max_new_tokens": "max_tokens",
}


class Quit(Exception):
    """A command asked to leave the chat."""


# ---- /set parsing ----------------------------------------------------------------------


def _number(key: str, text: str, kind: type):
    try:
        v = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise TinyLLMError(f"{key}={text!r} is not {what}") from None
    if kind is float and not math.isfinite(v):
        raise TinyLLMError(f"{key}={text!r} must be a finite number")
    return v


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\t", "\t")


def parse_set(text: str) -> dict:
    """'/set' arguments -> {key: value}. A value of `DEFAULT` means "back to the default"
    (CLI flag, else generation_config). Raises TinyLLMError with a one-line message.

    >>> parse_set("temperature=0.5; top_k=40 seed=none stop=User:,Bot:")
    {'temperature': 0.5, 'top_k': 40, 'seed': None, 'stop': ['User:', 'Bot:']}
    """
    text = re.sub(r"\s*=\s*", "=", text.strip())
    pairs: list[list[str]] = []
    for tok in re.split(r"[;\s]+", text):
        if not tok:
            continue
        if re.match(r"^[A-Za-z_-]+=", tok):
            pairs.append(tok.split("=", 1))
        elif pairs:  # a space inside a value (stop strings)
            pairs[-1][1] += " " + tok
        else:
            raise TinyLLMError(
                f"/set expects key=value pairs (e.g. /set temperature=0.7), got {tok!r}"
            )
    out: dict = {}
    for raw_key, value in pairs:
        key = raw_key.lower().replace("-", "_")
        key = SET_ALIASES.get(key, key)
        if key not in SET_KEYS:
            raise TinyLLMError(f"unknown setting {raw_key!r}; known: {', '.join(SET_KEYS)}")
        if value in ("", "default"):
            out[key] = DEFAULT
        elif key == "stop":
            out[key] = (
                []
                if value == "none"
                else [_unescape(s.strip()) for s in value.split(",") if s.strip()]
            )
        elif key == "seed":
            out[key] = None if value in ("none", "random") else _number(key, value, int)
        elif key in ("top_k", "max_tokens"):
            out[key] = _number(key, value, int)
        else:
            out[key] = _number(key, value, float)
    if not out:
        raise TinyLLMError("/set expects key=value pairs (e.g. /set temperature=0.7)")
    return out


class _Default:
    def __repr__(self):
        return "DEFAULT"


DEFAULT = _Default()


# ---- input assembly --------------------------------------------------------------------


def read_message(read_line: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from `read_line(prompt)` (input() in the REPL): a line; a line ending in
    a backslash continues on the next; a line starting with \"\"\" opens a block that a line
    ending in \"\"\" closes. EOFError before any text propagates (quit); EOF inside a block or
    a continuation ends the message."""
    line = read_line(prompt)
    head = line.lstrip()
    if head.startswith('"""'):
        rest = head[3:]
        if rest.rstrip().endswith('"""'):  # """one line"""
            return rest.rstrip()[:-3]
        lines = [rest]
        while True:
            try:
                line = read_line(more)
            except EOFError:
                break
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                break
            lines.append(line)
        return "\n".join(lines).strip("\n")
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read_line(more)
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


# ---- the session ------------------------------------------------------------------------


def format_stats(c, max_seq_len: int) -> str:
    n_prompt, n_gen = len(c.prompt_token_ids), len(c.token_ids)
    return (
        f"[prompt {n_prompt} tokens ({c.prefill_tokens} prefilled, {c.cached_tokens} from the "
        "prefix cache), "
        f"generated {n_gen} tokens, first token {c.time_to_first_token:.2f} s, "
        f"{c.decode_tokens_per_s:.1f} tokens/s, context {n_prompt + n_gen}/{max_seq_len}, "
        f"finish: {c.finish_reason}]"
    )


def _stderr(msg: str):
    sys.stdout.flush()
    print(msg, file=sys.stderr, flush=True)


class ChatSession:
    """A conversation with one LLM: history of whole turns, system prompt, sampling
    settings. A turn's prompt repeats the conversation so far, whose full KV blocks the
    engine still has in its prefix cache: it prefills only what follows them."""

    def __init__(
        self,
        llm,
        params: SamplingParams | None = None,
        system: str | None = None,
        notify: Callable[[str], None] = _stderr,
    ):
        self.llm = llm
        self.tok = llm.need_tokenizer("tinyllm chat")  # (text in, text out)
        self.base_params = params or SamplingParams()
        self.overrides: dict = {}  # from /set
        self.system = system or None
        self.turns: list[tuple[str, str]] = []  # (user, assistant), oldest first
        self.notify = notify
        self.fold_system = False  # the template rejects a system role
        self.last = None  # Completion of the last finished reply
        self.last_interrupted = False
        self.templated = bool(getattr(self.tok, "has_chat_template", False))

    # ---- settings ----
    def params(self) -> SamplingParams:
        """CLI params with the /set overrides applied (None fields: model defaults)."""
        p = SamplingParams(**{**vars(self.base_params), **self.overrides})
        if not self.templated:  # the plain transcript ends a reply at the next "User:"
            p.stop = list(p.stop or []) + ["\n" + PLAIN_USER.strip()]
        return p

    def set(self, text: str) -> str:
        """Apply '/set' arguments atomically; returns a confirmation line."""
        changes = parse_set(text)
        new = dict(self.overrides)
        for k, v in changes.items():
            if v is DEFAULT:
                new.pop(k, None)
            else:
                new[k] = v
        candidate = SamplingParams(**{**vars(self.base_params), **new})
        self.llm.resolve_params(candidate)  # validates; raises TinyLLMError on a bad value
        self.overrides = new
        return "set " + ", ".join(
            f"{k}={'default' if v is DEFAULT else _show(v)}" for k, v in changes.items()
        )

    def describe_params(self) -> str:
        p = self.llm.resolve_params(self.params())
        return " ".join(f"{k}={_show(getattr(p, k))}" for k in SET_KEYS)

    # ---- history ----
    def reset(self):
        self.turns.clear()

    def messages(self, user: str, turns: list[tuple[str, str]] | None = None) -> list[dict]:
        """The message list for the next turn; with `fold_system`, the system text is
        prepended to the first user message ("{system}\\n\\n{user}")."""
        turns = self.turns if turns is None else turns
        msgs = []
        for u, a in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": user})
        if self.system:
            if self.fold_system:
                msgs[0] = {"role": "user", "content": f"{self.system}\n\n{msgs[0]['content']}"}
            else:
                msgs.insert(0, {"role": "system", "content": self.system})
        return msgs

    def render(self, user: str, turns: list[tuple[str, str]] | None = None) -> list[int]:
        """Prompt ids for the next turn. A template that rejects the system role is
        detected here (once) and the system prompt is folded from then on."""
        if not self.templated:
            return self.tok.encode(self._plain_transcript(user, turns))
        try:
            return self.tok.encode_chat(self.messages(user, turns), add_generation_prompt=True)
        except ChatTemplateError:
            if not self.system or self.fold_system:
                raise
            self.fold_system = True
            try:
                ids = self.tok.encode_chat(self.messages(user, turns), add_generation_prompt=True)
            except BaseException:
                self.fold_system = False
                raise
            self.notify(
                "[this model's chat template has no system role: the system prompt is "
                "prepended to the first user message]"
            )
            return ids

    def _plain_transcript(self, user: str, turns) -> str:
        turns = self.turns if turns is None else turns
        text = f"{self.system}\n\n" if self.system else ""
        for u, a in turns:
            text += f"{PLAIN_USER}{u}\n{PLAIN_ASSISTANT} {a}\n"
        return text + f"{PLAIN_USER}{user}\n{PLAIN_ASSISTANT}"

    def reply_reserve(self) -> int:
        max_tokens = self.llm.resolve_params(self.params()).max_tokens
        return max(1, min(max_tokens, self.llm.max_seq_len // REPLY_RESERVE_FRACTION))

    def prepare(self, user: str) -> list[int]:
        """Render the next prompt so that it leaves room for a reply: the oldest whole turns
        are dropped (with a notice) while prompt + reserve exceeds the context. A message
        that cannot fit even alone raises TinyLLMError and leaves the history untouched."""
        ctx = self.llm.max_seq_len
        alone = self.render(user, [])
        if len(alone) >= ctx:
            what = "your message with the system prompt" if self.system else "your message"
            raise TinyLLMError(
                f"{what} is {len(alone)} tokens, the context is {ctx}: shorten it "
                f"or start with a larger --ctx-size"
            )
        reserve = self.reply_reserve()
        dropped = 0
        ids = self.render(user)
        while len(ids) + reserve > ctx and dropped < len(self.turns):
            dropped += 1
            ids = alone if dropped == len(self.turns) else self.render(user, self.turns[dropped:])
        if dropped:
            del self.turns[:dropped]
            self.notify(
                f"[context full: dropped the oldest {_plural(dropped, 'turn')} "
                f"(user message + reply) to fit the {ctx}-token context]"
            )
        room = ctx - len(ids)
        if room < reserve:
            self.notify(f"[only {_plural(room, 'token')} of context left for the reply]")
        return ids

    # ---- a turn ----
    def send(self, user: str) -> Iterator[str]:
        """Stream the reply to `user`; when it finishes, the turn joins the history. If the
        consumer stops early (Ctrl-C), it calls `abort` with the text it showed."""
        ids = self.prepare(user)
        result: list = []
        self._result = result  # abort() reads an interrupted reply's numbers here
        stream = self.llm.stream(ids, self.params(), result=result)
        try:
            yield from stream
        finally:
            stream.close()  # on an early close too, so `result` holds the partial reply
        c = result[0]
        self.turns.append((user, c.text))
        self.last, self.last_interrupted = c, False

    def finish_notice(self, how: str = "/set max_tokens=N") -> str | None:
        """Why the last reply stopped, when it was not the model's choice (printed after it);
        `how` names the way to allow longer replies."""
        c = self.last
        if c is None or self.last_interrupted or c.finish_reason != "length":
            return None
        if len(c.prompt_token_ids) + len(c.token_ids) >= self.llm.max_seq_len:
            return (
                "[the reply stopped because the context is full; older turns are dropped next time]"
            )
        return f"[the reply reached max_tokens={len(c.token_ids)}; {how} for longer ones]"

    def abort(self, user: str, shown: str) -> str:
        """A reply stopped by the user: keep the shown part as the reply (nothing shown:
        forget the message too). Returns the notice to print."""
        self.last_interrupted = True
        partial = getattr(self, "_result", None)
        if partial:  # the interrupted reply's numbers, for /stats
            self.last = partial[0]
        if shown:
            self.turns.append((user, shown))
            return "[interrupted — partial reply kept]"
        return "[interrupted before the reply started — your message was not kept]"

    def stats(self) -> str:
        """The last reply's numbers; an interrupted reply counts up to where it stopped."""
        if self.last is None:
            return (
                "no reply yet"
                if not self.last_interrupted
                else "no reply yet (the last was interrupted before it began)"
            )
        return format_stats(self.last, self.llm.max_seq_len)

    # ---- commands ----
    def command(self, line: str) -> str:
        """Run one /command; returns what to print. Raises Quit for /bye and /exit, and
        TinyLLMError for a bad argument."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/bye", "/exit", "/quit"):
            raise Quit()
        if name in ("/help", "/?"):
            return HELP
        if name in ("/reset", "/clear"):
            n = len(self.turns)
            self.reset()
            kept = " (system prompt kept)" if self.system else ""
            return f"[conversation cleared: {_plural(n, 'turn')} forgotten{kept}]"
        if name == "/system":
            if not arg:
                return (
                    f"system prompt: {self.system!r}"
                    if self.system
                    else "no system prompt (set one with /system TEXT)"
                )
            self.system = None if arg.lower() == "none" else arg
            return "[system prompt removed]" if self.system is None else "[system prompt set]"
        if name == "/set":
            return self.describe_params() if not arg else self.set(arg)
        if name == "/stats":
            return self.stats()
        raise TinyLLMError(f"unknown command {name}; /help lists the commands")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(s.encode("unicode_escape").decode() for s in v) or "none"
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


# ---- the terminal ------------------------------------------------------------------------

# C0/C1 control characters (but tab and newline) and DEL are shown as U+FFFD, so model output
# cannot move the cursor or send escape sequences to the terminal.
_CONTROL = {c: "\ufffd" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if c not in (9, 10)}


def history_path() -> str:
    return os.environ.get("TINYLLM_HISTORY") or os.path.expanduser("~/.tinyllm_history")


def _setup_readline():
    """Line editing and persistent history when the readline module exists; returns a
    function that saves the history (or None)."""
    try:
        import readline
    except ImportError:
        return None
    path = history_path()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(2000)

    def save():
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _line_buffer() -> str:
    try:
        import readline

        return readline.get_line_buffer()
    except (ImportError, AttributeError):
        return ""


# A line that arrives this soon after the previous one was pasted, not typed.
PASTE_GAP = 0.02  # seconds


def _more_pasted() -> bool:
    """Whether more input is already waiting: the rest of a multi-line paste. Terminals with
    bracketed paste hand readline the whole paste as one line already (newlines included);
    this catches those that send the lines one by one."""
    try:
        ready, _, _ = select.select([sys.stdin], [], [], PASTE_GAP)
    except (OSError, ValueError, TypeError):
        return False
    return bool(ready)


def _stream_reply(session: ChatSession, text: str, out, tty: bool, verbose: bool) -> None:
    """Print one reply as it streams; Ctrl-C keeps what was shown."""
    shown: list[str] = []
    pieces = session.send(text)
    try:
        for piece in pieces:
            shown.append(piece)
            out.write(piece.translate(_CONTROL) if tty else piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write("\n")
        _stderr(session.abort(text, "".join(shown)))
        return
    _end_reply(session, "".join(shown), out, verbose)


def _end_reply(
    session: ChatSession, reply: str, out, verbose: bool, how: str = "/set max_tokens=N"
):
    out.write("\n" if not reply.endswith("\n") else "")
    out.flush()
    notice = session.finish_notice(how)
    if notice:
        _stderr(notice)
    if verbose:
        _stderr(session.stats())


def _settings_line(session: ChatSession) -> str:
    """The sampling in force and where it comes from. The model's generation_config.json
    decides as in transformers: its temperature/top_p/top_k apply when it sets do_sample;
    without do_sample (or without the file) replies are greedy."""
    path = session.llm.model_dir / "generation_config.json"
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
        keys = sorted({"temperature", "top_p", "top_k", "repetition_penalty"} & set(g))
        sample = g.get("do_sample") is True
    except (OSError, ValueError, TypeError):
        keys, sample = [], False
    how = "flags and /set override, e.g. /set temperature=0.7"
    if sample:
        src, how = "from the model's generation_config.json", "flags and /set override"
    elif keys:
        src = (
            f"generation_config.json names {', '.join(keys)} but not do_sample: greedy, "
            "as transformers"
        )
    else:
        src = "the model names no sampling settings: greedy, as transformers"
    return f"sampling: {session.describe_params()} ({src}; {how})"


def run_chat(args) -> int:
    """`tinyllm chat`: one answer (question argument or piped stdin), or the REPL."""
    from .options import load_llm, sampling_from_args

    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    params = sampling_from_args(args)
    if args.question is None and sys.stdin is None:
        raise TinyLLMError(
            "stdin is closed: pass a question as an argument, or pipe a message into stdin"
        )
    interactive = args.question is None and sys.stdin.isatty()
    question = args.question
    if question is None and not interactive:
        question = sys.stdin.read()  # like `ollama run`: all piped input is one message
        if not question.strip():
            raise TinyLLMError("no input: pass a question or pipe a message into stdin")
    llm = load_llm(args)
    session = ChatSession(llm, params, system=args.system)
    if not session.templated:
        _stderr("[this model has no chat template: using a plain 'User:/Assistant:' transcript]")

    if not interactive:
        shown = []
        for piece in session.send(question.strip("\n")):
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        _end_reply(session, "".join(shown), sys.stdout, args.verbose, how="--max-tokens N")
        return 0

    _stderr(_settings_line(session))
    if session.system:
        _stderr(f"system prompt: {session.system!r}")
    _stderr(HINT)
    save_history = _setup_readline()
    tty = sys.stdout.isatty()
    typed: list[str] = []  # lines of the message being read

    def read_line(prompt: str) -> str:
        typed.append(input(prompt))
        return typed[-1]

    try:
        while True:
            typed.clear()
            try:
                text = read_message(read_line)
                while _more_pasted():  # a paste without bracketed-paste markers
                    text += "\n" + read_line("... ")
            except (
                KeyboardInterrupt
            ):  # like a shell: drop what was typed; at an empty prompt, say how to quit
                print()
                if not typed and not _line_buffer():
                    _stderr(QUIT_HINT)
                continue
            except EOFError:
                print()
                return 0
            try:
                if text.startswith("/") and "\n" not in text:
                    _stderr(session.command(text))
                elif text.strip():
                    _stream_reply(session, text.strip(), sys.stdout, tty, args.verbose)
                    print()
            except Quit:
                return 0
            except TinyLLMError as e:
                _stderr(f"error: {e}")
            except KeyboardInterrupt:  # a second Ctrl-C while handling the first
                print()
    finally:
        if save_history:
            save_history()
