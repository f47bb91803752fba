"""Batch generation: LLM.generate over the continuous-batching engine, and `tinyllm batch`
(both input formats, error lines, crash-safe resume). Tiny random checkpoints only."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import start_tinyllm, wait_for_lines, with_chat_template

from tinyllm import LLM, SamplingParams
from tinyllm.cli import main as cli_main

CHATML = (
    "{%- for m in messages -%}"
    "{%- if m.role not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role: ' + m.role) }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

RNG = np.random.default_rng(7)
# Mixed lengths; several are longer than mistral_window's sliding window of 8.
PROMPTS = [[int(t) for t in RNG.integers(3, 256, n)] for n in (5, 17, 2, 30, 9, 12, 1, 24)]


@pytest.fixture(scope="module")
def chat_dirs(tiny_factory, tmp_path_factory):
    """case -> a copy of the tiny checkpoint with a ChatML-like chat template."""
    out = {}
    for case in ("llama_gqa", "mistral_window"):
        out[case] = with_chat_template(
            tiny_factory(case), tmp_path_factory.mktemp(f"chat_{case}"), CHATML
        )
    return out


def greedy_by_full_prefill(llm: LLM, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """The independent reference: argmax of a fresh full-sequence forward at every step."""
    ids, out = list(ids), []
    for _ in range(max_tokens):
        tok = int(np.argmax(llm.logits(ids)[-1]))
        if tok in llm.eos_token_ids:
            return out, "stop"
        out.append(tok)
        ids.append(tok)
    return out, "length"


def read_results(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "every result line must be complete"
    return [json.loads(line) for line in data.splitlines()]


def by_id(records: list[dict]) -> dict:
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in the output: {sorted(ids)}"
    return {r["custom_id"]: r for r in records}


def outcome(rec: dict):
    """What must not depend on when or in which batch a request ran (cached_tokens does: it
    counts the prompt's blocks that requests run before it had computed)."""
    if rec["error"] is not None:
        return ("error", rec["error"]["code"])
    body = rec["response"]["body"]
    ch = body["choices"][0]
    usage = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    return (ch.get("text", ch.get("message", {}).get("content")), ch["finish_reason"], usage)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(*args) -> int:
    return cli_main(["batch", "--no-progress", *map(str, args)])


# ---- the Python API ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window"])
def test_generate_batched_greedy_equals_individual(tiny_factory, case):
    d = tiny_factory(case)
    llm = LLM(str(d), max_seq_len=96, max_batch=3)  # 8 prompts through 3 slots
    params = SamplingParams(max_tokens=10, temperature=0)
    got = llm.generate(PROMPTS, params)
    ref = LLM(str(d), max_seq_len=96, max_batch=1)
    for ids, c in zip(PROMPTS, got):
        assert c.prompt_token_ids == ids
        assert (c.token_ids, c.finish_reason) == greedy_by_full_prefill(ref, ids, 10)
    # It really was batched: fewer forwards than sequences x tokens.
    assert llm.engine.stats["steps"] < sum(len(c.token_ids) + 1 for c in got)


def test_generate_seeded_sampling_independent_of_batch_mates(tiny_factory):
    d = str(tiny_factory("llama_gqa"))
    seeded = [(PROMPTS[i % 4], seed) for i, seed in enumerate([11, 12, 13, 14, 15, 16])]
    seeded.append((PROMPTS[0], 99))  # same prompt as seed 11, other seed

    def params(seed):
        return SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)

    alone = LLM(d, max_batch=1).generate([p for p, _ in seeded], [params(s) for _, s in seeded])
    # Reversed, interleaved with unseeded requests, other max_batch values.
    for max_batch in (2, 5):
        mixed = []
        for p, s in reversed(seeded):
            mixed += [(p, s), (PROMPTS[5], None)]
        out = LLM(d, max_batch=max_batch).generate(
            [p for p, _ in mixed], [params(s) for _, s in mixed]
        )
        got = {s: c.token_ids for (_, s), c in zip(mixed, out) if s is not None}
        assert got == {s: c.token_ids for (_, s), c in zip(seeded, alone)}
    assert alone[0].token_ids != alone[-1].token_ids  # the seed does matter


