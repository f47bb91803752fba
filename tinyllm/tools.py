"""OpenAI tool calling: `tools`, `tool_choice`, `parallel_tool_calls` and `message.tool_calls`.

Owns the request side (checking the tool fields, rendering the tools through the model's
chat template the way transformers' `apply_chat_template(tools=...)` does: the template
receives `tools` as a list of {"type": "function", "function": {...}}), the constraint that
*enforces* a call for `tool_choice` "required" or a named function (constraints.py: the
call's arguments are JSON valid for the function's `parameters` schema), and the reply side:
parsing the generated text into `tool_calls` for the model families tinyllm runs, whole or
as a stream.

    family    the model writes                                          detected by the template
    hermes    <tool_call>{"name": f, "arguments": {...}}</tool_call>    "<tool_call>" (Qwen2.5,
              (one block per call; text may come first)                  Hermes, SmolLM3)
    mistral   [TOOL_CALLS] [{"name": f, "arguments": {...}}, ...]         "[TOOL_CALLS]"
    llama3    {"name": f, "parameters": {...}} (after <|python_tag|>     "<|python_tag|>" or
              or alone; several separated by ";")                        "ipython"

A template that never mentions `tools` cannot show the model its tools: a request with tools
is refused (400) rather than silently answered without them. tool_choice "none" renders the
tools and parses nothing, as OpenAI's "the model will not call a tool".
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .batch import LineError
from .constraints import json_grammar_rule
from .errors import TinyLLMError

TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
FAMILIES = ("hermes", "mistral", "llama3")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolRequest:
    tools: list[dict]  # [{"type": "function", "function": {"name", "description", "parameters"}}]
    choice: str  # "none" | "auto" | "required" | a function name
    parallel: bool
    family: str = "hermes"
    special: dict = field(default_factory=dict)  # marker text -> token id, when a special token

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def parses(self) -> bool:
        return self.choice != "none"


def _bad(code: str, message: str, param: str):
    raise LineError(code, message, param)


def check_tool_fields(body: dict) -> ToolRequest | None:
    """The tool fields of a chat request body, checked (LineError naming the field), or None
    when it has no tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            _bad("invalid_parameter", "tool_choice needs a non-empty tools list", "tool_choice")
        return None
    if not isinstance(tools, list):
        _bad("invalid_parameter", "tools must be a list of function tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            _bad("invalid_parameter", f'tools[{i}] must be {{"type": "function", ...}}', "tools")
        f = t.get("function")
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            _bad("invalid_parameter", f'tools[{i}].function needs a string "name"', "tools")
        if not _NAME.match(f["name"]):
            _bad(
                "invalid_parameter",
                f"tools[{i}].function.name={f['name']!r}: use 1-64 letters, digits, _ or -",
                "tools",
            )
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            _bad("invalid_parameter", f"tools[{i}].function.parameters must be an object", "tools")
        fn = {"name": f["name"], "parameters": params}
        if isinstance(f.get("description"), str):
            fn["description"] = f["description"]
        out.append({"type": "function", "function": fn})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        _bad("invalid_parameter", "tools: function names must be unique", "tools")
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fname = (
            (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        )
        if fname not in names:
            _bad(
                "invalid_parameter",
                f"tool_choice names function {fname!r}, which is not in tools ({', '.join(names)})",
                "tool_choice",
            )
        choice = fname
    elif choice not in ("none", "auto", "required"):
        _bad(
            "invalid_parameter",
            f'tool_choice={choice!r} must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if parallel is not None and not isinstance(parallel, bool):
        _bad(
            "invalid_parameter", "parallel_tool_calls must be true or false", "parallel_tool_calls"
        )
    return ToolRequest(out, choice, True if parallel is None else parallel)


def normalize_messages(messages):
    """OpenAI conversation messages as chat templates take them: an assistant message with
    `tool_calls` may have no content, and its calls' `arguments` (a JSON string in OpenAI's
    shape) become objects, as transformers' templates expect; "tool" messages pass as they
    are. Anything else is left for tokenizer.check_messages."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                _bad("invalid_messages", f"message {i}: tool_calls must be a list", "messages")
            fixed = []
            for c in calls:
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                    _bad(
                        "invalid_messages",
                        f'message {i}: each tool call needs "function": {{"name", "arguments"}}',
                        "messages",
                    )
                args = f.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = json.loads(args or "{}")
                    except ValueError:
                        _bad(
                            "invalid_messages",
                            f"message {i}: tool call {f['name']!r} has arguments that are not JSON",
                            "messages",
                        )
                fixed.append(
                    {**c, "type": "function", "function": {"name": f["name"], "arguments": args}}
                )
            m = {**m, "content": m.get("content") or "", "tool_calls": fixed}
        elif isinstance(m, dict) and m.get("role") == "tool" and m.get("content") is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


def family_of(source: str) -> str | None:
    """The tool-call format a chat template teaches (module docstring), or None."""
    if "<tool_call>" in source:
        return "hermes"
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<|python_tag|>" in source or "ipython" in source:
        return "llama3"
    return None


def tokenize(llm, messages: list[dict], req: ToolRequest) -> list[int]:
    """Prompt ids of a conversation with tools; a template without tool support is a
    LineError (400)."""
    tok = llm.tokenizer
    source = tok.chat_template(req.tools) if hasattr(tok, "chat_template") else ""
    if "tools" not in source:
        _bad(
            "tools_not_supported",
            f"this model's chat template ({llm.model_dir.name}) does not render tools, so the "
            "model cannot be told about them; use a model whose template supports tools, or "
            "send the request without tools",
            "tools",
        )
    fam = family_of(source)
    if fam is None and req.parses:
        _bad(
            "tools_not_supported",
            "this model's chat template renders tools in a format tinyllm does not parse "
            f'(it knows {", ".join(FAMILIES)}); send tool_choice="none" or no tools',
            "tools",
        )
    req.family = fam or "hermes"
    if fam == "mistral":
        tid = tok.token_to_id("[TOOL_CALLS]") if hasattr(tok, "token_to_id") else None
        if tid is not None:
            req.special["[TOOL_CALLS]"] = tid
    try:
        return tok.encode_chat(messages, add_generation_prompt=True, tools=req.tools)
    except TinyLLMError as e:
        raise LineError(
            "invalid_messages", f"cannot apply the chat template: {e}", "messages"
        ) from None


def tool_prompt(llm, messages: list[dict], req: ToolRequest, params) -> list[int]:
    """The prompt ids of a chat request with tools (checked against the context, as
    batch.tokenize); for a forced call (tool_choice "required" or named), `params` gets the
    grammar that enforces it."""
    ids = tokenize(llm, messages, req)
    bad = llm.engine.check_prompt(ids)
    if bad:
        raise LineError(*bad, "messages")
    g = grammar(req)
    if g is not None:
        if params.constrained:
            _bad(
                "invalid_parameter",
                f"tool_choice={req.choice!r} forces a tool call, which cannot be combined with "
                "response_format or another constraint",
                "tool_choice",
            )
        params.grammar = g
    return ids


# ---- enforcing a call ---------------------------------------------------------------------


def _call_schema(req: ToolRequest, names: list[str], args_key: str = "arguments") -> dict:
    def one(t):
        f = t["function"]
        return {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]},
            "required": ["name", args_key],
            "additionalProperties": False,
        }

    alts = [one(t) for t in req.tools if t["function"]["name"] in names]
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def grammar(req: ToolRequest) -> str | None:
    """The Lark grammar (llguidance) that forces a call for tool_choice "required" or a named
    function, in the model family's format; None when the model chooses (auto, none)."""
    if req.choice in ("none", "auto"):
        return None
    names = req.names if req.choice == "required" else [req.choice]
    more = req.parallel and req.choice == "required"
    if req.family == "hermes":
        body = json_grammar_rule(_call_schema(req, names))
        tail = ' ("\\n" call)*' if more else ""
        return f'start: call{tail}\ncall: "<tool_call>\\n" {body} "\\n</tool_call>"\n'
    if req.family == "mistral":
        schema = {
            "type": "array",
            "items": _call_schema(req, names),
            "minItems": 1,
            **({} if more else {"maxItems": 1}),
        }
        tid = req.special.get("[TOOL_CALLS]")
        marker = f"<[{tid}]>" if tid is not None else '"[TOOL_CALLS]"'
        return f'start: {marker} " " {json_grammar_rule(schema)}\n'
    call = json_grammar_rule(_call_schema(req, names, "parameters"))  # llama3
    tail = ' ("; " call)*' if more else ""
    return f"start: call{tail}\ncall: {call}\n"


# ---- parsing replies ----------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _call(name, args) -> dict:
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
    }


def _calls_from(objs, req: ToolRequest) -> list[dict] | None:
    calls = []
    for o in objs:
        if not isinstance(o, dict) or o.get("name") not in req.names:
            return None
        args = o.get("arguments", o.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append(_call(o["name"], args))
    return calls or None


def _json_values(text: str) -> list | None:
    """The JSON values of `text`, separated by whitespace or ";" (None if any is not JSON)."""
    dec, i, out = json.JSONDecoder(), 0, []
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return out
        try:
            v, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(v)


def parse(text: str, req: ToolRequest) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply. Text that does not parse as calls of the
    request's tools stays content (what the model said is never dropped)."""
    if not req.parses:
        return text, []
    if req.family == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        objs, rest = [], ""
        for m in _HERMES.finditer(text, start):
            try:
                objs.append(json.loads(m.group(1)))
            except ValueError:  # a call cut short (max_tokens): it stays text
                rest = text[m.start() :]
                break
        calls = _calls_from(objs, req) if objs else None
        if not calls:
            return text, []
        content = text[:start].strip() + ("\n" if text[:start].strip() and rest else "") + rest
        return content or None, calls
    if req.family == "mistral":
        body = text.strip()
        body = body[len("[TOOL_CALLS]") :] if body.startswith("[TOOL_CALLS]") else body
        if not body.lstrip().startswith("["):
            return text, []
        vals = _json_values(body)
        objs = [o for v in vals or [] for o in (v if isinstance(v, list) else [v])]
        calls = _calls_from(objs, req) if vals else None
        return (None, calls) if calls else (text, [])
    body = text.strip().removeprefix("<|python_tag|>").strip()  # llama3
    if not body.startswith("{"):
        return text, []
    vals = _json_values(body)
    calls = _calls_from(vals, req) if vals else None
    return (None, calls) if calls else (text, [])


def _marker(req: ToolRequest) -> str:
    return {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}.get(req.family, "{")


class ToolStream:
    """Streams a reply that may hold tool calls: content is passed on as it comes until the
    text could be the start of a call (hermes: "<tool_call>" anywhere; llama3 and mistral,
    whose calls are the whole reply: a reply starting with "{", "[" or the family's marker);
    from there on it is held, parsed at the end and sent as OpenAI tool-call deltas."""

    STARTS = ("{", "[", "<|python_tag|>", "[TOOL_CALLS]")

    def __init__(self, req: ToolRequest):
        self.req, self.text, self.sent = req, "", 0
        self.held = False  # a call may have started: everything from here waits for the end
        self.plain = not req.parses  # no call can come any more: pass everything on

    def push(self, piece: str) -> str:
        """The content that can be sent now."""
        self.text += piece
        if self.plain:
            return self._send(len(self.text))
        if self.held:
            return ""
        if self.req.family == "hermes":
            mark = "<tool_call>"
            i = self.text.find(mark, self.sent)
            if i >= 0:
                self.held = True
                return self._send(i)
            keep = next((k for k in range(len(mark) - 1, 0, -1) if self.text.endswith(mark[:k])), 0)
            return self._send(len(self.text) - keep)
        head = self.text.lstrip()
        if not head:
            return ""
        if head.startswith(self.STARTS):
            self.held = True
            return ""
        if any(s.startswith(head) for s in self.STARTS):
            return ""  # may still become a marker
        self.plain = True
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the content, the tool calls) once the reply has ended."""
        _, calls = parse(self.text, self.req)
        if not calls:
            return self._send(len(self.text)), []
        return "", calls  # (the content before the calls has been sent)


def message(text: str, finish: str, req: ToolRequest | None) -> tuple[dict, str]:
    """The chat reply message of a finished choice, and its finish_reason ("tool_calls" when
    it called tools)."""
    if req is None:
        return {"role": "assistant", "content": text}, finish
    content, calls = parse(text, req)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    # a reply cut by max_tokens says so even when it holds whole calls
    return {"role": "assistant", "content": content, "tool_calls": calls}, (
        "tool_calls" if finish == "stop" else finish
    )


def call_deltas(calls: list[dict]) -> list[dict]:
    """OpenAI stream deltas of finished tool calls: per call, one delta with its index, id,
    type and name (arguments ""), then one with its arguments."""
    out = []
    for k, c in enumerate(calls):
        f = c["function"]
        out.append(
            {
                "tool_calls": [
                    {
                        "index": k,
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": f["name"], "arguments": ""},
                    }
                ]
            }
        )
        out.append({"tool_calls": [{"index": k, "function": {"arguments": f["arguments"]}}]})
    return out
