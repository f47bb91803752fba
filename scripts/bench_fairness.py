"""Fairness under a flood (issue #25): client B's short requests, alone and while client A floods
the server with fan-out requests, on loopback.

    python scripts/bench_fairness.py [--model DIR] [--repeats 5] [--a-prompt-tokens 200]
        [--fanout-slots N]

Starts `tinyllm serve` (--backend, default numpy) on 127.0.0.1 with a free port, then
--repeats rounds of:
1. unloaded: B sends --b-requests requests one after another (a short prompt, max_tokens
   --b-tokens, ignore_eos, streamed), and their latencies (first token, end) are taken;
2. loaded: A's --a-clients threads each send, back to back, requests of --a-prompts prompts x
   n=--a-n choices (max_tokens --a-tokens; a short text, or --a-prompt-tokens random token ids
   for a flood of large prompts), so A always has a queue of choices waiting; once the queue
   is full B sends the same requests again.
Each round prints B's median and 90th percentile in both phases, their ratios, A's throughput
and the load average; the summary gives the median over rounds of the median and p90 ratios
(end to end, and to the first token). --repo runs the server from another checkout (e.g. the
code before a change), to compare. Bounded: each flood stops after --seconds, every request
has a timeout. Without --model it builds the tests' tiny random checkpoint (needs torch and
transformers).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp / "tiny", "llama_gqa")


def start(
    repo: Path,
    model: Path | None,
    max_batch: int,
    log,
    backend: str = "numpy",
    fanout: int = 0,
    threads: int = 1,
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "tinyllm",
        "serve",
        *(["-m", str(model)] if model is not None else []),
        "--port",
        "0",
        "--backend",
        backend,
        "--max-batch",
        str(max_batch),
        "--ctx-size",
        "256",
        "--threads",
        str(threads),
        *(["--fanout-slots", str(fanout)] if fanout else []),  # (older checkouts lack it)
    ]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=repo)
    line = proc.stdout.readline()
    m = re.search(r"ready at (http://\S+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r} (log: {log.name})")
    return proc, m.group(1)


def generated(url: str) -> float:
    """The server's generated-token counter (/metrics)."""
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("tinyllm_generation_tokens_total "):
            return float(line.split()[1])
    return float("nan")


def b_latencies(url: str, n: int, tokens: int) -> list[tuple[float, float]]:
    """B's requests one after another, streamed: (time to the first token, to the end)."""
    out = []
    body = {"max_tokens": tokens, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=300) as c:
        for i in range(n):
            t = time.perf_counter()
            first = None
            with c.stream("POST", "/v1/completions", json={**body, "prompt": f"b{i} hi"}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.perf_counter() - t
            out.append((first, time.perf_counter() - t))
    return out


def flood_body(a, rng) -> dict:
    """One of A's requests: --a-prompts prompts x n, each a text, or with --a-prompt-tokens
    that many random token ids (each request different: the prefix cache cannot help)."""
    if a.a_prompt_tokens:
        prompts = [rng.integers(3, 250, a.a_prompt_tokens).tolist() for _ in range(a.a_prompts)]
    else:
        prompts = ["tell me a story"] * a.a_prompts
    return {"prompt": prompts, "n": a.a_n, "max_tokens": a.a_tokens, "ignore_eos": True}


def flooded(url: str, a) -> tuple[list, float, int]:
    """B's latencies while A's threads flood the server; A's generated tokens/s meanwhile and
    the choices A completed."""
    import numpy as np

    stop = [time.monotonic() + a.seconds]
    a_choices = [0]

    def flood(seed):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=600) as c:
            while time.monotonic() < stop[0]:
                if c.post("/v1/completions", json=flood_body(a, rng)).status_code == 200:
                    a_choices[0] += a.a_prompts * a.a_n

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(a.a_clients)]
    t0, g0 = time.monotonic(), generated(url)
    for t in threads:
        t.start()
    time.sleep(2.0)  # A's requests are queued by now
    loaded = b_latencies(url, a.b_requests, a.b_tokens)
    tok_s = (generated(url) - g0) / (time.monotonic() - t0)  # A's and B's tokens
    if stop[0] <= time.monotonic():
        print("  (the flood ran out before B finished: raise --seconds)")
    stop[0] = time.monotonic()  # A stops sending; its requests in flight finish
    for t in threads:
        t.join(600)
    return loaded, tok_s, a_choices[0]


