"""BLAS threads vs decode speed, idle and beside a busy process (issue 15, item 7).

    python scripts/bench_threads.py [--model DIR] [--tokens 32] [--repeats 2]

Each configuration runs in a fresh process (BLAS thread pools are per process): SmolLM2-135M
(the embedded default unless --model), greedy decode of --tokens tokens after a 16-token
prompt, numpy backend. "BLAS default" leaves OpenBLAS at its own thread count (one per core);
"tinyllm default" is tinyllm.threads.default_threads(). "contended" starts one busy Python
loop (one core's worth of work) before the run and stops it after. Prints a markdown table
with the load average seen at the start of each run (the machine is shared: say so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import tinyllm.threads as th
mode = sys.argv[3]
if mode == "blas":                     # leave OpenBLAS at its own default
    th.set_threads = lambda n: th.blas_threads()[0]
from tinyllm import LLM, SamplingParams
llm = LLM(sys.argv[2] or None, threads=None if mode in ("blas", "default") else int(mode))
ids = list(range(100, 116))
llm.generate([ids], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))     # warm-up
p = SamplingParams(max_tokens=int(sys.argv[4]), temperature=0, ignore_eos=True)
c = llm.generate([ids], p)[0]
print(json.dumps({"threads": th.blas_threads()[0], "tok_s": c.decode_tokens_per_s}))
"""


def run(model: str, mode: str, tokens: int) -> dict:
    load = open("/proc/loadavg").read().split()[0]
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), model, mode, str(tokens)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if p.returncode:
        raise SystemExit(p.stderr)
    return {**json.loads(p.stdout.splitlines()[-1]), "load": load}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for condition in ("idle", "contended"):
        busy = (
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            if condition == "contended"
            else None
        )
        try:
            time.sleep(1 if busy else 0)
            for mode, label in (
                ("blas", "BLAS default"),
                ("default", "tinyllm default"),
                ("1", "1"),
                ("2", "2"),
            ):
                runs = [run(a.model, mode, a.tokens) for _ in range(a.repeats)]
                rows.append(
                    (
                        condition,
                        label,
                        runs[0]["threads"],
                        [r["tok_s"] for r in runs],
                        [r["load"] for r in runs],
                    )
                )
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            if busy:
                busy.kill()
                busy.wait()
    print(f"cores: {os.cpu_count()}, tokens: {a.tokens}, repeats: {a.repeats}\n")
    print(
        "| condition | threads setting | BLAS threads | decode tok/s (each run) | 1-min load at "
        "start |"
    )
    print("|---|---|---|---|---|")
    for cond, label, n, toks, loads in rows:
        print(
            f"| {cond} | {label} | {n} | {', '.join(f'{t:.1f}' for t in toks)} | "
            f"{', '.join(loads)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
