"""`tinyllm batch`: generate for every request of a JSONL file, safe to kill and resume.

Owns the batch file formats (OpenAI Batch input/output lines, and a plain
`{"id", "prompt"|"messages", ...}` form), turning one input line into an engine Request or
an error line, the append-only output file (one fsync'd line per finished request, in
completion order), --resume, the progress bar and the summary. It does not own generation
(engine.py: continuous batching), sampling semantics (sampling.py) or chat templates
(tokenizer.py).

Crash safety: a result line is written whole (Ctrl-C waits for it), flushed and fsync'd
before the next one. A kill can therefore lose only the requests still in flight, plus at
worst an incomplete last line, which --resume truncates before appending. --resume skips
every input line whose key is already in the output: the request id, or for a line that
owns no id (invalid JSON, no or an invalid id, a repeated id) its line number.

Integrity: a run holds an exclusive lock (flock) on its output, so a second run on the same
file is refused. Every result line carries a `fingerprint` of its request and of the run
(model, generation flags); --resume stops, listing the ids, when a kept result's request or
run changed, rather than silently keeping an answer to a different question (see
_changed_error for why it stops instead of re-running). SIGTERM stops a run like Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None

from .constraints import BODY_FIELDS, CONSTRAINT_FIELDS, body_constraint
from .errors import TinyLLMError
from .sampling import SamplingParams

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"

# Body fields that map onto SamplingParams (OpenAI names, plus vLLM's extras).
PARAM_FIELDS = {
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "stop": "stop",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}
# Accepted and ignored: they do not change what is generated.
IGNORED_FIELDS = {"model", "user", "metadata", "store", "service_tier", "stream_options"}
# Accepted only at their neutral value: anything else asks for a feature we do not have.
NEUTRAL_FIELDS = {
    "n": 1,
    "stream": False,
    "logprobs": False,
    "echo": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
}


class LineError(Exception):
    """One input line cannot run: becomes an error line in the output, the run goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.param = param  # the request field at fault, when there is one


@dataclass
class Item:
    """One parsed input line, not yet tokenized."""

    lineno: int
    custom_id: str | int
    chat: bool  # /v1/chat/completions (messages) or /v1/completions (prompt)
    prompt: object  # messages list, prompt str, or list of token ids
    params: SamplingParams  # the request's own values; None = not given


# ---- reading input ---------------------------------------------------------------------


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line, read lazily."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield n, raw


def identify(raw: bytes, lineno: int, seen: set) -> tuple[tuple, dict | None, LineError | None]:
    """The resume key of a line, its JSON object, and the error that stops it before any
    per-request validation. `seen` collects the ids met so far (a later repeat is an error
    keyed by its line, so the first occurrence keeps the id)."""
    from .request_json import BodyError, loads

    line_key = ("line", lineno)
    try:  # (no NaN/Infinity, no lone surrogates, bounded nesting: request_json.py)
        obj = loads(raw, f"input line {lineno}")
    except BodyError as e:
        return line_key, None, LineError(e.code, e.message)
    if not isinstance(obj, dict):
        return (
            line_key,
            None,
            LineError("invalid_request", f"input line {lineno} is not a JSON object"),
        )
    cid = obj.get("custom_id", obj.get("id"))
    if cid is None or cid == "":
        return (
            line_key,
            obj,
            LineError(
                "missing_custom_id",
                f'input line {lineno} has no "custom_id" (or "id"): results are keyed by it',
            ),
        )
    if isinstance(cid, bool) or not isinstance(cid, (str, int)):
        return (
            line_key,
            obj,
            LineError(
                "invalid_custom_id",
                f"input line {lineno}: the id must be a string or an integer, not {cid!r}",
            ),
        )
    if ("id", cid) in seen:
        return (
            line_key,
            obj,
            LineError(
                "duplicate_custom_id",
                f"input line {lineno}: id {cid!r} appeared on an earlier line; ids must be unique",
            ),
        )
    seen.add(("id", cid))
    return ("id", cid), obj, None


