"""KV-cache layout and index math, shared by both backends (no attention math here).

Layout, per layer (allocated by the backend in its own array type):

    k, v        (n_slots, capacity, n_kv_heads, head_dim)   storage dtype
    k_scale,    (n_slots, capacity, n_kv_heads)             float32, only for int8/fp8
    v_scale

A *slot* is one sequence's row (continuous batching refills slots). Inside a slot, the key of
position p lives at index p % capacity. Keys are stored **after** RoPE, so the order of
entries never matters to a query: a rolling cache needs no re-rotation.

Worked example (sliding window W=4, chunk 2 → capacity C = W + chunk = 6): after 9 tokens,
index i holds position  n-1 - ((n-1-i) mod C)  =  [6, 7, 8, 3, 4, 5];  the query at position 8
sees positions 5..8, all present. Writing a chunk of L new keys before attending overwrites
the L oldest entries, so a chunk may be at most C - W + 1 long (`max_chunk`), else a query at
the chunk's start would lose keys it still needs.

Quantized storage (int8 / fp8-e4m3): one scale per (token, kv-head) vector,
scale = absmax / qmax (qmax 127 for int8, 448 for e4m3), q = round_to_nearest_even(x / scale)
clipped to ±qmax, all in float32 with IEEE division. The CUDA kernels round identically, so
stored bytes agree bit for bit between backends. An all-zero vector stores scale 0 and q 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .config import KV_DTYPE_BYTES, KV_QUANTIZED, ModelConfig
from .errors import TinyLLMError

KV_DTYPES = ("auto",) + tuple(KV_DTYPE_BYTES)
QMAX = {"int8": 127.0, "fp8": 448.0}
# numpy storage dtype for each kv dtype (the CUDA backend stores fp8 as raw uint8 bytes).
NUMPY_STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16,
                 "int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}

DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class KVCacheSpec:
    n_layers: int
    n_slots: int          # sequences that can be live at once (batch slots)
    capacity: int         # entries per slot: max_seq_len, or W + chunk for a rolling cache
    n_kv_heads: int
    head_dim: int
    kv_dtype: str         # resolved: fp32 | fp16 | bf16 | int8 | fp8
    window: int | None    # sliding window W, or None
    max_seq_len: int      # longest sequence (prompt + generation) a slot accepts

    @property
    def quantized(self) -> bool:
        return self.kv_dtype in KV_QUANTIZED

    @property
    def rolling(self) -> bool:
        return self.capacity < self.max_seq_len

    @property
    def max_chunk(self) -> int:
        """Longest run of new tokens one forward may write into a slot (see module doc)."""
        if not self.rolling:
            return self.max_seq_len
        return self.capacity - self.window + 1

    def nbytes(self) -> int:
        per_entry = self.n_kv_heads * self.head_dim * KV_DTYPE_BYTES[self.kv_dtype]
        if self.quantized:
            per_entry += self.n_kv_heads * 4
        return 2 * self.n_layers * self.n_slots * self.capacity * per_entry

    @classmethod
    def for_model(cls, cfg: ModelConfig, kv_dtype: str, max_seq_len: int, n_slots: int = 1,
                  chunk: int = DEFAULT_PREFILL_CHUNK) -> "KVCacheSpec":
        w = cfg.sliding_window
        # Rolling cache: bounded by the window, not the context.
        capacity = min(max_seq_len, w + chunk) if w else max_seq_len
        return cls(cfg.n_layers, n_slots, capacity, cfg.n_kv_heads, cfg.head_dim, kv_dtype,
                   w, max_seq_len)


def resolve_kv_dtype(kv_dtype: str, compute_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise TinyLLMError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return compute_dtype if kv_dtype == "auto" else kv_dtype


def slot_positions(n: int, capacity: int) -> np.ndarray:
    """Position held by each cache index after n tokens were written (-1: empty).
    Index i holds the latest p < n with p % capacity == i."""
    i = np.arange(capacity)
    p = (n - 1) - ((n - 1 - i) % capacity)
    return np.where(p >= 0, p, -1)


def quantize(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """x (..., head_dim) float32 -> (q (..., head_dim) storage dtype, scale (...) float32)."""
    x = np.asarray(x, dtype=np.float32)
    qmax = np.float32(QMAX[kv_dtype])
    scale = np.abs(x).max(axis=-1) / qmax                       # float32 IEEE division
    safe = np.where(scale > 0, scale, np.float32(1))
    y = np.clip(x / safe[..., None], -qmax, qmax)               # |y| <= qmax up to rounding
    if kv_dtype == "int8":
        q = np.rint(y).astype(np.int8)                          # rint = round half to even
    else:
        q = y.astype(ml_dtypes.float8_e4m3fn)                   # round to nearest even
    return q, scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]
