"""`tinyllm chat`: the session logic (history, folding, overflow, KV reuse, /set) on a tiny
random model in-process, the real REPL through a pseudo-terminal (pexpect), and the one-shot
and piped forms as subprocesses. The model's words are random bytes: only mechanics are
checked, never content."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import with_chat_template

from tinyllm.chat import DEFAULT, ChatSession, Quit, parse_set, read_message
from tinyllm.errors import TinyLLMError
from tinyllm.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]

# ChatML-like, readable in assertions; the tiny tokenizer is byte-level, so every char is a token.
CHATML = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Mistral v0.1-style: refuses a system role.
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Counted here, independently of the engine's reusable_prefix."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def chat_model(tiny_factory, tmp_path_factory) -> Path:
    return with_chat_template(
        tiny_factory("llama_gqa"), tmp_path_factory.mktemp("chat") / "m", CHATML
    )


@pytest.fixture(scope="module")
def nosys_model(tiny_factory, tmp_path_factory) -> Path:
    return with_chat_template(
        tiny_factory("llama_gqa"), tmp_path_factory.mktemp("nosys") / "m", NO_SYSTEM
    )


@pytest.fixture(scope="module")
def llm(chat_model):
    from tinyllm.api import LLM

    return LLM(str(chat_model), backend="numpy", max_seq_len=256, max_batch=1)


def session(llm, notices=None, **kw) -> ChatSession:
    params = kw.pop("params", SamplingParams(temperature=0.0, max_tokens=6))
    return ChatSession(
        llm, params, notify=(notices.append if notices is not None else lambda m: None), **kw
    )


def reply(s: ChatSession, user: str) -> str:
    return "".join(s.send(user))


# ---- input assembly -------------------------------------------------------------------


def lines(*items):
    """A read_line that serves `items` and records the prompts it was asked with."""
    it = iter(items)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    read.prompts = prompts
    return read


def test_read_message_single_line_and_backslash_continuation():
    assert read_message(lines("hello")) == "hello"
    r = lines("first \\", "second\\", "third", "not read")
    assert read_message(r) == "first \nsecond\nthird"
    assert r.prompts == [">>> ", "... ", "... "]


def test_read_message_triple_quote_block():
    r = lines('"""', "line one", "", "  indented", '"""', "not read")
    assert read_message(r) == "line one\n\n  indented"
    assert read_message(lines('"""start here', 'end here"""')) == "start here\nend here"
    assert read_message(lines('"""just one line"""')) == "just one line"
    # EOF inside a block ends the message instead of losing it
    assert read_message(lines('"""', "a", "b")) == "a\nb"
    with pytest.raises(EOFError):
        read_message(lines())


# ---- /set ---------------------------------------------------------------------------------


def test_parse_set_pairs_separators_and_types():
    got = parse_set(
        "temperature=0.5; top_p = 0.9 top_k=40;seed=7 max_tokens=12 repetition_penalty=1.1"
    )
    assert got == {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "max_tokens": 12,
        "repetition_penalty": 1.1,
    }
    assert parse_set(r"stop=User:, Bot says,\n\n") == {"stop": ["User:", "Bot says", "\n\n"]}
    assert parse_set("stop=none seed=none") == {"stop": [], "seed": None}
    assert parse_set("temperature=default") == {"temperature": DEFAULT}
    assert parse_set("temp=1 num_predict=5 repeat-penalty=1.2") == {
        "temperature": 1.0,
        "max_tokens": 5,
        "repetition_penalty": 1.2,
    }


@pytest.mark.parametrize(
    "text, msg",
    [
        ("temperature=warm", "not a number"),
        ("top_k=0.5", "not an integer"),
        ("colour=blue", "unknown setting"),
        ("temperature", "key=value"),
        ("temperature=nan", "finite"),
    ],
)
def test_parse_set_errors_are_one_line(text, msg):
    with pytest.raises(TinyLLMError, match=msg) as e:
        parse_set(text)
    assert "\n" not in str(e.value)