def stat(xs: list[float]) -> tuple[float, float]:
    """Median and 90th percentile (nearest rank)."""
    xs = sorted(xs)
    return statistics.median(xs), xs[max(0, math.ceil(0.9 * len(xs)) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="a model directory, or 'embedded' (SmolLM2-135M) (default: the tiny random model)",
    )
    ap.add_argument("--repo", default=str(ROOT), help="checkout to run the server from")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--backend", default="numpy", help="the server's --backend (numpy, cpu)")
    ap.add_argument("--fanout-slots", type=int, default=0, help="the server's (default: 0, off)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's BLAS/kernel threads (default 1: the load generator shares the cores, "
        "and a BLAS thread that loses its core stalls every matmul: tinyllm/threads.py)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="unloaded + flooded rounds")
    ap.add_argument("--seconds", type=float, default=60, help="longest a round's flood runs")
    ap.add_argument("--a-clients", type=int, default=4)
    ap.add_argument("--a-prompts", type=int, default=8)
    ap.add_argument("--a-n", type=int, default=4)
    ap.add_argument("--a-tokens", type=int, default=16)
    ap.add_argument(
        "--a-prompt-tokens",
        type=int,
        default=0,
        help="A's prompts: this many random token ids each (default: a short text)",
    )
    ap.add_argument("--b-requests", type=int, default=8)
    ap.add_argument("--b-tokens", type=int, default=16)
    a = ap.parse_args()

    rounds, speeds = [], []  # (B alone, B flooded) latencies; generated tokens/s flooded
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            None if a.model == "embedded" else Path(a.model) if a.model else tiny_model(Path(tmp))
        )
        log = open(Path(tmp) / "serve.log", "w+")
        proc, url = start(
            Path(a.repo), model, a.max_batch, log, a.backend, a.fanout_slots, a.threads
        )
        try:
            b_latencies(url, 2, a.b_tokens)  # warm-up
            for r in range(a.repeats):
                alone = b_latencies(url, a.b_requests, a.b_tokens)
                loaded, tok_s, a_done = flooded(url, a)
                rounds.append((alone, loaded))
                speeds.append(tok_s)
                (m0, p0), (m1, p1) = (stat([x[1] for x in xs]) for xs in (alone, loaded))
                f0, f1 = (stat([x[0] for x in xs])[0] for xs in (alone, loaded))
                print(
                    f"round {r}: B unloaded median/p90 {m0 * 1e3:.1f}/{p0 * 1e3:.1f} ms, "
                    f"flooded {m1 * 1e3:.1f}/{p1 * 1e3:.1f} ms: ratio {m1 / m0:.2f}x / "
                    f"{p1 / p0:.2f}x; first token median {f0 * 1e3:.1f} -> {f1 * 1e3:.1f} ms; "
                    f"A {a_done} choices, {tok_s:.0f} tokens/s; load average "
                    f"{os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()

    name = model.name if model is not None else "embedded SmolLM2-135M"
    print(
        f"server: {a.repo}, model {name}, --max-batch {a.max_batch}, --fanout-slots "
        f"{a.fanout_slots}, --threads {a.threads}, {os.cpu_count()} CPUs"
    )
    print(
        f"flood: {a.a_clients} clients x {a.a_prompts} prompts "
        f"({a.a_prompt_tokens or 'a few'} tokens) x n={a.a_n}, max_tokens {a.a_tokens}; "
        f"B: {a.b_requests} requests of max_tokens {a.b_tokens}; {len(rounds)} rounds"
    )
    print(
        "flood throughput (A's and B's tokens/s), median over rounds:",
        f"{statistics.median(speeds):.0f}",
    )
    for what, k in (("latency", 1), ("first token", 0)):
        med = [stat([x[k] for x in lo])[0] / stat([x[k] for x in al])[0] for al, lo in rounds]
        p90 = [stat([x[k] for x in lo])[1] / stat([x[k] for x in al])[1] for al, lo in rounds]
        print(
            f"B {what} flooded/unloaded, over rounds: median ratio {statistics.median(med):.2f}x "
            f"(rounds {min(med):.2f}-{max(med):.2f}), p90 ratio {statistics.median(p90):.2f}x "
            f"(rounds {min(p90):.2f}-{max(p90):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
