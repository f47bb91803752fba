"""What each tinyllm kernel computes, in numpy, reading and writing device memory only through
the raw pointers and scalars it is launched with, and only over the grid it is launched on:
the kernels' documented semantics (the comment at the top of each cuda/*.cu), not their code.
Asserts the launch preconditions each kernel relies on (coverage, alignment, vector widths).
Run by RawKernel.__call__ in cupy/__init__.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import mem

# KV_KIND (cuda/common.cuh KVT<KIND>) -> storage dtype, bytes per element
KV_DT = {0: np.uint16, 1: np.float16, 2: np.float32, 3: np.int8, 4: np.uint8}
QMAX = {3: np.float32(127.0), 4: np.float32(448.0)}


def P(a) -> int:
    return a.__array_interface__["data"][0]


def bf2f(u) -> np.ndarray:
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


def f2bf(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def rd_bf(ptr: int, n: int) -> np.ndarray:
    return bf2f(mem(ptr, n, np.uint16))


def wr_bf(ptr: int, x) -> None:
    mem(ptr, len(x), np.uint16)[:] = f2bf(x)


def i32(ptr: int, i: int) -> int:
    return int(mem(ptr + 4 * i, 1, np.int32)[0])


def f32(ptr: int, i: int) -> float:
    return float(mem(ptr + 4 * i, 1, np.float32)[0])


# ---- KV cache entries (kv_cache.py's paged layout): sequence b's table is tables[b, :ring];
# position p is in block table[(p // block_size) % ring] at offset p % block_size; the entry of
# (p, kv head g) is (block * block_size + offset) * n_kv + g, head_dim elements each ----

def kv_entry(tables, b: int, ring: int, block_size: int, p: int, n_kv: int, g: int) -> int:
    block = i32(P(tables), b * ring + (p // block_size) % ring)
    assert block >= 0, f"position {p} of sequence {b} read through an unused block-table entry"
    return (block * block_size + p % block_size) * n_kv + g


def kv_read(kind: int, ptr: int, sptr, entry: int, hd: int) -> np.ndarray:
    """Dequantized float32 values of one cache entry (sptr: the scales, None if not quantized)."""
    dt = KV_DT[kind]
    raw = mem(ptr + entry * hd * np.dtype(dt).itemsize, hd, dt)
    if kind == 0:
        x = bf2f(raw)
    elif kind == 4:
        x = raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    else:
        x = raw.astype(np.float32)
    return x * np.float32(f32(sptr, entry)) if kind in QMAX else x


def key_read(kind: int, kc, kmeta, tables, b: int, ring: int, bs: int, p: int, n_kv: int, g: int, hd: int,
             closed: int) -> np.ndarray:
    """A key as float32: int8/fp8 keys below `closed` (the sequence's open block) are codes
    times the block's per-channel fp16 scale plus offset, the rest come from the sequence's
    float32 open row (kv_cache.py); other kinds as kv_read."""
    if kind not in QMAX:
        return kv_read(kind, P(kc), None, kv_entry(tables, b, ring, bs, p, n_kv, g), hd)
    ks, kz, k_open, opens = kmeta
    if p >= closed:
        row = i32(P(opens), b)
        return mem(P(k_open) + 4 * (((row * bs + p % bs) * n_kv + g) * hd), hd, np.float32).copy()
    block = i32(P(tables), b * ring + (p // bs) % ring)
    raw = mem(P(kc) + ((block * bs + p % bs) * n_kv + g) * hd, hd, KV_DT[kind])
    q = raw.astype(np.float32) if kind == 3 else raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    m = 2 * ((block * n_kv + g) * hd)
    s, c = mem(P(ks) + m, hd, np.float16).astype(np.float32), mem(P(kz) + m, hd, np.float16).astype(np.float32)
    return q * s + c


def kv_write(kind: int, ptr: int, sptr, entry: int, hd: int, x: np.ndarray) -> None:
    """Store one entry; int8/fp8: scale = absmax / qmax, q = RNE(clip(x / scale)) (kv_cache.py)."""
    dt = KV_DT[kind]
    dst = mem(ptr + entry * hd * np.dtype(dt).itemsize, hd, dt)
    if kind in QMAX:
        scale = np.abs(x).max() / QMAX[kind]
        y = np.clip(x / (scale if scale > 0 else np.float32(1)), -QMAX[kind], QMAX[kind])
        dst[:] = np.rint(y).astype(np.int8) if kind == 3 else y.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        mem(sptr + 4 * entry, 1, np.float32)[0] = scale
    elif kind == 0:
        dst[:] = f2bf(x)
    else:
        dst[:] = x.astype(dt)


def attend(qv: np.ndarray, keys: list, values: list) -> tuple[float, float, np.ndarray]:
    """Base-2 softmax over the scores qv . k (qv already scaled by scale * log2 e):
    (max score, sum of weights, unnormalized weighted sum of values)."""
    s = np.array([qv @ k for k in keys])
    m = s.max()
    w = np.exp2(s - m)
    return m, w.sum(), w @ np.array(values, np.float64)


# ---- one function per kernel family ------------------------------------------------------------------

def gather_rows(name, grid, block, a, defs):
    V = int(name.split("_v")[1])                       # bytes per vector
    src, stride, n_src, idx, out, row_vecs = a
    assert grid[1] * block[0] >= row_vecs and P(src) % V == 0 and P(out) % V == 0
    for r in range(grid[0]):
        i = i32(P(idx), r)
        dst = mem(P(out) + r * row_vecs * V, row_vecs * V, np.uint8)
        dst[:] = mem(P(src) + i * stride * V, row_vecs * V, np.uint8) if 0 <= i < n_src else 0


def rms_norm(name, grid, block, a, defs):
    add = name.startswith("add")
    if add:
        x, ldx, d, ldd, w, s_out, out, dim, eps = a
    else:
        x, ldx, w, out, dim, eps = a
    if name.endswith("v2"):
        assert dim % 8 == 0 and ldx % 8 == 0 and P(x) % 16 == 0 and P(w) % 16 == 0 and P(out) % 16 == 0
        assert not add or (ldd % 8 == 0 and P(d) % 16 == 0 and P(s_out) % 16 == 0)
    g = rd_bf(P(w), dim)
    for r in range(grid[0]):
        v = rd_bf(P(x) + r * ldx * 2, dim)
        if add:
            v = bf2f(f2bf(v + rd_bf(P(d) + r * ldd * 2, dim)))
            wr_bf(P(s_out) + r * dim * 2, v)
        rstd = 1.0 / np.sqrt(np.float32(np.mean(v.astype(np.float64) ** 2)) + np.float32(eps))
        wr_bf(P(out) + r * dim * 2, v * np.float32(rstd) * g)


def gemv(name, grid, block, a, defs):
    M = int(name.split("_m")[1].split("_")[0])
    x, ldx, W, bias, y, ldy, N, K = a
    warps = int(defs["GEMV_WARPS"])
    assert grid[0] * warps >= N and block[0] == 32 * warps
    assert K % 8 == 0 and ldx % 8 == 0 and P(x) % 16 == 0 and P(W) % 16 == 0
    Wm = rd_bf(P(W), N * K).reshape(N, K).astype(np.float64)
    b = rd_bf(P(bias), N) if bias is not None else 0
    for m in range(M):
        row = (Wm @ rd_bf(P(x) + m * ldx * 2, K).astype(np.float64)).astype(np.float32) + b
        if "_f32_" in name:
            mem(P(y) + m * ldy * 4, N, np.float32)[:] = row
        else:
            wr_bf(P(y) + m * ldy * 2, row)


def bias_add(name, grid, block, a, defs):
    y, ldy, b, M, N = a
    bb = rd_bf(P(b), N)
    for m in range(M):
        if name.startswith("bias_add_f32"):
            mem(P(y) + m * ldy * 4, N, np.float32)[:] += bb
        else:
            wr_bf(P(y) + m * ldy * 2, rd_bf(P(y) + m * ldy * 2, N) + bb)


def silu_mul(name, grid, block, a, defs):
    g, ldg, u, ldu, out, rows, H = a
    if name.endswith("v2"):
        assert H % 8 == 0 and ldg % 8 == 0 and ldu % 8 == 0 and P(g) % 16 == 0 and P(u) % 16 == 0
    for r in range(rows):
        gv, uv = rd_bf(P(g) + r * ldg * 2, H), rd_bf(P(u) + r * ldu * 2, H)
        wr_bf(P(out) + r * H * 2, gv / (np.float32(1) + np.exp(-gv)) * uv)


def rope_kv_write(name, grid, block, a, defs):
    (q, ldq, k, ldk, v, ldv, cos, sin, positions, seq_of_token, tables, kc, vc, vs, kr,
     ring, bs, n_heads, n_kv, hd) = a
    kind, half = int(defs["KV_KIND"]), hd // 2
    assert grid[1] * int(defs["ROPE_WARPS"]) >= n_heads + 2 * n_kv and hd % 2 == 0
    assert (kr is None) == (vs is None) == (kind not in QMAX)
    sv = P(vs) if vs is not None else None
    for t in range(grid[0]):
        pos = i32(P(positions), t)
        c, s = mem(P(cos) + pos * half * 4, half, np.float32), mem(P(sin) + pos * half * 4, half, np.float32)

        def rot(x):
            x1, x2 = x[:half], x[half:]
            return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s])

        for h in range(n_heads):
            ptr = P(q) + (t * ldq + h * hd) * 2
            wr_bf(ptr, rot(rd_bf(ptr, hd)))
        b = i32(P(seq_of_token), t)
        for g in range(n_kv):
            entry = kv_entry(tables, b, ring, bs, pos, n_kv, g)
            key = rot(rd_bf(P(k) + (t * ldk + g * hd) * 2, hd))
            if kind in QMAX:                          # int8/fp8 keys: float32 for kv_close
                mem(P(kr) + 4 * ((t * n_kv + g) * hd), hd, np.float32)[:] = key
            else:
                kv_write(kind, P(kc), None, entry, hd, key)
            kv_write(kind, P(vc), sv, entry, hd, rd_bf(P(v) + (t * ldv + g * hd) * 2, hd))


def kv_close(name, grid, block, a, defs):
    """Quantize the key blocks each sequence's write completes, keep its open block (kv_cache.py,
    NumpyKVCache.write)."""
    from tinyllm.kv_cache import quantize_block
    kr, starts, lens, cu_lens, opens, tables, ring, bs, k_open, kc, k_scale, k_zero, n_kv, hd = a
    kind = int(defs["KV_KIND"])
    name_kind = {3: "int8", 4: "fp8"}[kind]
    assert grid[1] == n_kv
    for b in range(grid[0]):
        s, L, tok0, row = i32(P(starts), b), i32(P(lens), b), i32(P(cu_lens), b), i32(P(opens), b)
        e, row0 = s + L, s - s % bs
        open_keys = mem(P(k_open) + 4 * row * bs * n_kv * hd, bs * n_kv * hd, np.float32).reshape(bs, n_kv, hd)
        new = mem(P(kr) + 4 * tok0 * n_kv * hd, L * n_kv * hd, np.float32).reshape(L, n_kv, hd)
        keys = np.concatenate([open_keys[:s - row0], new])
        for r in range(row0, e - e % bs, bs):
            block = i32(P(tables), b * ring + (r // bs) % ring)
            q, sc, c = quantize_block(keys[r - row0:r - row0 + bs], name_kind)
            n = bs * n_kv * hd
            mem(P(kc) + block * n, n, KV_DT[kind])[:] = q.view(KV_DT[kind]).reshape(-1)
            mem(P(k_scale) + 2 * block * n_kv * hd, n_kv * hd, np.float16)[:] = sc.reshape(-1)
            mem(P(k_zero) + 2 * block * n_kv * hd, n_kv * hd, np.float16)[:] = c.reshape(-1)
        rest = keys[e - e % bs - row0:] if e - e % bs >= row0 else keys[:0]
        open_keys[:len(rest)] = rest


def flash_prefill(name, grid, block, a, defs):
    HD = int(name.split("hd")[1].split("_")[0])
    (q, ldq, kc, vc, ks, kz, vs, k_open, opens, out, ldo, tile_seq, tile_row0, tables, starts, lens, cu_lens,
     ring, bs, n_heads, n_kv, hd, window, sl2) = a
    C = ring * bs
    kind = int(defs["KV_KIND"])
    sv = P(vs) if vs is not None else None
    kmeta = (ks, kz, k_open, opens)
    if name.endswith("v1"):
        rows_per_tile = int(defs["FA1_WARPS"]) * int(defs["FA1_RPW"])
    else:
        rows_per_tile = 64
        assert ldq % 8 == 0 and P(q) % 16 == 0 and ldo % 2 == 0 and block[0] == 128
    assert hd <= HD and hd % 8 == 0 and grid[1] == n_kv
    n_rep = n_heads // n_kv
    for tile in range(grid[0]):                       # tile: rows r0.. of (token, head-in-group)
        b, r0 = i32(P(tile_seq), tile), i32(P(tile_row0), tile)
        start, L, tok0 = i32(P(starts), b), i32(P(lens), b), i32(P(cu_lens), b)
        total = start + L
        kmin, rows = total - min(total, C), L * n_rep
        assert r0 < rows, "empty tile"
        for g in range(n_kv):
            for rg in range(r0, min(r0 + rows_per_tile, rows)):
                tok, h, qp = tok0 + rg // n_rep, g * n_rep + rg % n_rep, start + rg // n_rep
                qv = rd_bf(P(q) + (tok * ldq + h * hd) * 2, hd).astype(np.float64) * sl2
                keys, values = [], []
                for p in range(kmin, qp + 1):
                    if window <= 0 or p > qp - window:
                        e = kv_entry(tables, b, ring, bs, p, n_kv, g)
                        keys.append(key_read(kind, kc, kmeta, tables, b, ring, bs, p, n_kv, g, hd, total - total % bs))
                        values.append(kv_read(kind, P(vc), sv, e, hd))
                if keys:
                    _, l, o = attend(qv, keys, values)
                    o = o / l
                else:
                    o = np.zeros(hd)
                wr_bf(P(out) + (tok * ldo + h * hd) * 2, o)


def decode_split(name, grid, block, a, defs):
    HD = int(name.split("hd")[1].split("_")[0])
    REP = int(name.split("_r")[1].split("_")[0])      # query heads per CTA
    (q, ldq, kc, vc, ks, kz, vs, k_open, opens, pm, pl, po, dec_seqs, tables, starts, cu_lens, n_dec, ring,
     bs, n_heads, n_kv, hd, window, sl2, split_len) = a
    C = ring * bs
    kind, n_rep = int(defs["KV_KIND"]), n_heads // n_kv
    sv = P(vs) if vs is not None else None
    kmeta = (ks, kz, k_open, opens)
    chunks = -(-n_rep // REP)
    assert grid[1] == n_dec and grid[2] == n_kv * chunks and hd <= HD and ldq % 8 == 0 and P(q) % 16 == 0
    for split in range(grid[0]):
        for y in range(n_dec):
            b = i32(P(dec_seqs), y)
            t, qp = i32(P(cu_lens), b), i32(P(starts), b)
            lo = max(qp + 1 - min(qp + 1, C), qp - window + 1 if window > 0 else 0)
            s0 = lo + split * split_len
            s1 = min(s0 + split_len, qp + 1)
            for z in range(n_kv * chunks):
                g = z // chunks
                h0 = g * n_rep + (z % chunks) * REP
                for h in range(h0, min(h0 + REP, (g + 1) * n_rep)):
                    part = (split * n_dec + y) * n_heads + h
                    if s0 >= s1:                      # empty split
                        m, l, o = -np.inf, 0.0, np.zeros(hd)
                    else:
                        qv = rd_bf(P(q) + (t * ldq + h * hd) * 2, hd).astype(np.float64) * sl2
                        ps = range(s0, s1)
                        keys = [key_read(kind, kc, kmeta, tables, b, ring, bs, p, n_kv, g, hd, qp + 1 - (qp + 1) % bs)
                                for p in ps]
                        m, l, o = attend(qv, keys, [kv_read(kind, P(vc), sv, kv_entry(tables, b, ring, bs, p, n_kv, g), hd)
                                                    for p in ps])
                    mem(P(pm) + 4 * part, 1, np.float32)[0] = m
                    mem(P(pl) + 4 * part, 1, np.float32)[0] = l
                    mem(P(po) + 4 * part * hd, hd, np.float32)[:] = o


def decode_reduce(name, grid, block, a, defs):
    pm, pl, po, dec_seqs, cu_lens, out, ldo, n_splits, n_dec, n_heads, hd = a
    assert grid[0] == n_dec and grid[1] == n_heads and block[0] >= hd
    for y in range(n_dec):
        t = i32(P(cu_lens), i32(P(dec_seqs), y))
        for h in range(n_heads):
            parts = [(s * n_dec + y) * n_heads + h for s in range(n_splits)]
            m = np.array([f32(P(pm), i) for i in parts])
            l = np.array([f32(P(pl), i) for i in parts])
            o = np.array([mem(P(po) + 4 * i * hd, hd, np.float32) for i in parts], np.float64)
            w = np.exp2(m - (m.max() if m.max() > -np.inf else 0))
            L = (l * w).sum()
            wr_bf(P(out) + (t * ldo + h * hd) * 2, (w @ o) / L if L > 0 else np.zeros(hd))


def argmax(name, grid, block, a, defs):
    x, ld, V, out = a
    for r in range(grid[0]):
        mem(P(out) + 4 * r, 1, np.int32)[0] = int(np.argmax(mem(P(x) + 4 * r * ld, V, np.float32)))


def sample(name, grid, block, a, defs):
    """temperature (<= 0: greedy) -> top-k (0: off) -> top-p (1: off) -> a draw seeded by
    (seed, step). The draw is numpy's, not the kernel's: only its distribution matches."""
    x, ld, V, temp, topk, topp, seeds, steps, out = a
    for r in range(grid[0]):
        row = mem(P(x) + 4 * r * ld, V, np.float32).astype(np.float64)
        tt = f32(P(temp), r)
        if not tt > 0:
            tok = int(np.argmax(row))
        else:
            v = row / tt
            keep = np.ones(V, bool)
            k = i32(P(topk), r)
            if 0 < k < V:
                keep &= v >= np.sort(v)[-k]
            e = np.where(keep, np.exp(v - v.max()), 0)
            pp = f32(P(topp), r)
            if pp < 1:
                order = np.argsort(-np.where(keep, v, -np.inf))
                cut = order[: int(np.searchsorted(np.cumsum(e[order]), pp * e.sum())) + 1]
                e = np.where(np.isin(np.arange(V), cut), e, 0)
            rng = np.random.default_rng([int(mem(P(seeds) + 8 * r, 1, np.uint64)[0]), i32(P(steps), r)])
            tok = int(rng.choice(V, p=e / e.sum()))
        mem(P(out) + 4 * r, 1, np.int32)[0] = tok


FAMILIES = [("gather_rows_v", gather_rows), ("rms_norm_bf16", rms_norm), ("add_rms_norm_bf16", rms_norm),
            ("gemv_bf16_m", gemv), ("bias_add_", bias_add), ("silu_mul_bf16", silu_mul),
            ("rope_kv_write_v1", rope_kv_write), ("kv_close_v1", kv_close), ("flash_prefill_hd", flash_prefill),
            ("decode_split_hd", decode_split), ("decode_reduce_v1", decode_reduce),
            ("argmax_f32_v1", argmax), ("sample_f32_v1", sample)]


def run(name, grid, block, args, defs):
    for prefix, fn in FAMILIES:
        if name.startswith(prefix):
            return fn(name, grid, block, args, defs)
    raise AssertionError(f"no emulation for kernel {name}")
