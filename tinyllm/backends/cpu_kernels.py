"""The cpu backend's compiled kernels (numba): y = x · wᵀ for every weight format, as loops.

Decode reads every weight once per token, so its speed is the memory's read bandwidth; these
kernels read the weights in their stored format (fp32, bf16 bits, or quantized blocks) and
turn them into fp32 in registers. Shapes: x (M, K) float32, weights (N, K) in HF's
(out, in) order, out (M, N) float32.

The numpy twins: `x @ w.T` for fp32, `x @ w.astype(np.float32).T` for bf16, and
`x @ quant.dequantize(qt).T` for the quantized formats. For fp32, bf16, q4_k and q6_k each
weight here is the same fp32 number the twin computes and every product w·x is the same; only
the order in which products are summed differs. q8_0 / q4_0 / q4_1 (plane order, below) apply
each block's scale once to the block's sum of code·x instead of to each weight: the same real
sum, rounded in another order (their dequantizers, for prefill, give numpy's weights exactly).

fastmath: the kernels compile with fastmath={"reassoc"} and nothing else. A dot product
written as one running sum is a chain of dependent adds; without permission to reorder it LLVM
keeps that chain scalar (measured on this machine, one thread, 11008×4096 fp32: 4.2 GB/s with
fastmath=False, 2.1 GB/s with eight hand-kept partial sums, 11.8 GB/s with reassoc, which is
OpenBLAS's sgemv speed). "reassoc" only allows reordering additions: no FMA contraction (each
product is rounded as numpy rounds it), no finite-math or reciprocal assumptions (a NaN or
inf weight propagates). So results differ from numpy's by fp32 reassociation only, as BLAS's
blocking does (and for the plane formats by where the block scale multiplies, see above).

Decode (a few rows of x): `gemv_*`, a `prange` over tasks of ROWS_PER_TASK weight rows;
fp32 rows are read as they are, one row at a time, dotted with every row of x; bf16 and q6_k
rows are turned into fp32 in a K-long scratch that stays in L1; q8_0 / q4_0 / q4_1 / q4_k turn
a row into int8 codes and fp32 scales only, and `gemv_planes` multiplies those (see "plane
order"). The small helpers are inlined into the kernels (inline="always": a call passes every
array as a struct, and per row of a narrow weight that cost as much as the arithmetic).
Measured, one thread, CPU time, each call on another of ~150 MB of copies (so the weight
streams from memory), before -> after this layout (scripts/bench_cpu.py has the model-level
figures): fp32 576x576 135 -> 63 us, 49152x576 10.9 -> 4.5 ms (four rows at a time, the
earlier kernel, vectorized worse), q8_0 576x1536 145 -> 94 us, 4096x4096 2.0 -> 1.2 ms,
q4_0 49152x576 4.5 -> 3.0 ms (the machine shared with another job: ratios within one run).
Prefill (many rows of x): `dequant_*` turns a tile of weight rows into fp32 and the caller
multiplies with BLAS (cpu_backend.py says why and where).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

FASTMATH = {"reassoc"}  # see the module docstring; nothing else is relaxed
ROWS_PER_TASK = 16  # weight rows per prange task: one scratch allocation serves them all
# Loop indices are unsigned where a loop should vectorize ("How these loops are written").
U = np.uint64


@njit(fastmath=FASTMATH, cache=True, inline="always")
def dot(a, b):
    """sum(a * b) of two float32 vectors, in any order (reassoc lets LLVM vectorize it)."""
    acc = np.float32(0.0)
    for k in range(U(a.shape[0])):
        acc += a[k] * b[k]
    return acc


# ---- fp32 ----------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_f32(x, w, out):
    """out = x @ w.T; w (N, K) float32. Each weight row is dotted with every row of x; with
    four or more x rows, two weight rows meet four x rows at a time (dot_4x2), so a load of
    w feeds four products and a load of x two (a batch's decode is compute-bound: measured,
    one thread, 4096x4096 at M = 8, 14.2 -> 8.9 ms)."""
    M, N, R = x.shape[0], w.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        hi = min(N, t * R + R)
        for n in range(t * R, hi, 2):
            m = 0
            if n + 1 < hi:
                while m + 4 <= M:
                    dot_4x2(x, m, w, n, out)
                    m += 4
            for r in range(m, M):
                for j in range(n, min(n + 2, hi)):
                    out[r, j] = dot(x[r], w[j])


@njit(fastmath=FASTMATH, cache=True, inline="always")
def dot_4x2(x, m, w, n, out):
    """out[m..m+3, n..n+1] = x[m..m+3] · w[n..n+1]: eight dot products in one pass over K."""
    x0, x1, x2, x3, u, v = x[m], x[m + 1], x[m + 2], x[m + 3], w[n], w[n + 1]
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for k in range(U(u.shape[0])):
        uk, vk = u[k], v[k]
        a0 += x0[k] * uk
        a1 += x1[k] * uk
        a2 += x2[k] * uk
        a3 += x3[k] * uk
        b0 += x0[k] * vk
        b1 += x1[k] * vk
        b2 += x2[k] * vk
        b3 += x3[k] * vk
    out[m, n], out[m + 1, n], out[m + 2, n], out[m + 3, n] = a0, a1, a2, a3
    out[m, n + 1], out[m + 1, n + 1], out[m + 2, n + 1], out[m + 3, n + 1] = b0, b1, b2, b3


@intrinsic
def f16(typingctx, h):
    """The float16 whose bits are h (uint16), as float32 (numba has no float16 type): LLVM's
    `fpext half to float` on the bits, which x86 CPUs with F16C (every x86-64 since 2012) and
    ARMv8 do in one instruction, vectorized in loops. Exact for every pattern: normals,
    subnormals, ±0, ±inf; a NaN stays a NaN (its payload may gain the quiet bit)."""

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


# ---- row decoders: one weight row (its stored parts) -> w (K,) float32 ----------------------
# Each is the per-row loop of quant.dequantize (or of the bf16 cast); `out` is the scratch.


# How these loops are written (measured, one thread, a 4096-long row decoded in L1): LLVM
# vectorizes a loop only if it can see it is a plain run over memory. Two things hide that:
# a signed index (numba adds a negative-index wraparound check to every access) and a
# literal trip count of 32 (the loop is fully unrolled into scalar code before the
# vectorizer runs). So indices are unsigned (U) and block lengths come from the arrays'
# shapes: 0.19 ns per q8_0 weight this way, 0.68 with a literal 32, 1.5 with signed indices.


@intrinsic
def bf16(typingctx, h):
    """The bfloat16 whose bits are h (uint16), as float32, exactly: bf16 is the top half of
    an fp32, so shift the 16 bits up and read the 32 as float32 (numba has no bfloat16)."""

    def codegen(context, builder, sig, args):
        u = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(u, ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def row_bf16(bits, out):
    """out[k] = the bf16 whose bits are bits[k], as float32 (bf16)."""
    for k in range(U(bits.shape[0])):
        out[k] = bf16(bits[k])


@njit(fastmath=FASTMATH, cache=True, inline="always")
def dot_bf16(bits, x):
    """dot(bf16 row as its bits, float32 x), each weight turned into fp32 in a register."""
    acc = np.float32(0.0)
    for k in range(U(bits.shape[0])):
        acc += bf16(bits[k]) * x[k]
    return acc


# ---- plane order (q8_0, q4_0, q4_1): blocks of 32 weights with one scale each ----------------
# A dot product with one scale per 32 weights has a 32-long inner loop, too short for LLVM to
# vectorize (measured: the row decoders above ran at 0.19-0.68 ns per weight, compute-bound).
# So the backend holds these rows in *plane order* (cpu_backend.to_planes): position p*nb + b
# (plane p < 32, block b < nb = K/32) holds element 32b + p, and x is permuted the same way
# (x[:, plane_order(K)]). Then the sum of block b's 32 products is
#     a[b] = sum over planes p of code[p*nb + b] * x[p*nb + b]
# a loop over planes whose inner loop runs over all nb blocks: long, contiguous, branch-free,
# vectorized across blocks (one SIMD lane per block). The scale is applied once per block:
#     y = sum_b d[b] * a[b]  (+ sum_b m[b] * xsum[b] for q4_1's offsets)
# That is numpy's sum over k of (d[b] * code) * x[k] regrouped: d[b] * q is exact in fp32
# (an 11-bit fp16 mantissa times a code of at most 8 bits), so the result differs from
# numpy's dequantize-then-matmul by rounding order only, within the same gamma_K bound
# (tests/test_cpu_backend.py checks it).
#
# Row groups: a narrow row has few blocks (K = 576, SmolLM2: nb = 18, one 16-lane vector and
# a scalar remainder), so the block-sum loop is short and the per-row set-up (scales, loop
# entries, a dot of length nb) dominates: 576x576 q8_0 took 113 us against the row decoders'
# 90. So G rows (cpu_backend.rows_per_group: at most 80 blocks; 4 at K = 576, 1 at K >= 1536) are
# held as one row of G*K weights, plane p of the group = plane p of row 0, then of row 1, ...:
# position p*G*nb + r*nb + b holds element 32b + p of row r, and block r*nb + b of the group
# is block b of row r. x is repeated to match (each plane's nb values G times), so the loop
# over the group's G*nb blocks is the same plain loop as one row's; row r's output is the dot
# of its nb scales with its nb block sums. Measured, one thread, CPU time, streaming from
# memory (BENCHMARKS.md, "Narrow rows held in groups"), old row decoder -> groups of 4:
# 576x576 q8_0 55 -> 53 us, q4_0 83 -> 75; 49152x576 (the lm_head) q8_0 4.2 -> 3.5 ms,
# q4_0 6.4 -> 5.0; ungrouped plane order took 100-146 us and 8.0-11.5 ms there.


def plane_order(K: int, fmt: str = "q8_0") -> np.ndarray:
    """perm with x_planes = x[..., perm]: perm[p*nb + b] = 32b + p (nb = K/32). q4_k, whose
    byte j of group G (64 weights) holds element j of sub-block 2G (low nibble) and of 2G+1
    (high), is two halves of K/2 (HALVES): the even sub-blocks' planes, then the odd ones'
    (perm[p*K/64 + G] = 64G + p, perm[K/2 + p*K/64 + G] = 64G + 32 + p)."""
    if fmt == "q4_k":
        half = np.arange(0, K, 64)[None, :] + np.arange(32)[:, None]
        return np.concatenate([half.ravel(), half.ravel() + 32])
    return (np.arange(0, K, 32)[None, :] + np.arange(32)[:, None]).ravel()


@njit(cache=True, inline="always")
def f16_row(h, out):
    """out[i] = the float16 whose bits are h[i], as float32 (f16)."""
    for i in range(U(h.shape[0])):
        out[i] = f16(h[i])


@njit(cache=True, inline="always")
def unpack_nibbles(qs, offset, codes):
    """The codes (nibble - offset, int8) of one plane-order q4 row: byte k gives code k (low
    nibble) and K/2 + k (high). qs (K/2,) int8 (the bytes), codes (K,) int8. Flat, byte-wide:
    LLVM vectorizes it 64 bytes a step (kept as rows of 64-128 bytes it stayed scalar)."""
    h = U(qs.shape[0])
    for k in range(h):
        codes[k] = (qs[k] & np.int8(15)) - offset
    for k in range(h):
        codes[h + k] = ((qs[k] >> np.int8(4)) & np.int8(15)) - offset


@njit(fastmath=FASTMATH, cache=True, inline="always")
def block_sums(codes, x, a):
    """a[b] = sum over planes p of codes[p*nb + b] * x[p*nb + b]: block b's 32 products
    (codes (K,) int8 and x (K,) float32 in plane order, a (nb,) float32). Four planes per
    pass over a (32 planes, so no remainder): a quarter of a's loads and stores, and a quarter
    of the loop set-ups (one thread, K = 4096 in L1: 12 -> 19 weights/ns; a flat int8 dot
    with no blocks runs at 22)."""
    nb = U(a.shape[0])
    a[:] = 0
    for p in range(U(0), U(codes.shape[0]) // nb, U(4)):
        o0, o1, o2, o3 = p * nb, (p + U(1)) * nb, (p + U(2)) * nb, (p + U(3)) * nb
        for b in range(nb):
            a[b] += (
                np.float32(codes[o0 + b]) * x[o0 + b] + np.float32(codes[o1 + b]) * x[o1 + b]
            ) + (np.float32(codes[o2 + b]) * x[o2 + b] + np.float32(codes[o3 + b]) * x[o3 + b])


@njit(fastmath=FASTMATH, cache=True, inline="always")
def scale_blocks(offsets, a, s, mn, xsum):
    """a[b] = s[b] * a[b] (+ mn[b] * xsum[b] when `offsets`: q4_1, q4_k): each block's sum of
    code * x times its scale, for all of a group's blocks in one vectorized pass."""
    if offsets:
        for b in range(U(a.shape[0])):
            a[b] = s[b] * a[b] + mn[b] * xsum[b]
    else:
        for b in range(U(a.shape[0])):
            a[b] = s[b] * a[b]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def vsum(a):
    """sum(a), in any order."""
    acc = np.float32(0.0)
    for b in range(U(a.shape[0])):
        acc += a[b]
    return acc