def parse_item(obj: dict, lineno: int) -> Item:
    """Validate one request object (either form) into an Item; raises LineError."""
    cid = obj.get("custom_id", obj.get("id"))
    if "body" in obj or "url" in obj or "method" in obj:  # OpenAI Batch form
        extra = set(obj) - {"custom_id", "id", "method", "url", "body"}
        if extra:
            raise LineError(
                "invalid_request", f'unknown field(s) {", ".join(sorted(extra))} next to "body"'
            )
        if obj.get("method", "POST") != "POST":
            raise LineError("invalid_request", f"method must be POST, not {obj['method']!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", '"body" must be a JSON object with the request')
        url = obj.get("url") or (CHAT_URL if "messages" in body else COMPLETIONS_URL)
        if url not in (CHAT_URL, COMPLETIONS_URL):
            raise LineError(
                "invalid_url", f"url {url!r} is not supported; use {CHAT_URL} or {COMPLETIONS_URL}"
            )
        chat = url == CHAT_URL
        need = "messages" if chat else "prompt"
        if need not in body:
            raise LineError("missing_prompt", f'{url} needs "{need}" in the body')
    else:  # plain form
        body = {k: v for k, v in obj.items() if k not in ("id", "custom_id")}
        if "messages" in body and "prompt" in body:
            raise LineError("invalid_request", 'give either "prompt" or "messages", not both')
        if "messages" not in body and "prompt" not in body:
            raise LineError("missing_prompt", 'the request has neither "prompt" nor "messages"')
        chat = "messages" in body
    prompt = check_messages(body["messages"]) if chat else check_prompt(body["prompt"])
    rest = {k: v for k, v in body.items() if k not in ("messages", "prompt")}
    return Item(lineno, cid, chat, prompt, request_params(rest))


def check_messages(messages) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str}] (tokenizer.check_messages), as a LineError;
    assistant tool calls and tool results as chat templates take them (tools.py)."""
    from .tokenizer import check_messages as check
    from .tools import normalize_messages

    try:
        return check(normalize_messages(messages))
    except TinyLLMError as e:
        raise LineError("invalid_messages", str(e), "messages") from None


def check_prompt(prompt):
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, str) for t in prompt):
        raise LineError(
            "invalid_prompt",
            "one prompt per request: split a list of prompts into separate lines",
            "prompt",
        )
    raise LineError(
        "invalid_prompt", '"prompt" must be a string or a non-empty list of token ids', "prompt"
    )


def request_params(body: dict, extra: tuple[str, ...] = ()) -> SamplingParams:
    """The sampling fields of a request body (None where not given), checked for type.
    `extra` names fields the caller handles itself (the server's `stream`, `n`, ...): they
    are skipped here but listed among the known ones in an unknown-parameter error."""
    kw: dict = {}
    given: dict = {}  # SamplingParams field -> body key
    for k, v in body.items():
        if k in extra:
            continue
        if k in PARAM_FIELDS:
            if v is None:
                continue
            name = PARAM_FIELDS[k]
            if name in ("max_tokens", "top_k", "seed") and (
                isinstance(v, bool) or not isinstance(v, int)
            ):
                raise LineError("invalid_parameter", f"{k}={v!r} must be an integer", k)
            if name in ("temperature", "top_p", "repetition_penalty") and (
                isinstance(v, bool) or not isinstance(v, (int, float))
            ):
                raise LineError("invalid_parameter", f"{k}={v!r} must be a number", k)
            if name == "ignore_eos" and not isinstance(v, bool):
                raise LineError("invalid_parameter", f"ignore_eos={v!r} must be true or false", k)
            if name == "stop_token_ids" and not (
                isinstance(v, list)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            ):
                raise LineError(
                    "invalid_parameter", f"stop_token_ids={v!r} must be a list of integers", k
                )
            if name == "top_k" and v == -1:
                v = 0  # vLLM's spelling of "off"
            if name in kw:
                raise LineError(
                    "invalid_parameter", "give max_tokens or max_completion_tokens, not both", k
                )
            kw[name] = v
            given[name] = k
        elif k in BODY_FIELDS:  # response_format and vLLM's guided_* (constraints.py)
            if v is None:
                continue
            try:
                more = body_constraint(k, v)
            except ValueError as e:
                raise LineError("invalid_parameter", str(e), k) from None
            if set(more) & set(kw) or (more and any(x in given for x in CONSTRAINT_FIELDS)):
                raise LineError("invalid_parameter", f"{k}: give one constraint per request", k)
            kw.update(more)
            given.update({f: k for f in more})
        elif k in IGNORED_FIELDS:
            continue
        elif k in NEUTRAL_FIELDS:
            if v is not None and v != NEUTRAL_FIELDS[k]:
                raise LineError(
                    "unsupported_parameter",
                    f"{k}={v!r} is not supported (only {json.dumps(NEUTRAL_FIELDS[k])})",
                    k,
                )
        else:
            known = sorted(
                set(PARAM_FIELDS)
                | IGNORED_FIELDS
                | set(NEUTRAL_FIELDS)
                | set(extra)
                | set(BODY_FIELDS)
            )
            raise LineError(
                "unknown_parameter", f"unknown parameter {k!r}; known: {', '.join(known)}", k
            )
    try:
        return SamplingParams(**kw).validate()
    except TinyLLMError as e:
        # validate() names the field first: "invalid sampling parameter: top_p=2 (...)"
        name = str(e).partition(": ")[2].partition("=")[0]
        raise LineError("invalid_parameter", str(e), given.get(name, name or None)) from None


def merge_params(request: SamplingParams, defaults: SamplingParams) -> SamplingParams:
    """Per-request values win; the CLI's sampling flags fill what a request leaves out."""
    kw = {}
    for f in fields(SamplingParams):
        mine, default = getattr(request, f.name), getattr(defaults, f.name)
        given = mine is not None and not (
            f.name in ("ignore_eos", "stop_token_ids", "json_object") and not mine
        )
        kw[f.name] = mine if given else default
    return SamplingParams(**kw)


# ---- output records --------------------------------------------------------------------


def ok_record(item: Item, completion, model: str, created: int, with_ids: bool = False) -> dict:
    """with_ids: the choice carries the generated `token_ids` (as serve's return_token_ids;
    a model without a tokenizer has no text, so they are its only output)."""
    n_prompt, n_gen = len(completion.prompt_token_ids), len(completion.token_ids)
    choice: dict = {"index": 0}
    if item.chat:
        choice["message"] = {"role": "assistant", "content": completion.text}
    else:
        choice["text"] = completion.text
    choice.update(logprobs=None, finish_reason=completion.finish_reason)
    if with_ids:
        choice["token_ids"] = list(completion.token_ids)
    body = {
        "id": ("chatcmpl-" if item.chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if item.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_gen,
            "total_tokens": n_prompt + n_gen,
            # prompt tokens whose K/V came from the prefix cache (whole blocks an earlier
            # request computed)
            "prompt_tokens_details": {"cached_tokens": completion.cached_tokens},
        },
    }
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }


