"""The numpy backend: the float32 reference every other path is tested against.

Clarity first: each op is the math, a few lines long. CUDA kernels in cuda/*.cu name the
function here that is their twin.
"""

from __future__ import annotations

import numpy as np

from ..kv_cache import NUMPY_STORAGE, KVCacheSpec, dequantize, quantize, slot_positions


class NumpyKVCache:
    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        shape = (spec.n_slots, spec.capacity, spec.n_kv_heads, spec.head_dim)
        dt = NUMPY_STORAGE[spec.kv_dtype]
        self.k = [np.zeros(shape, dt) for _ in range(spec.n_layers)]
        self.v = [np.zeros(shape, dt) for _ in range(spec.n_layers)]
        if spec.quantized:
            self.k_scale = [np.zeros(shape[:3], np.float32) for _ in range(spec.n_layers)]
            self.v_scale = [np.zeros(shape[:3], np.float32) for _ in range(spec.n_layers)]

    def nbytes(self) -> int:
        arrays = self.k + self.v + (self.k_scale + self.v_scale if self.spec.quantized else [])
        return sum(a.nbytes for a in arrays)

    def write(self, layer: int, slot: int, idx: np.ndarray, k: np.ndarray, v: np.ndarray):
        """k, v (n, n_kv, hd) float32 into cache indices idx (n,) of one slot."""
        if self.spec.quantized:
            self.k[layer][slot, idx], self.k_scale[layer][slot, idx] = quantize(k, self.spec.kv_dtype)
            self.v[layer][slot, idx], self.v_scale[layer][slot, idx] = quantize(v, self.spec.kv_dtype)
        else:
            self.k[layer][slot, idx] = k
            self.v[layer][slot, idx] = v

    def read(self, layer: int, slot: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first n entries of a slot, float32 (dequantized on the fly for int8/fp8)."""
        k, v = self.k[layer][slot, :n], self.v[layer][slot, :n]
        if self.spec.quantized:
            return dequantize(k, self.k_scale[layer][slot, :n]), dequantize(v, self.v_scale[layer][slot, :n])
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
        cap = cache.spec.capacity
        for b, slot in enumerate(batch.slots):
            r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
            cache.write(layer, slot, batch.positions[r] % cap, k[r], v[r])
        return q

    def attention(self, q, cache: NumpyKVCache, layer, batch, scale):
        """For each sequence: softmax(q kᵀ · scale + mask) v over its cache slot, where the
        key at cache index i holds position slot_positions(...)[i] and query position qp
        sees key positions p with  qp - W < p <= qp  (W = window, or unbounded)."""
        spec = cache.spec
        T, n_heads, hd = q.shape
        n_kv, n_rep = spec.n_kv_heads, n_heads // spec.n_kv_heads
        out = np.empty((T, n_heads, hd), np.float32)
        for b, slot in enumerate(batch.slots):
            r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
            total = int(batch.starts[b] + batch.lens[b])           # tokens cached after the write
            n = min(total, spec.capacity)
            k, v = cache.read(layer, slot, n)                        # (n, n_kv, hd)
            kpos = slot_positions(total, spec.capacity)[:n]          # (n,)
            qpos = batch.positions[r]                                # (L,)
            allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0)
            if spec.window:
                allowed &= kpos[None, :] > qpos[:, None] - spec.window
            # GQA: query head h = g * n_rep + j uses KV head g.
            qg = q[r].reshape(-1, n_kv, n_rep, hd).transpose(1, 2, 0, 3)   # (n_kv, n_rep, L, hd)
            s = qg @ k.transpose(1, 2, 0)[:, None] * scale                  # (n_kv, n_rep, L, n)
            s = np.where(allowed, s, -np.inf)
            o = softmax(s) @ v.transpose(1, 0, 2)[:, None]                   # (n_kv, n_rep, L, hd)
            out[r] = o.transpose(2, 0, 1, 3).reshape(-1, n_heads, hd)
        return out.reshape(T, n_heads * hd)