def test_set_validates_and_applies_atomically(llm):
    s = session(llm)
    assert s.set("temperature=0.5 max_tokens=3") == "set temperature=0.5, max_tokens=3"
    with pytest.raises(TinyLLMError, match="top_p"):
        s.set("temperature=0.9 top_p=2")  # one bad value: nothing changes
    p = llm.resolve_params(s.params())
    assert (p.temperature, p.max_tokens) == (0.5, 3)
    s.set("max_tokens=default")  # back to the CLI value
    assert llm.resolve_params(s.params()).max_tokens == 6
    assert "temperature=0.5" in s.describe_params()


# ---- session: history, system prompt, folding -------------------------------------------


def test_rendered_prompt_carries_previous_turns_in_order(llm):
    s = session(llm, system="Be brief.")
    r1 = reply(s, "first question")
    r2 = reply(s, "second question")
    assert s.turns == [("first question", r1), ("second question", r2)]
    text = llm.tokenizer.decode(s.render("third question"))
    expected = (
        f"<|system|>Be brief.<|end|>\n<|user|>first question<|end|>\n<|assistant|>{r1}<|end|>\n"
        f"<|user|>second question<|end|>\n<|assistant|>{r2}<|end|>\n"
        f"<|user|>third question<|end|>\n<|assistant|>"
    )
    assert text == expected


def test_commands(llm):
    s = session(llm, system="sys")
    assert s.command("/stats") == "no reply yet"
    reply(s, "hi")
    assert "1 turn forgotten" in s.command("/clear") and s.turns == []
    assert s.system == "sys"  # /reset keeps the system prompt
    assert s.command("/system  new prompt ") == "[system prompt set]" and s.system == "new prompt"
    assert "new prompt" in s.command("/system")
    s.command("/system none")
    assert s.system is None
    assert "/set key=value" in s.command("/help")
    assert s.command("/stats").startswith("[prompt ")
    with pytest.raises(TinyLLMError, match="unknown command /frobnicate; /help"):
        s.command("/frobnicate now")
    for q in ("/bye", "/exit", "/EXIT"):
        with pytest.raises(Quit):
            s.command(q)


def test_stats_of_last_reply(llm):
    s = session(llm)
    assert s.finish_notice() is None
    reply(s, "hello")
    assert (
        s.finish_notice() == "[the reply reached max_tokens=6; /set max_tokens=N for longer ones]"
    )
    c = s.last
    n = len(c.prompt_token_ids)
    assert c.prefill_tokens + c.cached_tokens == n
    assert re.search(
        rf"prompt {n} tokens \({c.prefill_tokens} prefilled, {c.cached_tokens} from the prefix "
        r"cache\), "
        rf"generated {len(c.token_ids)} tokens, .*context {n + len(c.token_ids)}/256",
        s.stats(),
    )


def test_system_prompt_folded_when_the_template_rejects_it(nosys_model):
    from tinyllm.api import LLM

    llm2 = LLM(str(nosys_model), backend="numpy", max_seq_len=256, max_batch=1)
    notices = []
    s = session(llm2, notices, system="Be brief.")
    r1 = reply(s, "hi")
    s.render("next")
    text = llm2.tokenizer.decode(s.render("next"))
    assert text == f"[user] Be brief.\n\nhi\n[assistant] {r1}\n[user] next\n[assistant] "
    assert len([n for n in notices if "no system role" in n]) == 1  # said once, not per turn
    # without a system prompt nothing is folded and nothing is said
    notices2 = []
    s2 = session(llm2, notices2)
    assert llm2.tokenizer.decode(s2.render("hi")) == "[user] hi\n[assistant] "
    assert notices2 == []


def test_model_without_chat_template_gets_a_plain_transcript(tiny_factory):
    from tinyllm.api import LLM

    llm0 = LLM(str(tiny_factory("llama_gqa")), backend="numpy", max_seq_len=256, max_batch=1)
    assert not llm0.tokenizer.has_chat_template  # precondition
    s = session(llm0, system="SYS")
    r1 = reply(s, "hi")
    assert (
        llm0.tokenizer.decode(s.render("next"))
        == f"SYS\n\nUser: hi\nAssistant: {r1}\nUser: next\nAssistant:"
    )
    assert "\nUser:" in s.params().stop  # a reply ends where the model starts the next turn


