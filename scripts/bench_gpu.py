#!/usr/bin/env python3
"""GPU benchmark: one table, every figure next to the ceiling or reference measured in the same
run on the same GPU (docs/PERF.md). Needs CuPy, torch and transformers; no files, no network: the
Mistral-7B-shaped model gets random bf16 weights built directly on the device.

Rows:
  copy bandwidth            device-to-device copy, bytes read + written (the decode ceiling)
  bf16 GEMM                 8192^3 through our cuBLAS call (the prefill ceiling)
  decode tok/s, batch 1     tinyllm forward per token at context --ctx, vs weights+KV bytes / copy
                            bandwidth (the floor) and vs transformers (MistralForCausalLM, bf16,
                            SDPA, random init, same shape, DynamicCache) decoding the same way
  prefill tok/s             one --prefill-token forward, vs transformers' prefill
  flash attention TFLOP/s   causal, 32 q / 8 kv heads, d=128, n=4096: tinyllm v1/v2 vs torch SDPA
  decode attention GB/s     one token over an 8k / 32k bf16 cache (cache bytes / time) vs copy
                            bandwidth
  int8 / fp8 KV decode      time at 32k vs the bf16 cache (target >= 1.8x faster)
  decode eager / graph      batch 1, 8, 64 at --ctx: tok/s, % of copy bandwidth (weights + KV read
                            per step / step time / copy bandwidth), host time per step (from the
                            step's start until the host blocks on the token ids) and kernel
                            launches per step, eager vs one CUDA graph replay (cuda_graphs.py)
  quantized decode          batch 1 and 8 (--quant-batches) at --ctx, CUDA graphs on: bf16 vs
                            q8_0, q4_0, q4_k weights (--quant-formats; random codes and scales
                            built on the device, embedding bf16, lm_head quantized); tok/s, % of
                            copy bandwidth for the step's bytes, speed-up over bf16 (issue 20's
                            goal: q8_0 >= 1.7x, 4-bit >= 3x at batch 1)

Timing: CUDA events around the region, warm-up first, median of --iters repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def torch_median_ms(fn, iters: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


# ---- the model, built in memory -----------------------------------------------------------------


def mistral_config(n_layers: int):
    from tinyllm.config import ModelConfig

    return ModelConfig(
        arch="mistral",
        vocab_size=32000,
        dim=4096,
        n_layers=n_layers,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        hidden_dim=14336,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        sliding_window=None,
        torch_dtype="bfloat16",
    )


def random_bf16(be, shape, std=0.02):
    """Random normal values as bf16 on the device (truncated from fp32: fine for timing)."""
    cp = be.cp
    u = cp.random.standard_normal(shape, dtype=cp.float32) * np.float32(std)
    return (u.view(cp.uint32) >> 16).astype(cp.uint16).view(be.bf16)


def build_model(be, cfg):
    from tinyllm.model import Transformer
    from tinyllm.weights import LayerWeights, Weights

    d, h = cfg.dim, cfg.hidden_dim
    ones = lambda n: be.from_numpy(np.ones(n, np.float32))  # noqa: E731
    layers = [
        LayerWeights(
            attn_norm=ones(d),
            wq=random_bf16(be, (cfg.q_dim, d)),
            wk=random_bf16(be, (cfg.kv_dim, d)),
            wv=random_bf16(be, (cfg.kv_dim, d)),
            wo=random_bf16(be, (d, cfg.q_dim)),
            ffn_norm=ones(d),
            w1=random_bf16(be, (h, d)),
            w2=random_bf16(be, (d, h)),
            w3=random_bf16(be, (h, d)),
        )
        for _ in range(cfg.n_layers)
    ]
    embed = random_bf16(be, (cfg.vocab_size, d), 1.0)
    lm_head = random_bf16(be, (cfg.vocab_size, d))
    be.mark_logits_weight(lm_head)
    w = Weights(embed, layers, ones(d), lm_head)
    return Transformer(cfg, w, be)


def random_quant(be, fmt: str, shape, logits: bool = False):
    """A quantized weight with random codes and scales (~0.02) built on the device in
    quant.py's layout (cuda_backend.QUANT_PARTS): timing does not depend on the values."""
    from tinyllm.backends.cuda_backend import CudaQuantWeight

    cp = be.cp
    N, K = shape

    def u8(cols):
        return cp.random.randint(0, 256, (N, cols)).astype(cp.uint8)

    def f16(cols, s):
        return (cp.random.standard_normal((N, cols), dtype=cp.float32) * np.float32(s)).astype(
            cp.float16
        )

    parts = {
        "q8_0": lambda: {"qs": u8(K).view(cp.int8), "d": f16(K // 32, 2e-4)},
        "q4_0": lambda: {"qs": u8(K // 2), "d": f16(K // 32, 3e-3)},
        "q4_1": lambda: {"qs": u8(K // 2), "d": f16(K // 32, 3e-3), "m": f16(K // 32, 0.02)},
        "q4_k": lambda: {
            "qs": u8(K // 2),
            "scales": u8(K // 256 * 12),
            "d": f16(K // 256, 1e-4),
            "dmin": f16(K // 256, 1e-4),
        },
        "q6_k": lambda: {
            "ql": u8(K // 2),
            "qh": u8(K // 4),
            "scales": u8(K // 16).view(cp.int8),
            "d": f16(K // 256, 1e-5),
        },
    }[fmt]()
    return CudaQuantWeight(fmt, (N, K), parts, logits=logits)


def build_quant_model(be, cfg, fmt: str):
    """build_model's shape with every linear (lm_head too) in fmt; the embedding stays bf16."""
    from tinyllm.model import Transformer
    from tinyllm.weights import LayerWeights, Weights

    d, h = cfg.dim, cfg.hidden_dim
    ones = lambda n: be.from_numpy(np.ones(n, np.float32))  # noqa: E731
    layers = [
        LayerWeights(
            attn_norm=ones(d),
            wq=random_quant(be, fmt, (cfg.q_dim, d)),
            wk=random_quant(be, fmt, (cfg.kv_dim, d)),
            wv=random_quant(be, fmt, (cfg.kv_dim, d)),
            wo=random_quant(be, fmt, (d, cfg.q_dim)),
            ffn_norm=ones(d),
            w1=random_quant(be, fmt, (h, d)),
            w2=random_quant(be, fmt, (d, h)),
            w3=random_quant(be, fmt, (h, d)),
        )
        for _ in range(cfg.n_layers)
    ]
    embed = random_bf16(be, (cfg.vocab_size, d), 1.0)
    lm_head = random_quant(be, fmt, (cfg.vocab_size, d), logits=True)
    return Transformer(cfg, Weights(embed, layers, ones(d), lm_head), be)


def streamed_bytes(model) -> int:
    """Weight bytes one decode step reads (every linear once; the embedding is gathered)."""

    def nb(*ws):
        return sum(int(w.nbytes) for w in ws)

    total = nb(model.w.lm_head)
    for L in model.w.layers:
        total += nb(L.wqkv) if L.wqkv is not None else nb(L.wq, L.wk, L.wv)
        total += nb(L.w13) if L.w13 is not None else nb(L.w1, L.w3)
        total += nb(L.wo, L.w2)
    return total


def quant_decode_rows(
    be, cfg, ctx: int, steps: int, fmts, batches, bw: float | None, emu_seconds=lambda: 0.0
):
    """Table rows (and figures): decode tok/s with bf16 vs quantized weights, graphs on."""
    from tinyllm.kv_cache import KVCacheSpec

    rows, figs, base = [], {}, {}
    for fmt in ["bf16", *fmts]:
        try:
            model = build_model(be, cfg) if fmt == "bf16" else build_quant_model(be, cfg, fmt)
            wbytes = streamed_bytes(model)
            for B in batches:
                cache = be.alloc_kv(KVCacheSpec.for_model(cfg, "bf16", ctx + steps + 8, B))
                wall, _, _ = measure_decode_steps(
                    be, model, cache, B, ctx, steps, True, emu_seconds
                )
                be.graphs.reset()
                del cache
                tps = B * 1e3 / wall
                base.setdefault(B, tps if fmt == "bf16" else None)
                step_bytes = wbytes + B * cfg.kv_bytes_per_token("bf16") * ctx
                figs[f"decode_{fmt}_b{B}"] = dict(ms=wall, tok_s=tps, weight_bytes=wbytes)
                of_bw = f"{step_bytes / (wall * 1e-3) / bw:.0%} of copy bw, " if bw else ""
                rows.append(
                    (
                        f"decode {fmt} weights, batch {B}, ctx {ctx}",
                        f"{tps:,.1f} tok/s",
                        f"{of_bw}weights {wbytes / 2**30:.2f} GiB",
                        f"{tps / base[B]:.2f}x bf16" if base.get(B) and fmt != "bf16" else "",
                    )
                )
        except Exception as e:  # keep the other rows
            rows.append((f"decode {fmt} weights", "failed", f"{type(e).__name__}: {e}"[:90], ""))
        model = None
        free_all(be)
    return rows, figs


def free_all(be):
    """Return what the last measurement held (its locals are gone) to the device."""
    gc.collect()
    be.cp.get_default_memory_pool().free_all_blocks()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def weight_bytes(cfg) -> int:
    return 2 * (cfg.n_params() - cfg.vocab_size * cfg.dim)  # the embedding is only gathered


# ---- measurements --------------------------------------------------------------------------------


def measure_copy_bandwidth(iters):
    import cupy as cp

    n = 1 << 30
    a, b = cp.empty(n, cp.uint8), cp.empty(n, cp.uint8)
    a.fill(1)
    ms = median_ms(lambda: b.__setitem__(Ellipsis, a), iters)
    return 2 * n / (ms * 1e-3)


def measure_gemm(be, iters):
    n = 8192
    x, w = random_bf16(be, (n, n), 1.0), random_bf16(be, (n, n), 1.0)
    ms = median_ms(lambda: be.linear(x, w), iters)
    return 2 * n**3 / (ms * 1e-3)


def measure_tinyllm_model(be, cfg, ctx, prefill_tokens, decode_steps, iters):
    from tinyllm.backends import Batch
    from tinyllm.kv_cache import KVCacheSpec

    model = build_model(be, cfg)
    spec = KVCacheSpec.for_model(
        cfg, "bf16", max(ctx + decode_steps + 8, prefill_tokens), 1, chunk=prefill_tokens
    )
    cache = be.alloc_kv(spec)
    table = spec.slot_tables([0])  # one sequence owning the whole pool
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, prefill_tokens).astype(np.int32)
    prefill_ms = median_ms(
        lambda: model.forward(toks, Batch(table, [0], [prefill_tokens]), cache),
        max(3, iters // 4),
        1,
    )
    # fill the cache to ctx in chunks, then time single-token steps (forward + device argmax)
    for s in range(0, ctx, prefill_tokens):
        n = min(prefill_tokens, ctx - s)
        model.forward(toks[:n], Batch(table, [s], [n]), cache)
    pos = [ctx]

    def step():
        logits = model.forward(
            np.asarray([pos[0] % cfg.vocab_size], np.int32), Batch(table, [pos[0]], [1]), cache
        )
        be.argmax(logits)  # the host needs the token: one sync per step
        pos[0] += 1

    decode_ms = median_ms(step, decode_steps, 3)
    return prefill_tokens / (prefill_ms * 1e-3), 1e3 / decode_ms  # the caller frees the model


def measure_transformers(cfg, ctx, prefill_tokens, decode_steps, iters):
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.cache_utils import DynamicCache

    hf = MistralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        sliding_window=None,
        attn_implementation="sdpa",
    )
    torch.set_default_dtype(torch.bfloat16)  # random init directly in bf16 on the GPU
    try:
        with torch.device("cuda"):
            model = MistralForCausalLM(hf).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill_tokens), device="cuda")
    with torch.no_grad():
        prefill_ms = torch_median_ms(
            lambda: model(ids, use_cache=False, logits_to_keep=1), max(3, iters // 4), 1
        )
        cache = DynamicCache()
        ctx_ids = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda")
        for s in range(0, ctx, prefill_tokens):
            model(
                ctx_ids[:, s : s + prefill_tokens],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        tok = torch.zeros((1, 1), dtype=torch.long, device="cuda")

        def step():
            nonlocal tok
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.item()  # the host needs the token, as in tinyllm

        decode_ms = torch_median_ms(step, decode_steps, 3)
    return prefill_tokens / (prefill_ms * 1e-3), 1e3 / decode_ms


def attention_setup(be, n_ctx, n_q, kv_dtype, n_heads=32, n_kv=8, hd=128):
    from tinyllm.backends import Batch
    from tinyllm.kv_cache import DEFAULT_BLOCK_SIZE, KVCacheSpec

    ring = -(-n_ctx // DEFAULT_BLOCK_SIZE)
    spec = KVCacheSpec(1, ring, DEFAULT_BLOCK_SIZE, ring, n_kv, hd, kv_dtype, None, n_ctx)
    cache = be.alloc_kv(spec)
    # one sequence over every block of the pool, in shuffled order (paged: blocks need not be
    # adjacent)
    table = np.random.default_rng(0).permutation(ring).astype(np.int32)[None, :]
    k = random_bf16(be, (n_ctx, n_kv, hd), 1.0)
    v = random_bf16(be, (n_ctx, n_kv, hd), 1.0)
    q = random_bf16(be, (n_ctx, n_heads, hd), 1.0)
    # write the whole cache through our kernel (quantizing when asked), zero inv_freq: no rotation
    be.rope_kv_write(
        q, k, v, cache, 0, be.prepare(Batch(table, [0], [n_ctx])), np.zeros(hd // 2, np.float32)
    )
    batch = be.prepare(Batch(table, [n_ctx - n_q], [n_q]))
    return cache, q[:n_q], batch


def measure_flash(be, iters, n=4096):
    import torch
    import torch.nn.functional as F

    flops = 4 * n * n * 128 * 32 / 2  # causal: half of 4 n^2 d per head
    res = {}
    cache, q, batch = attention_setup(be, n, n, "bf16")
    for ver in ("v1", "v2"):
        be.versions["prefill_attention"] = ver
        ms = median_ms(lambda: be.attention(q, cache, 0, batch, 128**-0.5), iters)
        res[ver] = flops / (ms * 1e-3)
    be.versions["prefill_attention"] = "v2"
    tq = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    tk = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16).repeat_interleave(4, dim=1)
    tv = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16).repeat_interleave(4, dim=1)
    ms = torch_median_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True), iters)
    res["torch"] = flops / (ms * 1e-3)
    return res


def measure_decode_attention(be, iters, n_ctx, kv_dtype):
    cache, q, batch = attention_setup(be, n_ctx, 1, kv_dtype)
    spec = cache.spec
    cache_bytes = spec.nbytes()  # one layer, one sequence: all of it is read
    ms = median_ms(lambda: be.attention(q, cache, 0, batch, 128**-0.5), iters)
    return ms, cache_bytes / (ms * 1e-3)


def measure_torch_decode_attention(iters, n_ctx):
    import torch
    import torch.nn.functional as F

    tq = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    tk = torch.randn(1, 8, n_ctx, 128, device="cuda", dtype=torch.bfloat16)
    tv = torch.randn(1, 8, n_ctx, 128, device="cuda", dtype=torch.bfloat16)
    try:
        fn = lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)  # noqa: E731
        fn()
    except TypeError:
        tk, tv = tk.repeat_interleave(4, 1), tv.repeat_interleave(4, 1)
        fn = lambda: F.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
    ms = torch_median_ms(fn, iters)
    return ms, 2 * 8 * n_ctx * 128 * 2 / (ms * 1e-3)


class LaunchCounter:
    """Counts kernel launches (every RawKernel call through cuda_kernels.get, and cuBLAS gemmEx
    calls) while installed; a launch made during a graph capture is a kernel of the graph."""

    def __init__(self):
        from tinyllm.backends import cuda_kernels as ck

        self.ck, self.get, self.n = ck, ck.get, 0

    def __enter__(self):
        from cupy_backends.cuda.libs import cublas

        get = self.get

        def counting_get(*a, **kw):
            k = get(*a, **kw)

            def launch(*la, **lkw):
                self.n += 1
                return k(*la, **lkw)

            return launch

        self.cublas, self.gemm = cublas, cublas.gemmEx

        def counting_gemm(*a):
            self.n += 1
            return self.gemm(*a)

        self.ck.get, cublas.gemmEx = counting_get, counting_gemm
        return self

    def __exit__(self, *exc):
        self.ck.get, self.cublas.gemmEx = self.get, self.gemm


def measure_decode_steps(
    be, model, cache, B: int, ctx: int, steps: int, graph: bool, emu_seconds=lambda: 0.0
):
    """`steps` decode steps of B sequences (sequence b owning blocks b*R .. b*R+R-1 of the
    cache, KVCacheSpec.slot_tables) at positions ctx, ctx+1, ... with
    on-device greedy sampling, as the engine runs them: eager (forward, sampling parameters
    uploaded, sample kernel) or through the backend's CUDA graphs (inputs copied, one replay).
    The first step is a warm-up (and the capture). Returns medians: wall ms per step, host ms
    per step (until the host blocks on the token ids; minus emu_seconds(), the stand-in's
    emulation time, on a CPU) and kernels launched per step (in the graph when graphs are on)."""
    from tinyllm.backends import Batch

    cp = be.cp
    be.graphs.enabled = graph
    params = ([0.0] * B, [0] * B, [1.0] * B, list(range(B)))
    toks = np.zeros(B, np.int32)
    tables = cache.spec.slot_tables(range(B))
    walls, hosts, kernels = [], [], []
    for i in range(steps + 1):
        batch = Batch(tables, [ctx + i] * B, [1] * B)
        with LaunchCounter() as lc:
            cp.cuda.get_current_stream().synchronize()
            t0, e0 = time.perf_counter(), emu_seconds()
            if graph:
                launched = be.graphs.launch(model, toks, batch, cache, *params, [i] * B)
            else:
                logits = model.forward(toks, batch, cache)
                dev = [
                    cp.asarray(np.asarray(v, dt))
                    for v, dt in zip(
                        params + ([i] * B,), (np.float32, np.int32, np.float32, np.uint64, np.int32)
                    )
                ]
                out = cp.empty(B, np.int32)
                be.sample_into(logits, *dev, out)
            t1, e1 = time.perf_counter(), emu_seconds()
            toks = be.graphs.result(launched) if graph else out.get()
            t2, e2 = time.perf_counter(), emu_seconds()
        if i == 0:
            n_kernels = lc.n  # the warm-up step: eager or planned + captured
            continue
        walls.append((t2 - t0 - (e2 - e0)) * 1e3)
        hosts.append((t1 - t0 - (e1 - e0)) * 1e3)
        kernels.append(lc.n)
    if graph:  # replays launch no kernels from Python: count the capture's
        kernels = [n_kernels // 2]  # the first step launched them twice (plan, then capture)
    return statistics.median(walls), statistics.median(hosts), statistics.median(kernels)


def decode_graph_rows(
    be, model, ctx: int, steps: int, batches, bw: float | None, emu_seconds=lambda: 0.0
):
    """Table rows (and figures) of eager vs graph decode at each batch size."""
    from tinyllm.kv_cache import KVCacheSpec

    cfg = model.cfg
    rows, figs = [], {}
    for B in batches:
        cache = be.alloc_kv(KVCacheSpec.for_model(cfg, "bf16", ctx + steps + 8, B))
        step_bytes = weight_bytes(cfg) + B * cfg.kv_bytes_per_token("bf16") * ctx
        res = {}
        for graph in (False, True):
            try:
                res[graph] = measure_decode_steps(
                    be, model, cache, B, ctx, steps, graph, emu_seconds
                )
            except Exception as e:  # keep the other rows
                rows.append(
                    (
                        f"decode {'graph' if graph else 'eager'}, batch {B}",
                        "failed",
                        f"{type(e).__name__}: {e}"[:90],
                        "",
                    )
                )
        for graph, (wall, host, n) in res.items():
            name = "graph" if graph else "eager"
            figs[f"decode_{name}_b{B}"] = dict(
                ms=wall, host_ms=host, kernels=n, tok_s=B * 1e3 / wall
            )
            of_bw = f", {step_bytes / (wall * 1e-3) / bw:.0%} of copy bw" if bw else ""
            rows.append(
                (
                    f"decode {name}, batch {B}, ctx {ctx}",
                    f"{B * 1e3 / wall:,.1f} tok/s",
                    f"host {host:.2f} ms/step, {n:.0f} kernels/step{of_bw}",
                    f"{res[False][0] / wall:.2f}x eager" if graph and False in res else "",
                )
            )
        be.graphs.reset()
        del cache
    return rows, figs


# ---- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--layers", type=int, default=32, help="Mistral-7B has 32; fewer for a quick run"
    )
    ap.add_argument("--ctx", type=int, default=512, help="context before the timed decode steps")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument(
        "--graph-batches", default="1,8,64", help="batch sizes of the eager vs graph decode rows"
    )
    ap.add_argument(
        "--quant-formats", default="q8_0,q4_0,q4_k", help="weight formats of the quantized rows"
    )
    ap.add_argument("--quant-batches", default="1,8", help="batch sizes of the quantized rows")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    from tinyllm.backends.cuda_backend import CudaBackend

    be = CudaBackend()
    cfg = mistral_config(args.layers)
    rows: list[tuple[str, str, str, str]] = []
    figs: dict = {"gpu": be.gpu_name, "layers": args.layers, "ctx": args.ctx}
    t0 = time.time()

    bw = measure_copy_bandwidth(args.iters)
    gemm = measure_gemm(be, args.iters)
    figs.update(copy_bw=bw, gemm_flops=gemm)
    rows.append(("copy bandwidth (read+write)", f"{bw / 1e9:,.0f} GB/s", "", ""))
    rows.append(("bf16 GEMM 8192^3 (cuBLAS)", f"{gemm / 1e12:,.0f} TFLOP/s", "", ""))

    pre, dec = measure_tinyllm_model(
        be, cfg, args.ctx, args.prefill_tokens, args.decode_steps, args.iters
    )
    free_all(be)  # room for transformers' copy
    kv_step = cfg.kv_bytes_per_token("bf16") * args.ctx
    floor_tps = bw / (weight_bytes(cfg) + kv_step)
    prefill_floor = gemm / (2 * cfg.n_params())
    figs.update(decode_tps=dec, prefill_tps=pre, decode_floor_tps=floor_tps)
    hf_pre = hf_dec = None
    if not args.skip_transformers:
        try:
            hf_pre, hf_dec = measure_transformers(
                cfg, args.ctx, args.prefill_tokens, args.decode_steps, args.iters
            )
            figs.update(hf_decode_tps=hf_dec, hf_prefill_tps=hf_pre)
        except Exception as e:  # keep the rest of the table
            print(f"transformers measurement failed: {type(e).__name__}: {e}", file=sys.stderr)
        free_all(be)
    rows.append(
        (
            f"decode tok/s, batch 1, ctx {args.ctx}",
            f"{dec:,.1f}",
            f"floor {floor_tps:,.0f} ({dec / floor_tps:.0%}); transformers "
            f"{hf_dec or float('nan'):,.1f}",
            f"{dec / hf_dec:.2f}x HF" if hf_dec else "",
        )
    )
    rows.append(
        (
            f"prefill tok/s, {args.prefill_tokens} tokens",
            f"{pre:,.0f}",
            f"GEMM bound {prefill_floor:,.0f} ({pre / prefill_floor:.0%}); transformers "
            f"{hf_pre or float('nan'):,.0f}",
            f"{pre / hf_pre:.2f}x HF" if hf_pre else "",
        )
    )

    fl = measure_flash(be, args.iters)
    figs.update(flash=fl)
    rows.append(
        (
            "flash attn causal n=4096 d=128 (v2)",
            f"{fl['v2'] / 1e12:,.0f} TFLOP/s",
            f"v1 {fl['v1'] / 1e12:,.0f}; torch SDPA {fl['torch'] / 1e12:,.0f} TFLOP/s",
            f"{fl['v2'] / fl['torch']:.2f}x SDPA",
        )
    )

    dec_ms = {}
    for n_ctx in (8192, 32768):
        ms, gbs = measure_decode_attention(be, args.iters, n_ctx, "bf16")
        tms, tgbs = measure_torch_decode_attention(args.iters, n_ctx)
        dec_ms[("bf16", n_ctx)] = ms
        figs[f"decode_attn_{n_ctx}"] = dict(ms=ms, gbs=gbs, torch_ms=tms, torch_gbs=tgbs)
        rows.append(
            (
                f"decode attention bf16 ctx {n_ctx}",
                f"{gbs / 1e9:,.0f} GB/s ({ms * 1e3:,.0f} us)",
                f"copy {bw / 1e9:,.0f} GB/s ({gbs / bw:.0%}); torch SDPA {tgbs / 1e9:,.0f} GB/s",
                f"{tms / ms:.2f}x SDPA",
            )
        )
    for kv in ("int8", "fp8"):
        ms, gbs = measure_decode_attention(be, args.iters, 32768, kv)
        figs[f"decode_attn_32768_{kv}"] = dict(ms=ms, gbs=gbs)
        rows.append(
            (
                f"decode attention {kv} ctx 32768",
                f"{ms * 1e3:,.0f} us ({gbs / 1e9:,.0f} GB/s)",
                f"bf16 {dec_ms[('bf16', 32768)] * 1e3:,.0f} us",
                f"{dec_ms[('bf16', 32768)] / ms:.2f}x faster",
            )
        )

    free_all(be)
    try:
        g_rows, g_figs = decode_graph_rows(
            be,
            build_model(be, cfg),
            args.ctx,
            args.decode_steps,
            [int(b) for b in args.graph_batches.split(",")],
            bw,
        )
        rows += g_rows
        figs.update(g_figs)
    except Exception as e:  # keep the rest of the table
        print(f"eager vs graph decode measurement failed: {type(e).__name__}: {e}", file=sys.stderr)

    free_all(be)
    if args.quant_formats:
        q_rows, q_figs = quant_decode_rows(
            be,
            cfg,
            args.ctx,
            args.decode_steps,
            args.quant_formats.split(","),
            [int(b) for b in args.quant_batches.split(",")],
            bw,
        )
        rows += q_rows
        figs.update(q_figs)

    w = max(len(r[0]) for r in rows)
    print(
        f"\ntinyllm GPU benchmark on {be.gpu_name}, Mistral-7B shape ({args.layers} layers), "
        "random bf16 weights "
        f"({time.time() - t0:.0f} s)"
    )
    print(f"{'what':<{w}}  {'tinyllm':>24}  {'reference (same run)':<62} ratio")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>24}  {r[2]:<62} {r[3]}")
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