# ---- tinyllm batch: results ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window"])
def test_cli_greedy_equals_individual_both_formats(chat_dirs, tmp_path, case):
    d = chat_dirs[case]
    texts = [
        "Hello, world",
        "a",
        "The sliding window is eight bytes long, this is longer",
        "xyz" * 9,
    ]
    chats = [
        [{"role": "user", "content": "hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
    ]
    rows = []
    for i, t in enumerate(texts):
        if i % 2:
            rows.append({"id": f"p{i}", "prompt": t})
        else:
            rows.append(
                {
                    "custom_id": f"p{i}",
                    "method": "POST",
                    "url": "/v1/completions",
                    "body": {"prompt": t},
                }
            )
    rows += [
        {
            "custom_id": "c0",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": chats[0]},
        },
        {"id": "c1", "messages": chats[1]},
        {"id": "ids", "prompt": PROMPTS[3], "max_completion_tokens": 4, "ignore_eos": True},
        {"id": "short", "prompt": "abc", "max_tokens": 3, "ignore_eos": True},
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    # CLI flags are defaults; per-request max_tokens wins.
    assert (
        run_cli(
            "-i", inp, "-o", out, "-m", d, "--max-batch", 2, "--max-tokens", 9, "--temperature", 0
        )
        == 0
    )
    res = by_id(read_results(out))
    assert set(res) == {r.get("custom_id", r.get("id")) for r in rows}

    ref = LLM(str(d), max_batch=1)
    tok = ref.tokenizer
    prompt_ids = {f"p{i}": tok.encode(t) for i, t in enumerate(texts)}
    prompt_ids |= {
        "c0": tok.encode_chat(chats[0]),
        "c1": tok.encode_chat(chats[1]),
        "ids": PROMPTS[3],
        "short": tok.encode("abc"),
    }
    for cid, ids in prompt_ids.items():
        rec = res[cid]
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        assert rec["id"].startswith("batch_req_")
        body = rec["response"]["body"]
        n = {"ids": 4, "short": 3}.get(cid, 9)
        c = ref.generate(
            [ids], SamplingParams(max_tokens=n, temperature=0, ignore_eos=cid in ("ids", "short"))
        )[0]
        if cid.startswith("c"):
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": c.text}
        else:
            assert body["object"] == "text_completion"
            assert body["choices"][0]["text"] == c.text
        assert body["choices"][0]["finish_reason"] == c.finish_reason
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(c.token_ids),
            "total_tokens": len(ids) + len(c.token_ids),
            "prompt_tokens_details": {"cached_tokens": 0},
        }  # no shared 16-token block
        assert body["model"] == d.name
    assert res["ids"]["response"]["body"]["usage"]["completion_tokens"] == 4
    firsts = [tuple(ids[:16]) for ids in prompt_ids.values()]
    assert len(set(firsts)) == len(firsts)  # (why no prompt found cached blocks)
    assert res["short"]["response"]["body"]["choices"][0]["finish_reason"] == "length"


def test_cli_reports_cached_tokens_of_shared_prefixes(tiny_factory, tmp_path):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field) counts the prompt tokens in
    whole 16-token KV blocks that an earlier request computed. One at a time (--max-batch 1),
    so each request finds everything the ones before it wrote; never the last prompt token
    (its logits are needed). --no-prefix-caching computes everything; outputs are the same."""
    d = tiny_factory("llama_gqa")
    rng = np.random.default_rng(12)
    shared = [int(t) for t in rng.integers(3, 256, 40)]
    a = shared + [int(t) for t in rng.integers(3, 256, 9)]  # 49 tokens
    b = shared + [int(t) for t in rng.integers(3, 256, 5)]  # 45: shares 40 with a
    assert a[40] != b[40]
    other = [int(t) for t in rng.integers(3, 256, 20)]
    rows = [
        {"id": "a", "prompt": a},
        {"id": "b", "prompt": b},
        {"id": "a2", "prompt": a},
        {"id": "b_cut", "prompt": b[:33]},
        {"id": "other", "prompt": other},
    ]
    # Independently: a wrote a's 49 prompt tokens + 3 fed-back generated ones (4 generated);
    # each later request shares with the union of what ran before it:
    want = {
        "a": 0,
        "b": 32,  # the 40 shared tokens hold 2 whole blocks
        "a2": 48,  # a[:48] (its 49th is its last prompt token): 3 blocks
        "b_cut": 32,  # b[:32] (b_cut's last token is its 33rd): 2 blocks
        "other": 0,
    }
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{**r, "max_tokens": 4, "ignore_eos": True} for r in rows]
    )
    on, off = tmp_path / "on.jsonl", tmp_path / "off.jsonl"
    assert run_cli("-i", inp, "-o", on, "-m", d, "--max-batch", 1, "--temperature", 0) == 0
    assert (
        run_cli(
            "-i",
            inp,
            "-o",
            off,
            "-m",
            d,
            "--max-batch",
            1,
            "--temperature",
            0,
            "--no-prefix-caching",
        )
        == 0
    )
    got_on, got_off = by_id(read_results(on)), by_id(read_results(off))
    cached = {
        k: r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
        for k, r in got_on.items()
    }
    assert cached == want
    assert all(
        r["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        for r in got_off.values()
    )
    assert {k: outcome(v) for k, v in got_on.items()} == {k: outcome(v) for k, v in got_off.items()}


def test_cli_seeded_requests_reproducible_across_runs(tiny_factory, tmp_path):
    d = tiny_factory("llama_gqa")
    rows = [
        {
            "id": f"s{i}",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "temperature": 1.0,
            "seed": 100 + i,
            "max_tokens": 8,
            "ignore_eos": True,
        }
        for i in range(6)
    ]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert (
        run_cli(
            "-i", write_jsonl(tmp_path / "in_a.jsonl", rows), "-o", a, "-m", d, "--max-batch", 4
        )
        == 0
    )
    assert (
        run_cli(
            "-i",
            write_jsonl(tmp_path / "in_b.jsonl", rows[::-1]),
            "-o",
            b,
            "-m",
            d,
            "--max-batch",
            1,
        )
        == 0
    )
    ra, rb = by_id(read_results(a)), by_id(read_results(b))
    assert {k: outcome(v) for k, v in ra.items()} == {k: outcome(v) for k, v in rb.items()}


def test_cli_malformed_lines_become_error_lines(chat_dirs, tmp_path, capsys):
    d = chat_dirs["llama_gqa"]
    good = {"id": "good", "prompt": "fine", "max_tokens": 3}
    rows = [
        good,  # 1
        '{"id": "broken", "prompt": ',  # 2 invalid JSON
        {"prompt": "no id"},  # 3
        {"id": "noprompt", "max_tokens": 3},  # 4
        {"id": "badtemp", "prompt": "x", "temperature": -1},  # 5
        {"id": "typo", "prompt": "x", "max_new_tokens": 3},  # 6
        {"id": "long", "prompt": "y" * 80},  # 7 > --ctx-size 64
        {"id": "good", "prompt": "again"},  # 8 duplicate id
        {
            "custom_id": "url",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": "x"},
        },  # 9
        {"id": "n2", "prompt": "x", "n": 2},  # 10
        "[1, 2, 3]",  # 11 not an object
        "   ",  # 12 blank: ignored
        {"id": "role", "messages": [{"role": "tool", "content": "x"}]},  # 13 template refuses
        {
            "id": "chatprompt",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"prompt": "x"},
        },  # 14
        {"id": "last", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2},  # 15
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run_cli("-i", inp, "-o", out, "-m", d, "--ctx-size", 64) == 0
    recs = read_results(out)
    assert len(recs) == 14  # every non-blank line, once
    errors = {r["error"]["line"]: (r["custom_id"], r["error"]["code"]) for r in recs if r["error"]}
    assert errors == {
        2: (None, "invalid_json"),
        3: (None, "missing_custom_id"),
        4: ("noprompt", "missing_prompt"),
        5: ("badtemp", "invalid_parameter"),
        6: ("typo", "unknown_parameter"),
        7: ("long", "context_length_exceeded"),
        8: ("good", "duplicate_custom_id"),
        9: ("url", "invalid_url"),
        10: ("n2", "unsupported_parameter"),
        11: (None, "invalid_request"),
        13: ("role", "invalid_messages"),
        14: ("chatprompt", "missing_prompt"),
    }
    for r in recs:
        assert (r["response"] is None) == (r["error"] is not None)
        if r["error"]:
            assert r["error"]["message"] and "\n" not in r["error"]["message"]
    ok = {r["custom_id"]: r for r in recs if r["response"]}
    assert set(ok) == {"good", "last"}
    n_tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in ok.values())
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        summary.startswith("done: 2 ok, 12 failed")
        and f"; {n_tokens} tokens generated in " in summary
    )
    assert "tokens/s" in summary and "requests/s" in summary
    assert "unknown role: tool" in errors_msg(recs, 13)
    # A resume writes nothing more: error lines without an id are keyed by their line.
    size = out.stat().st_size
    assert run_cli("-i", inp, "-o", out, "-m", d, "--ctx-size", 64, "--resume") == 0
    assert out.stat().st_size == size


def errors_msg(recs, line):
    return next(r["error"]["message"] for r in recs if r["error"] and r["error"]["line"] == line)


# ---- tinyllm batch: files, resume, interruption -----------------------------------------


def test_cli_refuses_existing_output_without_resume(tiny_factory, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x", "max_tokens": 2}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"keep": "me"}\n')
    assert run_cli("-i", inp, "-o", out, "-m", tiny_factory("llama_gqa")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err
    assert out.read_text() == '{"keep": "me"}\n'
    # --resume on a file that is not ours: refused too, nothing cut.
    assert run_cli("-i", inp, "-o", out, "-m", tiny_factory("llama_gqa"), "--resume") == 2
    assert "not a batch result line" in capsys.readouterr().err
    assert out.read_text() == '{"keep": "me"}\n'


def test_cli_fatal_problems_are_one_line(tiny_factory, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    model = tiny_factory("llama_gqa")
    cases = [
        (
            ["-i", tmp_path / "missing.jsonl", "-o", tmp_path / "o1.jsonl", "-m", model],
            "missing.jsonl",
        ),
        (["-i", inp, "-o", tmp_path / "no" / "dir.jsonl", "-m", model], "cannot write"),
        (["-i", inp, "-o", tmp_path / "o2.jsonl", "-m", tmp_path / "nomodel"], "nomodel"),
    ]
    for args, needle in cases:
        assert run_cli(*args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tinyllm: error:") and "\n" not in err and needle in err


def test_cli_resume_truncates_a_torn_last_line(tiny_factory, tmp_path):
    d = tiny_factory("llama_gqa")
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i], "max_tokens": 6} for i in range(5)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    full, torn = tmp_path / "full.jsonl", tmp_path / "torn.jsonl"
    assert run_cli("-i", inp, "-o", full, "-m", d) == 0
    data = full.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn.write_bytes(data[: last_start + (len(data) - last_start) // 2])  # half of the last line
    assert run_cli("-i", inp, "-o", torn, "-m", d, "--resume") == 0
    a, b = by_id(read_results(full)), by_id(read_results(torn))
    assert set(b) == {r["id"] for r in rows}
    assert {k: outcome(v) for k, v in a.items()} == {k: outcome(v) for k, v in b.items()}


def test_cli_interrupted_and_killed_then_resumed_equals_uninterrupted(tiny_factory, tmp_path):
    d = tiny_factory("llama_gqa")
    rows = [
        {
            "id": f"r{i}",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": 40,
            "ignore_eos": True,
            **({"temperature": 1.0, "seed": i} if i % 2 else {}),
        }
        for i in range(60)
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert run_cli("-i", inp, "-o", ref, "-m", d, "--max-batch", 2) == 0

    args = ("batch", "-i", inp, "-o", out, "-m", d, "--max-batch", 2, "--no-progress")
    # 1) Ctrl-C: exit 130, says how to resume, keeps only whole lines.
    p = start_tinyllm(*args)
    wait_for_lines(out, 4, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "--resume" in err
    n1 = len(read_results(out))
    assert 4 <= n1 < len(rows)
    # 2) kill -9 during the resumed run.
    p = start_tinyllm(*args, "--resume", stderr=subprocess.DEVNULL)
    wait_for_lines(out, n1 + 4, p)
    p.kill()
    p.wait()
    assert out.read_bytes().count(b"\n") < len(rows)
    # 3) finish.
    assert run_cli("-i", inp, "-o", out, "-m", d, "--max-batch", 2, "--resume") == 0
    got, want = by_id(read_results(out)), by_id(read_results(ref))
    assert set(got) == set(want) == {r["id"] for r in rows}
    assert {k: outcome(v) for k, v in got.items()} == {k: outcome(v) for k, v in want.items()}


def test_cli_reads_requests_lazily(tiny_factory, tmp_path, monkeypatch):
    """A request is tokenized only when a slot is free, not the whole file up front."""
    import tinyllm.batch
    from tinyllm.tokenizer import HFTokenizer

    encoded, at_write = [], []
    real_encode, real_write = HFTokenizer.encode, tinyllm.batch.OutputFile.write

    def encode(self, text, *args, **kw):
        encoded.append(text)
        return real_encode(self, text, *args, **kw)

    def write(self, rec):
        at_write.append(len(encoded))
        return real_write(self, rec)

    monkeypatch.setattr(HFTokenizer, "encode", encode)
    monkeypatch.setattr(tinyllm.batch.OutputFile, "write", write)
    rows = [
        {"id": f"r{i}", "prompt": f"prompt number {i}", "max_tokens": 3, "ignore_eos": True}
        for i in range(12)
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run_cli("-i", inp, "-o", out, "-m", tiny_factory("llama_gqa"), "--max-batch", 2) == 0
    assert len(read_results(out)) == 12 and len(encoded) == 12
    assert at_write[0] <= 3  # 2 slots (+ at most one waiting)