def test_template_accepting_system_is_not_folded(llm):
    notices = []
    s = session(llm, notices, system="S")
    assert llm.tokenizer.decode(s.render("u")).startswith("<|system|>S<|end|>\n<|user|>u<|end|>")
    assert notices == []


# ---- session: KV reuse and context overflow ------------------------------------------------


def test_second_turn_prefills_only_what_the_cache_lacks(llm):
    # The random model's reply bytes are often invalid UTF-8: decoded to U+FFFD and re-encoded
    # they differ from the generated ids, so the reuse ends inside the reply. A long first
    # message and a short reply keep "most of the prompt is reused" true regardless.
    s = session(llm, params=SamplingParams(temperature=0.0, max_tokens=4))
    user1 = (
        "Tell me everything you know about the history of the printing press, in detail: "
        "Gutenberg, movable type, the spread across Europe, and what it changed for readers."
    )
    reply(s, user1)
    c1 = s.last
    assert c1.finish_reason == "length"  # precondition: the last sampled token was never fed back
    reply(s, "and then?")
    c2 = s.last
    # Independently: the prompt the template gives, and the K/V turn 1 wrote (its last sampled
    # token was never fed back); the prefix cache serves the whole blocks of what they share.
    p2 = llm.tokenizer.encode_chat(
        [
            {"role": "user", "content": user1},
            {"role": "assistant", "content": c1.text},
            {"role": "user", "content": "and then?"},
        ]
    )
    assert c2.prompt_token_ids == p2
    written = c1.prompt_token_ids + c1.token_ids[:-1]
    reused = min(common_prefix(written, p2), len(p2) - 1) // llm.block_size * llm.block_size
    assert (c2.cached_tokens, c2.prefill_tokens) == (reused, len(p2) - reused)
    assert c2.prefill_tokens < len(p2) // 3  # the whole first turn came from the cache


def test_overflow_drops_oldest_whole_turns_with_a_notice(llm):
    notices = []
    s = session(llm, notices, system="SYS", params=SamplingParams(temperature=0.0, max_tokens=20))
    s.turns = [(f"question {i} " + "x" * 30, f"answer {i} " + "y" * 20) for i in range(5)]
    before = list(s.turns)
    ids = s.prepare("latest")

    # Independently: the fewest oldest turns whose removal leaves room for the 20-token reply.
    def n_tokens(turns):
        msgs = [{"role": "system", "content": "SYS"}]
        for u, a in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return len(llm.tokenizer.encode_chat(msgs + [{"role": "user", "content": "latest"}]))

    assert n_tokens(before) + 20 > 256  # precondition: it does overflow
    k = next(k for k in range(6) if n_tokens(before[k:]) + 20 <= 256)
    assert k > 0 and s.turns == before[k:] and len(ids) == n_tokens(before[k:])
    assert notices == [
        f"[context full: dropped the oldest {k} turns (user message + reply) "
        f"to fit the 256-token context]"
    ]
    text = llm.tokenizer.decode(ids)
    assert text.startswith("<|system|>SYS<|end|>")  # the system prompt survives


def test_message_longer_than_context_is_an_error_and_history_stays(llm):
    s = session(llm)
    reply(s, "hi")
    before = list(s.turns)
    with pytest.raises(TinyLLMError, match=r"your message is \d+ tokens, the context is 256"):
        s.prepare("z" * 300)
    assert s.turns == before
    reply(s, "still here")  # the chat goes on
    assert len(s.turns) == 2


def test_interrupted_reply_keeps_the_part_shown(llm):
    s = session(llm, params=SamplingParams(temperature=0.0, max_tokens=50))
    pieces = s.send("hello")
    shown = next(pieces)
    pieces.close()  # what the REPL does on Ctrl-C
    assert s.turns == []  # an unfinished reply is not committed by itself
    assert s.abort("hello", shown) == "[interrupted — partial reply kept]"
    assert s.turns == [("hello", shown)]
    assert "not kept" in s.abort("lost", "")
    assert s.turns == [("hello", shown)]
    reply(s, "next")  # the engine is usable after the early close
    assert len(s.turns) == 2
    assert (
        f"<|user|>hello<|end|>\n<|assistant|>{shown}<|end|>\n<|user|>next"
        in llm.tokenizer.decode(s.last.prompt_token_ids)
    )


