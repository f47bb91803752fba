"""The CUDA backend: CuPy arrays, our kernels (cuda/*.cu, loaded by cuda_kernels.py) and cuBLAS
for large matrix products. Implements the op interface of backends/__init__.py; every op names
its numpy twin in numpy_backend.py / kv_cache.py, and every kernel file says the same.

Data types: weights and activations are bf16 on the device (fp16 and fp32 checkpoints are cast
to bf16 on the host while uploading: one compute dtype keeps every kernel single-typed), with
fp32 accumulation and fp32 softmax statistics. The vocabulary projection (the weight uploaded as
lm_head.weight, or the embedding table when tied) writes fp32 logits. KV caches store bf16,
fp16, fp32, int8 or fp8-e4m3 (raw bytes) exactly as kv_cache.py lays them out.

Owns: launch geometry, the version registry (VERSIONS), workspaces, GPU memory checks. Does not
own: the model (model.py), cache index math (kv_cache.py), kernel sources and tile sizes
(cuda/*.cu, cuda_kernels.TILES). The pure-Python helpers at the top (launch geometry, bf16
conversion, memory arithmetic) run without a GPU; the CudaBackend class needs CuPy and a device.
"""

from __future__ import annotations

import ctypes
import math
import weakref

import ml_dtypes
import numpy as np

from ..errors import TinyLLMError
from ..kv_cache import KVCacheSpec, layout
from . import Batch
from . import cuda_kernels as ck

# ---- the version registry --------------------------------------------------------------------
# Which kernel version each op launches by default; promoting a version changes one string.
# Tests run every version against numpy. A version that needs aligned/vectorizable shapes falls
# back to v1 by itself when a call does not qualify.
VERSIONS = {
    "rms_norm": "v2",  # v1 scalar, v2 16-byte vectors
    "silu_mul": "v2",  # v1 scalar, v2 16-byte vectors
    "prefill_attention": "v2",  # v1 FMA flash attention, v2 mma.sync tensor cores
    "decode_attention": "v1",  # v1 split-K flash decoding for sequences bringing one token;
    # "prefill" sends them through the prefill kernel too
    "gemv": "v1",  # the few-row matmul (<= GEMV_MAX_M rows, more go to cuBLAS);
    # "v1-all" any row count in GEMV_MAX_M-row chunks (what a CUDA
    # graph step uses: cuBLAS is not capturable through CuPy);
    # "cublas" sends every matmul to cuBLAS
}

# cuBLAS / CUDA enum values (CUPY.md §1; cupy_backends cublas.pxd, library_types.h). Kept here so
# importing this module never loads libcublas.
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1

UPLOAD_CHUNK_BYTES = 64 << 20  # pinned staging buffer (x2) for weight uploads
DECODE_MIN_SPLIT = 64  # fewest key positions per decode split
DECODE_CTAS_PER_SM = 4  # decode grid target: this many CTAs per SM
LOGIT_WEIGHT_NAMES = (
    "lm_head.weight",
    "embed_tokens.weight",
    "tok_embeddings.weight",
    "output.weight",
)


# ---- pure-Python helpers (no GPU needed) -------------------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float array -> bf16 bit patterns (uint16), round to nearest even (as __float2bfloat16_rn)."""
    return np.ascontiguousarray(a).astype(ml_dtypes.bfloat16).view(np.uint16)


def bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    return (np.asarray(u, np.uint16).astype(np.uint32) << 16).view(np.float32)


def head_dim_tile(hd: int) -> int:
    """The compiled head-dim tile (64 or 128) a head_dim runs in; smaller ones are zero-padded."""
    if hd % 8 or hd > max(ck.HEAD_DIMS) or hd <= 0:
        raise TinyLLMError(
            f"the cuda backend supports head_dim that is a multiple of 8 and at most "
            f"{max(ck.HEAD_DIMS)} (got {hd}); use --backend numpy"
        )
    return next(t for t in ck.HEAD_DIMS if hd <= t)