def error_record(custom_id, lineno: int, err: LineError) -> dict:
    return {
        "id": "batch_req_" + uuid.uuid4().hex,
        "custom_id": custom_id,
        "response": None,
        "error": {"code": err.code, "message": err.message, "line": lineno},
    }


def fingerprint(obj: dict | None, raw: bytes, run: str) -> str:
    """What a result line was made from: the request (its JSON object without the id, in
    canonical form, or the raw line when it is not a JSON object) and the run (`run`: the
    model and the generation settings, see run_identity)."""
    if isinstance(obj, dict):
        body = json.dumps(
            {k: v for k, v in obj.items() if k not in ("custom_id", "id")},
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
    else:
        body = raw.strip()
    return "sha256:" + hashlib.sha256(run.encode("utf-8") + b"\n" + body).hexdigest()[:32]


def run_identity(a, model_dir: Path) -> str:
    """The model (its directory, config.json bytes, and weight file names and sizes) and the
    flags that change what is generated, as one canonical string for fingerprint()."""
    files = sorted(
        (p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors") if p.is_file()
    )
    cfg = model_dir / "config.json"
    cfg_hash = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None
    settings = {
        k: getattr(a, k, None)
        for k in (
            "backend",
            "dtype",
            "kv_dtype",
            "max_seq_len",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "seed",
            "stop",
        )
    }
    return json.dumps(
        {
            "model": str(model_dir.resolve()),
            "config": cfg_hash,
            "weights": files,
            "settings": settings,
        },
        sort_keys=True,
    )


def record_key(rec: dict) -> tuple:
    """The resume key of an output record (must agree with identify())."""
    err = rec.get("error") or {}
    if rec.get("custom_id") is None or err.get("code") == "duplicate_custom_id":
        return ("line", err.get("line"))
    return ("id", rec["custom_id"])


# ---- the output file -------------------------------------------------------------------

LINE_START = b'{"id": "batch_req_'  # how every line we write begins


def scan_output(path: Path, repair: bool = True) -> tuple[dict, int]:
    """{resume key: fingerprint (None on lines from before fingerprints)} of the records
    already in `path`, and how many there are, read line by line. An incomplete last line of
    ours (a kill during a write: a prefix of a line, without its newline) is cut off the file
    when `repair` (only under the output lock); any other unreadable line is fatal."""
    keys, n, keep = {}, 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n") and (
                raw.startswith(LINE_START) or LINE_START.startswith(raw)
            ):
                break  # torn: `keep` stops before it
            keep += len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if (
                    not isinstance(rec, dict)
                    or "custom_id" not in rec
                    or not {"response", "error"} <= set(rec)
                ):
                    raise ValueError("not a batch result")
            except ValueError:
                raise TinyLLMError(
                    f"{path} line {lineno} is not a batch result line; is -o the right file?"
                ) from None
            keys[record_key(rec)] = rec.get("fingerprint")
            n += 1
    if repair and keep < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
        print(
            f"{path}: removed an incomplete last line left by an interrupted run", file=sys.stderr
        )
    return keys, n


def check_not_locked(path: Path):
    """Refuse at once when another run holds the output's lock (a cheap probe; OutputFile
    takes the lock for real)."""
    if fcntl is None or not path.is_file():
        return
    with open(path, "rb") as f:
        _lock(f, path)


def _lock(f, path: Path):
    """An exclusive, non-blocking lock on an open file (released when it is closed)."""
    if fcntl is None:  # not POSIX: no locking
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TinyLLMError(
            f"another tinyllm batch is writing {path} right now; wait for it to finish, "
            f"or choose another output file"
        ) from None
    except OSError:  # a file system without locks (some network mounts)
        pass


class OutputFile:
    """Append-only JSONL: each record is written whole, flushed and fsync'd."""

    def __init__(self, path: Path):
        self.created = not path.exists()
        try:
            self.f = open(path, "ab")
        except OSError as e:
            raise TinyLLMError(f"cannot write {path}: {e.strerror or e}") from None
        self.path = path
        self.written = 0
        try:
            _lock(self.f, path)  # held until close(): one writer per output file
        except TinyLLMError:
            self.f.close()
            raise

    def write(self, rec: dict):
        line = json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n"
        with ctrl_c.critical():  # Ctrl-C lands after the line, not inside it
            try:
                self.f.write(line)
                self.f.flush()
                os.fsync(self.f.fileno())
            except OSError as e:  # disk full, file system gone
                raise TinyLLMError(
                    f"cannot write {self.path}: {e.strerror or e}; the {self.written} results "
                    f"written before are kept: free the space and rerun with --resume"
                ) from None
            self.written += 1

    def close(self, discard_if_empty: bool = False):
        """Close (releasing the lock); with discard_if_empty, a file this run created and
        never wrote to is removed again."""
        try:
            self.f.close()
        except OSError:  # the failed write was already reported
            pass
        if discard_if_empty and self.created and self.written == 0:
            try:
                self.path.unlink()
            except OSError:
                pass


class _DeferredCtrlC:
    """Ctrl-C raises KeyboardInterrupt as usual, except inside `critical()` (writing a
    line), where it is held until the block ends. A Python-level handler is needed: blocking
    SIGINT with a signal mask is not enough, because the kernel may hand the signal to one
    of BLAS's threads, and CPython then raises it in the main thread anyway."""

    def __init__(self):
        self.depth, self.pending = 0, False
        self.signum = signal.SIGINT  # the last signal received (SIGINT or SIGTERM)

    def handler(self, signum, frame):
        self.signum = signum
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        """Use handler() for SIGINT and SIGTERM inside the block (only possible in the main
        thread): `kill` stops a run as Ctrl-C does, with its summary."""
        try:
            previous = {
                sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)
            }
        except ValueError:  # not the main thread: leave the signals alone
            yield
            return
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


