"""What a new (or hostile, or tired) user meets: API argument types, a checkpoint without a
tokenizer, the memory check, context above the trained maximum, strict sizes, --help and
--version, closed stdin/stdout, concurrent and changed batch runs, SIGTERM, BLAS threads,
and chat input (pastes, failing templates). Tiny random checkpoints only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_ENV as ENV
from conftest import (
    REPO,
    batch_args,
    run_tinyllm,
    start_tinyllm,
    tinyllm_cmd,
    wait_for_lines,
    with_chat_template,
)

from tinyllm import LLM, SamplingParams, TinyLLMError
from tinyllm.cli import build_parser
from tinyllm.cli import main as cli_main

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def one_error(p, *words):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("tinyllm: error:")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_factory):
    return tiny_factory("llama_gqa")


@pytest.fixture(scope="module")
def llm(model):
    return LLM(str(model))


# ---- the Python API ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt", [b"bytes", 1.5, None, [1.5], [None], [[1, 2.0]], [[True, 2]], {"a": 1}, [b"x"]]
)
def test_generate_rejects_wrong_prompt_types(llm, prompt):
    with pytest.raises(TinyLLMError, match="prompt"):
        llm.generate(prompt, SamplingParams(max_tokens=1))


def test_bytes_prompt_says_to_decode(llm):
    with pytest.raises(TinyLLMError, match="decode"):
        llm.generate(b"hello")


@pytest.mark.parametrize(
    "messages, what",
    [
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": None, "content": "hi"}], "role"),
        ([{"role": "user", "content": None}], "content"),
        (["hi"], "role"),
        ([], "non-empty"),
        ("hi", "non-empty"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "text content"),
    ],
)
def test_chat_rejects_wrong_message_types(tiny_factory, tmp_path, messages, what):
    d = with_chat_template(tiny_factory("llama_gqa"), tmp_path / "m", TEMPLATE)
    with pytest.raises(TinyLLMError, match=what):
        LLM(str(d)).chat(messages, SamplingParams(max_tokens=1))


def test_numpy_ids_and_lists_are_accepted(llm):
    a = llm.generate([np.array([5, 6, 7])], SamplingParams(max_tokens=3, temperature=0))[
        0
    ].token_ids
    b = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
    assert a == b and len(a) == 3


def test_a_checkpoint_without_tokenizer_runs_on_token_ids(model, tmp_path, llm):
    d = tmp_path / "no_tokenizer"
    shutil.copytree(model, d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    bare = LLM(str(d))
    assert bare.tokenizer is None
    ids = [4, 8, 15, 16, 23, 42]
    np.testing.assert_array_equal(bare.logits(ids), llm.logits(ids))  # same weights, same numbers
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    got = bare.generate([ids], p)[0]
    assert got.token_ids == llm.generate([ids], p)[0].token_ids and got.text == ""
    with pytest.raises(TinyLLMError, match="needs a tokenizer"):
        bare.generate("text needs a tokenizer")
    with pytest.raises(TinyLLMError, match="needs a tokenizer"):
        bare.generate([ids], SamplingParams(stop=["x"]))
    with pytest.raises(TinyLLMError, match="needs a tokenizer"):
        bare.chat([{"role": "user", "content": "hi"}])


def test_nan_logits_stop_the_request_naming_the_tensor(model, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(model, d)
    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.self_attn.v_proj.weight"] = np.full_like(
        t["model.layers.0.self_attn.v_proj.weight"], np.inf
    )
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(TinyLLMError, match="model.layers.0.self_attn.v_proj.weight"):
        LLM(str(d)).generate([[1, 2, 3]])
    # in a batch run it is that request's error line, code model_error
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": [1, 2, 3], "max_tokens": 2}) + "\n")
    assert (
        cli_main(
            [
                "batch",
                "-i",
                str(inp),
                "-o",
                str(out),
                "-m",
                str(d),
                "--backend",
                "numpy",
                "--no-progress",
            ]
        )
        == 0
    )
    rec = json.loads(out.read_text())
    assert rec["error"]["code"] == "model_error" and "v_proj" in rec["error"]["message"]


# ---- memory and context ----------------------------------------------------------------------


def test_memory_check_counts_the_kv_cache_and_names_what_fits(model, monkeypatch):
    import tinyllm.api
    from tinyllm.config import ModelConfig
    from tinyllm.memory import host_plan

    cfg = ModelConfig.load(model)
    ok = host_plan(cfg, "fp32", 256, 1, 512).total
    # room for the weights and one sequence, not for 64: the old weights-only check passed this
    monkeypatch.setattr(tinyllm.api, "available_memory", lambda: ok + 1)
    with pytest.raises(TinyLLMError) as e:
        LLM(str(model), max_seq_len=256, max_batch=64)
    msg = str(e.value)
    assert "KV cache" in msg and "working memory" in msg and "available" in msg
    batch = int(
        re.search(r"largest --max-batch that fits with --ctx-size 256 is (\d+)", msg).group(1)
    )
    ctx = int(re.search(r"largest --ctx-size that fits with --max-batch 64 is (\d+)", msg).group(1))
    assert 1 <= batch < 64 and 2 <= ctx < 256
    # the suggestions do fit, one more does not
    LLM(str(model), max_seq_len=256, max_batch=batch)
    LLM(str(model), max_seq_len=ctx, max_batch=64)
    with pytest.raises(TinyLLMError):
        LLM(str(model), max_seq_len=256, max_batch=batch + 1)


def test_gpu_default_pool_shrinks_to_the_free_memory(model, monkeypatch):
    """A backend with device memory (the cuda backend's interface): the default pool takes
    max_batch sequences of max_seq_len when that fits in 90% of the free memory next to the
    *measured* working memory of the warm-up step (memory.py), else as many blocks as fit (the
    paged cache preempts); when not even one sequence fits, the check's error stands."""
    import tinyllm.api
    from tinyllm.backends.numpy_backend import NumpyBackend
    from tinyllm.config import ModelConfig
    from tinyllm.kv_cache import KVCacheSpec
    from tinyllm.memory import CUBLAS_WORKSPACE, GPU_CONTEXT_MARGIN

    cfg = ModelConfig.load(model)
    one = KVCacheSpec.for_model(cfg, "fp32", 256, 1)
    weights = cfg.n_params() * 2
    peak = 100 << 20

    class Budgeted(NumpyBackend):
        device_memory = True
        free = 0
        warmups = 0

        def free_memory(self):
            return self.free

        def measure_peak(self, fn):
            fn()  # the warm-up forward runs
            self.warmups += 1
            return peak

        def check_fits(
            self, weight_bytes, kv_bytes=0, working=0, kv_bytes_per_token=None, max_seq_len=None
        ):
            if weight_bytes + kv_bytes + working > self.free:
                raise TinyLLMError("the model needs more GPU memory than is free")

    be = Budgeted()
    monkeypatch.setattr(tinyllm.api, "get_backend", lambda *a, **k: be)
    be.free = (
        int((peak + CUBLAS_WORKSPACE + GPU_CONTEXT_MARGIN + 88.5 * one.block_nbytes()) / 0.9) + 1
    )  # 5.5 sequences
    assert (
        LLM(str(model), max_seq_len=256, max_batch=4, cuda_graph=False).engine.spec.n_blocks
        == 4 * one.ring
    )
    shrunk = LLM(str(model), max_seq_len=256, max_batch=16, cuda_graph=False).engine.spec
    assert shrunk.n_blocks == 88 == 5.5 * one.ring and be.warmups == 2
    be.free = weights + one.nbytes() // 2
    with pytest.raises(TinyLLMError, match="more GPU memory than is free"):
        LLM(str(model), max_seq_len=256, max_batch=16)


def test_planned_kv_bytes_are_what_the_cache_allocates(llm):
    from tinyllm.memory import host_plan

    llm.engine.ensure_cache()
    plan = host_plan(
        llm.cfg, llm.kv_dtype, llm.max_seq_len, llm.engine.max_batch, llm.prefill_chunk
    )
    assert plan.kv == llm.engine.cache.nbytes()


def test_context_above_the_trained_maximum_warns(model):
    from tinyllm.api import ContextWarning

    with pytest.warns(ContextWarning, match="256"):
        LLM(str(model), max_seq_len=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLM(str(model), max_seq_len=256)  # at the maximum: no warning
    p = run_tinyllm(
        "generate", "-m", model, "--backend", "numpy", "--ctx-size", "300", "-n", "1", "hi"
    )
    assert (
        p.returncode == 0 and "tinyllm: warning: the context 300 exceeds the 256 tokens" in p.stderr
    )


@pytest.mark.parametrize(
    "text, value",
    [
        ("24GB", 24 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", 3 * 2**29),
        (" 2 tb ", 2 * 2**40),
        ("64k", 64 * 2**10),
        ("1e3MB", 1000 * 2**20),
    ],
)
def test_memory_sizes(text, value):
    from tinyllm.memory import parse_memory

    assert parse_memory(text) == value


@pytest.mark.parametrize(
    "text, why",
    [
        ("100", "no unit"),
        ("-5GB", "negative"),
        ("0GB", "more than zero"),
        ("1e400GB", "too large"),
        ("9e20TB", "too large"),
        ("nanGB", "cannot read"),
        ("infGB", "cannot read"),
        ("GB", "cannot read"),
        ("12XB", "cannot read"),
    ],
)
def test_bad_memory_sizes(text, why):
    from tinyllm.memory import parse_memory

    with pytest.raises(TinyLLMError, match=why):
        parse_memory(text)


def test_info_says_plainly_when_the_model_does_not_fit(model):
    p = run_tinyllm("info", "-m", model, "--backend", "numpy", "--memory=0.1MB")
    assert p.returncode == 0 and "does not fit: the weights alone take" in p.stdout
    assert not re.search(r"\s-\d", p.stdout)  # no negative sizes
    one_error(run_tinyllm("info", "-m", model, "--memory", "1e400GB"), "too large")


# ---- the command line --------------------------------------------------------------------------


def test_every_option_says_what_it_does_and_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if a.dest == "help":
                continue
            text = a.help or ""
            says_default = "default" in text or "(required)" in text
            if not text or (a.option_strings and not says_default):
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, missing


def test_version():
    from tinyllm import __version__

    p = run_tinyllm("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"tinyllm {__version__}"


def test_generate_takes_the_prompt_as_argument_or_stdin(model):
    args = ("generate", "-m", model, "--backend", "numpy", "-n", "6", "-t", "0")
    a = run_tinyllm(*args, "--prompt", "Hello")
    b = run_tinyllm(*args, "Hello")
    c = run_tinyllm(*args, stdin="Hello\n")
    assert a.returncode == b.returncode == c.returncode == 0, (a.stderr, b.stderr, c.stderr)
    assert a.stdout == b.stdout == c.stdout and len(a.stdout) > 1
    one_error(run_tinyllm(*args, stdin=""), "no prompt")
    one_error(run_tinyllm(*args, "--prompt", "a", "b"), "not both")


def test_list_shows_sizes(model, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(model, weights / "mymodel")
    p = run_tinyllm(
        "list", extra_env={"TINYLLM_WEIGHTS": str(weights), "HF_HOME": str(tmp_path / "hf")}
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].split()[:3] == ["alias", "repository", "size"]
    total = sum(f.stat().st_size for f in (weights / "mymodel").iterdir())
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("mymodel"))
    assert f"{total / 1024:.1f} KiB" in line


def _close(fd):
    return lambda: os.close(fd)


def test_closed_stdout_and_stdin_are_clean_errors(model):
    gen = ("generate", "-m", model, "--backend", "numpy", "-n", "2")
    one_error(run_tinyllm(*gen, "hi", preexec_fn=_close(1)), "stdout is closed")
    p = subprocess.run(
        tinyllm_cmd(*gen),
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        preexec_fn=_close(0),
    )
    one_error(p, "no prompt")
    p = subprocess.run(
        tinyllm_cmd("chat", "-m", model, "--backend", "numpy"),
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        preexec_fn=_close(0),
    )
    one_error(p, "stdin is closed")


def test_output_into_a_closed_pipe_is_quiet(model):
    """`tinyllm generate ... | head -c 1`: the reader leaves early; no traceback."""
    r = subprocess.Popen(
        tinyllm_cmd(
            "generate", "-m", model, "--backend", "numpy", "-n", 200, "-t", 1, "--seed", 1, "hi"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        cwd=REPO,
    )
    r.stdout.read(1)
    r.stdout.close()
    err = r.stderr.read().decode()
    r.wait(timeout=120)
    assert "Traceback" not in err and r.returncode == 0, err


# ---- batch integrity -----------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def batch(model, inp, out, *flags, **kw):
    return run_tinyllm(*batch_args(model, inp, out, *flags), **kw)


def slow_rows(n=40):
    return [
        {"id": f"r{i}", "prompt": [3 + i % 50, 7, 9], "max_tokens": 60, "ignore_eos": True}
        for i in range(n)
    ]


def test_a_second_run_on_the_same_output_is_refused(model, tmp_path):
    """The first run is frozen (SIGSTOP) as soon as its first result line is on disk. It took
    the output's lock before that write and releases it only after its last one, so while it
    has fewer than all lines it holds the lock and, frozen, cannot finish: the second run meets
    the lock however long it takes to start on a loaded machine (no timing race)."""
    inp = write_jsonl(tmp_path / "in.jsonl", slow_rows())
    out = tmp_path / "out.jsonl"
    first = start_tinyllm(*batch_args(model, inp, out, "--max-batch", "1"))
    try:
        wait_for_lines(out, 1, first)
        first.send_signal(signal.SIGSTOP)
        assert out.read_bytes().count(b"\n") < len(slow_rows()), (
            "the first run ended before it was paused"
        )
        second = batch(model, inp, out, "--resume")
    finally:
        first.send_signal(signal.SIGCONT)  # never leave it stopped
    one_error(second, "another tinyllm batch is writing")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    ids = [json.loads(ln)["custom_id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in slow_rows())  # each once, none lost


def test_resume_stops_when_a_request_or_the_settings_changed(model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": [5, 6, i + 7], "max_tokens": 3} for i in range(4)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert batch(model, inp, out).returncode == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert (
        all(r["fingerprint"].startswith("sha256:") for r in recs)
        and len({r["fingerprint"] for r in recs}) == 4
    )
    same = batch(model, inp, out, "--resume")
    assert same.returncode == 0 and "nothing to do" in same.stderr
    before = out.read_bytes()
    rows[1]["prompt"] = [9, 9, 9]  # a changed body
    rows[2]["max_tokens"] = 4  # a changed setting inside the body
    write_jsonl(inp, rows)
    line = one_error(batch(model, inp, out, "--resume"), "2 request(s) changed", "'r1'", "'r2'")
    assert "'r0'" not in line and "'r3'" not in line
    assert out.read_bytes() == before  # nothing appended, nothing cut
    rows[1]["prompt"], rows[2]["max_tokens"] = [5, 6, 8], 3
    write_jsonl(inp, rows)
    one_error(batch(model, inp, out, "--resume", "--temperature", "0.5"), "4 request(s) changed")


def test_results_from_before_fingerprints_are_kept_with_a_note(model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": [5, 6, i + 7], "max_tokens": 2} for i in range(3)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    write_jsonl(inp, rows[:2])
    assert batch(model, inp, out).returncode == 0
    old = [json.loads(ln) for ln in out.read_text().splitlines()]
    out.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "fingerprint"}) + "\n" for r in old)
    )
    write_jsonl(inp, rows)
    p = batch(model, inp, out, "--resume")
    assert p.returncode == 0 and "2 results" in p.stderr and "no fingerprint" in p.stderr
    assert [json.loads(ln)["custom_id"] for ln in out.read_text().splitlines()] == [
        "r0",
        "r1",
        "r2",
    ]


def test_empty_input_says_so_and_creates_nothing(model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n  \n")
    one_error(batch(model, inp, out), "has no requests", "empty")
    assert not out.exists()


def test_max_batch_that_does_not_fit_is_refused_before_the_output_exists(
    model, tmp_path, monkeypatch, capsys
):
    import tinyllm.api
    from tinyllm.config import ModelConfig
    from tinyllm.memory import host_plan

    inp, out = write_jsonl(tmp_path / "in.jsonl", slow_rows(3)), tmp_path / "out.jsonl"
    room = host_plan(ModelConfig.load(model), "fp32", 256, 2, 512).total
    monkeypatch.setattr(tinyllm.api, "available_memory", lambda: room)
    rc = cli_main(
        [
            "batch",
            "-i",
            str(inp),
            "-o",
            str(out),
            "-m",
            str(model),
            "--backend",
            "numpy",
            "--max-batch",
            "500",
            "--no-progress",
        ]
    )
    assert rc == 2 and "largest --max-batch" in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(model, tmp_path):
    inp, out = write_jsonl(tmp_path / "in.jsonl", slow_rows(30)), tmp_path / "out.jsonl"
    p = start_tinyllm(*batch_args(model, inp, out, "--max-batch", "2"))
    wait_for_lines(out, 2, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    assert out.read_bytes().endswith(b"\n")  # whole lines only
    assert batch(model, inp, out, "--resume").returncode == 0
    ids = [json.loads(ln)["custom_id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in slow_rows(30))


# ---- BLAS threads --------------------------------------------------------------------------------


def test_threads_are_honoured(model):
    code = (
        "import sys; from tinyllm import LLM; from tinyllm.threads import blas_threads; "
        "LLM(sys.argv[1], threads=int(sys.argv[2])); print(blas_threads())"
    )
    for n in (1, 2):
        p = subprocess.run(
            [sys.executable, "-c", code, str(model), str(n)],
            capture_output=True,
            text=True,
            env=ENV,
            cwd=REPO,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert set(json.loads(p.stdout.strip())) == {n}  # threadpoolctl's own report of OpenBLAS
    p = run_tinyllm(
        "generate", "-m", model, "--backend", "numpy", "-n", "1", "--threads", "1", "hi"
    )
    assert p.returncode == 0 and "1 BLAS thread)" in p.stderr
    bad = run_tinyllm("generate", "-m", model, "--threads", "0", "hi")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
    with pytest.raises(TinyLLMError, match="threads"):
        LLM(str(model), threads=0)


def test_default_threads_leave_out_busy_cores():
    from tinyllm import threads

    assert 1 <= threads.default_threads() <= threads.available_cores()
    assert threads.default_threads() == max(1, threads.available_cores() - threads.busy_cores())


# ---- chat input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tiny_factory, tmp_path_factory):
    return with_chat_template(tiny_factory("llama_gqa"), tmp_path_factory.mktemp("chat"), TEMPLATE)


def spawn_chat(model, tmp_path, *flags):
    pexpect = pytest.importorskip("pexpect")
    env = {**ENV, "TERM": "dumb", "TINYLLM_HISTORY": str(tmp_path / "history")}
    c = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "tinyllm",
            "chat",
            "--model",
            str(model),
            "--backend",
            "numpy",
            "-t",
            "0",
            "-n",
            "3",
            "-v",
            *flags,
        ],
        env=env,
        cwd=str(REPO),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(50, 200),
    )
    c.expect_exact(">>> ")
    return c


@pytest.mark.parametrize(
    "paste",
    [
        "\x1b[200~line one\nline two\nline three\x1b[201~\r",  # bracketed paste
        "line one\rline two\rline three\r",
    ],
)  # a terminal without it
def test_a_pasted_block_is_one_message(chat_model, tmp_path, paste):
    import pexpect

    c = spawn_chat(chat_model, tmp_path)
    c.send(paste)
    c.expect(r"\[prompt (\d+) tokens")
    n = len(
        "<|user|>line one\nline two\nline three<|end|>\n<|assistant|>"
    )  # byte-level: chars = tokens
    assert int(c.match.group(1)) == n
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    assert c.before.count("[prompt") == 0  # one reply only (/stats is not a reply)


def test_a_failing_template_keeps_the_conversation(chat_model, tmp_path):
    import pexpect

    # renders the first turn, fails from the second on
    d = with_chat_template(
        chat_model, tmp_path / "m", "{% if messages|length > 2 %}{{ 1 // 0 }}{% endif %}" + TEMPLATE
    )
    c = spawn_chat(d, tmp_path)
    c.sendline("first")
    c.expect_exact(">>> ")
    c.sendline("second")
    c.expect_exact("error: chat template failed to render: ZeroDivisionError")
    c.expect_exact(">>> ")
    c.sendline("/stats")  # still the first reply's numbers
    c.expect(r"prompt (\d+) tokens")
    assert int(c.match.group(1)) == len("<|user|>first<|end|>\n<|assistant|>")
    c.expect_exact(">>> ")
    c.sendline("/bye")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0


def test_stats_after_ctrl_c_inside_generation(chat_model, monkeypatch):
    """Ctrl-C can land inside the forward pass (not only while the terminal prints): the
    interrupted reply's numbers are still what /stats shows."""
    from tinyllm.chat import ChatSession

    llm = LLM(str(chat_model))
    session = ChatSession(llm, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    real, calls = llm.model.forward, []

    def forward(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # prefill + 4 decode steps, then Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(llm.model, "forward", forward)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for piece in session.send("hello"):
            shown.append(piece)
    session.abort("hello", "".join(shown))
    assert session.last.finish_reason == "interrupted" and len(session.last.token_ids) == 5
    assert "generated 5 tokens" in session.stats() and "finish: interrupted" in session.stats()
