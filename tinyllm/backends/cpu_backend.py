"""The cpu backend: the numpy backend with compiled linear layers (cpu_kernels.py, numba).

Everything but `linear` (and the row lookups of `embed`) is the numpy backend's op. Weights
stay in the format they arrive in, so decode streams the fewest bytes:

    fp32 / fp16 checkpoints      float32 (N, K)                        4 bytes/weight
    bf16 checkpoints             ml_dtypes.bfloat16 (N, K), as stored  2 bytes/weight
    quant.QuantTensor            its parts (fmt q8_0 ... q6_k)         1.06 ... 0.56 bytes/weight

(1-D tensors, the norms and biases, are float32.) linear(x, w) for x (M, K):

    M <= GEMV_MAX_ROWS (decode)  cpu_kernels.gemv_<fmt>: each weight row is read once and
                                 turned into fp32 in registers / an L1 scratch
    fp32 weights, larger M       x @ w.T by BLAS, as the numpy backend
    other formats, larger M      prefill: dequantize TILE_BYTES worth of weight rows to fp32
                                 (cpu_kernels.dequant_<fmt>) and multiply the tile by BLAS

Why tile + BLAS for prefill: a GEMV kernel runs M scalar-vectorized dot products per weight
row, compute that grows with M, while BLAS's blocked sgemm reaches the core's FMA peak; the
dequantization costs one pass over the tile, shared by all M rows, and a tile of ~1 MiB stays
in the L2 cache between that pass and the multiply.
"""

from __future__ import annotations

import sys
import time

import ml_dtypes
import numpy as np

from .. import quant
from .numpy_backend import NumpyBackend

GEMV_MAX_ROWS = 8  # x rows up to which the compiled GEMV runs (decode batches)
TILE_BYTES = 1 << 20  # fp32 bytes of weight rows per prefill tile

# Each format: its parts (QuantTensor.parts names) in the kernels' argument order. fp16
# scales go to the kernels as their uint16 bits (numba has no float16; cpu_kernels.f16).
PARTS = {
    "bf16": ("bits",),
    "q8_0": ("qs", "d"),
    "q4_0": ("qs", "d"),
    "q4_1": ("qs", "d", "m"),
    "q4_k": ("qs", "scales", "d", "dmin"),
    "q6_k": ("ql", "qh", "scales", "d"),
}


def kernel_args(fmt: str, w) -> tuple:
    """The arrays a weight passes to gemv_<fmt> / dequant_<fmt>."""
    if fmt == "bf16":
        return (w.view(np.uint16),)
    return tuple(
        w.parts[p].view(np.uint16) if w.parts[p].dtype == np.float16 else w.parts[p]
        for p in PARTS[fmt]
    )


def weight_format(w) -> str:
    """'fp32' | 'bf16' | a QuantTensor's fmt."""
    if isinstance(w, quant.QuantTensor):
        return w.fmt
    return "bf16" if w.dtype == ml_dtypes.bfloat16 else "fp32"


class CpuBackend(NumpyBackend):
    name = "cpu"
    compute_dtype = "fp32"  # activations, KV math and sums are float32, as on numpy

    def __init__(self, threads: int = 1):
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

    def upload_quant(self, name: str, qt: quant.QuantTensor) -> quant.QuantTensor:
        self._prepare(qt.fmt)
        return super().upload_quant(name, qt)

    def _prepare(self, fmt: str):
        """Compile (or load from numba's on-disk cache) the kernels of `fmt` on a tiny input
        the first time a weight of that format arrives; report a real compile once."""
        if fmt in self._ready:
            return
        from . import cpu_kernels as ck

        t0 = time.perf_counter()
        kernels = (ck.gemv_f32, ck.read_bandwidth) if fmt == "fp32" else ()
        if fmt != "fp32":
            kernels = (getattr(ck, f"gemv_{fmt}"), getattr(ck, f"dequant_{fmt}"))
        before = sum(k.stats.cache_misses.get(s, 0) for k in kernels for s in k.stats.cache_misses)
        self._warm(fmt)
        misses = sum(k.stats.cache_misses.get(s, 0) for k in kernels for s in k.stats.cache_misses)
        if misses > before:
            print(
                f"compiling CPU kernels ({fmt}), once: {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
        self._ready.add(fmt)

    def _warm(self, fmt: str):
        """Run fmt's kernels on a 1x256 weight of zeros (compiles them for these types)."""
        K = 256
        x = np.zeros((1, K), np.float32)
        if fmt == "fp32":
            from . import cpu_kernels as ck

            ck.gemv_f32(x, np.zeros((4, K), np.float32), np.zeros((1, 4), np.float32))
            return
        w = _zero_weight(fmt, K)
        self._gemv(fmt, x, w)
        self._dequant(fmt, w, 0, 1)

    # ---- ops -------------------------------------------------------------------------
    def embed(self, table, tokens):
        fmt = weight_format(table)
        if fmt == "fp32":
            return table[tokens]
        if fmt == "bf16":
            return table[tokens].astype(np.float32)
        return np.concatenate([self._dequant(fmt, table, int(t), 1) for t in tokens])

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
        else:
            getattr(ck, f"gemv_{fmt}")(x, *kernel_args(fmt, w), out)
        return out

    def _dequant(self, fmt: str, w, lo: int, rows: int):
        """Weight rows lo .. lo+rows-1 as float32 (rows, K)."""
        from . import cpu_kernels as ck

        out = np.empty((rows, w.shape[1]), np.float32)
        getattr(ck, f"dequant_{fmt}")(*kernel_args(fmt, w), lo, out)
        return out

    def _tiled(self, fmt: str, x, w):
        N, K = w.shape
        out = np.empty((len(x), N), np.float32)
        step = max(16, TILE_BYTES // (4 * K))
        for lo in range(0, N, step):
            rows = min(step, N - lo)
            out[:, lo : lo + rows] = x @ self._dequant(fmt, w, lo, rows).T
        return out


def _zero_weight(fmt: str, K: int):
    """A (1, K) weight of `fmt` whose parts are zeros (for compiling the kernels)."""
    if fmt == "bf16":
        return np.zeros((1, K), ml_dtypes.bfloat16)
    return quant.quantize(np.zeros((1, K), np.float32), fmt)