# ---- the real REPL in a pseudo-terminal ------------------------------------------------------


def env_for(tmp_path) -> dict:
    return dict(
        os.environ,
        TERM="dumb",
        TINYLLM_HISTORY=str(tmp_path / "history"),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )


def spawn(model: Path, tmp_path, *flags: str):
    pexpect = pytest.importorskip("pexpect")
    args = [
        "-m",
        "tinyllm",
        "chat",
        "--model",
        str(model),
        "--backend",
        "numpy",
        "--temperature",
        "0",
        *flags,
    ]
    child = pexpect.spawn(
        sys.executable,
        args,
        env=env_for(tmp_path),
        cwd=str(ROOT),
        encoding="utf-8",
        codec_errors="replace",
        timeout=30,
        dimensions=(50, 200),
    )
    child.expect_exact("/help for commands, Ctrl-C stops a reply, Ctrl-D or /bye quits")
    child.expect_exact(">>> ")
    return child


def ask(child, line: str, timeout: float = 30) -> str:
    """Send one line; return everything printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(">>> ", timeout=timeout)
    return child.before


def finish(child, timeout: float = 10) -> int:
    import pexpect

    child.expect(pexpect.EOF, timeout=timeout)
    child.close()
    return child.exitstatus


def test_repl_reply_commands_and_bye(chat_model, tmp_path):
    c = spawn(chat_model, tmp_path, "--max-tokens", "10", "--ctx-size", "512")
    out = ask(c, "hello there")
    assert out.startswith("hello there\r\n") and len(out) > len(
        "hello there\r\n"
    )  # echo, then the reply
    assert "generated 10 tokens" in ask(c, "/stats")
    assert (
        ask(c, "/set temperature=0.5 max_tokens=3")
        .strip()
        .endswith("set temperature=0.5, max_tokens=3")
    )
    ask(c, "another one")
    stats = ask(c, "/stats")
    assert "generated 3 tokens" in stats and re.search(
        r"\(\d+ prefilled, [1-9]\d* from the prefix cache\)", stats
    )
    assert "error: invalid sampling parameter: temperature=-1.0" in ask(c, "/set temperature=-1")
    assert "temperature=0.5" in ask(c, "/set")  # the bad value changed nothing
    assert "unknown command /nope; /help lists the commands" in ask(c, "/nope")
    assert "[system prompt set]" in ask(c, "/system You are a pirate.")
    assert "'You are a pirate.'" in ask(c, "/system")
    assert "[conversation cleared: 2 turns forgotten (system prompt kept)]" in ask(c, "/reset")
    c.sendintr()  # Ctrl-C at an empty prompt: how to quit
    c.expect_exact("(to quit, press Ctrl-D or type /bye)")
    c.expect_exact(">>> ")
    c.send("half typed")  # Ctrl-C on a typed line just drops it
    c.expect_exact("half typed")  # (readline has echoed it: it holds the text)
    c.sendintr()
    c.expect_exact(">>> ")
    assert "to quit" not in c.before
    assert "conversation cleared: 0 turns" in ask(c, "/clear")  # nothing was sent
    c.sendline("/bye")
    assert finish(c) == 0
    history = (tmp_path / "history").read_text()
    assert "/set temperature=0.5 max_tokens=3" in history and "hello there" in history


def test_repl_multiline_input(chat_model, tmp_path):
    c = spawn(chat_model, tmp_path, "--max-tokens", "4", "--verbose")
    c.sendline('"""')
    c.expect_exact("... ")
    c.sendline("first line")
    c.expect_exact("... ")
    c.sendline('second line"""')
    c.expect_exact(">>> ")
    # --verbose: one message of the template's size (no reply was produced per line)
    n = len("<|user|>first line\nsecond line<|end|>\n<|assistant|>")
    assert f"[prompt {n} tokens" in c.before
    c.sendline("/exit")
    assert finish(c) == 0


