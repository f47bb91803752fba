"""Fairness under a flood (issue #25): client B's short requests, alone and while client A floods
the server with fan-out requests, on loopback.

    python scripts/bench_fairness.py [--model DIR] [--seconds 20] [--repo PATH]

Starts `tinyllm serve` (numpy backend) on 127.0.0.1 with a free port, then:
1. unloaded: B sends --b-requests requests one after another (a short prompt, max_tokens
   --b-tokens, ignore_eos), and their latencies are taken;
2. loaded: A's --a-clients threads each send, back to back, requests of --a-prompts prompts x
   n=--a-n choices (max_tokens --a-tokens), so A always has a queue of choices waiting; once
   the queue is full B sends the same requests again.
It prints the median and 90th percentile of B's latency in both phases and their ratio, and A's
throughput. --repo runs the server from another checkout (e.g. the code before the fair queue),
to compare. Bounded: the flood stops after --seconds, every request has a timeout. Without
--model it builds the tests' tiny random checkpoint (needs torch and transformers).
"""

from __future__ import annotations

import argparse
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


def start(repo: Path, model: Path | None, max_batch: int, log) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "tinyllm",
        "serve",
        *(["-m", str(model)] if model is not None else []),
        "--port",
        "0",
        "--backend",
        "numpy",
        "--max-batch",
        str(max_batch),
        "--ctx-size",
        "256",
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


def b_latencies(url: str, n: int, tokens: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=300) as c:
        for i in range(n):
            t = time.perf_counter()
            r = c.post(
                "/v1/completions",
                json={"prompt": f"b{i} hi", "max_tokens": tokens, "ignore_eos": True},
            )
            r.raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default=None,
        help="a model directory, or 'embedded' (SmolLM2-135M) (default: the tiny random model)",
    )
    ap.add_argument("--repo", default=str(ROOT), help="checkout to run the server from")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60, help="longest the flood runs")
    ap.add_argument("--a-clients", type=int, default=4)
    ap.add_argument("--a-prompts", type=int, default=8)
    ap.add_argument("--a-n", type=int, default=4)
    ap.add_argument("--a-tokens", type=int, default=16)
    ap.add_argument("--b-requests", type=int, default=8)
    ap.add_argument("--b-tokens", type=int, default=16)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = (
            None if a.model == "embedded" else Path(a.model) if a.model else tiny_model(Path(tmp))
        )
        log = open(Path(tmp) / "serve.log", "w+")
        proc, url = start(Path(a.repo), model, a.max_batch, log)
        try:
            b_latencies(url, 2, a.b_tokens)  # warm-up
            alone = b_latencies(url, a.b_requests, a.b_tokens)

            stop = time.monotonic() + a.seconds
            a_choices = [0]

            def flood():
                body = {
                    "prompt": ["tell me a story"] * a.a_prompts,
                    "n": a.a_n,
                    "max_tokens": a.a_tokens,
                    "ignore_eos": True,
                }
                with httpx.Client(base_url=url, timeout=600) as c:
                    while time.monotonic() < stop:
                        if c.post("/v1/completions", json=body).status_code == 200:
                            a_choices[0] += a.a_prompts * a.a_n

            threads = [threading.Thread(target=flood, daemon=True) for _ in range(a.a_clients)]
            t0, g0 = time.monotonic(), generated(url)
            for t in threads:
                t.start()
            time.sleep(2.0)  # A's requests are queued by now
            loaded = b_latencies(url, a.b_requests, a.b_tokens)
            tok_s = (generated(url) - g0) / (time.monotonic() - t0)  # A's and B's tokens
            flood_left = stop - time.monotonic()
            stop = time.monotonic()  # A stops sending; its requests in flight finish
            for t in threads:
                t.join(600)
            a_s = time.monotonic() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()

    def stat(xs):
        return statistics.median(xs), sorted(xs)[max(0, int(0.9 * len(xs)) - 1)]

    (m0, p0), (m1, p1) = stat(alone), stat(loaded)
    name = model.name if model is not None else "embedded SmolLM2-135M"
    print(f"server: {a.repo}, model {name}, --max-batch {a.max_batch}")
    print(
        f"flood: {a.a_clients} clients x {a.a_prompts} prompts x n={a.a_n}, "
        f"max_tokens {a.a_tokens}: {a_choices[0]} choices in {a_s:.1f} s; "
        f"{tok_s:.0f} generated tokens/s while B ran"
        + (" (the flood ran out before B finished)" if flood_left <= 0 else "")
    )
    print(f"B ({a.b_requests} requests, max_tokens {a.b_tokens}):")
    print(f"  unloaded  median {m0 * 1e3:8.1f} ms  p90 {p0 * 1e3:8.1f} ms")
    print(f"  flooded   median {m1 * 1e3:8.1f} ms  p90 {p1 * 1e3:8.1f} ms")
    print(f"  ratio     median {m1 / m0:8.2f}x    p90 {p1 / p0:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