ctrl_c = _DeferredCtrlC()


# ---- the run ---------------------------------------------------------------------------


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0  # generated
    seconds: float = 0.0  # generation wall time


def open_input(path_arg: str) -> Path:
    path = Path(path_arg)
    if not path.is_file():
        raise TinyLLMError(f"input {path} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TinyLLMError(f"cannot read {path}: {e.strerror or e}") from None
    return path


def count_todo(path: Path, done: dict, run: str) -> tuple[int, int, list]:
    """(lines to run, lines already in the output, keys of done lines whose request or run
    changed since their result was written) without parsing requests in full."""
    seen: set = set()
    todo = skip = 0
    changed = []
    try:
        for n, raw in input_lines(path):
            key, obj, _ = identify(raw, n, seen)
            if key not in done:
                todo += 1
                continue
            skip += 1
            if done[key] is not None and done[key] != fingerprint(obj, raw, run):
                changed.append(key)
    except OSError as e:
        raise TinyLLMError(f"cannot read {path}: {e.strerror or e}") from None
    return todo, skip, changed


def _changed_error(changed: list, out_path: Path) -> TinyLLMError:
    """--resume stops rather than re-running changed requests: the output is append-only with
    one line per id, so a re-run would either leave two answers for one id or rewrite a file
    other tools may be reading; stopping loses nothing and lets the user choose."""
    shown = ", ".join(repr(k[1]) if k[0] == "id" else f"line {k[1]}" for k in changed[:8])
    more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
    return TinyLLMError(
        f"--resume: {len(changed)} request(s) changed since their results in {out_path} were "
        "written "
        f"(request body, model or generation settings): {shown}{more}; write to a new output file, "
        f"or delete those lines from {out_path} and --resume again"
    )


def served_name(a, llm) -> str:
    """The model name result lines carry, in one process or on Ray replicas alike: the name
    serve answers to for the same --model (options.model_names: a local path's directory
    name, else the name given)."""
    from .options import model_names

    return model_names(a.model, llm.model_dir)[0]


def start_local(a, quiet: bool):
    """The engine of a single-process run: (job factory, cleanup). `start` of run_batch;
    ray_batch.py's starts replicas on a Ray cluster instead."""
    from .options import load_llm

    try:
        llm = load_llm(a, max_batch=a.max_batch, quiet=quiet)
    except (OSError, ValueError) as e:
        raise TinyLLMError(f"cannot load the model: {e}") from None

    def make_job(*job_args):
        job = BatchJob(llm, *job_args)
        job.model_name = served_name(a, llm)
        return job

    return make_job, (lambda: None)


def run_batch(a, start=None) -> int:
    """`tinyllm batch`: 0 when every line got a result line (errors included), 130 on
    Ctrl-C, 143 on SIGTERM; fatal problems raise TinyLLMError (one line, exit 2, from cli.main).

    Order: check the files (no output yet) -> load the model (its memory check refuses a
    --max-batch that does not fit before the output exists) -> open and lock the output ->
    re-read it under the lock -> run. `start(a, quiet)` loads the model and returns (a
    factory of the job: BatchJob's arguments after llm, a cleanup called at the end);
    start_local by default."""
    from .hub import resolve
    from .options import sampling_from_args

    if a.max_batch < 1:
        raise TinyLLMError(f"--max-batch must be at least 1 (got {a.max_batch})")
    defaults = sampling_from_args(a)
    in_path, out_path = check_paths(a.input, a.output)
    run = run_identity(a, resolve(a.model).path)
    todo, n_skip = todo_before_loading(in_path, out_path, run, a.resume)
    if todo == 0:
        print(
            f"nothing to do: all {n_skip} requests of {in_path} are already in {out_path}",
            file=sys.stderr,
        )
        return 0
    quiet = a.no_progress
    make_job, stop = (start or start_local)(a, quiet)
    try:
        out = OutputFile(out_path)
    except BaseException:
        stop()
        raise
    try:
        job, todo, n_kept = _locked_job(make_job, defaults, in_path, out, run, quiet)
        try:
            with ctrl_c.installed():
                job.run(todo, progress=not quiet)
        except KeyboardInterrupt:
            by = " by SIGTERM" if ctrl_c.signum == signal.SIGTERM else ""
            print(
                f"\ninterrupted{by}: {out.written} results written this run, "
                f"{n_kept + out.written} in {out_path}; "
                f"{len(job.inflight)} unfinished requests were dropped.\n"
                f"to continue, run the same command with --resume",
                file=sys.stderr,
            )
            return 143 if ctrl_c.signum == signal.SIGTERM else 130
    finally:
        try:
            out.close(discard_if_empty=True)
        finally:
            stop()
    print_done(job.tally, out_path)
    return 0


def check_paths(input_arg, output_arg) -> tuple[Path, Path]:
    """(input, output) paths, refused before anything is loaded when the output cannot be
    the result file of this input: the same file, a directory, not a regular file, locked."""
    in_path, out_path = open_input(input_arg), Path(output_arg)
    if out_path.exists() and in_path.resolve() == out_path.resolve():
        raise TinyLLMError("the input and the output are the same file")
    if out_path.is_dir():
        raise TinyLLMError(f"cannot write {out_path}: it is a directory")
    if out_path.exists() and not out_path.is_file():  # a FIFO would block open() forever
        raise TinyLLMError(
            f"cannot write {out_path}: it is not a regular file (a pipe, a device or a socket); "
            "the output must be a file that --resume can read back: choose a file path"
        )
    check_not_locked(out_path)
    return in_path, out_path


def todo_before_loading(in_path: Path, out_path: Path, run, resume: bool) -> tuple[int, int]:
    """(requests to run, requests already in the output), read without the lock (a first look
    before the model loads; _locked_job reads it again under the lock)."""
    has_results = out_path.is_file() and out_path.stat().st_size > 0
    if has_results and not resume:
        raise TinyLLMError(
            f"{out_path} already has results; pass --resume to skip the requests it holds "
            f"and append the rest (or choose another output file)"
        )
    done = scan_output(out_path, repair=False)[0] if has_results else {}
    todo, n_skip, changed = count_todo(in_path, done, run)
    unchecked = sum(1 for fp in done.values() if fp is None)
    if unchecked:
        print(
            f"note: {unchecked} results in {out_path} carry no fingerprint (written by an older "
            "tinyllm); "
            f"they are kept without checking that their requests are unchanged",
            file=sys.stderr,
        )
    if todo + n_skip == 0:
        raise TinyLLMError(f"{in_path} has no requests: it is empty (or only blank lines)")
    if changed:
        raise _changed_error(changed, out_path)
    return todo, n_skip


def _locked_job(make_job, defaults, in_path: Path, out, run, quiet: bool):
    """(the job, requests to run, results already there), from the output re-read under its
    lock."""
    out_path = out.path
    done, n_kept = scan_output(out_path) if out_path.stat().st_size else ({}, 0)
    todo, n_skip, changed = count_todo(in_path, done, run)
    if changed:
        raise _changed_error(changed, out_path)
    if n_skip and not quiet:
        print(f"resuming: {n_skip} requests already in {out_path}, {todo} to go", file=sys.stderr)
    return make_job(defaults, in_path, out, done, Tally(skipped=n_skip), run), todo, n_kept


def print_done(t, out_path: Path):
    skipped = f", {t.skipped} already done" if t.skipped else ""
    failed = f" (see the error lines in {out_path})" if t.failed else ""
    print(
        f"done: {t.ok} ok, {t.failed} failed{failed}{skipped}; {t.tokens} tokens generated in "
        f"{t.seconds:.1f} s: {t.tokens / t.seconds:.1f} tokens/s, "
        f"{(t.ok + t.failed) / t.seconds:.2f} requests/s",
        file=sys.stderr,
    )


class BatchJob:
    """One pass over the input: lines stream lazily into the engine, results stream out."""

    def __init__(
        self,
        llm,
        defaults: SamplingParams,
        in_path: Path,
        out: OutputFile,
        done: dict,
        tally: Tally,
        run: str = "",
    ):
        self.llm, self.defaults, self.in_path, self.out, self.done = (
            llm,
            defaults,
            in_path,
            out,
            done,
        )
        self.tally, self.run_id = tally, run
        # the name serve would answer to (start_local sets it; ray_batch's replicas name their own)
        self.model_name = llm.model_dir.name if llm is not None else None
        self.prints: dict[int, str] = {}  # input line -> fingerprint of its request
        self.inflight: dict[int, Item] = {}  # engine index -> item, admitted and not finished
        self.bar = None

    def run(self, total: int, progress: bool = True):
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        with tqdm(
            total=total,
            unit="req",
            desc="batch",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        ) as self.bar:
            for ev in self.llm.engine.run(self.requests()):
                if ev.kind == "text":
                    continue
                item = self.inflight.pop(ev.index)
                with_ids = self.llm.tokenizer is None
                rec = result_record(item, ev, self.model_name, with_ids)
                self.write(item.lineno, rec, t0)
        self.tally.seconds = max(time.perf_counter() - t0, 1e-9)

    def write(self, lineno: int, rec: dict, t0: float):
        """Write the result record of input line `lineno`, with its fingerprint, and count it."""
        self.out.write({**rec, "fingerprint": self.prints.pop(lineno, None)})
        if rec["error"] is not None:
            self.tally.failed += 1
        else:
            self.tally.ok += 1
            self.tally.tokens += rec["response"]["body"]["usage"]["completion_tokens"]
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"{self.tally.tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s", refresh=False
        )

    def fail(self, custom_id, lineno: int, err: LineError):
        self.out.write(
            {**error_record(custom_id, lineno, err), "fingerprint": self.prints.pop(lineno, None)}
        )
        self.tally.failed += 1
        self.bar.update(1)

    def requests(self):
        """Engine Requests for the lines not yet in the output, parsed and tokenized only
        when the engine has room for them; a line that cannot run becomes an error line here."""
        index = 0
        for item in self.items():
            try:
                req = engine_request(self.llm, item, self.defaults, index)
            except LineError as e:
                self.fail(item.custom_id, item.lineno, e)
                continue
            self.inflight[index] = item
            index += 1
            yield req

    def items(self):
        """The parsed Items of the lines not yet in the output, read lazily; a line that cannot
        be parsed becomes an error line here (tokenizing is left to the caller)."""
        seen: set = set()
        for lineno, raw in input_lines(self.in_path):
            key, obj, err = identify(raw, lineno, seen)
            if key in self.done:
                continue
            self.prints[lineno] = fingerprint(obj, raw, self.run_id)
            if err is not None:  # only a repeated id is echoed; the rest own no id
                self.fail(
                    obj.get("custom_id", obj.get("id"))
                    if err.code == "duplicate_custom_id"
                    else None,
                    lineno,
                    err,
                )
                continue
            try:
                item = parse_item(obj, lineno)
            except LineError as e:
                self.fail(key[1], lineno, e)
                continue
            yield item