def test_repl_ctrl_c_stops_a_long_reply_and_the_chat_goes_on(chat_model, tmp_path):
    c = spawn(chat_model, tmp_path, "--max-tokens", "4000", "--ctx-size", "4096")
    c.sendline("write a long story")
    c.expect_exact("write a long story\r\n")
    c.expect(r"\S")  # the reply has started
    c.sendintr()
    c.expect_exact("[interrupted — partial reply kept]", timeout=15)
    c.expect_exact(">>> ")
    interrupted = ask(c, "/stats")  # the interrupted reply's own numbers
    m = re.search(r"generated (\d+) tokens.*finish: interrupted", interrupted)
    assert m and 0 < int(m.group(1)) < 4000, interrupted
    ask(c, "/set max_tokens=5")
    ask(c, "short now")
    stats = ask(c, "/stats")
    assert "generated 5 tokens" in stats
    # the partial reply is part of the conversation (the prompt is longer than the two user
    # turns' template alone), and the first turn's full 16-token KV blocks came from the cache
    first = "<|user|>write a long story<|end|>\n<|assistant|>"
    m = re.search(r"prompt (\d+) tokens \((\d+) prefilled, (\d+) from the prefix cache", stats)
    assert int(m.group(1)) > len(first + "<|end|>\n<|user|>short now<|end|>\n<|assistant|>")
    assert int(m.group(3)) >= len(first) // 16 * 16
    c.sendeof()  # Ctrl-D quits
    assert finish(c) == 0


def test_repl_overflow_notice(chat_model, tmp_path):
    c = spawn(chat_model, tmp_path, "--max-tokens", "20", "--ctx-size", "200")
    seen = ""
    for i in range(6):
        seen += ask(c, f"message number {i}: " + "blah " * 6)
        if "[context full: dropped the oldest" in seen:
            break
    assert re.search(
        r"\[context full: dropped the oldest \d+ turns? \(user message \+ reply\) "
        r"to fit the 200-token context\]",
        seen,
    )
    assert "error" not in seen
    assert "your message is" in ask(
        c, "w" * 250
    )  # too long even alone: an error line, then the prompt
    c.sendline("/bye")
    assert finish(c) == 0


# ---- one answer: question argument and piped stdin ------------------------------------------


def run_cli(model: Path, tmp_path, *args: str, stdin: str | None = None):
    cmd = [
        sys.executable,
        "-m",
        "tinyllm",
        "chat",
        "--model",
        str(model),
        "--backend",
        "numpy",
        "--temperature",
        "0",
        "--max-tokens",
        "5",
        *args,
    ]
    return subprocess.run(
        cmd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        env=env_for(tmp_path),
        cwd=str(ROOT),
        timeout=60,
    )


def test_question_argument_answers_once(chat_model, tmp_path):
    r = run_cli(chat_model, tmp_path, "--verbose", "--system", "S", "What is 2+2?")
    assert r.returncode == 0, r.stderr
    n = len("<|system|>S<|end|>\n<|user|>What is 2+2?<|end|>\n<|assistant|>")
    assert f"[prompt {n} tokens" in r.stderr and "generated 5 tokens" in r.stderr
    assert "[the reply reached max_tokens=5; --max-tokens N for longer ones]" in r.stderr
    assert r.stdout.endswith("\n") and len(r.stdout) > 1
    assert ">>>" not in r.stdout and "/help" not in r.stdout and "model:" in r.stderr


def test_piped_stdin_is_one_message(chat_model, tmp_path):
    r = run_cli(chat_model, tmp_path, "--verbose", stdin="line one\nline two\n")
    assert r.returncode == 0, r.stderr
    n = len("<|user|>line one\nline two<|end|>\n<|assistant|>")
    assert f"[prompt {n} tokens" in r.stderr  # both lines, one turn
    assert ">>>" not in r.stdout and "/help" not in r.stdout and "/help" not in r.stderr
    empty = run_cli(chat_model, tmp_path, stdin="  \n")
    assert empty.returncode == 2 and "no input" in empty.stderr and empty.stderr.count("\n") == 1
