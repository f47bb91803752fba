"""Structured output and tool calling (constraints.py, tools.py) on SmolLM2-135M-Instruct.

Through the official `openai` client against a live `tinyllm serve`: pydantic models parsed
by `client.chat.completions.parse` for every seed of sampled runs, regex and Lark grammar
constraints, a tool-call round trip (streamed and not) with the chat template rendering the
tools as transformers does, tool_choice "required"/named enforced, a 400 for every invalid or
unsupported schema; in process: constrained and unconstrained sequences sharing steps (the
unconstrained ones get exactly their own tokens), logprobs and finish "length" keeping their
meaning. The reference checks are independent of llguidance: pydantic's validation, Python's
`re`, `json`, transformers' apply_chat_template and a full-prefill log-softmax.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, Literal

import numpy as np
import pytest

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

from pydantic import BaseModel, Field, StringConstraints  # noqa: E402
from test_serve import Server  # noqa: E402

from tinyllm import LLM, SamplingParams  # noqa: E402
from tinyllm.errors import TinyLLMError  # noqa: E402

# A ChatML template with tools in the Hermes/Qwen2.5 format (written for these tests): the
# tools as JSON lines in <tools></tools>, calls as <tool_call>{...}</tool_call>, results as
# <tool_response> in a user turn. SmolLM2 speaks ChatML, so this is its own prompt format.
HERMES_TEMPLATE = r"""{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{#
#}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within {#
#}<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] != 'system' %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% if not tools %}<|im_start|>system
{{ message.content }}<|im_end|>
{% endif %}
{%- elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}{#
#}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,10}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = 20


# ---- the five pydantic schemas --------------------------------------------------------------


# Every string and number is bounded, so every sampled reply fits max_tokens.
Short = Annotated[str, StringConstraints(max_length=10)]
Small = Annotated[int, Field(ge=0, le=99)]


class Address(BaseModel):
    street: str = Field(max_length=16)
    city: str = Field(max_length=12)


class Person(BaseModel):  # nested objects
    name: str = Field(max_length=12)
    address: Address


class Basket(BaseModel):  # arrays with min/max items
    items: list[Short] = Field(min_length=2, max_length=4)
    counts: list[Small] = Field(min_length=1, max_length=3)


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Shirt(BaseModel):  # enums
    color: Color
    size: Literal["S", "M", "L", "XL"]


class Reading(BaseModel):  # bounded numbers
    celsius: int = Field(ge=-40, le=50)
    humidity: int = Field(ge=0, le=100)
    rating: int = Field(gt=0, lt=6)


class Account(BaseModel):  # required / optional fields, string patterns
    username: str = Field(pattern=r"^[a-z]{3,8}$")
    code: str = Field(pattern=r"^[A-Z]{2}-[0-9]{3}$")
    nickname: str | None = Field(default=None, max_length=10)


SCHEMAS = [
    (Person, "Invent a person and their address."),
    (Basket, "List a few fruits in a basket and their counts."),
    (Shirt, "Describe a shirt."),
    (Reading, "Give a weather reading."),
    (Account, "Create a user account."),
]


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_dir(smollm2_gguf_path, tmp_path_factory):
    from tinyllm.gguf_convert import convert_gguf

    return convert_gguf(smollm2_gguf_path, tmp_path_factory.mktemp("smollm2") / "m", progress=False)


@pytest.fixture(scope="module")
def tools_dir(smol_dir, tmp_path_factory):
    """SmolLM2 with the Hermes tool template (its weights linked, not copied)."""
    d = tmp_path_factory.mktemp("smollm2_tools") / "m"
    d.mkdir()
    for f in smol_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def llm(smol_dir):
    return LLM(str(smol_dir), max_seq_len=512, max_batch=8)


@pytest.fixture(scope="module")
def server(tools_dir):
    s = Server(tools_dir, max_batch=40, ctx=1024)
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ---- through the openai client ---------------------------------------------------------------


@pytest.mark.slow  # 172 s on the 2-core machine nearly idle (100 sampled replies); the rest
# of this file takes ~95 s
def test_parse_pydantic_models_valid_for_every_seed(server, client):
    """5 schemas x 20 seeds, sampled (temperature 1): every choice parses into its model
    (pydantic validates bounds, lengths, enums and patterns itself) and ends by "stop"."""

    half = SEEDS // 2  # two requests of n=10 per schema (choice j of seed s draws from s + j)

    def run(case):
        (model, ask), seed = case
        return client.chat.completions.parse(
            model=server.model,
            messages=[{"role": "user", "content": ask}],
            response_format=model,
            n=half,
            seed=seed,
            temperature=1.0,
            max_tokens=160,
        )

    cases = [(c, seed) for c in SCHEMAS for seed in (1000, 1000 + half)]
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(run, cases))
    for k, (model, _) in enumerate(SCHEMAS):
        choices = replies[2 * k].choices + replies[2 * k + 1].choices
        assert len(choices) == SEEDS
        texts = set()
        for ch in choices:
            assert ch.finish_reason == "stop", (model.__name__, ch.message.content)
            assert isinstance(ch.message.parsed, model)
            model.model_validate_json(ch.message.content)  # (parse did this too)
            texts.add(ch.message.content)
        assert len(texts) > 1, f"{model.__name__}: every seed gave the same reply"


def test_regex_and_grammar_constraints(server, client):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    r = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        max_tokens=20,
        n=4,
        seed=7,
        temperature=1.0,
        extra_body={"guided_regex": pattern},
    )
    for ch in r.choices:
        assert re.fullmatch(pattern, ch.message.content), ch.message.content
        assert ch.finish_reason == "stop"
    lark = 'start: "Answer: " WORD " (" NUM ")"\nWORD: /[a-z]{1,8}/\nNUM: /[1-9][0-9]?/\n'
    r = client.completions.create(
        model=server.model,
        prompt="Q: What color is the sky?\n",
        max_tokens=20,
        n=4,
        seed=3,
        temperature=1.0,
        extra_body={"guided_grammar": lark},
    )
    for ch in r.choices:
        assert re.fullmatch(r"Answer: [a-z]{1,8} \([1-9][0-9]?\)", ch.text), ch.text
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Return a JSON object with your name."}],
        response_format={"type": "json_object"},
        max_tokens=120,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def _check_weather_args(call, choice="get_weather"):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == choice
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["city"], str) and len(args["city"]) <= 20
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(server, client, stream):
    """A named tool_choice forces the call; its arguments fit the function's schema; the tool
    result goes back as a "tool" message and the model answers in plain text."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=server.model, tools=[WEATHER, TIME], max_tokens=80, temperature=0)
    if not stream:
        r = client.chat.completions.create(messages=ASK, tool_choice=named, **kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        calls = ch.message.tool_calls
        assistant = ch.message.model_dump(exclude_none=True)
    else:
        chunks = list(
            client.chat.completions.create(messages=ASK, tool_choice=named, stream=True, **kw)
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        assert finish == "tool_calls"
        parts = [tc for d in deltas for tc in d.tool_calls or []]
        assert parts and all(p.index == 0 for p in parts)
        assert not "".join(d.content or "" for d in deltas)
        first = parts[0]
        args = "".join(p.function.arguments or "" for p in parts)

        class _Call:  # the streamed call, assembled as a client does
            id, type = first.id, first.type

            class function:  # noqa: N801
                name, arguments = first.function.name, args

        calls = [_Call]
        assistant = {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": first.id,
                    "type": "function",
                    "function": {"name": first.function.name, "arguments": args},
                }
            ],
        }
    assert len(calls) == 1
    args = _check_weather_args(calls[0])
    convo = ASK + [
        assistant,
        {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 21 degrees."},
    ]
    kw["max_tokens"] = 24
    if not stream:
        r = client.chat.completions.create(messages=convo, tool_choice="none", **kw)
        answer, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.tool_calls is None
    else:
        chunks = list(
            client.chat.completions.create(messages=convo, tool_choice="none", stream=True, **kw)
        )
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert answer and finish in ("stop", "length")
    # the server rendered the tool result: the same conversation prompt-counts alike
    r = client.chat.completions.create(
        messages=convo, tool_choice="none", **{**kw, "max_tokens": 1}
    )
    assert r.usage.prompt_tokens > 0 and args["city"]


def test_tool_choice_required_enforced_for_every_seed(server, client):
    r = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Hello there! How are you?"}],
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        n=8,
        seed=11,
        temperature=1.0,
        max_tokens=80,
    )
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch.message
        (call,) = ch.message.tool_calls
        if call.function.name == "get_weather":
            _check_weather_args(call)
        else:
            assert call.function.name == "get_time"
            assert re.fullmatch(r"[A-Z][a-z]{2,10}", json.loads(call.function.arguments)["zone"])


def test_tools_rendered_as_transformers_renders_them(tools_dir):
    from transformers import AutoTokenizer

    from tinyllm.tokenizer import Tokenizer
    from tinyllm.tools import normalize_messages

    ref = AutoTokenizer.from_pretrained(str(tools_dir))
    ours = Tokenizer.load(tools_dir)
    convo = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."},
    ]
    msgs = normalize_messages(convo)
    want = ref.apply_chat_template(
        msgs, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False
    )
    got = ours.apply_chat_template(msgs, tools=[WEATHER, TIME], add_generation_prompt=True)
    assert got == want and '"arguments": {"city": "Paris"}' in got and "get_time" in got


BAD_FORMATS = [
    ({"type": "object", "if": {"type": "object"}}, "if"),  # an unimplemented keyword
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "strng"),  # no such type
    ({"type": "string", "format": "colour"}, "colour"),  # an unknown format
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "nope"),  # a dangling $ref
    ({"type": "string", "pattern": "[a-"}, "regex"),  # a pattern that is not a regex
]


def test_every_bad_schema_is_a_400_naming_it(server, client):
    def bad(fragment, **kw):
        kw.setdefault("messages", ASK)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.model, max_tokens=4, **kw)
        assert fragment in str(e.value), str(e.value)

    for schema, fragment in BAD_FORMATS:
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        bad(fragment, response_format=rf)
        bad(fragment, extra_body={"guided_json": schema})
    bad("response_format type 'yaml'", response_format={"type": "yaml"})
    bad("needs a string name", response_format={"type": "json_schema", "json_schema": {}})
    bad("not valid JSON", extra_body={"guided_json": "{not json"})
    bad("regex", extra_body={"guided_regex": "(unclosed"})
    bad("unknown name", extra_body={"guided_grammar": "start: nothing_defined"})
    bad("one constraint", extra_body={"guided_regex": "a", "guided_grammar": 'start: "a"'})
    bad(
        "not in tools", tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}
    )
    bad("tool_choice=", tools=[WEATHER], tool_choice="sometimes")
    bad("1-64 letters", tools=[{"type": "function", "function": {"name": "has space"}}])
    broken = {"type": "function", "function": {"name": "f", "parameters": BAD_FORMATS[0][0]}}
    bad("if", tools=[broken], tool_choice="required")
    with pytest.raises(openai.BadRequestError):  # completions: no tools
        client.completions.create(model=server.model, prompt="x", extra_body={"tools": [WEATHER]})
    # the server still serves
    r = client.chat.completions.create(model=server.model, messages=ASK, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_template_without_tools_is_a_400(llm):
    from tinyllm.serve import APIError, parse_job

    body = {"messages": ASK, "tools": [WEATHER]}
    with pytest.raises(APIError) as e:
        parse_job(body, True, llm, ("m",))
    assert e.value.status == 400 and "does not render tools" in e.value.message


# ---- in process: the engine -----------------------------------------------------------------


def test_constrained_and_unconstrained_share_steps_exactly(llm):
    """Unconstrained sequences batched with constrained ones get exactly the tokens they get
    alone and in an all-unconstrained batch; the constrained ones report the model's own
    logprobs (a full-prefill log-softmax) and end by "length" when max_tokens cuts them."""
    tok = llm.tokenizer
    asks = ["Tell me a story.", "Describe the sea.", "Give a person as JSON.", "Count to five."]
    ids = [tok.encode_chat([{"role": "user", "content": a}]) for a in asks]

    def free(i):
        return SamplingParams(max_tokens=16, temperature=0.9, seed=100 + i)

    schema = closed(Person.model_json_schema())
    con = SamplingParams(max_tokens=80, temperature=0.9, seed=5, json_schema=schema, logprobs=2)
    short = SamplingParams(max_tokens=4, temperature=0, regex=r"[a-z]{10,20}")
    alone = [llm.generate([ids[i]], free(i))[0] for i in (0, 1, 3)]
    plain = llm.generate(ids, [free(0), free(1), free(2), free(3)])
    mixed = llm.generate(ids + [ids[2]], [free(0), free(1), con, free(3), short])
    for k, i in enumerate((0, 1, 3)):
        assert mixed[i].token_ids == alone[k].token_ids == plain[i].token_ids
    c = mixed[2]
    assert c.finish_reason == "stop" and Person.model_validate_json(c.text)
    assert mixed[4].finish_reason == "length" and len(mixed[4].token_ids) == 4
    assert re.fullmatch(r"[a-z]+", mixed[4].text)
    # logprobs: the model's distribution, not the masked one
    full = llm.logits(ids[2] + c.token_ids)[len(ids[2]) - 1 : -1].astype(np.float64)
    ref = full - np.logaddexp.reduce(full, axis=-1, keepdims=True)
    got = _token_events(llm, ids[2], con)
    assert [t for t, _ in got] == c.token_ids
    np.testing.assert_allclose(
        [x for _, x in got], ref[np.arange(len(c.token_ids)), c.token_ids], atol=2e-4
    )


def closed(schema):
    """The schema with additionalProperties false on every object (as OpenAI's strict mode)."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    return [closed(v) for v in schema] if isinstance(schema, list) else schema


def _token_events(llm, prompt, params):
    from tinyllm.engine import Request

    eng = llm.engine
    eng.add(Request(prompt, llm.resolve_params(params), 0))
    out = []
    while eng.has_work():
        for ev in eng.step():
            if ev.kind == "token":
                out.append((ev.token_id, ev.logprob))
    return out


def test_python_api_errors_name_the_problem(llm):
    with pytest.raises(TinyLLMError, match=r'invalid json_schema: Unimplemented keys: \["if"\]'):
        llm.generate("x", SamplingParams(json_schema={"type": "object", "if": {}}))
    with pytest.raises(TinyLLMError, match="one constraint per request"):
        llm.generate("x", SamplingParams(regex="a", json_object=True))
    with pytest.raises(TinyLLMError, match="invalid grammar"):
        llm.generate("x", SamplingParams(grammar="start: ("))


def test_batch_lines_take_response_format(smol_dir, tmp_path):
    from conftest import run_tinyllm

    lines = [
        {
            "custom_id": "a",
            "body": {
                "messages": [{"role": "user", "content": "A shirt as JSON."}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "shirt", "schema": Shirt.model_json_schema()},
                },
                "max_tokens": 60,
            },
        },
        {"custom_id": "b", "messages": ASK, "guided_regex": "(yes|no)", "max_tokens": 5},
        {"custom_id": "c", "messages": ASK, "response_format": {"type": "json_schema"}},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = run_tinyllm("batch", "-i", inp, "-o", out, "-m", smol_dir, timeout=300)
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert p.returncode != 0 or recs, p.stderr
    a = recs["a"]["response"]["body"]["choices"][0]
    assert a["finish_reason"] == "stop" and Shirt.model_validate_json(a["message"]["content"])
    b = recs["b"]["response"]["body"]["choices"][0]
    assert b["message"]["content"] in ("yes", "no")
    assert "json_schema" in recs["c"]["error"]["message"]
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.gpu
def test_cuda_constrained_rows_leave_the_others_exact(tiny_factory):
    """cuda: a step holding a constrained sequence runs eagerly and samples that row on the host
    after its mask; the other rows (greedy and seeded device sampling) draw exactly the tokens
    of a run without it, which replays decode graphs (checked on the CuPy stand-in too)."""
    from conftest import TINY_CASES  # noqa: F401 (the tiny checkpoints' cases)

    d = tiny_factory("llama_gqa")
    llm = LLM(str(d), backend="cuda", max_seq_len=128, prefill_chunk=16, max_batch=4)
    prompts = [[1, 5, 9, 33, 70], [1, 40, 41, 42], [1, 100, 101]]
    free = [
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=0),
        SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.9, top_k=40, seed=7),
    ]
    con = SamplingParams(max_tokens=12, temperature=0.9, seed=3, regex="[a-z]{4,6}")
    alone = [c.token_ids for c in llm.generate(prompts[:2], free)]
    replays = llm.backend.graphs.stats["replays"]
    assert replays > 0  # the free run replayed graphs
    mixed = llm.generate(prompts, free + [con])
    assert [c.token_ids for c in mixed[:2]] == alone
    assert re.fullmatch("[a-z]{4,6}", mixed[2].text) and mixed[2].finish_reason == "stop"