def engine_request(llm, item: Item, defaults: SamplingParams, index: int):
    """The engine Request of an item: its prompt tokenized and checked, its sampling fields
    merged with the run's defaults; raises LineError."""
    from .engine import Request

    ids = tokenize(llm, item)  # (first: a prompt problem is reported before a parameter one)
    try:
        params = llm.resolve_params(merge_params(item.params, defaults))
    except TinyLLMError as e:
        raise LineError("invalid_parameter", str(e)) from None
    return Request(ids, params, index)


def result_record(item: Item, ev, model: str, with_ids: bool = False) -> dict:
    """The output record (without its fingerprint) of an engine "finish" or "error" event."""
    if ev.kind == "error":
        return error_record(item.custom_id, item.lineno, LineError(ev.code, ev.error))
    return ok_record(item, ev.completion, model, int(time.time()), with_ids)


def tokenize(llm, item: Item) -> list[int]:
    """Prompt token ids of an item, checked against the vocabulary and the context. Text is
    only tokenized when it can fit: a tokenizer-less model refuses it, and a text longer than
    the context could hold even at the longest token's length fails before tokenizing (a
    50 MB line would otherwise take minutes and gigabytes only to be refused)."""
    param = "messages" if item.chat else "prompt"
    if item.chat or isinstance(item.prompt, str):
        tok = llm.tokenizer
        if tok is None:
            raise LineError(
                "tokenizer_missing",
                f"{'chat messages need' if item.chat else 'a text prompt needs'} a tokenizer "
                f"and the model has none (no tokenizer.json or tokenizer.model.v1/v2/v3): send "
                "the prompt as a list of token ids",
                param,
            )
        chars = sum(len(m["content"]) for m in item.prompt) if item.chat else len(item.prompt)
        # n chars are >= n / longest tokens; x4 leaves room for a normalizer that shrinks text
        if chars > 4 * llm.max_seq_len * tok.longest_token_chars():
            raise LineError(
                "context_length_exceeded",
                f"the {param} has {chars} characters, far more than a context of "
                f"{llm.max_seq_len} tokens holds: shorten it (refused before tokenizing)",
                param,
            )
    if item.chat:
        try:
            ids = llm.tokenizer.encode_chat(item.prompt, add_generation_prompt=True)
        except TinyLLMError as e:
            raise LineError(
                "invalid_messages", f"cannot apply the chat template: {e}", "messages"
            ) from None
    elif isinstance(item.prompt, str):
        ids = llm.tokenizer.encode(item.prompt)
    else:
        ids = list(item.prompt)
    bad = llm.engine.check_prompt(ids)
    if bad:
        raise LineError(*bad, "messages" if item.chat else "prompt")
    return ids
