"""`tinyllm batch --ray`: the batch job on a local Ray cluster (ray.init(num_cpus=2), two
replicas of a tiny random model) against the single-process run of batch.py as the reference:
the same result for every id, exactly once, through a replica's os._exit, a SIGKILL of a
replica's worker process, and a killed driver followed by --resume.

The cluster starts once for the module (about 10 s on 2 idle cores); every test starts its own
replicas (a few seconds each: a worker process imports numpy and loads the model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import with_chat_template
from test_batch import CHATML, outcome, read_results, run_cli, write_jsonl

from tinyllm import ray_batch
from tinyllm.batch import record_key
from tinyllm.cli import main as cli_main
from tinyllm.errors import TinyLLMError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # about a minute in all on 2 idle cores (see the report)

REPO = Path(__file__).resolve().parents[1]
N_OK = 48
RNG = np.random.default_rng(23)
ROWS = [
    {
        "id": f"r{i}",
        "prompt": [int(t) for t in RNG.integers(3, 256, 3 + (i * 7) % 29)],
        "max_tokens": 24,
        "ignore_eos": True,
        **({"temperature": 1.0, "seed": 1000 + i} if i % 2 else {}),
    }
    for i in range(N_OK)
] + [
    {"id": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6},
    '{"id": "broken", "prompt": ',  # invalid JSON
    {"prompt": "no id"},
    {"id": "r0", "prompt": "a repeated id"},
    {"id": "typo", "prompt": "x", "max_new_tokens": 3},
    {"id": "long", "prompt": "y" * 200},  # > --ctx-size 128: rejected by the replica
    {"id": "role", "messages": [{"role": "tool", "content": "x"}]},  # the template refuses
]
FLAGS = dict(max_batch=4, max_seq_len=128)
CLI_FLAGS = ["--max-batch", 4, "--ctx-size", 128]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_factory, tmp_path_factory):
    return with_chat_template(
        tiny_factory("llama_gqa"), tmp_path_factory.mktemp("ray_chat"), CHATML
    )


@pytest.fixture(scope="module")
def job(model, tmp_path_factory):
    """(input file, the single-process output of batch.py for it)."""
    d = tmp_path_factory.mktemp("ray_job")
    inp, ref = write_jsonl(d / "in.jsonl", ROWS), d / "ref.jsonl"
    assert run_cli("-i", inp, "-o", ref, "-m", model, *CLI_FLAGS) == 0
    return inp, ref


def results(path: Path) -> dict:
    """resume key (batch.record_key: the id, or the line of a line owning none) -> (outcome,
    fingerprint); asserts that no key appears twice."""
    recs = read_results(path)
    keys = [record_key(r) for r in recs]
    assert len(keys) == len(set(keys)), "a line was written twice"
    return {k: (outcome(r), r["fingerprint"]) for k, r in zip(keys, recs)}


def assert_same(out: Path, ref: Path):
    got, want = results(out), results(ref)
    assert len(want) == len(ROWS)
    assert got == want


def test_two_replicas_equal_the_single_process_run(cluster, model, job, tmp_path, capsys):
    inp, ref = job
    out = tmp_path / "out.jsonl"
    assert ray_batch.batch(inp, out, model, replicas=2, **FLAGS) == 0
    assert_same(out, ref)  # bad lines included: the same error lines, keyed as locally
    errors = {r["error"]["code"] for r in read_results(out) if r["error"]}
    assert errors == {
        "invalid_json",
        "missing_custom_id",
        "duplicate_custom_id",
        "unknown_parameter",
        "context_length_exceeded",
        "invalid_messages",
    }
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("done: 49 ok, 6 failed")

    def models(path: Path) -> set:  # the name result lines carry (batch.served_name)
        return {r["response"]["body"]["model"] for r in read_results(path) if not r["error"]}

    assert models(out) == models(ref) == {model.name}  # a local path: its directory's name
    # --resume over a complete output: nothing to do, nothing written.
    size = out.stat().st_size
    assert ray_batch.batch(inp, out, model, replicas=2, resume=True, **FLAGS) == 0
    assert out.stat().st_size == size


def test_replica_os_exit_loses_and_duplicates_nothing(cluster, model, job, tmp_path, monkeypatch):
    """One replica, which calls os._exit after 6 finished requests (8 in flight): the job can
    only finish on the replica Ray restarts, with the lost chunks sent again."""
    inp, ref = job
    once, pids = tmp_path / "fired", tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(
        ray_batch, "TEST_FAULT", {"exit_after": 6, "once": str(once), "pid_dir": str(pids)}
    )
    out = tmp_path / "out.jsonl"
    assert ray_batch.batch(inp, out, model, replicas=1, **FLAGS) == 0
    assert once.exists()  # the fault fired: the replica died with requests in flight
    assert len(os.listdir(pids)) == 2  # the replica, and the process Ray restarted it in
    assert_same(out, ref)


def test_replica_sigkilled_loses_and_duplicates_nothing(cluster, model, job, tmp_path, monkeypatch):
    inp, ref = job
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr(ray_batch, "TEST_FAULT", {"pid_dir": str(pids)})
    out = tmp_path / "out.jsonl"
    rc: list = []
    t = threading.Thread(
        target=lambda: rc.append(ray_batch.batch(inp, out, model, replicas=2, **FLAGS))
    )
    t.start()
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 10):
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.005)
    victim = int(sorted(os.listdir(pids))[0])
    os.kill(victim, signal.SIGKILL)
    written_at_kill = out.read_bytes().count(b"\n")
    t.join(timeout=180)
    assert rc == [0]
    assert written_at_kill < len(ROWS)  # the kill came mid-run (the other replica, or the
    # killed one once Ray restarted it, ran the lost chunks: assert_same)
    assert_same(out, ref)


def test_killed_driver_then_resume(cluster, model, job, tmp_path):
    """A driver (here a `tinyllm batch --ray ADDRESS` process on the test's cluster) killed
    with SIGKILL mid-run; --resume (in this process) finishes with every id once."""
    inp, ref = job
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "tinyllm", "batch", "-i", inp, "-o", out, "-m", model]
    cmd += [*CLI_FLAGS, "--ray", cluster, "--replicas", 2, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 8):
        assert p.poll() is None, p.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.kill()
    p.communicate()
    n_first = out.read_bytes().count(b"\n")
    assert n_first < len(ROWS)
    assert ray_batch.batch(inp, out, model, replicas=2, resume=True, **FLAGS) == 0
    assert_same(out, ref)


def test_user_errors_are_one_line(cluster, model, job, tmp_path, capsys):
    inp, _ = job
    cases = [
        (["--replicas", 2], "--replicas needs --ray"),
        (["--ray", "--replicas", 3], "the cluster has 2 CPU(s)"),
        (["--ray", "--replicas", 0], "--replicas must be at least 1"),
        # the model fails to load inside the replica: its error, in one line, no output
        (["--ray", "--replicas", 1, "--kv-cache-memory", "1KB"], "could not load the model"),
    ]
    for extra, needle in cases:
        out = tmp_path / "o.jsonl"
        rc = cli_main(
            ["batch", "--no-progress", "-i", str(inp), "-o", str(out), "-m", str(model)]
            + list(map(str, extra))
        )
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and needle in err, err
        assert not out.exists()
    # an address nobody answers at is refused at once (ray.init would retry for minutes)
    with pytest.raises(TinyLLMError, match="cannot reach the Ray head at 127.0.0.1:1"):
        ray_batch.probe("127.0.0.1:1")
    # a Ray run refuses an output holding results without --resume, as locally
    out = tmp_path / "held.jsonl"
    out.write_text(json.dumps({"keep": "me"}) + "\n")
    assert cli_main(["batch", "-i", str(inp), "-o", str(out), "--ray", "-m", str(model)]) == 2
    assert "--resume" in capsys.readouterr().err