@pytest.mark.parametrize(
    "family,text,content",
    [
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Paris"}}\n'
            "</tool_call>",
            "Sure.",
        ),
        ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "Paris"}}]', None),
        ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "Paris"}}', None),
    ],
)
def test_parsers_per_family_whole_and_streamed(family, text, content):
    from tinyllm.tools import ToolRequest, ToolStream, call_deltas, grammar, parse

    req = ToolRequest([WEATHER, TIME], "auto", True, family)
    got, calls = parse(text, req)
    assert got == content and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_time"
    assert json.loads(calls[0]["function"]["arguments"]) == {"zone": "Paris"}
    ts = ToolStream(req)
    sent = "".join(ts.push(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, streamed = ts.finish()
    assert (sent + rest).strip() == (content or "") and len(streamed) == 1
    d = call_deltas(streamed)
    assert d[0]["tool_calls"][0]["function"]["name"] == "get_time"
    assert json.loads(d[1]["tool_calls"][0]["function"]["arguments"]) == {"zone": "Paris"}
    # not a call: all of it stays content, streamed as it came
    assert parse("Paris is sunny.", req) == ("Paris is sunny.", [])
    ts = ToolStream(req)
    assert "".join(ts.push(c) for c in "Paris is sunny.") + ts.finish()[0] == "Paris is sunny."
    # a forced call's grammar is one llguidance accepts
    req.choice = "get_time"
    from tinyllm.constraints import _llguidance

    M = _llguidance().LLMatcher
    assert not M.validate_grammar_with_warnings(M.grammar_from_lark(grammar(req)))[0]