def decode_rep(n_rep: int) -> tuple[int, int]:
    """(query heads per decode CTA, CTAs per kv head) for a GQA group of n_rep heads."""
    rep = next((r for r in ck.DECODE_REPS if r >= n_rep), max(ck.DECODE_REPS))
    return rep, -(-n_rep // rep)


def visible_range(start: int, length: int, capacity: int, window: int | None) -> tuple[int, int]:
    """[lo, hi] key positions the last query of a sequence sees (cuda/common.cuh key_visible)."""
    qp = start + length - 1
    total = start + length
    lo = total - min(total, capacity)
    if window:
        lo = max(lo, qp - window + 1)
    return lo, qp


def decode_splits(ranges: list[int], ctas_per_split: int, n_sms: int) -> tuple[int, int]:
    """(split_len, n_splits) for split-K decoding: enough CTAs to fill the GPU
    (DECODE_CTAS_PER_SM per SM), splits at least DECODE_MIN_SPLIT positions long."""
    max_r = max(max(ranges), 1)
    want = max(1, -(-DECODE_CTAS_PER_SM * n_sms // max(ctas_per_split, 1)))
    split_len = max(DECODE_MIN_SPLIT, -(-max_r // want))
    split_len = -(-split_len // 32) * 32
    return split_len, -(-max_r // split_len)


def prefill_tiles(
    lens: np.ndarray, n_rep: int, rows_per_tile: int
) -> tuple[np.ndarray, np.ndarray]:
    """The CTA list of the prefill kernels: sequence b has lens[b]*n_rep rows (token, head of
    the group), cut into tiles of rows_per_tile. Returns (tile_seq, tile_row0) int32."""
    seq, row0 = [], []
    for b, n in enumerate(np.asarray(lens).tolist()):
        nt = -(-n * n_rep // rows_per_tile)
        seq += [b] * nt
        row0 += [i * rows_per_tile for i in range(nt)]
    return np.asarray(seq, np.int32), np.asarray(row0, np.int32)


def gather_vec_bytes(row_bytes: int, stride_bytes: int, *addresses: int) -> int:
    """Widest copy unit (16, 4, 2, 1 bytes) dividing the row, the stride and every address."""
    for v in (16, 4, 2, 1):
        if row_bytes % v == 0 and stride_bytes % v == 0 and all(a % v == 0 for a in addresses):
            return v
    return 1


def fmt_gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def fits_message(
    weight_bytes: int,
    kv_bytes: int,
    free: int,
    working: int = 0,
    kv_bytes_per_token: int | None = None,
    max_seq_len: int | None = None,
) -> str | None:
    """None if weights + KV cache + working memory (memory.py's estimate) fit in `free` bytes,
    else the user-facing reason with the longest context that would fit."""
    need = weight_bytes + kv_bytes + working
    if need <= free:
        return None
    msg = (
        f"the model needs {fmt_gb(need)} of GPU memory ({fmt_gb(weight_bytes)} weights + "
        f"{fmt_gb(kv_bytes)} KV cache + {fmt_gb(working)} working memory) and "
        f"{fmt_gb(free)} is free"
    )
    room = free - weight_bytes - working
    if kv_bytes_per_token and room > 0:
        longest = room // kv_bytes_per_token
        if max_seq_len:
            longest = min(longest, max_seq_len)
        msg += f"; the longest context that fits is {longest} tokens (pass max_seq_len={longest}"
        msg += " or a smaller kv_dtype such as int8)"
    elif room <= 0:
        msg += "; the weights alone do not fit: use a smaller model or --backend numpy"
    return msg


# ---- quantized weights (tinyllm/quant.py's layout; cuda/quant_matmul.cu) -------------------------
# Per format: the parts in the order the kernels take them, and the elements per lane unit
# (the dequantize launch's work items; cuda/quant_matmul.cu).
QUANT_PARTS = {
    "q8_0": ("qs", "d"),
    "q4_0": ("qs", "d"),
    "q4_1": ("qs", "d", "m"),
    "q4_k": ("qs", "scales", "d", "dmin"),
    "q6_k": ("ql", "qh", "scales", "d"),
}
QUANT_UNIT = {"q8_0": 16, "q4_0": 32, "q4_1": 32, "q4_k": 32, "q6_k": 64}
QUANT_BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 256, "q6_k": 256}
# The prefill path dequantizes this many bytes of bf16 weight rows at a time into a workspace
# for cuBLAS (a Mistral-7B gate|up weight, 28672 x 4096, in 8 chunks).
DEQUANT_CHUNK_BYTES = 32 << 20


def dequant_rows(N: int, K: int) -> int:
    """Weight rows per dequantize-then-cuBLAS chunk: as many as fit in DEQUANT_CHUNK_BYTES."""
    return max(1, min(N, DEQUANT_CHUNK_BYTES // (2 * K)))


class CudaQuantWeight:
    """A quant.QuantTensor on the device: fmt, shape (N out, K in) and its parts as CuPy arrays
    in quant.py's layout, row n of every part belonging to weight row n (so a row range is a
    view of each part). `logits`: linear() writes fp32 (the vocabulary projection)."""

    def __init__(self, fmt: str, shape: tuple[int, int], parts: dict, logits: bool = False):
        self.fmt, self.shape, self.parts, self.logits = fmt, tuple(shape), parts, logits

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.parts.values())

    def args(self) -> tuple:
        """The parts in the kernels' parameter order."""
        return tuple(self.parts[k] for k in QUANT_PARTS[self.fmt])

    def rows(self, r0: int, r1: int) -> CudaQuantWeight:
        return CudaQuantWeight(
            self.fmt, (r1 - r0, self.shape[1]), {k: a[r0:r1] for k, a in self.parts.items()}
        )


# ---- device-side containers ---------------------------------------------------------------------


class CudaKVCache:
    """kv_cache.py's paged layout in CuPy arrays (NumpyKVCache's twin): per layer k, v
    (n_blocks, block_size, n_kv_heads, head_dim) in the storage dtype (fp8 as raw uint8 bytes)
    and, for int8/fp8, the keys' fp16 k_scale, k_zero (n_blocks, n_kv_heads, head_dim), the
    values' float32 v_scale (n_blocks, block_size, n_kv_heads) and the open rows k_open
    (n_open, block_size, n_kv_heads, head_dim) float32. Zero-initialized. The kernels address
    it through each batch's block tables (and open rows)."""

    def __init__(self, spec: KVCacheSpec, cp, bf16_dtype):
        self.spec = spec
        self.kind = ck.KV_KINDS[spec.kv_dtype]
        storage = {
            "bf16": bf16_dtype,
            "fp16": np.float16,
            "fp32": np.float32,
            "int8": np.int8,
            "fp8": np.uint8,
        }[spec.kv_dtype]
        for name, (shape, dt) in layout(spec).items():
            setattr(self, name, [cp.zeros(shape, dt or storage) for _ in range(spec.n_layers)])

    def arrays(self) -> list:
        return [a for name in layout(self.spec) for a in getattr(self, name)]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


class CudaBatch:
    """A Batch plus its device copies (one H2D copy per forward) and launch metadata that
    every layer reuses (prefill tiles, decode splits)."""

    def __init__(self, batch: Batch, cp):
        self.host = batch
        for name in (
            "tables",
            "starts",
            "lens",
            "cu_lens",
            "positions",
            "seq_of_token",
            "last_rows",
            "opens",
        ):
            setattr(self, name, getattr(batch, name))
        B, T = len(batch.lens), batch.n_tokens
        meta = np.concatenate(
            [
                batch.tables.reshape(-1),
                batch.starts,
                batch.lens,
                batch.cu_lens,
                batch.positions,
                batch.seq_of_token,
                batch.opens,
            ]
        ).astype(np.int32)
        self.bind(cp.asarray(meta))
        self.n_seqs = B
        self.max_pos = int(batch.positions.max()) if T else 0
        self.memo: dict = {}  # per-forward launch metadata, keyed by what it depends on

    @staticmethod
    def meta_size(B: int, T: int, R: int) -> int:
        """int32 elements of the device metadata of B sequences, T tokens, tables of R entries."""
        return B * R + 4 * B + 1 + 2 * T

    def bind(self, d_meta) -> None:
        """Take the device metadata from d_meta (meta_size int32: tables (B, R) row-major,
        starts, lens, cu_lens, positions, seq_of_token, opens): a fresh upload, or a CUDA
        graph's static input buffer."""
        B, T = len(self.host.lens), self.host.n_tokens
        R = self.host.tables.shape[1]
        self.d_meta = d_meta
        o = np.cumsum([0, B * R, B, B, B + 1, T, T, B])
        (
            self.d_tables,
            self.d_starts,
            self.d_lens,
            self.d_cu_lens,
            self.d_positions,
            self.d_seq_of_token,
            self.d_opens,
        ) = (d_meta[o[i] : o[i + 1]] for i in range(7))

    @property
    def n_tokens(self) -> int:
        return self.host.n_tokens


class AttentionCall:
    """What both attention launches of one layer share (CudaBackend.attention). Their kernel
    arguments start with `lead` (queries, the layer's K/V pools, the int8/fp8 key metadata:
    null pointers for float caches) and end with `tail` (head counts, window, scale)."""

    def __init__(
        self, q, ldq: int, cache: CudaKVCache, layer: int, b, out, n_heads, hd, scale, null
    ):
        spec = cache.spec
        self.spec, self.cache, self.b, self.out = spec, cache, b, out
        self.n_heads, self.n_kv, self.hd = n_heads, spec.n_kv_heads, hd
        self.HD = head_dim_tile(hd)  # the kernels' head_dim template argument
        q8 = spec.quantized  # int8/fp8: key scales, offsets and open rows too
        kmeta = (
            cache.k_scale[layer] if q8 else null,
            cache.k_zero[layer] if q8 else null,
            cache.v_scale[layer] if q8 else null,
            cache.k_open[layer] if q8 else null,
            b.d_opens if q8 else null,
        )
        self.lead = (q, np.int32(ldq), cache.k[layer], cache.v[layer], *kmeta)
        sl2 = np.float32(float(scale) * math.log2(math.e))  # the kernels use exp2
        window = np.int32(spec.window or 0)
        self.tail = (np.int32(n_heads), np.int32(self.n_kv), np.int32(hd), window, sl2)


# ---- the backend ---------------------------------------------------------------------------------


class CudaBackend:
    name = "cuda"
    compute_dtype = "bf16"
    # Capabilities (backends/__init__.py); `graphs` (DecodeGraphs) is set per instance.
    device_sampling = True  # sample() draws on the device (sample.cu)
    device_memory = True  # weights and KV live in GPU memory (memory.py's GPU plan)
    fused_projections = True  # concat_rows(): one GEMV for q|k|v and one for gate|up
    quant_formats = tuple(QUANT_PARTS)  # upload_quant / linear (cuda/quant_matmul.cu)

    def __init__(
        self, dtype: str | None = None, checkpoint_dtype: str = "float32", device: int | None = None
    ):
        if dtype not in (None, "auto", "bf16", "bfloat16"):
            raise TinyLLMError(
                f"the cuda backend computes in bf16 (fp16 and fp32 checkpoints are cast "
                f"to bf16); got dtype={dtype!r}: drop --dtype or pass bf16"
            )
        import cupy as cp

        self.cp = cp
        if device is not None:
            cp.cuda.Device(device).use()
        self.device = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(self.device.id)
        cc = props["major"] * 10 + props["minor"]
        if cc < 80:
            raise TinyLLMError(
                f"the cuda backend needs compute capability 8.0 or newer (bf16 tensor "
                f"cores); this GPU is {props['major']}.{props['minor']}"
            )
        self.gpu_name = (
            props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        )
        self.n_sms = int(props["multiProcessorCount"])
        self.smem_optin = int(props.get("sharedMemPerBlockOptin", 48 * 1024))
        self.checkpoint_dtype = checkpoint_dtype
        self.versions = dict(VERSIONS)
        try:  # CuPy >= 14 with numpy >= 2.1.2 knows ml_dtypes.bfloat16
            cp.empty(1, dtype=ml_dtypes.bfloat16)
            self.bf16 = np.dtype(ml_dtypes.bfloat16)
        except Exception:  # otherwise bf16 lives in uint16 arrays (kernels see pointers)
            self.bf16 = np.dtype(np.uint16)
        # The vocabulary projection's weight(s), by device pointer; weak, so a freed weight's
        # address reused by another array is not mistaken for it.
        self._logit_weights = weakref.WeakValueDictionary()
        self._rope: dict[bytes, tuple] = {}
        self._ws: dict[str, object] = {}
        self._one = np.ones((), np.float32)  # cuBLAS alpha / beta (host pointer mode)
        self._zero = np.zeros((), np.float32)
        self._pinned = None
        self._pinned_events = [None, None]
        self.uploaded_bytes = 0
        # Decode as CUDA graphs (cuda_graphs.py); while a graph's step is planned or captured,
        # every activation and workspace comes from its arena.
        from .cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self)
        self._arena = None

    # ---- memory -------------------------------------------------------------------------------
    def free_memory(self) -> int:
        """Bytes still available to this process: the device's free memory plus what CuPy's
        pool holds but does not use."""
        free, _ = self.cp.cuda.runtime.memGetInfo()
        pool = self.cp.get_default_memory_pool()
        return int(free + pool.total_bytes() - pool.used_bytes())

    def total_memory(self) -> int:
        return int(self.cp.cuda.runtime.memGetInfo()[1])

    def measure_peak(self, fn) -> int:
        """Bytes CuPy's pool had to hold for fn() beyond what was in use before: its cached
        blocks are freed first, so afterwards the pool's total is the high-water mark."""
        pool = self.cp.get_default_memory_pool()
        self.cp.cuda.get_current_stream().synchronize()
        pool.free_all_blocks()
        used = pool.used_bytes()
        fn()
        self.cp.cuda.get_current_stream().synchronize()
        return max(0, int(pool.total_bytes()) - int(used))

    def check_fits(
        self,
        weight_bytes: int,
        kv_bytes: int = 0,
        working: int = 0,
        kv_bytes_per_token: int | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        """Raise TinyLLMError (needed GB, longest context that fits) unless weights not yet
        uploaded (weight_bytes) plus a KV cache of kv_bytes fit in free GPU memory."""
        msg = fits_message(
            weight_bytes, kv_bytes, self.free_memory(), working, kv_bytes_per_token, max_seq_len
        )
        if msg:
            raise TinyLLMError(f"{msg} ({self.gpu_name})")

    # ---- weights ---------------------------------------------------------------------------------
    def upload(self, name: str, a: np.ndarray):
        """A weight to the device as bf16, cast on the host chunk by chunk through a reusable
        pinned buffer (so an fp32 checkpoint never needs a second full-size host copy)."""
        cp = self.cp
        a = np.asarray(a)
        try:
            dst = cp.empty(a.shape, self.bf16)
        except cp.cuda.memory.OutOfMemoryError:
            raise TinyLLMError(
                f"out of GPU memory loading {name} ({fmt_gb(a.size * 2)}): "
                f"{fmt_gb(self.uploaded_bytes)} of "
                f"weights were already loaded and {fmt_gb(self.free_memory())} is free on "
                f"{self.gpu_name}; "
                f"use a smaller model"
            ) from None
        flat = a.reshape(-1)
        n = flat.size
        chunk = UPLOAD_CHUNK_BYTES // 2
        if self._pinned is None:
            self._pinned = [
                np.frombuffer(cp.cuda.alloc_pinned_memory(UPLOAD_CHUNK_BYTES), np.uint16, chunk)
                for _ in range(2)
            ]
        stream = cp.cuda.get_current_stream()
        dst_u16 = dst.view(np.uint16).reshape(-1)
        for ci, i in enumerate(range(0, n, chunk)):
            m = min(chunk, n - i)
            k = ci % 2
            ev = self._pinned_events[k]
            if ev is not None:
                ev.synchronize()  # the copy that used this buffer is done
            buf = self._pinned[k][:m]
            src = flat[i : i + m]
            if src.dtype == ml_dtypes.bfloat16:
                np.copyto(buf, src.view(np.uint16))
            elif src.dtype == np.uint16:
                np.copyto(buf, src)
            else:
                np.copyto(
                    buf.view(ml_dtypes.bfloat16), src, casting="unsafe"
                )  # RNE cast on the host
            dst_u16[i : i + m].data.copy_from_host_async(
                ctypes.c_void_p(buf.ctypes.data), m * 2, stream
            )
            self._pinned_events[k] = stream.record()
        self.uploaded_bytes += dst.nbytes
        if name.endswith(LOGIT_WEIGHT_NAMES):
            self._logit_weights[dst.data.ptr] = dst
        return dst

    def upload_quant(self, name: str, qt) -> CudaQuantWeight:
        """A quant.QuantTensor's parts to the device as they are (codes and fp16 scales: no
        cast), checked against the layout the kernels read."""
        fmt, (N, K) = qt.fmt, tuple(qt.shape)
        if fmt not in QUANT_PARTS:
            raise TinyLLMError(
                f"{name}: the cuda backend has no kernels for weight format {fmt!r} "
                f"(supported: {', '.join(QUANT_PARTS)})"
            )
        if K % QUANT_BLOCK[fmt]:
            raise ValueError(f"{name}: {fmt} needs in-features divisible by {QUANT_BLOCK[fmt]}")
        parts = {}
        for key in QUANT_PARTS[fmt]:
            a = np.ascontiguousarray(qt.parts[key])
            if a.shape[0] != N:
                raise ValueError(f"{name}: {fmt} part {key} has {a.shape[0]} rows, want {N}")
            try:
                parts[key] = self.cp.asarray(a)
            except self.cp.cuda.memory.OutOfMemoryError:
                raise TinyLLMError(
                    f"out of GPU memory loading {name} ({fmt}): {fmt_gb(self.uploaded_bytes)} of "
                    f"weights were already loaded and {fmt_gb(self.free_memory())} is free on "
                    f"{self.gpu_name}; use a smaller model or a smaller --quantize format"
                ) from None
        w = CudaQuantWeight(fmt, (N, K), parts, logits=name.endswith(LOGIT_WEIGHT_NAMES))
        self.uploaded_bytes += w.nbytes
        return w

    def mark_logits_weight(self, w) -> None:
        """Make linear(x, w) write fp32 (the vocabulary projection); upload does this itself for
        lm_head.weight / embed_tokens.weight."""
        if isinstance(w, CudaQuantWeight):
            w.logits = True
            return
        self._logit_weights[w.data.ptr] = w

    def to_numpy(self, x) -> np.ndarray:
        cp = self.cp
        if isinstance(x, np.ndarray):
            return x.astype(np.float32)
        x = cp.ascontiguousarray(x)
        if x.dtype == self.bf16 or x.dtype == ml_dtypes.bfloat16:
            return bf16_bits_to_f32(x.view(np.uint16).get())
        return cp.asnumpy(x).astype(np.float32)

    def from_numpy(self, a: np.ndarray):
        """An activation-like array to the device in bf16 (tests and benchmarks)."""
        return self.cp.asarray(to_bf16_bits(np.asarray(a, np.float32))).view(self.bf16)

    def alloc_kv(self, spec: KVCacheSpec) -> CudaKVCache:
        head_dim_tile(spec.head_dim)
        need = spec.nbytes()
        per_token = spec.block_nbytes() // spec.block_size  # one position of one sequence
        msg = fits_message(
            0,
            need,
            self.free_memory(),
            0,
            per_token,
            spec.max_seq_len if not spec.rolling else None,
        )
        if msg:
            raise TinyLLMError(f"KV cache does not fit: {msg} ({self.gpu_name})")
        return CudaKVCache(spec, self.cp, self.bf16)

    def concat_rows(self, arrays: list):
        """Weights stacked by rows into one device array, and row views of it equal to each
        input (the inputs can then be freed): the fused projections of model.py. Quantized
        weights of one format fuse part by part; weights of different formats (a Q4_K_M file's
        q4_k q, k with a q6_k v) or quantized with float ones do not fuse: (None, the inputs),
        and model.py runs them as separate linears."""
        if any(isinstance(a, CudaQuantWeight) for a in arrays):
            fmts = {a.fmt if isinstance(a, CudaQuantWeight) else None for a in arrays}
            if len(fmts) != 1 or len({a.shape[1] for a in arrays}) != 1:
                return None, list(arrays)
            parts = {k: self.concat_rows([a.parts[k] for a in arrays])[0] for k in arrays[0].parts}
            n = sum(a.shape[0] for a in arrays)
            fused = CudaQuantWeight(arrays[0].fmt, (n, arrays[0].shape[1]), parts)
            views, o = [], 0
            for a in arrays:
                views.append(fused.rows(o, o + a.shape[0]))
                o += a.shape[0]
            return fused, views
        n = sum(a.shape[0] for a in arrays)
        out = self.cp.empty((n,) + tuple(arrays[0].shape[1:]), arrays[0].dtype)
        views, o = [], 0
        for a in arrays:  # a byte copy: no bf16 arithmetic support needed
            out[o : o + a.shape[0]].view(np.uint8)[...] = self.cp.ascontiguousarray(a).view(
                np.uint8
            )
            views.append(out[o : o + a.shape[0]])
            o += a.shape[0]
        return out, views

    def prepare(self, batch) -> CudaBatch:
        return batch if isinstance(batch, CudaBatch) else CudaBatch(batch, self.cp)

    # ---- small helpers ---------------------------------------------------------------------------
    def _rows(self, x):
        """x (..., K) -> (2-D view (M, K), row stride in elements); copies only if the last
        axis is not contiguous or the leading axes cannot be merged."""
        cp = self.cp
        K = x.shape[-1]
        x2 = x.reshape(-1, K) if x.ndim != 2 else x
        if (
            x2.ndim != 2
            or x2.strides[1] != x2.itemsize
            or x2.strides[0] % x2.itemsize
            or x2.strides[0] < K * x2.itemsize
        ):
            x2 = cp.ascontiguousarray(x2)
        ld = x2.strides[0] // x2.itemsize if x2.shape[0] > 1 else K
        return x2, ld

    def _empty(self, shape, dtype):
        """An uninitialized activation: from the arena while a graph step is planned or
        captured (cuda_graphs.py), else from CuPy's pool."""
        return (
            self._arena.take(shape, dtype)
            if self._arena is not None
            else self.cp.empty(shape, dtype)
        )

    def _ws_get(self, key: str, n: int, dtype):
        """A grow-only workspace of at least n elements (the arena's own during a graph step)."""
        ws = self._arena.workspaces if self._arena is not None else self._ws
        buf = ws.get(key)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            ws[key] = buf = self._empty(max(n, 1), dtype)
        return buf

    @staticmethod
    def _null():
        return np.uint64(0)

    @staticmethod
    def _paging(spec: KVCacheSpec, b: CudaBatch) -> tuple:
        """The kernels' (ring, block_size) scalars; the batch's tables must have `ring` entries."""
        if b.tables.shape[1] != spec.ring:
            raise ValueError(
                f"block tables have {b.tables.shape[1]} entries; the cache's ring is {spec.ring}"
            )
        return np.int32(spec.ring), np.int32(spec.block_size)

    # ---- ops -------------------------------------------------------------------------------------
    def _gather(self, src, idx, n_src: int):
        """out[r] = src[idx[r]] for a 2-D src (rows of any dtype)."""
        cp = self.cp
        src2, ld = self._rows(src)
        row_bytes = src2.shape[1] * src2.itemsize
        stride_bytes = ld * src2.itemsize
        idx = (
            cp.asarray(idx, dtype=np.int32)
            if not isinstance(idx, cp.ndarray) or idx.dtype != np.int32
            else idx
        )
        out = self._empty((idx.shape[0], src2.shape[1]), src2.dtype)
        if idx.shape[0] == 0 or row_bytes == 0:
            return out
        vec = gather_vec_bytes(row_bytes, stride_bytes, src2.data.ptr, out.data.ptr)
        row_vecs = row_bytes // vec
        threads = ck.TILES["GATHER_THREADS"]
        k = ck.get("embedding.cu", f"gather_rows_v{vec}_v1")
        k(
            (idx.shape[0], -(-row_vecs // threads)),
            (threads,),
            (src2, np.int64(stride_bytes // vec), np.int32(n_src), idx, out, np.int32(row_vecs)),
        )
        return out

    def embed(self, table, tokens):
        """NumpyBackend.embed: table[tokens] -> (T, dim) bf16 (cuda/embedding.cu)."""
        return self._gather(table, tokens, table.shape[0])

    def take_rows(self, x, rows):
        """NumpyBackend.take_rows: x[rows] (cuda/embedding.cu)."""
        return self._gather(x, rows, x.shape[0] if x.ndim == 2 else int(np.prod(x.shape[:-1])))

    def rms_norm(self, x, w, eps):
        """NumpyBackend.rms_norm (cuda/rmsnorm.cu)."""
        x2, ldx = self._rows(x)
        M, dim = x2.shape
        out = self._empty((M, dim), self.bf16)
        if M:
            ver = self.versions["rms_norm"]
            if ver == "v2" and not (
                dim % 8 == 0 and ldx % 8 == 0 and x2.data.ptr % 16 == 0 and w.data.ptr % 16 == 0
            ):
                ver = "v1"
            k = ck.get("rmsnorm.cu", f"rms_norm_bf16_{ver}")
            k(
                (M,),
                (ck.TILES["RMS_THREADS"],),
                (x2, np.int32(ldx), w, out, np.int32(dim), np.float32(eps)),
            )
        return out.reshape(x.shape)

    def add_rms_norm(self, x, d, w, eps):
        """NumpyBackend.add_rms_norm: (s = x + d, rms_norm(s)) with s rounded to bf16 first."""
        x2, ldx = self._rows(x)
        d2, ldd = self._rows(d)
        M, dim = x2.shape
        s = self._empty((M, dim), self.bf16)
        out = self._empty((M, dim), self.bf16)
        if M:
            ver = self.versions["rms_norm"]
            if ver == "v2" and not (
                dim % 8 == 0
                and ldx % 8 == 0
                and ldd % 8 == 0
                and x2.data.ptr % 16 == 0
                and d2.data.ptr % 16 == 0
                and w.data.ptr % 16 == 0
            ):
                ver = "v1"
            k = ck.get("rmsnorm.cu", f"add_rms_norm_bf16_{ver}")
            k(
                (M,),
                (ck.TILES["RMS_THREADS"],),
                (x2, np.int32(ldx), d2, np.int32(ldd), w, s, out, np.int32(dim), np.float32(eps)),
            )
        return s.reshape(x.shape), out.reshape(x.shape)

    def linear(self, x, w, b=None):
        """NumpyBackend.linear: x @ w.T + b. Few rows: our GEMV (cuda/matmul.cu); otherwise
        cuBLAS gemmEx (bf16 in, fp32 compute) into a fresh output, then the bias kernel.
        fp32 output for the vocabulary projection, bf16 otherwise."""
        if isinstance(w, CudaQuantWeight):
            return self._linear_quant(x, w, b)
        x2, ldx = self._rows(x)
        M, K = x2.shape
        N = w.shape[0]
        if w.shape[-1] != K:
            raise ValueError(f"linear: x has {K} features, w is {tuple(w.shape)}")
        f32 = self._logit_weights.get(w.data.ptr) is not None
        y = self._empty((M, N), np.float32 if f32 else self.bf16)
        if M == 0 or N == 0:
            return y.reshape(x.shape[:-1] + (N,))
        gemv_ok = K % 8 == 0 and ldx % 8 == 0 and x2.data.ptr % 16 == 0 and w.data.ptr % 16 == 0
        ver = "v1-all" if self._arena is not None else self.versions["gemv"]
        if self._arena is not None and not gemv_ok:  # a graph step: cuBLAS is not capturable
            raise TinyLLMError(
                f"a CUDA-graph decode step needs GEMV-able linears (K={K}, ldx={ldx}); "
                f"pass cuda_graph=False / --no-cuda-graph"
            )
        if gemv_ok and (ver == "v1-all" or (ver == "v1" and M <= ck.GEMV_MAX_M)):
            out = "f32" if f32 else "bf16"
            kernel_of = lambda m: ("matmul.cu", f"gemv_bf16_m{m}_{out}_v1")  # noqa: E731
            self._gemv(kernel_of, ck.TILES["GEMV_WARPS"], x2, ldx, (w,), b, y)
            return y.reshape(x.shape[:-1] + (N,))
        self._gemm_tn(x2, ldx, w.data.ptr, N, y, 0, f32)
        self._bias_add(y, b, f32)
        return y.reshape(x.shape[:-1] + (N,))

    def _gemm_tn(self, x2, ldx: int, w_ptr: int, n: int, y, col0: int, f32: bool):
        """cuBLAS gemmEx, bf16 in, fp32 compute: y[:, col0:col0+n] = x2 . w^T for a bf16
        weight (n, K) at w_ptr. Row-major y (M,N) = x (M,K) . w (N,K)^T is column-major
        y^T = w^T(op T) . x^T: "TN", with C starting at column col0 of y's rows."""
        from cupy_backends.cuda.libs import cublas

        M, K = x2.shape
        cublas.gemmEx(
            self.cp.cuda.device.get_cublas_handle(),
            CUBLAS_OP_T,
            CUBLAS_OP_N,
            n,
            M,
            K,
            self._one.ctypes.data,
            w_ptr,
            CUDA_R_16BF,
            K,
            x2.data.ptr,
            CUDA_R_16BF,
            ldx,
            self._zero.ctypes.data,
            y.data.ptr + col0 * y.itemsize,
            CUDA_R_32F if f32 else CUDA_R_16BF,
            y.shape[1],
            CUBLAS_COMPUTE_32F,
            CUBLAS_GEMM_DEFAULT,
        )

    def _bias_add(self, y, b, f32: bool):
        """y (M, N) += b (N,) in place (cuda/matmul.cu); nothing when b is None."""
        if b is None:
            return
        M, N = y.shape
        k = ck.get("matmul.cu", "bias_add_f32_v1" if f32 else "bias_add_bf16_v1")
        k((min(-(-(M * N) // 256), 65536),), (256,), (y, np.int32(N), b, np.int32(M), np.int32(N)))

    def _linear_quant(self, x, w: CudaQuantWeight, b=None):
        """linear() with a quantized weight (cuda/quant_matmul.cu): few rows (and every
        CUDA-graph step, in GEMV_MAX_M-row chunks) through the format's GEMV, which dequantizes
        in registers; more rows through dequantize-to-bf16 in chunks of dequant_rows() weight
        rows into a workspace, each chunk one cuBLAS gemmEx writing its columns of y (first
        version: cuBLAS's tensor-core tiles for free; the extra pass over the weight costs
        about 3 bytes of traffic per element, small against a prefill's M-row product)."""
        x2, ldx = self._rows(x)
        M, K = x2.shape
        N = w.shape[0]
        if w.shape[1] != K:
            raise ValueError(f"linear: x has {K} features, w is {w.fmt} {w.shape}")
        y = self._empty((M, N), np.float32 if w.logits else self.bf16)
        if M == 0 or N == 0:
            return y.reshape(x.shape[:-1] + (N,))
        graph = self._arena is not None
        if ldx % 8 or x2.data.ptr % 16:  # the kernels read x in 16-byte vectors
            if graph:
                raise TinyLLMError(
                    f"a CUDA-graph decode step needs 16-byte aligned linear inputs (ldx={ldx}); "
                    f"pass cuda_graph=False / --no-cuda-graph"
                )
            x2 = self.cp.ascontiguousarray(x2).copy()
            ldx = K
        ver = "v1-all" if graph else self.versions["gemv"]
        if ver == "v1-all" or (ver == "v1" and M <= ck.GEMV_MAX_M):
            out = "f32" if w.logits else "bf16"
            kernel_of = lambda m: ("quant_matmul.cu", f"gemv_{w.fmt}_m{m}_{out}_v1")  # noqa: E731
            self._gemv(kernel_of, ck.TILES["QGEMV_WARPS"], x2, ldx, w.args(), b, y)
        else:
            self._dequant_gemm(x2, ldx, w, y)
            self._bias_add(y, b, w.logits)
        return y.reshape(x.shape[:-1] + (N,))

    def _gemv(self, kernel_of, warps: int, x2, ldx: int, w_args: tuple, b, y):
        """y = x2 . w^T + b by a GEMV kernel, GEMV_MAX_M rows at a time (more rows: the graph
        buckets, in row chunks); kernel_of(m) -> (file, kernel) of the m-row kernel, w_args the
        weight's kernel arguments (a bf16 matrix, or a quantized one's arrays)."""
        M, K = x2.shape
        N = y.shape[1]
        bias = b if b is not None else self._null()
        for r0 in range(0, M, ck.GEMV_MAX_M):
            m = min(ck.GEMV_MAX_M, M - r0)
            k = ck.get(*kernel_of(m))
            k(
                (-(-N // warps),),
                (32 * warps,),
                (
                    x2[r0 : r0 + m],
                    np.int32(ldx),
                    *w_args,
                    bias,
                    y[r0 : r0 + m],
                    np.int32(N),
                    np.int32(N),
                    np.int32(K),
                ),
            )

    def _dequant_gemm(self, x2, ldx: int, w: CudaQuantWeight, y):
        """y = x2 . w^T: dequant_rows() weight rows at a time dequantized to bf16 into a
        workspace, each chunk one cuBLAS product writing its columns of y."""
        K = x2.shape[1]
        N = y.shape[1]
        rows = dequant_rows(N, K)
        scratch = self._ws_get("dequant", rows * K, self.bf16)
        deq = ck.get("quant_matmul.cu", f"dequant_{w.fmt}_bf16_v1")
        threads = ck.TILES["DEQUANT_THREADS"]
        for n0 in range(0, N, rows):
            nc = min(rows, N - n0)
            work = nc * K // QUANT_UNIT[w.fmt]
            deq(
                (max(1, min(-(-work // threads), 16 * self.n_sms)),),
                (threads,),
                (*w.rows(n0, n0 + nc).args(), scratch, np.int32(nc), np.int32(K)),
            )
            self._gemm_tn(x2, ldx, scratch.data.ptr, nc, y, n0, w.logits)

    def silu_mul(self, gate, up):
        """NumpyBackend.silu_mul: silu(gate) * up (cuda/swiglu.cu)."""
        g2, ldg = self._rows(gate)
        u2, ldu = self._rows(up)
        M, H = g2.shape
        out = self._empty((M, H), self.bf16)
        if M and H:
            ver = self.versions["silu_mul"]
            if ver == "v2" and not (
                H % 8 == 0
                and ldg % 8 == 0
                and ldu % 8 == 0
                and g2.data.ptr % 16 == 0
                and u2.data.ptr % 16 == 0
            ):
                ver = "v1"
            threads = ck.TILES["SWIGLU_THREADS"]
            work = M * H // (8 if ver == "v2" else 1)
            blocks = max(1, min(-(-work // threads), 8 * self.n_sms * 4))
            k = ck.get("swiglu.cu", f"silu_mul_bf16_{ver}")
            k(
                (blocks,),
                (threads,),
                (g2, np.int32(ldg), u2, np.int32(ldu), out, np.int32(M), np.int32(H)),
            )
        return out.reshape(gate.shape)

    # ---- RoPE + cache write ----------------------------------------------------------------------
    def _rope_tables(self, inv_freq: np.ndarray, n_pos: int):
        """Device cos/sin tables (n, hd/2) fp32 for positions 0..n-1, computed on the host with
        numpy exactly as numpy_backend.rope_rotate computes its angles (bit-identical values).
        Grown geometrically, so a long generation reallocates O(log n) times."""
        key = inv_freq.tobytes()
        have = self._rope.get(key)
        if have is not None and have[0] >= n_pos:
            return have[1], have[2]
        n = max(n_pos, 4096, 2 * (have[0] if have else 0))
        ang = np.arange(n, dtype=np.int64).astype(np.float32)[:, None] * inv_freq[None, :]
        cos = self.cp.asarray(np.ascontiguousarray(np.cos(ang), np.float32))
        sin = self.cp.asarray(np.ascontiguousarray(np.sin(ang), np.float32))
        self._rope[key] = (n, cos, sin)
        return cos, sin

    def _heads(self, x, n_heads: int, hd: int):
        """x as (T, n_heads, hd) with contiguous heads; returns (array, token stride)."""
        cp = self.cp
        x = x.reshape(x.shape[0], n_heads, hd) if x.ndim != 3 else x
        it = x.itemsize
        if (
            x.strides[2] != it
            or x.strides[1] != hd * it
            or (x.shape[0] > 1 and x.strides[0] % (8 * it))
        ):
            x = cp.ascontiguousarray(x)
        if x.data.ptr % 16:
            x = x.copy()
        ld = x.strides[0] // it if x.shape[0] > 1 else n_heads * hd
        return x, ld

    def rope_kv_write(self, q, k, v, cache: CudaKVCache, layer: int, batch, inv_freq):
        """NumpyBackend.rope_kv_write (cuda/rope_kv.cu): rotates q in place and returns it;
        writes rotated k and v at each token's entry through its sequence's block table
        (block tables[b, (pos // block_size) % ring], offset pos % block_size). int8/fp8:
        values quantized there, keys through a float32 workspace into cuda/kv_close.cu (the
        blocks this forward completes quantized per channel, the rest to the open rows)."""
        b = self.prepare(batch)
        spec = cache.spec
        T = b.n_tokens
        n_heads, hd = q.shape[-2], q.shape[-1]
        n_kv = spec.n_kv_heads
        q, ldq = self._heads(q, n_heads, hd)
        k, ldk = self._heads(k, n_kv, hd)
        v, ldv = self._heads(v, n_kv, hd)
        if T == 0:
            return q
        inv = np.asarray(inv_freq.get() if hasattr(inv_freq, "get") else inv_freq, np.float32)
        cos, sin = self._rope_tables(inv, b.max_pos + 1)
        if self._arena is not None:
            self._arena.keep += [cos, sin]  # a graph holds raw pointers: keep the tables alive
        null = self._null()
        vs = cache.v_scale[layer] if spec.quantized else null
        kr = self._ws_get("k_rot", T * n_kv * hd, np.float32) if spec.quantized else null
        warps = ck.TILES["ROPE_WARPS"]
        kern = ck.get("rope_kv.cu", "rope_kv_write_v1", KV_KIND=cache.kind)
        kern(
            (T, -(-(n_heads + 2 * n_kv) // warps)),
            (32 * warps,),
            (
                q,
                np.int32(ldq),
                k,
                np.int32(ldk),
                v,
                np.int32(ldv),
                cos,
                sin,
                b.d_positions,
                b.d_seq_of_token,
                b.d_tables,
                cache.k[layer],
                cache.v[layer],
                vs,
                kr,
                *self._paging(spec, b),
                np.int32(n_heads),
                np.int32(n_kv),
                np.int32(hd),
            ),
        )
        if spec.quantized:
            close = ck.get("kv_close.cu", "kv_close_v1", KV_KIND=cache.kind)
            close(
                (b.n_seqs, n_kv),
                (ck.TILES["CLOSE_THREADS"],),
                (
                    kr,
                    b.d_starts,
                    b.d_lens,
                    b.d_cu_lens,
                    b.d_opens,
                    b.d_tables,
                    *self._paging(spec, b),
                    cache.k_open[layer],
                    cache.k[layer],
                    cache.k_scale[layer],
                    cache.k_zero[layer],
                    np.int32(n_kv),
                    np.int32(hd),
                ),
            )
        return q

    # ---- attention -------------------------------------------------------------------------------
    def attention(self, q, cache: CudaKVCache, layer: int, batch, scale):
        """NumpyBackend.attention: causal (+window) GQA attention of the batch's queries over
        the blocks their tables name: sequences bringing one token through
        cuda/attention_decode.cu, the others through cuda/attention_prefill.cu. Returns
        (T, n_heads*head_dim) bf16."""
        b, spec = self.prepare(batch), cache.spec
        n_heads, hd = q.shape[-2], q.shape[-1]
        if n_heads % spec.n_kv_heads:
            raise ValueError(f"attention: {n_heads} query heads for {spec.n_kv_heads} kv heads")
        q, ldq = self._heads(q, n_heads, hd)
        out = self._empty((b.n_tokens, n_heads * hd), self.bf16)
        if b.n_tokens == 0:
            return out
        a = AttentionCall(q, ldq, cache, layer, b, out, n_heads, hd, scale, self._null())
        # Sequences bringing one token go to the split-K decode kernel, the others to the
        # prefill kernel; the two launches write disjoint rows of `out`.
        use_decode = self.versions["decode_attention"] == "v1"
        dec, d_dec, pre_lens = self._attention_split(b, use_decode)
        if len(dec):
            self._attention_decode(a, dec, d_dec)
        self._attention_prefill(a, pre_lens, use_decode)
        return out

    def _attention_split(self, b: CudaBatch, use_decode: bool) -> tuple:
        """(rows of the sequences bringing one token, the same on the device or None, the
        other sequences' lengths with those rows zeroed); memoized on the batch."""
        key = ("split", use_decode)
        if key not in b.memo:
            one = (b.lens == 1) if use_decode else np.zeros(len(b.lens), bool)
            dec = np.nonzero(one)[0].astype(np.int32)
            b.memo[key] = (dec, self.cp.asarray(dec) if len(dec) else None, b.lens * ~one)
        return b.memo[key]

    def _attention_decode(self, a: AttentionCall, dec: np.ndarray, d_dec):
        """Split-K decode attention of the one-token sequences `dec`: each split's partial
        (max, sum, output) into workspace, then one reduction into their rows of a.out."""
        spec, b, n_heads, hd = a.spec, a.b, a.n_heads, a.hd
        key = ("decode", n_heads, a.n_kv, spec.capacity, spec.window)
        if key not in b.memo:
            rep, chunks = decode_rep(n_heads // a.n_kv)
            ranges = []
            for i in dec.tolist():
                lo, hi = visible_range(int(b.starts[i]), 1, spec.capacity, spec.window)
                ranges.append(hi - lo + 1)
            split_len, n_splits = decode_splits(ranges, len(dec) * a.n_kv * chunks, self.n_sms)
            b.memo[key] = (rep, chunks, split_len, n_splits)
        rep, chunks, split_len, n_splits = b.memo[key]
        n_dec = len(dec)
        part_m = self._ws_get("dec_m", n_splits * n_dec * n_heads, np.float32)
        part_l = self._ws_get("dec_l", n_splits * n_dec * n_heads, np.float32)
        part_o = self._ws_get("dec_o", n_splits * n_dec * n_heads * hd, np.float32)
        kern = ck.get(
            "attention_decode.cu", f"decode_split_hd{a.HD}_r{rep}_v1", KV_KIND=a.cache.kind
        )
        kern(
            (n_splits, n_dec, a.n_kv * chunks),
            (32 * ck.TILES["DEC_WARPS"],),
            (
                *a.lead,
                part_m,
                part_l,
                part_o,
                d_dec,
                b.d_tables,
                b.d_starts,
                b.d_cu_lens,
                np.int32(n_dec),
                *self._paging(spec, b),
                *a.tail,
                np.int32(split_len),
            ),
        )
        red = ck.get("attention_decode.cu", "decode_reduce_v1", KV_KIND=a.cache.kind)
        red(
            (n_dec, n_heads),
            (ck.TILES["DEC_RED_THREADS"],),
            (
                part_m,
                part_l,
                part_o,
                d_dec,
                b.d_cu_lens,
                a.out,
                np.int32(n_heads * hd),
                np.int32(n_splits),
                np.int32(n_dec),
                np.int32(n_heads),
                np.int32(hd),
            ),
        )

    def _attention_prefill(self, a: AttentionCall, pre_lens: np.ndarray, use_decode: bool):
        """Flash attention (v1 or v2) of the sequences bringing several tokens, over tiles of
        query rows (prefill_tiles: none for the decode sequences, whose lengths are zeroed)."""
        spec, b = a.spec, a.b
        ver = self.versions["prefill_attention"]
        rows_per_tile = ck.FA2_BM if ver == "v2" else ck.TILES["FA1_WARPS"] * ck.TILES["FA1_RPW"]
        n_rep = a.n_heads // a.n_kv
        key = ("tiles", use_decode, rows_per_tile, n_rep)
        if key not in b.memo:
            ts, tr = prefill_tiles(pre_lens, n_rep, rows_per_tile)  # no tiles for decode sequences
            b.memo[key] = (len(ts), self.cp.asarray(np.concatenate([ts, tr])) if len(ts) else None)
        n_tiles, d_tiles = b.memo[key]
        if n_tiles == 0:
            return
        tile_seq, tile_row0 = d_tiles[:n_tiles], d_tiles[n_tiles:]
        args = (
            *a.lead,
            a.out,
            np.int32(a.n_heads * a.hd),
            tile_seq,
            tile_row0,
            b.d_tables,
            b.d_starts,
            b.d_lens,
            b.d_cu_lens,
            *self._paging(spec, b),
            *a.tail,
        )
        if ver == "v2":
            smem = ck.prefill_v2_smem(a.HD)
            if smem > self.smem_optin:
                raise TinyLLMError(
                    f"prefill attention needs {smem} B of shared memory per block; "
                    f"this GPU allows {self.smem_optin}"
                )
            kern = ck.get(
                "attention_prefill.cu",
                f"flash_prefill_hd{a.HD}_v2",
                smem=smem,
                KV_KIND=a.cache.kind,
            )
            kern((n_tiles, a.n_kv), (128,), args, shared_mem=smem)
        else:
            kern = ck.get(
                "attention_prefill.cu", f"flash_prefill_hd{a.HD}_v1", KV_KIND=a.cache.kind
            )
            kern((n_tiles, a.n_kv), (32 * ck.TILES["FA1_WARPS"],), args)

    # ---- next-token choice -----------------------------------------------------------------------
    def _logits_f32(self, logits):
        cp = self.cp
        x2, ld = self._rows(logits)
        if x2.dtype != np.float32:
            x2 = cp.asarray(cp.ascontiguousarray(x2).view(np.uint16).astype(np.uint32) << 16).view(
                np.float32
            )
            ld = x2.shape[1]
        return x2, ld

    def argmax(self, logits) -> np.ndarray:
        """np.argmax(logits, axis=-1) per row, on the device (cuda/sample.cu); returns numpy
        int32."""
        cp = self.cp
        x2, ld = self._logits_f32(logits)
        out = cp.empty(x2.shape[0], np.int32)
        if x2.shape[0]:
            k = ck.get("sample.cu", "argmax_f32_v1")
            k(
                (x2.shape[0],),
                (ck.TILES["SAMPLE_THREADS"],),
                (x2, np.int32(ld), np.int32(x2.shape[1]), out),
            )
        return out.get()

    def sample(self, logits, temperature, top_k, top_p, seeds, steps) -> np.ndarray:
        """Per row: temperature (0 = greedy) -> top-k (0 = off) -> top-p (1 = off) -> a draw
        reproducible from (seed, step) (cuda/sample.cu). Scalars broadcast over rows.
        Returns numpy int32 token ids."""
        cp = self.cp
        R = logits.shape[0]
        out = cp.empty(R, np.int32)
        if R == 0:
            return out.get()

        def rows(v, dt):
            return cp.asarray(np.broadcast_to(np.asarray(v, dt), (R,)).copy())

        self.sample_into(
            logits,
            rows(temperature, np.float32),
            rows(top_k, np.int32),
            rows(top_p, np.float32),
            rows(np.asarray(seeds, np.uint64), np.uint64),
            rows(steps, np.int32),
            out,
        )
        return out.get()

    def sample_into(self, logits, temperature, top_k, top_p, seeds, steps, out) -> None:
        """sample() with every per-row parameter already on the device ((R,) float32, int32,
        float32, uint64, int32) and the token ids written to out (R,) int32: the launch a
        CUDA graph captures."""
        x2, ld = self._logits_f32(logits)
        k = ck.get("sample.cu", "sample_f32_v1")
        k(
            (x2.shape[0],),
            (ck.TILES["SAMPLE_THREADS"],),
            (x2, np.int32(ld), np.int32(x2.shape[1]), temperature, top_k, top_p, seeds, steps, out),
        )
