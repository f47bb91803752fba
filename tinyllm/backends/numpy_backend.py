"""The numpy backend: the float32 reference every other path is tested against.

Clarity first: each op is the math, a few lines long. CUDA kernels in cuda/*.cu name the
function here that is their twin.
"""

from __future__ import annotations

import numpy as np

from .. import quant
from ..kv_cache import (
    NUMPY_STORAGE,
    KVCacheSpec,
    closed_below,
    dequantize,
    dequantize_block,
    entries,
    layout,
    quantize,
    quantize_block,
    visible_lo,
)


class NumpyKVCache:
    """kv_cache.py's paged layout in numpy arrays: per layer k, v (n_blocks, block_size,
    n_kv, hd); for int8/fp8 also k_scale, k_zero (n_blocks, n_kv, hd) fp16, v_scale
    (n_blocks, block_size, n_kv) float32 and the open rows k_open (n_open, block_size, n_kv,
    hd) float32."""

    def __init__(self, spec: KVCacheSpec):
        self.spec = spec
        for name, (shape, dt) in layout(spec).items():
            setattr(
                self,
                name,
                [np.zeros(shape, dt or NUMPY_STORAGE[spec.kv_dtype]) for _ in range(spec.n_layers)],
            )

    def arrays(self) -> list[np.ndarray]:
        return [a for name in layout(self.spec) for a in getattr(self, name)]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def write(
        self,
        layer: int,
        table: np.ndarray,
        positions: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        open_row: int = 0,
    ):
        """k, v (n, n_kv, hd) float32 of one sequence's consecutive positions (n,), through
        its table (R,); int8/fp8 keys through its open row (see kv_cache.py)."""
        at = entries(table, positions, self.spec)  # (block ids, offsets)
        if not self.spec.quantized:
            self.k[layer][at] = k
            self.v[layer][at] = v
            return
        self.v[layer][at], self.v_scale[layer][at] = quantize(v, self.spec.kv_dtype)
        # K: the open row's earlier keys, then the new ones, cover positions row0 .. end-1;
        # every block they complete is quantized, what is left is the new open row.
        bs, start, end = self.spec.block_size, int(positions[0]), int(positions[-1]) + 1
        row0, closed = start // bs * bs, closed_below(end, self.spec)
        keys = np.concatenate([self.k_open[layer][open_row, : start - row0], k])
        for r in range(row0, closed, bs):
            blk = table[(r // bs) % self.spec.ring]
            self.k[layer][blk], self.k_scale[layer][blk], self.k_zero[layer][blk] = quantize_block(
                keys[r - row0 : r - row0 + bs], self.spec.kv_dtype
            )
        rest = keys[closed - row0 :]
        self.k_open[layer][open_row, : len(rest)] = rest

    def read(
        self,
        layer: int,
        table: np.ndarray,
        positions: np.ndarray,
        total: int = 0,
        open_row: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V (n, n_kv, hd) float32 of one sequence's positions (n,) after `total` were
        written (dequantized on the fly for int8/fp8): the gather a paged attention kernel
        does block by block."""
        at = entries(table, positions, self.spec)
        k, v = self.k[layer][at], self.v[layer][at]
        if not self.spec.quantized:
            return k.astype(np.float32), v.astype(np.float32)
        blocks = at[0]
        k = dequantize_block(k, self.k_scale[layer][blocks], self.k_zero[layer][blocks])
        is_open = positions >= closed_below(total, self.spec)
        k[is_open] = self.k_open[layer][open_row, at[1][is_open]]
        return k, dequantize(v, self.v_scale[layer][at])


def batch_entries(
    tables: np.ndarray, rows: np.ndarray, positions: np.ndarray, spec: KVCacheSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(block, offset) of each position, where rows (broadcast with positions) names the
    table (tables (B, R)) each goes through: kv_cache.entries for a batch at once."""
    positions = np.asarray(positions, np.int64)
    return tables[rows, (positions // spec.block_size) % spec.ring], positions % spec.block_size


def rope_rotate(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE (HF layout): pairs (j, j + d/2) turn by angle pos * inv_freq[j].
    x (T, heads, d), positions (T,), inv_freq (d/2,) float32."""
    ang = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # (T, d/2), fp32 like HF
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def sequence_positions(
    batch, b: int, spec: KVCacheSpec
) -> tuple[slice, np.ndarray, int, np.ndarray]:
    """Sequence b of a batch in attention: its rows r of q, their positions qpos (L,), the
    positions cached after this step's write (total), and the key positions kpos (n,) its
    queries may read (kv_cache.visible_lo on)."""
    r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
    qpos = batch.positions[r]
    total = int(batch.starts[b] + batch.lens[b])
    return r, qpos, total, np.arange(visible_lo(total, int(qpos[0]), spec), total)


def plain_cache(cache) -> bool:
    """An unquantized NumpyKVCache as it is, not a subclass storing something else (kv_formats'
    study cache rounds K and V in its write): its write is a plain store and its read a plain
    gather, so the batched paths (and the cpu backend's kernels) may do both directly."""
    return type(cache) is NumpyKVCache and not cache.spec.quantized


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class NumpyBackend:
    name = "numpy"
    compute_dtype = "fp32"

    def float_bytes(self, checkpoint_dtype: str) -> int:
        """Bytes per unquantized weight as held (memory.host_plan; backends.float_bytes)."""
        from . import float_bytes

        return float_bytes(self.name, checkpoint_dtype)

    # Capabilities (backends/__init__.py): what the engine and the memory plan may rely on.
    graphs = None  # no captured decode graphs
    device_sampling = False  # sampling runs on the host (sampling.py)
    device_memory = False  # weights and KV live in host RAM (memory.py's host plan)
    fused_projections = False  # q|k|v and gate|up stay separate matrices (readable)
    quant_formats = quant.FORMATS  # linear runs every weight-only format (dequantize + matmul)

    def upload(self, name: str, a: np.ndarray) -> np.ndarray:
        # An owned, aligned float32 copy: a safetensors memmap view may sit at an offset
        # that is not a multiple of 4, and BLAS falls back to slow loops on unaligned data.
        return np.array(a, dtype=np.float32, order="C", copy=True)

    def upload_quant(self, name: str, qt: quant.QuantTensor) -> quant.QuantTensor:
        # Owned C-contiguous parts (a safetensors memmap view may be unaligned).
        parts = {k: np.array(p, order="C", copy=True) for k, p in qt.parts.items()}
        return quant.QuantTensor(qt.fmt, tuple(qt.shape), parts)

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
        if isinstance(w, quant.QuantTensor):
            # The reference: rebuild the float32 matrix (quant.dequantize: the formats'
            # formulas) and multiply. A kernel does the same a block at a time in registers.
            w = quant.dequantize(w)
        y = x @ w.T
        return y if b is None else y + b

    def silu_mul(self, gate, up):
        return gate / (1.0 + np.exp(-gate)) * up

    def take_rows(self, x, rows):
        return x[rows]

    def rope(self, x, positions, inv_freq):
        return rope_rotate(x, positions, inv_freq)

    def rope_kv_write(self, q, k, v, cache: NumpyKVCache, layer, batch, inv_freq):
        q = self.rope(q, batch.positions, inv_freq)
        k = self.rope(k, batch.positions, inv_freq)
        if plain_cache(cache):  # one scatter for every token: (block, offset) of each
            at = batch_entries(batch.tables, batch.seq_of_token, batch.positions, cache.spec)
            cache.k[layer][at], cache.v[layer][at] = k, v
            return q
        for b, table in enumerate(batch.tables):
            r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
            cache.write(layer, table, batch.positions[r], k[r], v[r], batch.opens[b])
        return q

    def attention(self, q, cache: NumpyKVCache, layer, batch, scale):
        """For each sequence: softmax(q kᵀ · scale + mask) v over the positions its block
        table holds, where query position qp sees key positions p with qp - W < p <= qp
        (W = window, or unbounded). Keys are gathered from lo = kv_cache.visible_lo on."""
        spec = cache.spec
        T, n_heads, hd = q.shape
        n_kv, n_rep = spec.n_kv_heads, n_heads // spec.n_kv_heads
        out = np.empty((T, n_heads, hd), np.float32)
        loop = range(len(batch.lens))
        one = np.flatnonzero(batch.lens == 1)  # sequences bringing one token (decoding)
        if len(one) > 1 and plain_cache(cache):  # together (_decode_attention), the rest here
            rows = batch.cu_lens[one]
            out[rows] = self._decode_attention(q[rows], cache, layer, batch, one, scale)
            loop = np.flatnonzero(batch.lens != 1)
        for b in loop:
            table = batch.tables[b]
            r, qpos, total, kpos = sequence_positions(batch, b, spec)
            k, v = cache.read(layer, table, kpos, total, batch.opens[b])  # (n, n_kv, hd)
            allowed = kpos[None, :] <= qpos[:, None]
            if spec.window:
                allowed &= kpos[None, :] > qpos[:, None] - spec.window
            # GQA: query head h = g * n_rep + j uses KV head g.
            qg = q[r].reshape(-1, n_kv, n_rep, hd).transpose(1, 2, 0, 3)  # (n_kv, n_rep, L, hd)
            s = qg @ k.transpose(1, 2, 0)[:, None] * scale  # (n_kv, n_rep, L, n)
            s = np.where(allowed, s, -np.inf)
            o = softmax(s) @ v.transpose(1, 0, 2)[:, None]  # (n_kv, n_rep, L, hd)
            out[r] = o.transpose(2, 0, 1, 3).reshape(-1, n_heads, hd)
        return out.reshape(T, n_heads * hd)

    def _decode_attention(self, q, cache: NumpyKVCache, layer, batch, seqs, scale):
        """attention() of the sequences `seqs` (B,) of the batch that bring one token each
        (q (B, n_heads, hd): their rows; unquantized cache), all at once: each one's keys
        lo_b .. total_b - 1 gathered into rows padded to the longest n, the padding masked to
        -inf (weight exactly 0; it gathers valid cache entries, so 0 * v stays 0). The loop's
        math in one set of array ops instead of B: padding changes only the order of float
        sums (the loop's results to rounding, not bit for bit). Returns (B, n_heads, hd)."""
        spec = cache.spec
        B, n_heads, hd = q.shape
        n_kv, n_rep = spec.n_kv_heads, n_heads // spec.n_kv_heads
        total = batch.starts[seqs].astype(np.int64) + 1  # (B,) positions cached after the write
        lo = np.array([visible_lo(int(t), int(t) - 1, spec) for t in total])  # (B,)
        n = total - lo  # (B,) keys each query sees (its window's, or all)
        col = np.arange(int(n.max()))  # (N,)
        valid = col[None, :] < n[:, None]  # (B, N)
        kpos = lo[:, None] + np.where(valid, col[None, :], 0)  # (B, N): padding reads lo_b
        at = batch_entries(batch.tables, seqs[:, None], kpos, spec)
        k = cache.k[layer][at].astype(np.float32)  # (B, N, n_kv, hd)
        v = cache.v[layer][at].astype(np.float32)
        # GQA: query head h = g * n_rep + j uses KV head g.
        qg = q.reshape(B, n_kv, n_rep, 1, hd)
        s = qg @ k.transpose(0, 2, 3, 1)[:, :, None] * scale  # (B, n_kv, n_rep, 1, N)
        s = np.where(valid[:, None, None, None, :], s, -np.inf)
        o = softmax(s) @ v.transpose(0, 2, 1, 3)[:, :, None]  # (B, n_kv, n_rep, 1, hd)
        return o.reshape(B, n_heads, hd)