@njit(fastmath=FASTMATH, cache=True)
def row_planes(codes, s, mn, out):
    """One plane-order row dequantized: out[p*nb + b] = s[b] * code + mn[b] (mn zeros for
    q8_0 / q4_0: adding 0 changes no product), numpy's dequantize element by element."""
    nb = U(s.shape[0])
    for p in range(U(codes.shape[0]) // nb):
        for b in range(nb):
            out[p * nb + b] = s[b] * np.float32(codes[p * nb + b]) + mn[b]


@njit(cache=True, inline="always")
def part(a, h, H):
    """The h-th of H equal parts of the 1-D array a."""
    n = a.shape[0] // H
    return a[h * n : h * n + n]


@njit(cache=True, inline="always")
def halves(fmt):
    """How many independent plane-order halves a row has (plane_order): 2 for q4_k."""
    return 2 if fmt == 3 else 1


@njit(cache=True, inline="always")
def group_scales(fmt, n, d, m, sc, s, mn):
    """Row (group) n's scales s and offsets mn (float32, one per block, in plane_order's
    block order; mn zeros for q8_0 / q4_0: adding 0 changes no product). fmt 0 q8_0, 1 q4_0,
    2 q4_1, 3 q4_k; d, m the fp16 bits (per block; q4_k: d, dmin per super-block); sc
    q4_k's packed scales (else unused)."""
    if fmt == 3:
        q4k_scales(d[n], m[n], sc[n], s, mn)
        return
    f16_row(d[n], s)
    if fmt == 2:
        f16_row(m[n], mn)
    else:
        mn[:] = 0


@njit(cache=True, inline="always")
def nibble_offset(fmt):
    """What q4 codes subtract from the nibble: 8 for q4_0, 0 for q4_1 and q4_k."""
    return np.int8(8) if fmt == 1 else np.int8(0)


@njit(cache=True, inline="always")
def planes_row(fmt, n, qs, d, m, sc, codes, s, mn):
    """Row (group) n of a plane-order weight -> its codes (int8, plane order; q8_0 returns its
    own row), and its scales and offsets (group_scales). qs int8 (q4's bytes viewed as int8)."""
    group_scales(fmt, n, d, m, sc, s, mn)
    if fmt == 0:
        return qs[n]
    unpack_nibbles(qs[n], nibble_offset(fmt), codes)
    return codes


@njit(cache=True)
def scale_min_k4(j, sc, o):
    """llama.cpp's get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) from the
    12 packed bytes sc[o : o + 12] of one q4_k super-block (j, o unsigned)."""
    if j < U(4):
        return sc[o + j] & 63, sc[o + j + U(4)] & 63
    hi_s, hi_m = (sc[o + j - U(4)] >> 6) << 4, (sc[o + j] >> 6) << 4
    return (sc[o + j + U(4)] & 15) | hi_s, (sc[o + j + U(4)] >> 4) | hi_m


@njit(cache=True)
def q4k_scales(d, dmin, sc, s, mn):
    """q4_k's per-sub-block scale d*sc and offset -(dmin*mn) (quant.dequantize's
    w = (d*sc) * q - (dmin*mn)) in plane_order's block order: sub-block 8B + j of super-block
    B is block 4B + j/2 (j even) or nb/2 + 4B + j/2 (odd). d, dmin (K/256,) fp16 bits."""
    half = U(s.shape[0] // 2)
    for B in range(U(d.shape[0])):
        D, Dmin = f16(d[B]), f16(dmin[B])
        for j in range(U(8)):
            sj, mj = scale_min_k4(j, sc, U(12) * B)
            b = U(4) * B + j // U(2) + (half if j % U(2) else U(0))
            s[b], mn[b] = D * np.float32(sj), -(Dmin * np.float32(mj))


@njit(cache=True)
def row_q6_k(ql, qh, scales, d, out):
    """q6_k: super-blocks of 256 = 2 halves of 128; in half h, for l < 32, the 6-bit values of
    elements l, l+32, l+64, l+96 are the low/high nibbles of ql[64h+l], ql[64h+l+32] topped
    with 2-bit fields of qh[32h+l] (bits 0, 2, 4, 6); element i of the half uses scale
    scales[8h + i // 16]; w = (d * sc) * (q - 32).
    ql (K/2,), qh (K/4,) uint8; scales (K/16,) int8; d (K/256,) float16 bits."""
    L = U(ql.shape[0] // d.shape[0] // 8)  # 16: l runs in two halves of 16 (one scale each)
    for b in range(U(d.shape[0])):
        D = f16(d[b])
        for h in range(U(2)):
            for t in range(U(2)):  # l in [16t, 16t + 16)
                lb, hb = U(128) * b + U(64) * h + L * t, U(64) * b + U(32) * h + L * t
                y, si = U(256) * b + U(128) * h + L * t, U(16) * b + U(8) * h + t
                s1, s2 = D * np.float32(scales[si]), D * np.float32(scales[si + U(2)])
                s3, s4 = D * np.float32(scales[si + U(4)]), D * np.float32(scales[si + U(6)])
                for i in range(L):
                    lo0, lo1 = np.int32(ql[lb + i]), np.int32(ql[lb + i + U(32)])
                    hi = np.int32(qh[hb + i])
                    q1 = ((lo0 & 15) | ((hi & 3) << 4)) - 32
                    q2 = ((lo1 & 15) | (((hi >> 2) & 3) << 4)) - 32
                    q3 = ((lo0 >> 4) | (((hi >> 4) & 3) << 4)) - 32
                    q4 = ((lo1 >> 4) | (((hi >> 6) & 3) << 4)) - 32
                    out[y + i] = s1 * np.float32(q1)
                    out[y + i + U(32)] = s2 * np.float32(q2)
                    out[y + i + U(64)] = s3 * np.float32(q3)
                    out[y + i + U(96)] = s4 * np.float32(q4)


# ---- GEMV drivers: decode a row into the scratch, dot it with every row of x -----------------
# One per format (numba dispatches on argument types, not on a format name). prange task t
# owns rows [t*R, t*R+R); its scratch w (K,) is allocated once per task.


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_bf16(x, bits, out):
    M, K = x.shape
    N, R = bits.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            if M == 1:  # one pass: each weight turned into fp32 in a register
                out[0, n] = dot_bf16(bits[n], x[0])
                continue
            row_bf16(bits[n], w)  # else once into the scratch, for all M rows
            for m in range(M):
                out[m, n] = dot(x[m], w)


@njit(cache=True)
def x_planes(x, perm, G, H, xp, xsum):
    """x (M, K) into the layout of a plane-order group of G rows (gemv_planes): xp (M, G*K),
    plane p of the group = plane p of x (x[:, perm], perm = plane_order) repeated for each of
    its G rows: xp[i, p*G*nb + r*nb + b] = x[i, perm[p*nb + b]] (q4_k: G = 1, so xp is
    x[:, perm], its H = 2 halves each [32 planes][nb/2 blocks]); xsum (M, G*nb) each block's
    sum of x, in the same block order (block b of half h at h*nb/H + b), repeated likewise."""
    M, K = x.shape
    nb = K // 32
    bh, kh = nb // H, K // H  # blocks and positions per half
    xsum[:] = 0
    for i in range(M):
        for j in range(K):  # position j of x in plane order: plane p, block b
            v = x[i, perm[j]]
            p, b = divmod(j, nb)
            blk = (j // kh) * bh + (j % kh) % bh
            for r in range(G):
                xp[i, p * G * nb + r * nb + b] = v
                xsum[i, r * nb + blk] += v


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_planes(fmt, x, perm, qs, d, m, sc, out):
    """q8_0 / q4_0 / q4_1 / q4_k (fmt 0-3, planes_row): out = x @ w.T for x (M, K), the weight
    held as groups of G = N / len(qs) rows (cpu_backend.to_planes; "row groups" above). Per
    group g: qs[g] (G*K or G*K/2 int8) and d[g], m[g] (G*nb float16 bits: q4_1's offsets;
    q4_k, G = 1: d and dmin per super-block, sc its packed scales) are one row of G*K weights
    whose block r*nb + b is block b of row gG + r. x goes into that layout first (x_planes,
    perm = plane_order(K)). Per group: decode codes and scales once, then for each x row the
    block sums of all G rows, their scales (and offsets: q4_1, q4_k), one output per row."""
    ng, G = qs.shape[0], out.shape[1] // qs.shape[0]
    M, H = x.shape[0], halves(fmt)
    KG = G * x.shape[1]
    nb, NB, R = KG // 32 // G, KG // 32, max(1, ROWS_PER_TASK // G)
    xp, xsum = np.empty((M, KG), np.float32), np.empty((M, NB), np.float32)
    x_planes(x, perm, G, H, xp, xsum)
    for t in prange((ng + R - 1) // R):
        codes = np.empty(KG, np.int8)
        s, mn, a = np.empty(NB, np.float32), np.empty(NB, np.float32), np.empty(NB, np.float32)
        for g in range(t * R, min(ng, t * R + R)):
            c = planes_row(fmt, g, qs, d, m, sc, codes, s, mn)
            for i in range(M):
                for h in range(H):  # the h-th half of the blocks from the h-th half of K
                    block_sums(part(c, h, H), part(xp[i], h, H), part(a, h, H))
                scale_blocks(fmt >= 2, a, s, mn, xsum[i])
                for r in range(G):
                    out[i, g * G + r] = vsum(a[r * nb : r * nb + nb])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_q6_k(x, ql, qh, scales, d, out):
    M, K = x.shape
    N, R = ql.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            row_q6_k(ql[n], qh[n], scales[n], d[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


# ---- tile dequantizers (prefill): rows lo..lo+len(out)-1 -> out (rows, K) float32 -----------


@njit(parallel=True, cache=True)
def dequant_bf16(bits, lo, out):
    for i in prange(out.shape[0]):
        row_bf16(bits[lo + i], out[i])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def dequant_planes(fmt, qs, d, m, sc, lo, out):
    """Rows lo .. lo+len(out)-1 of a plane-order weight as float32, each in its own plane
    order (element 32b + p of the row at p*nb + b). Each group of G rows (gemv_planes) that
    the range touches is decoded once, G*K weights, and its rows in the range copied out."""
    K = out.shape[1]
    G, nb = qs.shape[1] * (1 if fmt == 0 else 2) // K, K // 32  # qs: G*K codes, in bytes
    H = halves(fmt)
    g0, g1 = lo // G, (lo + out.shape[0] + G - 1) // G
    for g in prange(g0, g1):
        codes = np.empty(G * K, np.int8)
        w = np.empty(G * K, np.float32)
        s, mn = np.empty(G * nb, np.float32), np.empty(G * nb, np.float32)
        c = planes_row(fmt, g, qs, d, m, sc, codes, s, mn)
        for h in range(H):
            row_planes(part(c, h, H), part(s, h, H), part(mn, h, H), part(w, h, H))
        for r in range(max(lo, g * G), min(lo + out.shape[0], g * G + G)):
            for p in range(32):  # plane p of row r: G*nb apart in the group, nb in the row
                o = p * G * nb + (r - g * G) * nb
                out[r - lo, p * nb : p * nb + nb] = w[o : o + nb]


@njit(parallel=True, cache=True)
def dequant_q6_k(ql, qh, scales, d, lo, out):
    for i in prange(out.shape[0]):
        row_q6_k(ql[lo + i], qh[lo + i], scales[lo + i], d[lo + i], out[i])


# ---- the small ops of a decode step (cpu_backend: rms_norm, rope, attention) ---------------
# At SmolLM2's size numpy spent ~7 ms of a 25 ms decode step in these (one thread): each is a
# handful of numpy calls on 576-long rows, ~30 us of call overhead per op per layer. The
# twins: numpy_backend's rms_norm, rope_rotate and attention, the same math in plain loops.


@njit(fastmath=FASTMATH, cache=True)
def rms_norm(x, w, eps, out):
    """out = x / sqrt(mean(x*x) + eps) * w, row by row; x, out (T, D), w (D,) float32."""
    D = x.shape[1]
    for t in range(x.shape[0]):
        r = np.float32(1.0) / np.sqrt(dot(x[t], x[t]) / np.float32(D) + np.float32(eps))
        for j in range(U(D)):
            out[t, j] = x[t, j] * r * w[j]


@njit(fastmath=FASTMATH, cache=True, inline="always")
def rope(x, cos, sin):
    """Rotate-half RoPE in place: x (T, heads, d); pair (j, j + d/2) of token t turns by the
    angle whose cos and sin are cos[t, j], sin[t, j] ((T, d/2) float32, numpy-computed)."""
    T, H, d = x.shape
    half = d // 2
    for t in range(T):
        for h in range(H):
            for j in range(half):
                a, b = x[t, h, j], x[t, h, j + half]
                x[t, h, j] = a * cos[t, j] - b * sin[t, j]
                x[t, h, j + half] = b * cos[t, j] + a * sin[t, j]


@njit(fastmath=FASTMATH, cache=True)
def rope_write(q, k, v, cos, sin, kc, vc, tables, cu_lens, positions, geometry):
    """numpy_backend.rope_kv_write's twin for a float32 cache: q, k (T, heads, d) rotated in
    place (rope), then token i of sequence b (rows cu_lens[b] .. cu_lens[b+1]-1) writes its
    k, v into kc, vc (n_blocks, block_size, n_kv, hd) at its position p: block
    tables[b, (p // block_size) % R], offset p % block_size (kv_cache.entries;
    geometry as attention's)."""
    rope(q, cos, sin)
    rope(k, cos, sin)
    bs, R = geometry[0], geometry[1]
    for b in range(tables.shape[0]):
        for i in range(cu_lens[b], cu_lens[b + 1]):
            p = positions[i]
            blk, off = tables[b, (p // bs) % R], p % bs
            kc[blk, off] = k[i]
            vc[blk, off] = v[i]


@njit(fastmath=FASTMATH, cache=True)
def attention(q, k, v, tables, starts, cu_lens, positions, geometry, scale, out):
    """A batch's attention over a float32 paged cache (numpy_backend.attention's twin).
    Sequence b's queries are rows cu_lens[b] .. cu_lens[b+1]-1 of q (T, n_heads, hd), at
    `positions`; after this step's write it has total = starts[b] + (its rows) positions
    cached, in k, v (n_blocks, block_size, n_kv, hd) through its block table tables[b] (R,).
    geometry = (block_size, R, capacity C = R * block_size, window W or 0). As kv_cache.py:
    it reads positions from lo = max(0, total - C) (and, with a window, first query - W + 1)
    on; position p is at block tables[b, (p // block_size) % R], offset p % block_size; query
    position qp sees p when p <= qp and (W == 0 or p > qp - W). GQA: head h reads KV head
    h // (n_heads / n_kv). out (T, n_heads, hd) = softmax(q·kᵀ · scale over the seen keys) · v."""
    bs, R, C, W = geometry
    n_heads, hd = q.shape[1], q.shape[2]
    n_rep = n_heads // k.shape[2]
    s = np.empty(C, np.float32)
    for b in range(tables.shape[0]):
        r0, r1 = cu_lens[b], cu_lens[b + 1]
        total = starts[b] + r1 - r0
        lo = max(0, total - C)
        if W:
            lo = max(lo, positions[r0] - W + 1)
        n = total - lo
        for i in range(r0, r1):
            qp = positions[i]
            for h in range(n_heads):
                g = h // n_rep
                top = np.float32(-np.inf)
                for j in range(n):
                    p = lo + j
                    seen = p <= qp and (W == 0 or p > qp - W)
                    kj = k[tables[b, (p // bs) % R], p % bs, g]
                    s[j] = dot(q[i, h], kj) * scale if seen else -np.inf
                    top = max(top, s[j])
                total_e = np.float32(0.0)
                for j in range(n):
                    s[j] = np.exp(s[j] - top)
                    total_e += s[j]
                o = out[i, h]
                o[:] = 0
                for j in range(n):
                    if s[j] != 0:
                        p = lo + j
                        w, vj = s[j] / total_e, v[tables[b, (p // bs) % R], p % bs, g]
                        for e in range(U(hd)):
                            o[e] += w * vj[e]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def read_bandwidth(a, reps):
    """Sum every element of a (R, C) float32 `reps` times, four rows per step (four read
    streams): the read bandwidth the roofline divides by (the benchmark times this)."""
    R, C = a.shape
    total = np.float32(0.0)
    for _ in range(reps):
        for rb in prange(R // 4):
            r = rb * 4
            a0, a1, a2, a3 = a[r], a[r + 1], a[r + 2], a[r + 3]
            s = np.float32(0.0)
            for k in range(C):
                s += a0[k] + a1[k] + a2[k] + a3[k]
            total += s
    return total
