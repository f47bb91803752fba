"""The numpy backend: the float32 reference every other path is tested against.

Clarity first: each op is the math, a few lines long. CUDA kernels in cuda/*.cu name the
function here that is their twin.
"""

from __future__ import annotations

import numpy as np

from ..kv_cache import NUMPY_STORAGE, KVCacheSpec, dequantize, entries, quantize, visible_lo


class NumpyKVCache:
    """kv_cache.py's paged layout in numpy arrays: per layer k, v (n_blocks, block_size,
    n_kv, hd) and, for int8/fp8, scales (n_blocks, block_size, n_kv)."""

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        shape = (spec.n_blocks, spec.block_size, spec.n_kv_heads, spec.head_dim)
        dt = NUMPY_STORAGE[spec.kv_dtype]
        self.k = [np.zeros(shape, dt) for _ in range(spec.n_layers)]
        self.v = [np.zeros(shape, dt) for _ in range(spec.n_layers)]
        if spec.quantized:
            self.k_scale = [np.zeros(shape[:3], np.float32) for _ in range(spec.n_layers)]
            self.v_scale = [np.zeros(shape[:3], np.float32) for _ in range(spec.n_layers)]

    def nbytes(self) -> int:
        arrays = self.k + self.v + (self.k_scale + self.v_scale if self.spec.quantized else [])
        return sum(a.nbytes for a in arrays)

    def write(self, layer: int, table: np.ndarray, positions: np.ndarray, k: np.ndarray, v: np.ndarray):
        """k, v (n, n_kv, hd) float32 of one sequence's positions (n,), through its table (R,)."""
        at = entries(table, positions, self.spec)                 # (block ids, offsets)
        if self.spec.quantized:
            self.k[layer][at], self.k_scale[layer][at] = quantize(k, self.spec.kv_dtype)
            self.v[layer][at], self.v_scale[layer][at] = quantize(v, self.spec.kv_dtype)
        else:
            self.k[layer][at] = k
            self.v[layer][at] = v

    def read(self, layer: int, table: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V (n, n_kv, hd) float32 of one sequence's positions (n,) (dequantized on
        the fly for int8/fp8): the gather a paged attention kernel does block by block."""
        at = entries(table, positions, self.spec)
        k, v = self.k[layer][at], self.v[layer][at]
        if self.spec.quantized:
            return dequantize(k, self.k_scale[layer][at]), dequantize(v, self.v_scale[layer][at])
        return k.astype(np.float32), v.astype(np.float32)


def rope_rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE (HF layout): pairs (j, j + d/2) turn by angle pos * inv_freq[j].
    x (T, heads, d), positions (T,), inv_freq (d/2,) float32."""
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]     # (T, d/2), fp32 like HF
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class NumpyBackend:
    name = "numpy"
    compute_dtype = "fp32"

    def upload(self, name: str, a: np.ndarray) -> np.ndarray:
        # An owned, aligned float32 copy: a safetensors memmap view may sit at an offset
        # that is not a multiple of 4, and BLAS falls back to slow loops on unaligned data.
        return np.array(a, dtype=np.float32, order="C", copy=True)

    def to_numpy(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def alloc_kv(self, spec: KVCacheSpec) -> NumpyKVCache:
        return NumpyKVCache(spec)

    def prepare(self, batch):
        return batch

    def embed(self, table, tokens):
        return table[tokens]

    def rms_norm(self, x, w, eps):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def add_rms_norm(self, x, d, w, eps):
        x = x + d
        return x, self.rms_norm(x, w, eps)

    def linear(self, x, w, b=None):
        y = x @ w.T
        return y if b is None else y + b

    def silu_mul(self, gate, up):
        return gate / (1.0 + np.exp(-gate)) * up

    def take_rows(self, x, rows):
        return x[rows]

    def rope_kv_write(self, q, k, v, cache: NumpyKVCache, layer, batch, inv_freq):
        q = rope_rotate(q, batch.positions, inv_freq)
        k = rope_rotate(k, batch.positions, inv_freq)
        for b, table in enumerate(batch.tables):
            r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
            cache.write(layer, table, batch.positions[r], k[r], v[r])
        return q

    def attention(self, q, cache: NumpyKVCache, layer, batch, scale):
        """For each sequence: softmax(q kᵀ · scale + mask) v over the positions its block
        table holds, where query position qp sees key positions p with qp - W < p <= qp
        (W = window, or unbounded). Keys are gathered from lo = kv_cache.visible_lo on."""
        spec = cache.spec
        T, n_heads, hd = q.shape
        n_kv, n_rep = spec.n_kv_heads, n_heads // spec.n_kv_heads
        out = np.empty((T, n_heads, hd), np.float32)
        for b, table in enumerate(batch.tables):
            r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
            qpos = batch.positions[r]                                # (L,)
            total = int(batch.starts[b] + batch.lens[b])           # positions cached after the write
            kpos = np.arange(visible_lo(total, int(qpos[0]), spec), total)   # (n,)
            k, v = cache.read(layer, table, kpos)                    # (n, n_kv, hd)
            allowed = kpos[None, :] <= qpos[:, None]
            if spec.window:
                allowed &= kpos[None, :] > qpos[:, None] - spec.window
            # GQA: query head h = g * n_rep + j uses KV head g.
            qg = q[r].reshape(-1, n_kv, n_rep, hd).transpose(1, 2, 0, 3)   # (n_kv, n_rep, L, hd)
            s = qg @ k.transpose(1, 2, 0)[:, None] * scale                  # (n_kv, n_rep, L, n)
            s = np.where(allowed, s, -np.inf)
            o = softmax(s) @ v.transpose(1, 0, 2)[:, None]                   # (n_kv, n_rep, L, hd)
            out[r] = o.transpose(2, 0, 1, 3).reshape(-1, n_heads, hd)
        return out.reshape(T, n_heads * hd)
