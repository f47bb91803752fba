#!/usr/bin/env python3
"""Kernel performance counters without a GPU: one decode step and one prefill chunk of a
Mistral-7B-shaped layer on the CPU executor's tracing build (tests/cudacpu/tracer.py), with
Nsight-style counters (tests/cudacpu/counters.py), sm_90 occupancy from ptxas and a stated
roofline model. Prints a table per kernel and the predicted batch-1 decode tok/s of the whole
model as a % of the bandwidth roofline. All figures are PREDICTED, not measured.

Shapes (Mistral-7B v0.1): dim 4096, 32 query heads, 8 kv heads, head_dim 128, MLP 14336, vocab
32000, 32 layers, sliding window 4096, paged cache of 16-position blocks (block table in a
shuffled order, as a long-running pool has it). Decode: one sequence at --ctx positions (its
window full by default), the launches cuda_backend.py makes for one token (fused wqkv and
w13 GEMVs, split-K decode attention, ...); prefill: one --chunk-token chunk from position 0
(the linears are cuBLAS there, not ours: not profiled).

Sampling (how the big launches stay fast on a CPU): a launch runs only about one block in s
(s = ceil(blocks / --max-blocks), chosen by a hash of the block index, so spread over the whole
grid: early and late causal prefill tiles alike); counts are scaled by blocks / blocks run, a
buffer's DRAM bytes by the same ratio but never beyond the buffer (tests/cudacpu/counters.py).
GEMV blocks are 8 output rows of the full matrix (the sampled rows are 8-row slabs of it).

Model (counters.predict_us): t = max(DRAM bytes / bandwidth, mma FLOPs / peak) * q + launch,
q = ceil(CTAs / 132) * 132 / CTAs, launch cost 0 inside a CUDA graph (decode) and 3 us
eagerly (prefill). What it ignores: latency hiding with too few bytes in flight per SM, L2
misses beyond compulsory ones (and L2 hits of data the ideal counts), imbalance of work
between CTAs and tail effects within a wave, clocks and power, cuBLAS.

    python scripts/kernel_profile.py                 # bf16 + every KV dtype, the full shape
    python scripts/kernel_profile.py --kv bf16 --json out.json
    python scripts/kernel_profile.py --small         # a reduced shape (CI's smoke run)
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "cudacpu"))
sys.path.insert(0, str(ROOT / "scripts"))

import counters  # noqa: E402
import tracer  # noqa: E402

from tinyllm.backends import cuda_backend as cb  # noqa: E402
from tinyllm.backends import cuda_kernels as ck  # noqa: E402

KV_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "int8": 1, "fp8": 1}


@dataclass
class Shape:
    dim: int = 4096
    n_heads: int = 32
    n_kv: int = 8
    hd: int = 128
    hidden: int = 14336
    vocab: int = 32000
    layers: int = 32
    window: int = 4096
    block_size: int = 16


SMALL = Shape(dim=512, n_heads=8, n_kv=2, hd=64, hidden=1024, vocab=2048, layers=2, window=0)


@dataclass
class Launch:
    label: str  # the row's name
    file: str
    kernel: str
    defines: dict
    grid: tuple
    block: int
    smem: int
    args: list  # ctypes values
    arrays: list  # every array the pointers point into
    ideal: float  # bytes the operation must move (inputs read once, outputs written once)
    per_step: int  # launches of this kind per decode step / prefill chunk (layers)
    max_blocks: int = 64
    code: str | None = None  # another source than cuda/<file> (tests plant inefficiencies)


def aligned(n_bytes: int) -> np.ndarray:
    """Zeroed bytes at a 256-byte aligned address (as cudaMalloc returns); pages untouched
    stay unallocated, so full-size weights cost only the rows a sampled launch reads."""
    raw = np.zeros(int(n_bytes) + 256, np.uint8)
    off = (-raw.__array_interface__["data"][0]) % 256
    return raw[off : off + int(n_bytes)]


def address(a) -> int:
    """A host array's address, or a CuPy array's device pointer (scripts/kernel_calibrate.py
    builds the same launches on a GPU)."""
    return a.__array_interface__["data"][0] if isinstance(a, np.ndarray) else a.data.ptr


def P(a) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if a is None else address(a))


def put(dst, values) -> None:
    """dst[:] = values, for host (and, in kernel_calibrate.py, device) arrays."""
    dst[:] = np.asarray(values, dst.dtype)


I32, F32, I64 = ctypes.c_int, ctypes.c_float, ctypes.c_longlong


class Builder:
    """Makes the launches of one step, with their buffers."""

    def __init__(self, s: Shape, kv: str, ctx: int, max_blocks: int):
        self.s, self.kv, self.ctx, self.max_blocks = s, kv, ctx, max_blocks
        self.kind = ck.KV_KINDS[kv]
        self.q8 = kv in ("int8", "fp8")

    def cache(self, positions: int):
        """Paged cache of one layer holding `positions` positions, blocks in shuffled order."""
        s, bs = self.s, self.s.block_size
        ring = -(-(positions + 1) // bs)
        nb = ring + 1
        rng = np.random.default_rng(0)
        table = rng.permutation(nb)[:ring].astype(np.int32)
        tables = aligned(ring * 4).view(np.int32)
        put(tables, table)
        e = KV_BYTES[self.kv]
        c = {
            "ring": ring,
            "tables": tables,
            "k": aligned(nb * bs * s.n_kv * s.hd * e),
            "v": aligned(nb * bs * s.n_kv * s.hd * e),
        }
        if self.q8:
            c["ks"] = aligned(nb * s.n_kv * s.hd * 2)
            c["kz"] = aligned(nb * s.n_kv * s.hd * 2)
            c["vs"] = aligned(nb * bs * s.n_kv * 4)
            c["k_open"] = aligned(bs * s.n_kv * s.hd * 4)
            c["opens"] = aligned(4).view(np.int32)
        return c

    def kv_ideal(self, positions: int) -> float:
        """Bytes of `positions` cached positions of one layer (K and V, plus int8/fp8 metadata:
        per-channel key scale + offset per block, a value scale per vector)."""
        s = self.s
        b = positions * s.n_kv * s.hd * 2 * KV_BYTES[self.kv]
        if self.q8:
            b += -(-positions // s.block_size) * s.n_kv * s.hd * 4 + positions * s.n_kv * 4
        return b

    def gemv(self, label, N, K, per_step, f32=False):
        x = aligned(K * 2)
        w = aligned(N * K * 2)
        y = aligned(N * (4 if f32 else 2))
        warps = ck.TILES["GEMV_WARPS"]
        return Launch(
            label,
            "matmul.cu",
            f"gemv_bf16_m1_{'f32' if f32 else 'bf16'}_v1",
            {},
            (-(-N // warps),),
            32 * warps,
            0,
            [P(x), I32(K), P(w), P(None), P(y), I32(N), I32(N), I32(K)],
            [x, w, y],
            N * K * 2 + K * 2 + y.nbytes,
            per_step,
            self.max_blocks,
        )

    def rmsnorm(self, label, M, add, per_step):
        d = self.s.dim
        x, dd, w, s_, o = (aligned(M * d * 2) for _ in range(5))
        threads = ck.TILES["RMS_THREADS"]
        if add:
            args = [P(x), I32(d), P(dd), I32(d), P(w[: d * 2]), P(s_), P(o), I32(d), F32(1e-5)]
            arrays, ideal = [x, dd, w, s_, o], M * d * 2 * 4 + d * 2
        else:
            args = [P(x), I32(d), P(w[: d * 2]), P(o), I32(d), F32(1e-5)]
            arrays, ideal = [x, w, o], M * d * 2 * 2 + d * 2
        kern = "add_rms_norm_bf16_v2" if add else "rms_norm_bf16_v2"
        return Launch(
            label,
            "rmsnorm.cu",
            kern,
            {},
            (M,),
            threads,
            0,
            args,
            arrays,
            ideal,
            per_step,
            self.max_blocks,
        )

    def swiglu(self, M, per_step, n_sms=132):
        H = self.s.hidden
        g, u, o = aligned(M * H * 2), aligned(M * H * 2), aligned(M * H * 2)
        threads = ck.TILES["SWIGLU_THREADS"]
        blocks = max(1, min(-(-(M * H // 8) // threads), 8 * n_sms * 4))
        return Launch(
            "silu_mul",
            "swiglu.cu",
            "silu_mul_bf16_v2",
            {},
            (blocks,),
            threads,
            0,
            [P(g), I32(H), P(u), I32(H), P(o), I32(M), I32(H)],
            [g, u, o],
            3 * M * H * 2,
            per_step,
            self.max_blocks,
        )

    def embed(self, M):
        d = self.s.dim
        table = aligned(self.s.vocab * d * 2)
        idx = aligned(M * 4).view(np.int32)
        put(idx, np.arange(M) * 7 % self.s.vocab)
        out = aligned(M * d * 2)
        row_vecs = d * 2 // 16
        threads = ck.TILES["GATHER_THREADS"]
        return Launch(
            "embedding",
            "embedding.cu",
            "gather_rows_v16_v1",
            {},
            (M, -(-row_vecs // threads)),
            threads,
            0,
            [P(table), I64(row_vecs), I32(self.s.vocab), P(idx), P(out), I32(row_vecs)],
            [table, idx, out],
            2 * M * d * 2 + M * 4,
            1,
            self.max_blocks,
        )

    def argmax(self):
        V = self.s.vocab
        lg, out = aligned(V * 4), aligned(4)
        return Launch(
            "argmax",
            "sample.cu",
            "argmax_f32_v1",
            {},
            (1,),
            ck.TILES["SAMPLE_THREADS"],
            0,
            [P(lg), I32(V), I32(V), P(out)],
            [lg, out],
            V * 4 + 4,
            1,
        )

    def rope_kv(self, T, start, c, per_step):
        s = self.s
        ldq = (s.n_heads + 2 * s.n_kv) * s.hd  # q, k, v: column views of the fused qkv output
        qkv = aligned(T * ldq * 2)
        q, k, v = qkv, qkv[s.n_heads * s.hd * 2 :], qkv[(s.n_heads + s.n_kv) * s.hd * 2 :]
        half = s.hd // 2
        cos, sin = aligned((start + T) * half * 4), aligned((start + T) * half * 4)
        pos = aligned(T * 4).view(np.int32)
        put(pos, np.arange(start, start + T))
        seq = aligned(T * 4)
        kr = aligned(T * s.n_kv * s.hd * 4) if self.q8 else None
        warps = ck.TILES["ROPE_WARPS"]
        args = [P(q), I32(ldq), P(k), I32(ldq), P(v), I32(ldq), P(cos), P(sin), P(pos), P(seq)]
        args += [P(c["tables"]), P(c["k"]), P(c["v"]), P(c.get("vs")), P(kr)]
        args += [I32(c["ring"]), I32(s.block_size), I32(s.n_heads), I32(s.n_kv), I32(s.hd)]
        e = KV_BYTES[self.kv]
        # q read + written, k and v read, rotated k written (fp32 for int8/fp8, to kv_close),
        # v written to the cache (+ its scale), cos/sin rows
        ideal = T * s.n_heads * s.hd * 4 + T * s.n_kv * s.hd * 4 + T * s.n_kv * s.hd * e
        ideal += T * s.n_kv * s.hd * (4 if self.q8 else e) + T * s.hd * 4
        ideal += T * s.n_kv * 4 if self.q8 else 0
        arrays = [qkv, cos, sin, pos, seq, c["tables"], c["k"], c["v"]]
        arrays += [a for a in (c.get("vs"), kr) if a is not None]
        launch = Launch(
            "rope_kv_write",
            "rope_kv.cu",
            "rope_kv_write_v1",
            {"KV_KIND": self.kind},
            (T, -(-(s.n_heads + 2 * s.n_kv) // warps)),
            32 * warps,
            0,
            args,
            arrays,
            ideal,
            per_step,
            self.max_blocks,
        )
        if not self.q8:
            return [launch]
        meta = aligned(4 * 4).view(np.int32)  # starts, lens, cu_lens, opens (one sequence)
        put(meta, [start, T, 0, 0])
        close = Launch(
            "kv_close",
            "kv_close.cu",
            "kv_close_v1",
            {"KV_KIND": self.kind},
            (1, s.n_kv),
            ck.TILES["CLOSE_THREADS"],
            0,
            [P(kr), P(meta[0:]), P(meta[1:]), P(meta[2:]), P(meta[3:]), P(c["tables"])]
            + [I32(c["ring"]), I32(s.block_size), P(c["k_open"]), P(c["k"]), P(c["ks"])]
            + [P(c["kz"]), I32(s.n_kv), I32(s.hd)],
            [kr, meta, c["tables"], c["k_open"], c["k"], c["ks"], c["kz"]],
            # rotated keys read; closed blocks written as codes + scale/offset, the rest to the
            # open row (fp32)
            T * s.n_kv * s.hd * 4
            + (T // s.block_size) * s.block_size * s.n_kv * s.hd * e
            + (T // s.block_size) * s.n_kv * s.hd * 4
            + (T % s.block_size or 0) * s.n_kv * s.hd * 4,
            per_step,
            self.max_blocks,
        )
        return [launch, close]

    def kmeta(self, c):
        return [P(c.get(k)) for k in ("ks", "kz", "vs", "k_open", "opens")]

    def kmeta_arrays(self, c):
        return [c[k] for k in ("ks", "kz", "vs", "k_open", "opens") if k in c]

    def decode_attention(self, c, per_step, n_sms=132):
        s = self.s
        ctx = self.ctx
        ldq = (s.n_heads + 2 * s.n_kv) * s.hd
        q = aligned(ldq * 2)
        lo, hi = cb.visible_range(ctx - 1, 1, c["ring"] * s.block_size, s.window or None)
        rep, chunks = cb.decode_rep(s.n_heads // s.n_kv)
        split_len, n_splits = cb.decode_splits([hi - lo + 1], s.n_kv * chunks, n_sms)
        pm = aligned(n_splits * s.n_heads * 4)
        pl = aligned(n_splits * s.n_heads * 4)
        po = aligned(n_splits * s.n_heads * s.hd * 4)
        meta = aligned(3 * 4).view(np.int32)  # dec_seqs, starts, cu_lens
        put(meta, [0, ctx - 1, 0])
        HD = cb.head_dim_tile(s.hd)
        sl2 = F32(1 / math.sqrt(s.hd) * math.log2(math.e))
        args = [P(q), I32(ldq), P(c["k"]), P(c["v"]), *self.kmeta(c), P(pm), P(pl), P(po)]
        args += [P(meta[0:]), P(c["tables"]), P(meta[1:]), P(meta[2:]), I32(1), I32(c["ring"])]
        args += [I32(s.block_size), I32(s.n_heads), I32(s.n_kv), I32(s.hd), I32(s.window)]
        args += [sl2, I32(split_len)]
        arrays = [q, c["k"], c["v"], *self.kmeta_arrays(c), pm, pl, po, meta, c["tables"]]
        split = Launch(
            f"decode_split r{rep}",
            "attention_decode.cu",
            f"decode_split_hd{HD}_r{rep}_v1",
            {"KV_KIND": self.kind},
            (n_splits, 1, s.n_kv * chunks),
            32 * ck.TILES["DEC_WARPS"],
            0,
            args,
            arrays,
            self.kv_ideal(hi - lo + 1) + s.n_heads * s.hd * 2,
            per_step,
            self.max_blocks,
        )
        out = aligned(s.n_heads * s.hd * 2)
        red = Launch(
            "decode_reduce",
            "attention_decode.cu",
            "decode_reduce_v1",
            {"KV_KIND": self.kind},
            (1, s.n_heads),
            ck.TILES["DEC_RED_THREADS"],
            0,
            [P(pm), P(pl), P(po), P(meta[0:]), P(meta[2:]), P(out), I32(s.n_heads * s.hd)]
            + [I32(n_splits), I32(1), I32(s.n_heads), I32(s.hd)],
            [pm, pl, po, meta, out],
            s.n_heads * s.hd * 2,  # the attention output; the partials are the split's cost
            per_step,
            self.max_blocks,
        )
        return [split, red]

    def prefill_attention(self, T, c, per_step):
        s = self.s
        n_rep = s.n_heads // s.n_kv
        ldq = (s.n_heads + 2 * s.n_kv) * s.hd
        q = aligned(T * ldq * 2)
        out = aligned(T * s.n_heads * s.hd * 2)
        ts, tr = cb.prefill_tiles(np.array([T]), n_rep, ck.FA2_BM)
        tiles = aligned(2 * len(ts) * 4).view(np.int32)
        put(tiles, np.concatenate([ts, tr]))
        meta = aligned(3 * 4).view(np.int32)  # starts, lens, cu_lens
        put(meta, [0, T, 0])
        HD = cb.head_dim_tile(s.hd)
        smem = ck.prefill_v2_smem(HD)
        sl2 = F32(1 / math.sqrt(s.hd) * math.log2(math.e))
        args = [P(q), I32(ldq), P(c["k"]), P(c["v"]), *self.kmeta(c), P(out)]
        args += [I32(s.n_heads * s.hd), P(tiles[: len(ts)]), P(tiles[len(ts) :])]
        args += [P(c["tables"]), P(meta[0:]), P(meta[1:]), P(meta[2:]), I32(c["ring"])]
        args += [I32(s.block_size), I32(s.n_heads), I32(s.n_kv), I32(s.hd), I32(s.window)]
        args += [sl2]
        arrays = [q, c["k"], c["v"], *self.kmeta_arrays(c), out, tiles, meta, c["tables"]]
        return Launch(
            "flash_prefill v2",
            "attention_prefill.cu",
            f"flash_prefill_hd{HD}_v2",
            {"KV_KIND": self.kind},
            (len(ts), s.n_kv),
            128,
            smem,
            args,
            arrays,
            T * s.n_heads * s.hd * 2 * 2 + self.kv_ideal(T),
            per_step,
            self.max_blocks,
        )


def decode_step(s: Shape, kv: str, ctx: int, max_blocks: int) -> list[Launch]:
    b = Builder(s, kv, ctx, max_blocks)
    c = b.cache(ctx)
    qkv_n = (s.n_heads + 2 * s.n_kv) * s.hd
    L = s.layers
    return [
        b.embed(1),
        b.rmsnorm("rms_norm", 1, False, 1),
        b.gemv("gemv wqkv", qkv_n, s.dim, L),
        *b.rope_kv(1, ctx - 1, c, L),
        *b.decode_attention(c, L),
        b.gemv("gemv wo", s.dim, s.n_heads * s.hd, L),
        b.rmsnorm("add_rms_norm", 1, True, 2 * L),
        b.gemv("gemv w13", 2 * s.hidden, s.dim, L),
        b.swiglu(1, L),
        b.gemv("gemv w2", s.dim, s.hidden, L),
        b.gemv("gemv lm_head (f32)", s.vocab, s.dim, 1, f32=True),
        b.argmax(),
    ]


def prefill_chunk(s: Shape, kv: str, chunk: int, max_blocks: int) -> list[Launch]:
    b = Builder(s, kv, chunk, max_blocks)
    c = b.cache(chunk)
    return [
        *b.rope_kv(chunk, 0, c, 1),
        b.prefill_attention(chunk, c, 1),
        b.rmsnorm("add_rms_norm", chunk, True, 2),
        b.swiglu(chunk, 1),
    ]


# ---- ptxas resources ----------------------------------------------------------------------


def resources(builds: set[tuple[str, tuple]]) -> dict:
    """{(file, defines, kernel): {regs, smem}} from NVRTC's ptxas -v for sm_90 (cached on disk);
    {} when NVRTC is missing (occupancy then ignores registers)."""
    import check_kernels

    if not check_kernels.nvrtc_available():
        return {}
    includes = check_kernels.cuda_include_dirs()
    cache = Path(os.environ.get("CUDACPU_CACHE") or Path.home() / ".cache" / "tinyllm-cudacpu")
    cache.mkdir(parents=True, exist_ok=True)

    def one(b):
        f, extra = b
        opts = check_kernels.nvrtc_options(dict(extra), includes)
        key = hashlib.sha256("\0".join([ck.source(f), *opts]).encode()).hexdigest()[:24]
        p = cache / f"ptxas-{key}.json"
        if p.exists():
            return b, json.loads(p.read_text())
        ok, log = check_kernels.compile_nvrtc(f, dict(extra), includes)
        res = check_kernels.parse_resources(log) if ok else {}
        p.write_text(json.dumps(res))
        return b, res

    out = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        for (f, extra), res in ex.map(one, sorted(builds)):
            for k, r in res.items():
                out[(f, extra, k)] = r
    return out


# ---- running and reporting ------------------------------------------------------------------

_modules: dict = {}


def module(file: str, defines: dict, code: str | None = None) -> tracer.TraceModule:
    key = (file, tuple(sorted(defines.items())), code)
    if key not in _modules:
        _modules[key] = tracer.TraceModule(code or ck.source(file), ck.options(defines))
    return _modules[key]


def measure(launches: list[Launch], res: dict, dev: dict, graph: bool) -> list[dict]:
    rows = []
    for la in launches:
        m = module(la.file, la.defines, la.code)
        bufs = [(address(a), a.nbytes) for a in la.arrays]
        recs, info = m.trace(
            la.kernel, la.grid, (la.block,), la.args, la.smem, bufs, max_blocks=la.max_blocks
        )
        c = counters.count(recs, info, bufs)
        r = res.get((la.file, tuple(sorted(la.defines.items())), la.kernel), {})
        occ = counters.occupancy(la.block, r.get("regs"), r.get("smem", 0) + la.smem)
        blocks = info["blocks"]
        pred = counters.predict_us(c["dram_bytes"], c["flops"], blocks, dev, graph)
        rows.append(
            {
                "kernel": la.label,
                "entry": la.kernel,
                "defines": la.defines,
                "launches": la.per_step,
                "grid": list(la.grid),
                "block": la.block,
                "ctas": blocks,
                "sampled_ctas": info["sampled"],
                "requests": c["global_ld_requests"] + c["global_st_requests"],
                "sectors": c["global_ld_sectors"] + c["global_st_sectors"],
                "sector_efficiency": c["sector_efficiency"],
                "ld_sector_efficiency": c["global_ld_sector_efficiency"],
                "st_sector_efficiency": c["global_st_sector_efficiency"],
                "dram_bytes": c["dram_bytes"],
                "ideal_bytes": float(la.ideal),
                "shared_requests": c["shared_requests"],
                "shared_wavefronts": c["shared_wavefronts"],
                "bank_conflict_ways": c["bank_conflict_ways"],
                "bank_conflict_ways_worst_site": c["bank_conflict_ways_worst_site"],
                "flops": c["flops"],
                "registers": r.get("regs"),
                "smem_bytes": r.get("smem", 0) + la.smem,
                "ctas_per_sm": occ["ctas_per_sm"],
                "occupancy_limit": occ["limited_by"],
                "occupancy": occ["occupancy"],
                "waves": counters.waves(blocks, occ["ctas_per_sm"]),
                "quantization": pred["quantization"],
                "bound": pred["bound"],
                "predicted_us": pred["predicted_us"],
            }
        )
    return rows


def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n## {title}  (PREDICTED; per launch, x launches per step)")
    hdr = (
        f"{'kernel':<20} {'x':>3} {'CTAs':>6} {'requests':>9} {'sect.eff':>8} {'DRAM MB':>9} "
        f"{'ideal MB':>9} {'DRAM/id':>7} {'bank':>5} {'regs':>4} {'occ':>5} {'waves':>6} "
        f"{'pred us':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = r["dram_bytes"] / r["ideal_bytes"] if r["ideal_bytes"] else None
        print(
            f"{r['kernel']:<20} {r['launches']:>3} {r['ctas']:>6} {r['requests']:>9.0f} "
            f"{_f(r['sector_efficiency'], '8.1%')} {r['dram_bytes'] / 1e6:>9.3f} "
            f"{r['ideal_bytes'] / 1e6:>9.3f} {_f(ratio, '7.3f')} "
            f"{_f(r['bank_conflict_ways_worst_site'], '5.1f')} {_f(r['registers'], '4d')} "
            f"{r['occupancy']:>5.0%} {r['waves']:>6.2f} {r['predicted_us']:>8.2f}"
        )


def summary(rows: list[dict], dev: dict) -> dict:
    """The whole decode step: sum over kernels x launches per step."""
    t = sum(r["predicted_us"] * r["launches"] for r in rows)
    ideal = sum(r["ideal_bytes"] * r["launches"] for r in rows)
    dram = sum(r["dram_bytes"] * r["launches"] for r in rows)
    roof = dev["bw"] / ideal
    return {
        "step_us": t,
        "tok_s": 1e6 / t,
        "roofline_tok_s": roof,
        "pct_roofline": 1e6 / t / roof,
        "dram_bytes": dram,
        "ideal_bytes": ideal,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--kv", action="append", choices=list(ck.KV_KINDS), help="KV dtype(s) (default: all)"
    )
    ap.add_argument("--ctx", type=int, default=4096, help="decode context (positions cached)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk tokens")
    ap.add_argument("--device", choices=list(counters.DEVICES), default="h100")
    ap.add_argument("--bw", type=float, help="measured copy bandwidth in GB/s (overrides)")
    ap.add_argument("--max-blocks", type=int, default=48, help="blocks traced per launch")
    ap.add_argument("--small", action="store_true", help="a reduced shape (CI smoke run)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-ptxas", action="store_true", help="skip NVRTC (no register counts)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    why = tracer.available()
    if why:
        print(f"kernel_profile: cannot trace here: {why}", file=sys.stderr)
        return 2
    s = SMALL if args.small else Shape()
    dev = dict(counters.DEVICES[args.device])
    if args.bw:
        dev["bw"] = args.bw * 1e9
    kvs = args.kv or list(ck.KV_KINDS)
    steps = []
    for kv in kvs:
        if not args.no_decode:
            steps.append(("decode", kv, decode_step(s, kv, args.ctx, args.max_blocks)))
        if not args.no_prefill:
            steps.append(("prefill", kv, prefill_chunk(s, kv, args.chunk, args.max_blocks)))
    builds = {(la.file, tuple(sorted(la.defines.items()))) for _, _, ls in steps for la in ls}
    res = {} if args.no_ptxas else resources(builds)
    out = []
    print(
        f"device model: {args.device}, {dev['bw'] / 1e12:.2f} TB/s, "
        f"{dev['mma_flops'] / 1e12:.0f} TFLOP/s (mma.sync), 132 SMs"
        + ("" if res else "; registers unknown (no NVRTC): occupancy ignores them")
    )
    for phase, kv, launches in steps:
        rows = measure(launches, res, dev, graph=phase == "decode")
        for r in rows:
            r.update(phase=phase, kv=kv)
        out += rows
        ctx = f"ctx {args.ctx}" if phase == "decode" else f"{args.chunk} tokens"
        print_table(f"{phase}, KV {kv}, {ctx}", rows)
        if phase == "decode":
            sm = summary(rows, dev)
            print(
                f"decode step: {sm['step_us']:.0f} us -> {sm['tok_s']:.1f} tok/s; roofline "
                f"(ideal {sm['ideal_bytes'] / 1e9:.2f} GB / {dev['bw'] / 1e12:.2f} TB/s) "
                f"{sm['roofline_tok_s']:.1f} tok/s: {sm['pct_roofline']:.1%} of roofline; "
                f"DRAM {sm['dram_bytes'] / sm['ideal_bytes']:.3f}x ideal"
            )
            out.append(
                {
                    "kernel": "decode step",
                    "phase": "summary",
                    "kv": kv,
                    "ctx": args.ctx,
                    "small": args.small,
                    **sm,
                }
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
