"""KV-cache layout and index math, shared by both backends (no attention math here).

The cache is *paged* (PagedAttention, Kwon et al. 2023; vLLM): a pool of fixed-size blocks,
and per sequence a block table naming the blocks that hold its positions. Per layer
(allocated by the backend in its own array type):

    k, v        (n_blocks, block_size, n_kv_heads, head_dim)   storage dtype
    (int8 / fp8 add scales, offsets and open rows: "Quantized storage" below)

Addressing. A sequence's table has `ring` entries (R); its capacity is C = R * block_size.
Position p lives in block  table[(p // block_size) % R]  at offset  p % block_size.
Without a sliding window R = ceil(max_seq_len / block_size): the table just grows and the
modulo never wraps. With a window W it is a ring: a sequence holds at most
R = ceil((W + chunk) / block_size) + 1 blocks however long it runs. Keys are stored **after**
RoPE, so the order of entries never matters to a query: a ring needs no re-rotation.

Worked example (no window, block_size 4): a 10-token sequence with table [7, 2, 5, -1, ...]
keeps positions 0-3 in block 7, 4-7 in block 2 and 8-9 in offsets 0-1 of block 5; position 9
is k[5, 1]. Unused entries are -1 (never read).

Worked example (window W=4, chunk 2, block_size 2 → R = ceil(6/2) + 1 = 4, C = 8): rows
j = p // 2 of positions go to entries j % 4. When position 8 (row 4) is written, entry 0
still names the block of positions 0-1, which no query can see any more (the window of
position 8 is 5..8): the engine releases it to the pool and puts a fresh block in entry 0
(paging.py), so a shared or prefix-cached block is never overwritten. Right after that
switch, with 9 tokens written, entry 0's unwritten offset 1 stands for position
9 - C = 1 under the addressing rule: stale. Readers therefore start at
max(total - C, q - W + 1) for a query at q (here 5), never below the window. That is why one
forward may write at most  max_chunk = C - W - block_size + 2  new tokens into a ring: the
block rows it replaces must all lie below its first query's window.

Quantized storage (int8 / fp8-e4m3; qmax 127 / 448): keys per channel, values per token
(KIVI, Liu et al. 2024; BENCHMARKS.md measures why: a few key channels carry offsets 100-1000x
the rest, so any per-token key scale wastes the range on them). Per layer, besides k and v:

    k_scale, k_zero  (n_blocks, n_kv_heads, head_dim)   fp16: one scale and offset per channel
    v_scale          (n_blocks, block_size, n_kv_heads) float32: one scale per value vector
    k_open           (n_open, block_size, n_kv_heads, head_dim)  float32 (both backends)

* V, as it is written: scale = absmax / qmax over the vector, q = rint(x / scale) clipped to
  ±qmax (int8) or the e4m3 cast of the clipped x / scale (round to nearest even), all float32
  with IEEE division; an all-zero vector stores scale 0 and q 0 (`quantize`).
* K of a *closed* block (all block_size positions written), per (kv head, channel) over its
  block_size keys x: offset c = fp16((max x + min x) / 2), y = x - c, scale s =
  fp16(max|y| / qmax), q = y / s rounded as for V (q = 0 where s = 0) (`quantize_block`).
  Read back as q * s + c.
* K of a sequence's *open* block (its last, partly written row) stays in full precision in
  the sequence's open row k_open[o] (Batch.opens[b] = o; kept while it runs) at offset
  p % block_size, until the block's last position is written; then the block is quantized
  from those keys and the new ones, in the same forward, before attention reads it (KIVI's
  residual). After `total` positions, positions below total // block_size * block_size are
  read from blocks, the rest from the open row (`closed_below`).
The CUDA kernels round identically, so stored bytes agree bit for bit between backends.
Full blocks are closed, so the prefix cache shares only quantized blocks, and a preempted or
restarted sequence recomputes from a block boundary.

Worked example (int8, block_size 4, one kv head, one channel): keys 1.0, 3.0, 2.0 at positions
0-2 sit in the open row; position 3 (-5.0) closes the block: c = (3 + -5) / 2 = -1,
y = 2, 4, 3, -4, s = fp16(4 / 127) = 0.031494140625, q = rint(y / s) = 64, 127, 95, -127,
read back as 1.0156, 2.9998, 1.9919, -4.9998.

Bytes per token (ModelConfig.kv_bytes_per_token): per (layer, kv head) 2 * head_dim codes,
4 for V's scale and 4 * head_dim / block_size for K's scale and offset; plus each running
sequence's open row (block_size full-precision keys), which is not per token
(KVCacheSpec.open_nbytes).

Block size (DEFAULT_BLOCK_SIZE = 16, as vLLM): the kernels address every key through the
table on its own (one table read per key row; a prefill key tile of FA2_BN = 64 keys spans
four blocks), so the block size need not match a kernel tile. Small blocks waste less (on
average half a block per sequence is empty) and match prompts at a finer grain; 16 is also
the key-scale group of the KIVI format (BENCHMARKS.md: 16-token blocks measured best). Any
size >= 1 is correct.
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
NUMPY_STORAGE = {
    "fp32": np.float32,
    "fp16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "int8": np.int8,
    "fp8": ml_dtypes.float8_e4m3fn,
}

DEFAULT_PREFILL_CHUNK = 512
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class KVCacheSpec:
    n_layers: int
    n_blocks: int  # blocks in the pool
    block_size: int  # positions per block
    ring: int  # block-table entries per sequence (R): the most blocks one sequence holds
    n_kv_heads: int
    head_dim: int
    kv_dtype: str  # resolved: fp32 | fp16 | bf16 | int8 | fp8
    window: int | None  # sliding window W, or None
    max_seq_len: int  # longest sequence (prompt + generation) accepted
    n_open: int = 1  # open rows (int8/fp8 keys of open blocks): one per running sequence
    # (rows 0 .. n_open-2) and the logits row (n_open-1, see logits_row)

    @property
    def quantized(self) -> bool:
        return self.kv_dtype in KV_QUANTIZED

    @property
    def logits_row(self) -> int:
        """The open row of full-sequence logits (Engine.logits): never one a running
        sequence holds, so logits() can run between generation steps."""
        return self.n_open - 1

    @property
    def seq_open_rows(self) -> range:
        """The open rows running sequences take, one each."""
        return range(self.n_open - 1)

    @property
    def capacity(self) -> int:
        """C = R * block_size: positions one sequence's table addresses before it wraps."""
        return self.ring * self.block_size

    @property
    def rolling(self) -> bool:
        return self.capacity < self.max_seq_len

    @property
    def max_chunk(self) -> int:
        """Longest run of new tokens one forward may write for a sequence (see module doc)."""
        if not self.rolling:
            return self.max_seq_len
        return self.capacity - self.window - self.block_size + 2

    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, K and V (and their scales)."""
        kv = self.n_kv_heads * self.head_dim
        b = 2 * self.block_size * kv * KV_DTYPE_BYTES[self.kv_dtype]
        if self.quantized:
            b += (
                self.block_size * self.n_kv_heads * 4 + 2 * kv * 2
            )  # v scales; k scale and offset (fp16)
        return self.n_layers * b

    def open_row_nbytes(self) -> int:
        """Bytes of one open row (int8/fp8 only): block_size float32 keys per kv head and layer."""
        return (
            4 * self.n_layers * self.block_size * self.n_kv_heads * self.head_dim
            if self.quantized
            else 0
        )

    def open_nbytes(self) -> int:
        return self.n_open * self.open_row_nbytes()

    def nbytes(self) -> int:
        return self.n_blocks * self.block_nbytes() + self.open_nbytes()

    def tokens(self) -> int:
        """KV positions the whole pool holds."""
        return self.n_blocks * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks one sequence of n_tokens positions holds at most (a ring caps it at R)."""
        return min(-(-n_tokens // self.block_size), self.ring)

    def slot_tables(self, slots) -> np.ndarray:
        """(len(slots), R) int32 tables of the fixed layout where 'slot' s owns blocks
        s*R .. s*R + R-1: the contiguous per-sequence cache expressed as pages (tests and
        single-sequence tools use it; the engine allocates from the pool instead)."""
        s = np.asarray(slots, np.int64)
        if len(s) and (s.max() + 1) * self.ring > self.n_blocks:
            raise ValueError(
                f"slot {int(s.max())} needs {(int(s.max()) + 1) * self.ring} blocks; the pool has "
                f"{self.n_blocks}"
            )
        return (s[:, None] * self.ring + np.arange(self.ring)[None, :]).astype(np.int32)

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        kv_dtype: str,
        max_seq_len: int,
        n_seqs: int = 1,
        chunk: int = DEFAULT_PREFILL_CHUNK,
        block_size: int = DEFAULT_BLOCK_SIZE,
        n_blocks: int | None = None,
    ) -> KVCacheSpec:
        """The cache of a model: n_blocks from the caller (a memory budget), or enough for
        n_seqs sequences of max_seq_len each (what fixed slots would have taken)."""
        w = cfg.sliding_window
        ring = -(-max_seq_len // block_size)
        if w:  # the rolling ring: bounded by the window, not the context
            ring = min(ring, -(-(w + chunk) // block_size) + 1)
        return cls(
            cfg.n_layers,
            n_blocks if n_blocks is not None else n_seqs * ring,
            block_size,
            ring,
            cfg.n_kv_heads,
            cfg.head_dim,
            kv_dtype,
            w,
            max_seq_len,
            n_open=n_seqs + 1,
        )


def layout(spec: KVCacheSpec) -> dict[str, tuple[tuple[int, ...], type | None]]:
    """The arrays of one layer, name -> (shape, dtype), as the module doc lists them; dtype
    None is the kv dtype's storage, which each backend picks (NUMPY_STORAGE; raw bytes for fp8
    on CUDA). Both backends allocate exactly these, in this order."""
    kv = (spec.n_blocks, spec.block_size, spec.n_kv_heads, spec.head_dim)
    arrays = {"k": (kv, None), "v": (kv, None)}
    if spec.quantized:
        meta = (spec.n_blocks, spec.n_kv_heads, spec.head_dim)
        arrays.update(
            k_scale=(meta, np.float16),
            k_zero=(meta, np.float16),
            v_scale=(kv[:3], np.float32),
            k_open=((spec.n_open,) + kv[1:], np.float32),
        )
    return arrays


def resolve_kv_dtype(kv_dtype: str, compute_dtype: str) -> str:
    if kv_dtype not in KV_DTYPES:
        raise TinyLLMError(f"unknown kv dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return compute_dtype if kv_dtype == "auto" else kv_dtype


def visible_lo(total: int, first_query: int, spec: KVCacheSpec) -> int:
    """The smallest position any query at first_query or later may read after `total`
    positions were written: what the table still holds, and inside the window."""
    lo = max(0, total - spec.capacity)
    return max(lo, first_query - spec.window + 1) if spec.window else lo


def closed_below(total: int, spec: KVCacheSpec) -> int:
    """Positions below this live in closed blocks after `total` were written (int8/fp8: the
    rest are in the open row)."""
    return total // spec.block_size * spec.block_size


def entries(
    table: np.ndarray, positions: np.ndarray, spec: KVCacheSpec
) -> tuple[np.ndarray, np.ndarray]:
    """(block, offset) of each position through one sequence's table (R,)."""
    positions = np.asarray(positions, np.int64)
    return table[(positions // spec.block_size) % spec.ring], positions % spec.block_size


def _codes(y: np.ndarray, scale: np.ndarray, kv_dtype: str) -> np.ndarray:
    """y / scale clipped to ±qmax (0 where scale is 0), rounded to the storage dtype."""
    qmax = np.float32(QMAX[kv_dtype])
    t = np.divide(y, scale, out=np.zeros_like(y), where=scale > 0)  # float32 IEEE division
    t = np.clip(t, -qmax, qmax)
    if kv_dtype == "int8":
        return np.rint(t).astype(np.int8)  # rint = round half to even
    return t.astype(ml_dtypes.float8_e4m3fn)  # round to nearest even


def quantize(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Per vector (V): x (..., head_dim) float32 -> (q (..., head_dim) storage dtype,
    scale (...) float32)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / np.float32(QMAX[kv_dtype])
    return _codes(x, scale[..., None], kv_dtype), scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None]


def quantize_block(x: np.ndarray, kv_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel over a block (K): x (block_size, ..., head_dim) float32 -> (q like x in the
    storage dtype, scale (..., head_dim) fp16, offset (..., head_dim) fp16); see the module doc."""
    x = np.asarray(x, dtype=np.float32)
    c = ((x.max(axis=0) + x.min(axis=0)) * np.float32(0.5)).astype(np.float16)
    y = x - c.astype(np.float32)
    s = (np.abs(y).max(axis=0) / np.float32(QMAX[kv_dtype])).astype(np.float16)
    return _codes(y, s.astype(np.float32), kv_dtype), s, c


def dequantize_block(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """q (n, ..., head_dim) with the scale and offset (..., head_dim) of its block, or one
    per row (n, ..., head_dim)."""
    return q.astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)
