"""`tinyllm batch --ray` throughput: one process vs 1 and 2 Ray replicas on the same input,
and (with --transport) the cost of moving chunks with actors vs Ray Data's actor pool.

    python scripts/bench_ray_batch.py [--requests 96] [--max-tokens 32] [--transport]

A random Llama-shaped model (hidden 256, 4 layers, byte vocabulary) made with transformers,
so the run needs no download. All runs share one local cluster (ray.init(num_cpus=2)); each
replica gets the cores Ray gives it (2 for one replica, 1 each for two) less those busy at its
start (threads.py), the single process --threads 1; the ratio of 2 replicas to 1 is the
scaling over processes. Generation time is the summary's (output open
to last line); wall time adds starting the replicas and loading the model in them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_model(d: Path) -> Path:
    import torch
    import transformers
    from conftest import tiny_tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def summary(err: str) -> tuple[float, int, int]:
    """(generation seconds, ok, tokens) from batch's `done:` line."""
    m = re.search(r"done: (\d+) ok.*?; (\d+) tokens generated in ([\d.]+) s", err)
    return float(m.group(3)), int(m.group(1)), int(m.group(2))


def timed(fn) -> tuple[float, float, int, int]:
    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stderr(buf):
        rc = fn()
    wall = time.perf_counter() - t
    assert rc == 0, buf.getvalue()[-2000:]
    gen, ok, tokens = summary(buf.getvalue())
    return wall, gen, ok, tokens


def transport(ray, n: int = 2000, chunk: int = 8):
    """Pure overhead of moving n small items through 2 do-nothing replicas: actors fed chunks
    by the driver (what ray_batch does) vs ray.data map_batches with an actor pool."""
    items = [{"lineno": i, "prompt": list(range(20))} for i in range(n)]

    class Echo:
        def __call__(self, batch):
            return batch

        def generate(self, chunk):
            return chunk

    t = time.perf_counter()
    actors = [ray.remote(Echo).options(num_cpus=1, max_concurrency=2).remote() for _ in range(2)]
    pending, got, it = {}, 0, iter(range(0, n, chunk))
    for a in actors * 2:
        s = next(it, None)
        if s is not None:
            pending[a.generate.remote(items[s : s + chunk])] = a
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        a = pending.pop(ref)
        got += len(ray.get(ref))
        s = next(it, None)
        if s is not None:
            pending[a.generate.remote(items[s : s + chunk])] = a
    t_actors = time.perf_counter() - t
    assert got == n
    for a in actors:
        ray.kill(a)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    ds = ray.data.from_items(items).map_batches(
        Echo, batch_size=chunk, concurrency=2, num_cpus=1, batch_format="pandas"
    )
    got = sum(1 for _ in ds.iter_rows())
    t_data = time.perf_counter() - t
    assert got == n
    return t_actors, t_data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--transport", action="store_true", help="also time actors vs Ray Data")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from tinyllm import ray_batch
    from tinyllm.cli import main as cli_main

    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    model = make_model(tmp / "model")
    rng = np.random.default_rng(0)
    inp = tmp / "in.jsonl"
    inp.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"r{i}",
                    "prompt": [int(t) for t in rng.integers(3, 256, 16 + i % 48)],
                    "max_tokens": a.max_tokens,
                    "ignore_eos": True,
                }
            )
            + "\n"
            for i in range(a.requests)
        )
    )
    flags = ["--max-batch", str(a.max_batch), "--temperature", "0", "--no-progress"]
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    single = timed(
        lambda: cli_main(
            ["batch", "-i", str(inp), "-o", str(tmp / "one.jsonl"), "-m", str(model)]
            + flags
            + ["--threads", "1"]
        )
    )
    rows.append(("1 process (--threads 1)", single))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for n in (1, 2):
        r = timed(
            lambda n=n: ray_batch.batch(
                inp,
                tmp / f"ray{n}.jsonl",
                str(model),
                replicas=n,
                max_batch=a.max_batch,
                temperature=0.0,
            )
        )
        rows.append((f"--ray --replicas {n}", r))
    print(f"{a.requests} requests x {a.max_tokens} tokens, --max-batch {a.max_batch}")
    print(f"{'run':<26} {'wall s':>7} {'gen s':>7} {'req/s':>7} {'tok/s':>8}")
    for name, (wall, gen, ok, tokens) in rows:
        print(f"{name:<26} {wall:7.1f} {gen:7.2f} {ok / gen:7.1f} {tokens / gen:8.0f}")
    g = {name: r[1] for name, r in rows}
    print(
        f"ratios (generation time): ray 1 replica / 1 process = "
        f"{g['1 process (--threads 1)'] / g['--ray --replicas 1']:.2f}x throughput, "
        f"2 replicas / 1 replica = {g['--ray --replicas 1'] / g['--ray --replicas 2']:.2f}x"
    )
    if a.transport:
        t_actors, t_data = transport(ray)
        print(
            f"transport of 2000 items in chunks of 8 through 2 echo replicas: "
            f"actors {t_actors:.2f} s, ray.data map_batches actor pool {t_data:.2f} s"
        )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
