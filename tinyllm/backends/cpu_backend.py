"""The cpu backend: the numpy backend with compiled linear layers (cpu_kernels.py, numba).

Compiled besides `linear` (and the row lookups of `embed`): rms_norm, the RoPE rotation and a
decode step's attention over a float32 cache (numpy spent ~7 of a 25 ms SmolLM2 decode step
in those, mostly call overhead; now ~3). Everything else is the numpy backend's op. Weights
stay in the format they arrive in, so decode streams the fewest bytes:

    fp32 / fp16 checkpoints      float32 (N, K)                        4 bytes/weight
    bf16 checkpoints             ml_dtypes.bfloat16 (N, K), as stored  2 bytes/weight
    q8_0 / q4_0 / q4_1           PlaneQuant: the QuantTensor's bytes,   1.06 / 0.56 / 0.62
                                 in plane order, narrow rows in groups
                                 of G (to_planes, rows_per_group)
    q4_k / q6_k                  quant.QuantTensor, its parts          0.56 / 0.82 bytes/weight

(1-D tensors, the norms and biases, are float32.) linear(x, w) for x (M, K):

    M <= GEMV_MAX_ROWS (decode)  cpu_kernels.gemv_<fmt> (gemv_planes): each weight row is
                                 read once and turned into fp32 in registers / an L1 scratch
    fp32 weights, larger M       x @ w.T by BLAS, as the numpy backend
    other formats, larger M      prefill: dequantize TILE_BYTES worth of weight rows to fp32
                                 (cpu_kernels.dequant_<fmt>) and multiply the tile by BLAS
(plane-order weights multiply x permuted into plane order, x[:, plane_order(K)]: the same sum.)

Why tile + BLAS for prefill, and where: a GEMV kernel's work grows with M (one vectorized dot
product per x row per weight row), while BLAS's blocked sgemm runs near the core's FMA peak
and the dequantization is one pass over the tile shared by all M rows (a ~1 MiB tile stays in
L2 between that pass and the multiply). Measured, one thread, 4096x4096, CPU time on a shared
2-core machine (load ~4.5), GEMV kernel / tile+BLAS: q4_0 M=8 8.6/21.0 ms, M=16 20.2/22.2,
M=24 24.7/25.2, M=32 34.2/28.0, M=128 186/68 (q8_0 and q4_k alike); fp32 gemv_f32 / BLAS:
M=8 8.3/16.5, M=16 14.8/18.8. So the kernels take M <= 16 and BLAS the rest.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import ml_dtypes
import numpy as np

from .. import quant
from ..kv_cache import KVCacheSpec
from . import Batch
from .numpy_backend import NumpyBackend, plain_cache

GEMV_MAX_ROWS = 16  # x rows up to which the compiled GEMV runs (measured: docstring)
TILE_BYTES = 1 << 20  # fp32 bytes of weight rows per prefill tile
# Blocks per plane-order group at most (rows_per_group). Measured, one thread, CPU time, each
# call on another of 200 copies of the weight (so it streams from memory, as in decode), min
# of 30 interleaved repeats, load ~1.5 on 2 cores, G = 1 / 2 / 4 / 8 rows per group: 576x576
# q8_0 - / 89 / 74 / 90 us, q4_0 - / 73 / 61 / 66; 1536x576 q8_0 - / 162 / 120 / 177;
# 576x1536 (K = 1536, 48 blocks) q8_0 130 / 153 / 186 / -, q4_0 137 / 149 / 137 / -.
# So K = 576 (18 blocks) takes G = 4 (72 blocks), K = 1536 stays ungrouped.
GROUP_BLOCKS = 80

# Each format: its parts (QuantTensor.parts names) in the kernels' argument order. fp16
# scales go to the kernels as their uint16 bits (numba has no float16; cpu_kernels.f16).
PARTS = {
    "bf16": ("bits",),
    "q6_k": ("ql", "qh", "scales", "d"),
}
# Formats held in plane order (cpu_kernels' "plane order" comment) and their fmt code there.
PLANAR = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3}


@dataclass(frozen=True)
class PlaneQuant:
    """A q8_0 / q4_0 / q4_1 / q4_k weight as this backend holds it: the QuantTensor's bytes
    with each row's quants in plane order (cpu_kernels.plane_order: element 32b + p of the row
    at position p*nb + b; the packed q4 bytes likewise: q4_0's byte 16b + j at j*nb + b, q4_k's
    byte 32G + j at j*(K/64) + G, its halves of K/2 the even and the odd sub-blocks). Same
    bytes, same size; not a QuantTensor, so quant.dequantize cannot read it as if it were in
    stored order. Rows are held `group` (G) to a plane-order row (cpu_kernels "row groups"):
    qs (N/G, G*K) or (N/G, G*K/2) int8; d, m (N/G, G*nb) float16 bits as uint16 (m: q4_1's
    offsets, q4_k's dmin; else d again); sc q4_k's packed scales (else d again). q4_k: G = 1,
    d and dmin per super-block."""

    fmt: str
    shape: tuple[int, int]
    group: int  # rows per group (cpu_kernels.gemv_planes): qs, d, m have N / group rows
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray
    sc: np.ndarray

    @property
    def nbytes(self) -> int:
        extra = {"q4_1": self.m.nbytes, "q4_k": self.m.nbytes + self.sc.nbytes}
        return self.qs.nbytes + self.d.nbytes + extra.get(self.fmt, 0)

    def _parts(self, f) -> tuple:
        """f applied to qs and d, and to m and sc where they are arrays of their own (not d
        again, the placeholder: that stays the placeholder)."""
        d = f("d")
        return f("qs"), d, d if self.m is self.d else f("m"), d if self.sc is self.d else f("sc")

    def rows(self, lo: int, hi: int) -> PlaneQuant:
        """Rows lo..hi-1 (whole groups) as views."""
        g = slice(lo // self.group, hi // self.group)
        return PlaneQuant(
            self.fmt,
            (hi - lo, self.shape[1]),
            self.group,
            *self._parts(lambda f: getattr(self, f)[g]),
        )

    @staticmethod
    def concat(ws: list[PlaneQuant]) -> PlaneQuant:
        """Weights of one format and group size stacked by rows (concat_rows)."""
        w = ws[0]
        parts = w._parts(lambda f: np.concatenate([getattr(a, f) for a in ws]))
        return PlaneQuant(w.fmt, (sum(a.shape[0] for a in ws), w.shape[1]), w.group, *parts)


def rows_per_group(fmt: str, N: int, K: int) -> int:
    """G, the weight rows held as one plane-order group (cpu_kernels "row groups"): the most
    (a power of two dividing N, at most 16) that keep the group within GROUP_BLOCKS blocks;
    1 for q4_k (its two halves per row are not grouped) and for K >= 32 * GROUP_BLOCKS / 2."""
    G = 1
    while fmt != "q4_k" and 2 * G * (K // 32) <= GROUP_BLOCKS and G < 16 and N % (2 * G) == 0:
        G *= 2
    return G


def to_planes(qt: quant.QuantTensor) -> PlaneQuant:
    N, K = qt.shape
    G = rows_per_group(qt.fmt, N, K)
    qs = qt.parts["qs"].view(np.int8)
    group = 64 if qt.fmt == "q4_k" else 32  # weights per run of bytes that planes split
    per_run = qs.shape[1] // (K // group)  # 32 bytes (q8_0, q4_k) or 16 (q4_0, q4_1)
    # (groups, row in group, run, byte in run) -> (groups, byte in run, row in group, run)
    qs = qs.reshape(N // G, G, K // group, per_run).transpose(0, 3, 1, 2).reshape(N // G, -1)

    def owned(part):  # float16 bits as uint16, a group's G rows as one; owned copies
        if part not in qt.parts:
            return d
        return np.array(qt.parts[part], order="C").view(np.uint16).reshape(N // G, -1)

    d = owned("d")
    m, sc = owned("m" if qt.fmt == "q4_1" else "dmin"), d
    if qt.fmt == "q4_k":
        sc = np.array(qt.parts["scales"], order="C")
    return PlaneQuant(qt.fmt, qt.shape, G, np.ascontiguousarray(qs), d, m, sc)


def kernel_args(fmt: str, w) -> tuple:
    """The arrays a weight passes to gemv_<fmt> / dequant_<fmt> (gemv_planes /
    dequant_planes for a PlaneQuant: fmt code, qs, d, m)."""
    if fmt in PLANAR:
        return PLANAR[fmt], w.qs, w.d, w.m, w.sc
    if fmt == "bf16":
        return (w.view(np.uint16),)
    return tuple(
        w.parts[p].view(np.uint16) if w.parts[p].dtype == np.float16 else w.parts[p]
        for p in PARTS[fmt]
    )


def rows(w, lo: int, hi: int):
    """Rows lo..hi-1 of a weight this backend holds, as a view."""
    if isinstance(w, np.ndarray):
        return w[lo:hi]
    if isinstance(w, quant.QuantTensor):
        return quant.take_rows(w, lo, hi)
    return w.rows(lo, hi)


def weight_format(w) -> str:
    """'fp32' | 'bf16' | a QuantTensor's or PlaneQuant's fmt."""
    if isinstance(w, (quant.QuantTensor, PlaneQuant)):
        return w.fmt
    return "bf16" if w.dtype == ml_dtypes.bfloat16 else "fp32"


class CpuBackend(NumpyBackend):
    name = "cpu"
    compute_dtype = "fp32"  # activations, KV math and sums are float32, as on numpy
    fused_projections = True  # concat_rows(): one GEMV for q|k|v and one for gate|up

    def __init__(self, threads: int = 1):
        short_openmp_spin()
        import numba

        self.threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(self.threads)
        self._ready: set[str] = set()  # formats whose kernels are compiled or loaded

    # ---- weights ---------------------------------------------------------------------
    def upload(self, name: str, a) -> np.ndarray:
        if a.ndim == 2 and a.dtype == ml_dtypes.bfloat16:  # bf16 stays bf16 (2 bytes/weight)
            self._prepare("bf16")
            return np.array(a, order="C", copy=True)
        if a.ndim == 2:
            self._prepare("fp32")
        return super().upload(name, a)

    def upload_quant(self, name: str, qt: quant.QuantTensor):
        self._prepare(qt.fmt)
        return to_planes(qt) if qt.fmt in PLANAR else super().upload_quant(name, qt)

    def _prepare(self, fmt: str):
        """Compile (or load from numba's on-disk cache) the kernels of `fmt` on a tiny input
        the first time a weight of that format arrives, and with the first, those of the
        small ops ("ops": rms_norm, rope, attention); report a real compile once."""
        if fmt in self._ready:
            return
        fmts = [fmt] if self._ready else ["ops", fmt]
        kernels = [k for f in fmts for k in _kernels(f)]
        t0 = time.perf_counter()
        before = sum(k.stats.cache_misses.get(s, 0) for k in kernels for s in k.stats.cache_misses)
        for f in fmts:
            self._warm(f)
            self._ready.add(f)
        misses = sum(k.stats.cache_misses.get(s, 0) for k in kernels for s in k.stats.cache_misses)
        if misses > before:
            print(
                f"compiling CPU kernels ({fmt}), once: {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )

    def _warm(self, fmt: str):
        """Run fmt's kernels on tiny zeros, with the argument types a model passes (compiles
        them for these types): a 1x256 weight, or the small ops on one token."""
        from . import cpu_kernels as ck

        K = 256
        x = np.zeros((1, K), np.float32)
        if fmt == "ops":
            self.rms_norm(x, x[0], 1e-5)
            q = self.rope(np.zeros((1, 1, 8), np.float32), np.zeros(1, np.int32), x[0, :4])
            cache = self.alloc_kv(KVCacheSpec(1, 1, 1, 1, 1, 8, "fp32", None, 1))
            batch = Batch(np.zeros((1, 1), np.int32), [0], [1])
            self.rope_kv_write(q, q, q, cache, 0, batch, x[0, :4])
            self.attention(q, cache, 0, batch, 1.0)
        elif fmt == "fp32":
            ck.gemv_f32(x, np.zeros((4, K), np.float32), np.zeros((1, 4), np.float32))
        else:
            w = _zero_weight(fmt, K)
            self._gemv(fmt, x, w)
            self._dequant(fmt, w, 0, 1)

    def concat_rows(self, arrays: list):
        """The fused projections of model.py: q|k|v and gate|up stacked by rows into one
        weight each (one GEMV call instead of three or two: at SmolLM2's size a call's fixed
        cost, Python, dispatch, x into plane order, a parallel region, is a tenth of its
        work), and row views of it equal to each input. Weights of different formats, or
        plane-order weights held in groups of different sizes, stay apart: (None, inputs)."""
        release_freed_memory()  # the previous call's parts, now replaced by views
        first = arrays[0]
        if len({weight_format(a) for a in arrays}) != 1 or (
            isinstance(first, PlaneQuant) and len({a.group for a in arrays}) != 1
        ):
            return None, list(arrays)
        if isinstance(first, np.ndarray):  # fp32 / bf16 matrices, biases
            fused = np.concatenate(arrays)
        elif isinstance(first, quant.QuantTensor):  # q6_k
            fused = quant.concat_rows(arrays)
        else:
            fused = PlaneQuant.concat(arrays)
        bounds = np.cumsum([0] + [a.shape[0] for a in arrays])
        return fused, [rows(fused, lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    # ---- ops -------------------------------------------------------------------------
    def embed(self, table, tokens):
        fmt = weight_format(table)
        if fmt == "fp32":
            return table[tokens]
        if fmt == "bf16":
            return table[tokens].astype(np.float32)
        rows = np.concatenate([self._dequant(fmt, table, int(t), 1) for t in tokens])
        if fmt in PLANAR:  # back to stored order: plane position i holds element perm[i]
            rows[:, plane_order(rows.shape[1], fmt)] = rows.copy()
        return rows

    def rms_norm(self, x, w, eps):
        from . import cpu_kernels as ck

        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        ck.rms_norm(x, w, eps, out)
        return out

    def rope(self, x, positions, inv_freq):
        """numpy's angles (rope_rotate's cos and sin, float32), the rotation compiled."""
        from . import cpu_kernels as ck

        x = np.array(x, dtype=np.float32, order="C")  # a copy: rotated in place
        ck.rope(x, *_cos_sin(positions, inv_freq))
        return x

    def rope_kv_write(self, q, k, v, cache, layer, batch, inv_freq):
        """One compiled call for a float32 cache (cpu_kernels.rope_write): the angles once
        for q and k, the rotation, the cache write; other caches take numpy's."""
        from . import cpu_kernels as ck

        spec = cache.spec
        if cache.k[layer].dtype != np.float32 or not plain_cache(cache):
            return super().rope_kv_write(q, k, v, cache, layer, batch, inv_freq)
        q, k = (np.array(a, dtype=np.float32, order="C") for a in (q, k))  # rotated in place
        b = batch
        ck.rope_write(
            q, k, np.ascontiguousarray(v, dtype=np.float32), *_cos_sin(b.positions, inv_freq),
            cache.k[layer], cache.v[layer], b.tables, b.cu_lens, b.positions, _geometry(spec),
        )  # fmt: skip
        return q

    def attention(self, q, cache, layer, batch, scale):
        """The compiled twin of numpy's attention for a decode step (at most GEMV_MAX_ROWS
        query rows) over a float32 cache; longer prefills (BLAS's batched matmuls win there)
        and fp16/bf16/int8/fp8 caches take numpy's."""
        from . import cpu_kernels as ck

        spec = cache.spec
        if len(q) > GEMV_MAX_ROWS or cache.k[layer].dtype != np.float32 or not plain_cache(cache):
            return super().attention(q, cache, layer, batch, scale)
        T, n_heads, hd = q.shape
        q, out = np.ascontiguousarray(q, dtype=np.float32), np.empty(q.shape, np.float32)
        b = batch
        ck.attention(
            q, cache.k[layer], cache.v[layer], b.tables, b.starts, b.cu_lens, b.positions,
            _geometry(spec), np.float32(scale), out,
        )  # fmt: skip
        return out.reshape(T, n_heads * hd)

    def linear(self, x, w, b=None):
        fmt = weight_format(w)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if fmt == "fp32" and len(x) > GEMV_MAX_ROWS:
            y = x @ w.T
        elif len(x) <= GEMV_MAX_ROWS:
            y = self._gemv(fmt, x, w)
        else:
            y = self._tiled(fmt, x, w)
        return y if b is None else y + b

    def _gemv(self, fmt: str, x, w):
        from . import cpu_kernels as ck

        n = w.shape[0]
        out = np.empty((len(x), n), np.float32)
        if fmt == "fp32":
            ck.gemv_f32(x, w, out)
        elif fmt in PLANAR:
            code, *parts = kernel_args(fmt, w)
            ck.gemv_planes(code, x, plane_order(x.shape[1], fmt), *parts, out)
        else:
            getattr(ck, f"gemv_{fmt}")(x, *kernel_args(fmt, w), out)
        return out

    def _dequant(self, fmt: str, w, lo: int, rows: int):
        """Weight rows lo .. lo+rows-1 as float32 (rows, K)."""
        from . import cpu_kernels as ck

        out = np.empty((rows, w.shape[1]), np.float32)
        getattr(ck, "dequant_planes" if fmt in PLANAR else f"dequant_{fmt}")(
            *kernel_args(fmt, w), lo, out
        )
        return out

    def _tiled(self, fmt: str, x, w):
        N, K = w.shape
        out = np.empty((len(x), N), np.float32)
        if fmt in PLANAR:  # the tiles come out in plane order: multiply x in that order
            x = np.ascontiguousarray(x[:, plane_order(K, fmt)])
        step = max(16, TILE_BYTES // (4 * K))
        if fmt in PLANAR:  # whole row groups per tile: each is decoded once
            step = -(-step // w.group) * w.group
        for lo in range(0, N, step):
            rows = min(step, N - lo)
            out[:, lo : lo + rows] = x @ self._dequant(fmt, w, lo, rows).T
        return out


@lru_cache(maxsize=1)
def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory():
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). Fusing
    replaces each layer's q, k, v, gate and up by views of new arrays; glibc keeps the freed
    parts (up to 32 MB each: under its mmap threshold) in the heap, so without this a
    Mistral-7B-shaped q4_0 model held 6.2 GB after fusing instead of 4.3 (measured)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def short_openmp_spin():
    """GOMP_SPINCOUNT=3000 unless the user set it or OMP_WAIT_POLICY: numba's OpenMP threads
    (GNU libgomp here) spin about 3000 turns for the next parallel loop, then sleep. libgomp's
    default, 300000 turns, keeps the thread that finished first spinning on its core while the
    other, sharing a core with a busy process, waits for a time slice: decode collapsed.
    Measured, SmolLM2-135M q4_0, 16 greedy tokens, best of 3, 2 threads, 2 cores with the test
    suite running beside (load 1.6-2.3), tok/s on its own / beside one busy loop:
    libgomp default 39.6 / 8.5 (1.0 in another run); OMP_WAIT_POLICY=active 35.7 / 13.1;
    spin count 10000 43.0 / 9.7, 3000 44.8 / 14.1 and 40.0 / 13.4, 1000 32.1 / 21.1,
    300 23.2 / 23.8; OMP_WAIT_POLICY=passive 24.8 / 24.8 and 18.4 / 27.7; numba's workqueue
    layer 17.3 / 15.2; tbb (pip install tbb) 30.6 / 13.0. One thread: about 25-30 alone, in
    every setting. The shorter the spin, the better beside a busy process and the worse
    alone: 3000 keeps the spinning speed alone and is 10x the default beside a busy process
    (the default thread count, threads.py, leaves a busy core out anyway). libgomp reads the
    variables once, when it is loaded (numba loads it at its first parallel loop or
    set_num_threads, so this runs before both); a process that loaded libgomp earlier (torch
    does) keeps what it started with."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")


@lru_cache(maxsize=64)
def plane_order(K: int, fmt: str) -> np.ndarray:
    from .cpu_kernels import plane_order as order

    return order(K, fmt)


def _cos_sin(positions, inv_freq) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's cos and sin (T, d/2) float32, computed as numpy_backend.rope_rotate does."""
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(ang), np.sin(ang)


def _geometry(spec: KVCacheSpec) -> tuple[int, int, int, int]:
    """(block_size, ring R, capacity C, window or 0): what the compiled cache ops need."""
    return spec.block_size, spec.ring, spec.capacity, int(spec.window or 0)


def _kernels(fmt: str) -> tuple:
    """The compiled kernels _prepare(fmt) warms ("ops": the small ops')."""
    from . import cpu_kernels as ck

    if fmt == "ops":
        return ck.rms_norm, ck.rope, ck.rope_write, ck.attention
    if fmt == "fp32":
        return ck.gemv_f32, ck.read_bandwidth
    name = "planes" if fmt in PLANAR else fmt
    return getattr(ck, f"gemv_{name}"), getattr(ck, f"dequant_{name}")


def _zero_weight(fmt: str, K: int):
    """A (1, K) weight of `fmt` whose parts are zeros (for compiling the kernels)."""
    if fmt == "bf16":
        return np.zeros((1, K), ml_dtypes.bfloat16)
    qt = quant.quantize(np.zeros((1, K), np.float32), fmt)
    return to_planes(qt) if fmt in PLANAR else qt
