"""The cpu backend's compiled kernels (numba): y = x · wᵀ for every weight format, as loops.

Decode reads every weight once per token, so its speed is the memory's read bandwidth; these
kernels read the weights in their stored format (fp32, bf16 bits, or quantized blocks) and
turn them into fp32 in registers. Shapes: x (M, K) float32, weights (N, K) in HF's
(out, in) order, out (M, N) float32.

The numpy twins: `x @ w.T` for fp32, `x @ w.astype(np.float32).T` for bf16, and
`x @ quant.dequantize(qt).T` for the quantized formats. Each weight here is the same fp32
number the twin computes (the same operations in the same order), and every product w·x is the
same; only the order in which products are summed differs.

fastmath: the kernels compile with fastmath={"reassoc"} and nothing else. A dot product
written as one running sum is a chain of dependent adds; without permission to reorder it LLVM
keeps that chain scalar (measured on this machine, one thread, 11008×4096 fp32: 4.2 GB/s with
fastmath=False, 2.1 GB/s with eight hand-kept partial sums, 11.8 GB/s with reassoc, which is
OpenBLAS's sgemv speed). "reassoc" only allows reordering additions: no FMA contraction (each
product is rounded as numpy rounds it), no finite-math or reciprocal assumptions (a NaN or
inf weight propagates). So results differ from numpy's by fp32 reassociation only, as BLAS's
blocking does.

Decode (a few rows of x): `gemv_*`, a `prange` over weight rows; each thread turns one row at
a time into fp32 in a K-long scratch that stays in L1 and takes its dot product with every
row of x (fp32 weights need no scratch: four rows at once give four read streams, which one
stream alone does not saturate). Prefill (many rows of x): `dequant_*` turns a tile of weight
rows into fp32 and the caller multiplies with BLAS (cpu_backend.py says why).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

FASTMATH = {"reassoc"}  # see the module docstring; nothing else is relaxed
ROWS_PER_TASK = 16  # weight rows per prange task: one scratch allocation serves them all


@njit(fastmath=FASTMATH, cache=True)
def dot(a, b):
    """sum(a * b) of two float32 vectors, in any order (reassoc lets LLVM vectorize it)."""
    acc = np.float32(0.0)
    for k in range(a.shape[0]):
        acc += a[k] * b[k]
    return acc


# ---- fp32 ----------------------------------------------------------------------------------


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_f32(x, w, out):
    """out = x @ w.T; w (N, K) float32. Four weight rows per step share each load of x."""
    M, K = x.shape
    N = w.shape[0]
    for nb in prange((N + 3) // 4):
        n = nb * 4
        if n + 4 > N:  # the last 1-3 rows
            for r in range(n, N):
                for m in range(M):
                    out[m, r] = dot(x[m], w[r])
            continue
        w0, w1, w2, w3 = w[n], w[n + 1], w[n + 2], w[n + 3]
        for m in range(M):
            xm = x[m]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                a0 += xm[k] * w0[k]
                a1 += xm[k] * w1[k]
                a2 += xm[k] * w2[k]
                a3 += xm[k] * w3[k]
            out[m, n], out[m, n + 1], out[m, n + 2], out[m, n + 3] = a0, a1, a2, a3


POW2 = np.array([2.0 ** (e - 25) for e in range(32)], np.float32)  # fp16 exponent e -> 2^(e-25)


@njit(cache=True)
def f16(h):
    """The float16 whose bits are h (uint16), as float32, exactly (numba has no float16):
    5-bit exponent e (bias 15), 10-bit mantissa m; value (1024 + m) * 2^(e-25), subnormals
    (e = 0) m * 2^-24, e = 31 inf/nan."""
    h = np.int32(h)
    e, m = (h >> 10) & 31, h & 1023
    if e == 0:
        v = np.float32(m) * POW2[1]
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(1024 + m) * POW2[e]
    return -v if h & 0x8000 else v


# ---- row decoders: one weight row (its stored parts) -> w (K,) float32 ----------------------
# Each is the per-row loop of quant.dequantize (or of the bf16 cast); `out` is the scratch.


# How these loops are written (measured, one thread, a 4096-long row decoded in L1): LLVM
# vectorizes a loop only if it can see it is a plain run over memory. Two things hide that:
# a signed index (numba adds a negative-index wraparound check to every access) and a
# literal trip count of 32 (the loop is fully unrolled into scalar code before the
# vectorizer runs). So indices are unsigned (U) and block lengths come from the arrays'
# shapes: 0.19 ns per q8_0 weight this way, 0.68 with a literal 32, 1.5 with signed indices.
U = np.uint64


@njit(cache=True)
def row_bf16(bits, out):
    """bf16 is the top half of an fp32: shift the 16 bits up and read them as float32."""
    u = out.view(np.uint32)
    for k in range(U(bits.shape[0])):
        u[k] = np.uint32(bits[k]) << np.uint32(16)


@njit(cache=True)
def row_q8_0(qs, d, out):
    """q8_0: blocks of 32; w = d[b] * q.  qs (K,) int8, d (K/32,) float16 bits."""
    bs = U(qs.shape[0] // d.shape[0])  # 32
    for b in range(U(d.shape[0])):
        s = f16(d[b])
        for k in range(b * bs, b * bs + bs):
            out[k] = s * np.float32(qs[k])


@njit(cache=True)
def row_q4_0(qs, d, out):
    """q4_0: blocks of 32 in 16 bytes; byte j holds element j (low nibble) and j+16 (high);
    w = d[b] * (q - 8).  qs (K/2,) uint8, d (K/32,) float16 bits."""
    h = U(qs.shape[0] // d.shape[0])  # 16 bytes per block
    for b in range(U(d.shape[0])):
        s = f16(d[b])
        for j in range(b * h, b * h + h):  # out[32b + i] from byte 16b + i, i < 16
            out[j + b * h] = s * (np.float32(qs[j] & np.uint8(15)) - np.float32(8))
        for j in range(b * h, b * h + h):  # out[32b + 16 + i]
            out[j + b * h + h] = s * (np.float32(qs[j] >> np.uint8(4)) - np.float32(8))


@njit(cache=True)
def row_q4_1(qs, d, m, out):
    """q4_1: as q4_0 with an offset instead of the -8: w = d[b] * q + m[b]."""
    h = U(qs.shape[0] // d.shape[0])
    for b in range(U(d.shape[0])):
        s, lo = f16(d[b]), f16(m[b])
        for j in range(b * h, b * h + h):
            out[j + b * h] = s * np.float32(qs[j] & np.uint8(15)) + lo
        for j in range(b * h, b * h + h):
            out[j + b * h + h] = s * np.float32(qs[j] >> np.uint8(4)) + lo


@njit(cache=True)
def scale_min_k4(j, sc):
    """llama.cpp's get_scale_min_k4: the 6-bit scale and min of sub-block j (0..7) from the
    12 packed bytes `sc` of one q4_k super-block."""
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@njit(cache=True)
def row_q4_k(qs, scales, d, dmin, out):
    """q4_k: super-blocks of 256 = 4 groups of 64; group g of super-block b uses the 32 bytes
    from q0 = 128b + 32g: low nibbles are elements 256b + 64g + l (sub-block 2g), high
    nibbles the next 32 (2g+1); w = (d*sc) * q - (dmin*mn).
    qs (K/2,), scales (K/256*12,) uint8; d, dmin (K/256,) float16 bits."""
    L = U(qs.shape[0] // d.shape[0] // 4)  # 32 bytes per group
    for b in range(U(d.shape[0])):
        D, Dmin = f16(d[b]), f16(dmin[b])
        sc = scales[U(12) * b : U(12) * b + U(12)]
        for g in range(4):
            s1, m1 = scale_min_k4(2 * g, sc)
            s2, m2 = scale_min_k4(2 * g + 1, sc)
            d1, n1 = D * np.float32(s1), Dmin * np.float32(m1)
            d2, n2 = D * np.float32(s2), Dmin * np.float32(m2)
            q0 = U(4) * L * b + L * U(g)  # element 2*q0 + l is byte q0 + l's low nibble
            for j in range(q0, q0 + L):
                out[q0 + j] = d1 * np.float32(qs[j] & np.uint8(15)) - n1
            for j in range(q0, q0 + L):
                out[q0 + j + L] = d2 * np.float32(qs[j] >> np.uint8(4)) - n2


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
            row_bf16(bits[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_q8_0(x, qs, d, out):
    M, K = x.shape
    N, R = qs.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            row_q8_0(qs[n], d[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_q4_0(x, qs, d, out):
    M, K = x.shape
    N, R = qs.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            row_q4_0(qs[n], d[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_q4_1(x, qs, d, mn, out):
    M, K = x.shape
    N, R = qs.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            row_q4_1(qs[n], d[n], mn[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def gemv_q4_k(x, qs, scales, d, dmin, out):
    M, K = x.shape
    N, R = qs.shape[0], ROWS_PER_TASK
    for t in prange((N + R - 1) // R):
        w = np.empty(K, np.float32)
        for n in range(t * R, min(N, t * R + R)):
            row_q4_k(qs[n], scales[n], d[n], dmin[n], w)
            for m in range(M):
                out[m, n] = dot(x[m], w)


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


@njit(parallel=True, cache=True)
def dequant_q8_0(qs, d, lo, out):
    for i in prange(out.shape[0]):
        row_q8_0(qs[lo + i], d[lo + i], out[i])


@njit(parallel=True, cache=True)
def dequant_q4_0(qs, d, lo, out):
    for i in prange(out.shape[0]):
        row_q4_0(qs[lo + i], d[lo + i], out[i])


@njit(parallel=True, cache=True)
def dequant_q4_1(qs, d, mn, lo, out):
    for i in prange(out.shape[0]):
        row_q4_1(qs[lo + i], d[lo + i], mn[lo + i], out[i])


@njit(parallel=True, cache=True)
def dequant_q4_k(qs, scales, d, dmin, lo, out):
    for i in prange(out.shape[0]):
        row_q4_k(qs[lo + i], scales[lo + i], d[lo + i], dmin[lo + i], out[i])


@njit(parallel=True, cache=True)
def dequant_q6_k(ql, qh, scales, d, lo, out):
    for i in prange(out.shape[0]):
        row_q6_k(ql[lo + i], qh[lo + i], scales[lo + i], d[lo + i], out[i])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def read_bandwidth(a, reps):
    """Sum every element of a (R, C) float32 `reps` times, four rows per step as gemv_f32
    reads them: the read bandwidth the roofline divides by (the benchmark times this)."""
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
