"""KV-cache formats as a fake-quantization study on the numpy backend (`tinyllm eval --kv-formats`).

Each format is applied as quantize-then-dequantize to K and V as they are written to a float32
cache, so attention reads exactly the values a real cache in that format would return. This
module measures formats; it stores nothing in them. The runtime's int8 and fp8 caches
(kv_cache.py) are KIVI: keys per channel over each closed block of B tokens (an fp16 scale and
midrange offset per (block, kv-head, channel)), values per token (an fp32 scale per vector),
each sequence's open block of keys in full precision. `int8-kivi-zp-f16` / `fp8-kivi-f16` here
call that very rounding (kv_cache.quantize_block for K, kv_cache.quantize for V), so they return
the values those caches do (test_study_formats_reproduce_the_shipped_caches). `int8-token` /
`fp8-token` are the caches as they were before KIVI (K and V both per token, kv_cache.quantize),
kept as a baseline.

Formats (K / V; D = head_dim, B = KIVI token block, default 16):

    fp32        reference, exact
    bf16        round to bfloat16 (nearest even)
    int8-token  one fp32 scale per (token, kv-head) vector, absmax/127   (int8 cache before KIVI)
    fp8-token   the same with e4m3, absmax/448                           (fp8 cache before KIVI)
    q8_0        llama.cpp's q8_0: 32-wide blocks along D, fp16 scale d = absmax/127,
                q = round-half-away(x / d) with d in fp32, read back as q * fp16(d)
                (ggml quantize_row_q8_0_ref); D must be a multiple of 32
    fp8-vllm    vLLM's default fp8 KV: plain e4m3 cast, scale 1.0, saturating at ±448
    int8-kivi   K: one fp32 scale per (block of B tokens, kv-head, channel) = absmax over the
                block's tokens / 127; V: int8 per token (as int8-token)
    int8-kivi-zp  int8-kivi whose keys first lose each channel's midrange over the block,
                c = (max + min) / 2 (an fp32 offset per (block, kv-head, channel) next to the
                scale), so the scale covers the channel's spread, not its offset
    fp8-kivi    the best e4m3 variant found: K per channel over blocks with the midrange
                offset, in e4m3 (scale absmax(x - c)/448); V: e4m3 per token (as fp8-token)
    int8-kivi-zp-f16, fp8-kivi-f16  the two above with the keys' scale and offset in fp16:
                the runtime's int8 / fp8 caches
    fp8-kivi-sym  fp8-kivi without the offset (symmetric per-channel key scales)
    fp8-kivi-v32  fp8-kivi-sym with V on one fp32 scale per 32 channels

KIVI's open block. A block's key scales need all B of its tokens, so the open (partially
filled) block of each sequence stays in full precision (KIVI's residual) until its last token
is written; then its B keys are quantized together. So the K read back for a position changes
once: exact while its block is open, block-quantized after. A prefill chunk closes every block
it completes before attention runs (as the real cache's kernels would), decode steps close
one block every B tokens, and restarting a sequence at position p (prefix reuse) reopens the
block holding p (the study re-quantizes it from the full-precision keys it kept; a real cache
holds only the quantized ones, so it must reuse whole blocks or recompute from the block
start). Blocks are aligned to positions (block j = positions jB .. jB+B-1), not to cache
indices, so a rolling sliding-window cache wraps without moving block boundaries; a
block's raw keys are kept in a shadow of cap + B rows, which holds them even when the window
is shorter than a block.

Bytes per token (all layers, K and V), from the format: per (layer, kv-head, token)

    fp32 8D; bf16 4D; fp8-vllm 2D
    int8-token, fp8-token   2D + 8                   (two fp32 scales)
    q8_0                    2 * (D + 2 * D/32)       (an fp16 scale per 32 values)
    int8-kivi, fp8-kivi-sym K: D + 4D/B  (fp32 per-channel scales amortised over the block)
                            V: D + 4
                            + the open block: B rows of fp32 keys (4BD bytes) per sequence,
                              amortised over the context length N: 4BD/N (a bf16 backend
                              would keep them in bf16: 2BD/N)
    int8-kivi-zp, fp8-kivi  as int8-kivi with K: D + 8D/B (an fp32 offset per channel too)
    the -f16 variants       as int8-kivi: D + 4D/B (fp16 scale and offset)
    fp8-kivi-v32            as fp8-kivi-sym with V: D + 4 * D/32

Worked example, SmolLM2-135M (30 layers, 3 kv heads, D = 64) at a context of N = 1024 tokens:
int8-token = 30*3*(128 + 8) = 12,240 bytes; q8_0 = 30*3*2*(64 + 4) = 12,240; fp8-vllm =
30*3*128 = 11,520; int8-kivi = 30*3*(64 + 4*64/16 + 64 + 4 + 4*16*64/1024) = 30*3*(80 + 68 + 4)
= 13,680 (of which 360 is the open block; at N = 4096 it is 90 and the total 13,410);
fp8-kivi = 30*3*(64 + 8*64/16 + 68 + 4) = 15,120.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .backends.numpy_backend import NumpyBackend, NumpyKVCache
from .errors import TinyLLMError
from .kv_cache import KVCacheSpec, dequantize, dequantize_block, entries, quantize, quantize_block

KIVI_BLOCK = 16
E4M3_MAX = 448.0
Q8_0_BLOCK = 32

Transform = Callable[[np.ndarray], np.ndarray]  # (..., D) float32 -> same, the values read back


def per_token(x: np.ndarray, kind: str) -> np.ndarray:
    """kv_cache.quantize's int8/fp8 round trip, one scale per vector (last axis): the caches'
    V rounding (and, before KIVI, their K rounding too)."""
    return dequantize(*quantize(x, kind))


def per_group(x: np.ndarray, kind: str, group: int) -> np.ndarray:
    """One scale per `group` consecutive channels of each vector (kv_cache's rounding)."""
    y = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    return per_token(y, kind).reshape(x.shape)


def per_channel_blocks(
    blocks: np.ndarray, kind: str, zero_point: bool = False, fp16_meta: bool = False
) -> np.ndarray:
    """blocks (nb, B, n_kv, D): one scale per (block, kv-head, channel) over the B tokens
    (kv_cache's rounding, with the token axis moved last). zero_point: first subtract each
    channel's midrange c = (max + min) / 2 over the block (stored next to the scale), so the
    scale covers the channel's spread rather than its offset. fp16_meta: offset and scale
    stored in fp16 (the scale rounded from absmax/qmax; values it pushes past qmax saturate):
    with zero_point, exactly the shipped int8/fp8 key format (kv_cache.quantize_block)."""
    if fp16_meta:
        assert zero_point, "the fp16 formats carry an offset"
        x = blocks.transpose(1, 0, 2, 3)  # (B, nb, n_kv, D)
        return dequantize_block(*quantize_block(x, kind)).transpose(1, 0, 2, 3)
    x = blocks.transpose(0, 2, 3, 1)  # (nb, n_kv, D, B)
    c = np.float32(0)
    if zero_point:
        c = (x.max(-1, keepdims=True) + x.min(-1, keepdims=True)) * np.float32(0.5)
    return (per_token(x - c, kind) + c).transpose(0, 3, 1, 2)


def bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def e4m3_cast(x: np.ndarray) -> np.ndarray:
    """vLLM's default fp8 KV: scale 1.0, saturate to ±448 (CUDA's __NV_SATFINITE), round to
    nearest even."""
    y = np.clip(np.asarray(x, np.float32), -E4M3_MAX, E4M3_MAX)
    return y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def q8_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp q8_0 along the last axis (ggml quantize_row_q8_0_ref / dequantize_row_q8_0):
    d = absmax/127 in fp32, q = roundf(x * (1/d)) (half away from zero), stored d in fp16.
    (ggml's SIMD paths round ties to even instead; exact ties are rare in activations.)"""
    x = np.asarray(x, np.float32)
    if x.shape[-1] % Q8_0_BLOCK:
        raise TinyLLMError(
            f"kv format q8_0 needs head_dim to be a multiple of {Q8_0_BLOCK} "
            f"(this model's is {x.shape[-1]}); choose another --kv-formats entry"
        )
    y = x.reshape(*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    d = np.abs(y).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    t = y * inv
    q = np.trunc(t + np.copysign(np.float32(0.5), t))  # roundf: half away from zero
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


@dataclass(frozen=True)
class KVFormat:
    name: str
    k: Transform | None  # per-token K transform; None: per-channel blocks (KIVI)
    v: Transform
    k_bytes: Callable[[int, int], float]  # (D, B) -> bytes per (layer, kv-head, token)
    v_bytes: Callable[[int], float]  # D -> bytes
    k_block_kind: str = ""  # "int8" | "fp8" for KIVI keys
    k_zero_point: bool = False  # KIVI keys: a per-channel midrange offset too
    k_fp16_meta: bool = False  # KIVI keys: scale (and offset) in fp16, not fp32
    doc: str = ""

    @property
    def kivi(self) -> bool:
        return self.k is None

    def bytes_per_token(
        self, n_layers: int, n_kv_heads: int, head_dim: int, context: int, block: int = KIVI_BLOCK
    ) -> float:
        """K and V bytes per token, all layers, including scales and (KIVI) the open block of
        fp32 keys amortised over `context` tokens."""
        per = self.k_bytes(head_dim, block) + self.v_bytes(head_dim)
        if self.kivi:
            per += 4 * block * head_dim / context
        return n_layers * n_kv_heads * per


def _kivi(
    name: str,
    kind: str,
    v: Transform,
    v_bytes,
    doc: str,
    zero_point: bool = False,
    fp16_meta: bool = False,
) -> KVFormat:
    # bytes of scale (and offset) per channel and block
    per_channel = (2 if zero_point else 1) * (2 if fp16_meta else 4)
    return KVFormat(
        name,
        None,
        v,
        lambda d, b: d + per_channel * d / b,
        v_bytes,
        kind,
        zero_point,
        fp16_meta,
        doc,
    )


def _tok(kind: str) -> Transform:
    return lambda x: per_token(x, kind)


def _same(f: Transform, nbytes: Callable[[int], float]):
    """(k, v, k_bytes, v_bytes) of a format that treats K and V alike, token by token."""
    return f, f, lambda d, b: nbytes(d), nbytes


FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        KVFormat("fp32", *_same(lambda x: x, lambda d: 4 * d), doc="reference"),
        KVFormat("bf16", *_same(bf16, lambda d: 2 * d), doc="bfloat16"),
        KVFormat(
            "int8-token", *_same(_tok("int8"), lambda d: d + 4), doc="the int8 cache before KIVI"
        ),
        KVFormat(
            "fp8-token", *_same(_tok("fp8"), lambda d: d + 4), doc="the fp8 cache before KIVI"
        ),
        KVFormat("q8_0", *_same(q8_0, lambda d: d + 2 * d / Q8_0_BLOCK), doc="llama.cpp q8_0"),
        KVFormat("fp8-vllm", *_same(e4m3_cast, lambda d: d), doc="vLLM's default fp8"),
        _kivi("int8-kivi", "int8", _tok("int8"), lambda d: d + 4, "K per channel, V per token"),
        _kivi(
            "int8-kivi-zp",
            "int8",
            _tok("int8"),
            lambda d: d + 4,
            "K per channel with offset, V per token",
            zero_point=True,
        ),
        _kivi(
            "fp8-kivi",
            "fp8",
            _tok("fp8"),
            lambda d: d + 4,
            "K per channel with offset, V per token",
            zero_point=True,
        ),
        _kivi(
            "int8-kivi-zp-f16",
            "int8",
            _tok("int8"),
            lambda d: d + 4,
            "int8-kivi-zp, fp16 scale and offset",
            zero_point=True,
            fp16_meta=True,
        ),
        _kivi(
            "fp8-kivi-f16",
            "fp8",
            _tok("fp8"),
            lambda d: d + 4,
            "fp8-kivi, fp16 scale and offset",
            zero_point=True,
            fp16_meta=True,
        ),
        _kivi("fp8-kivi-sym", "fp8", _tok("fp8"), lambda d: d + 4, "K per channel, V per token"),
        _kivi(
            "fp8-kivi-v32",
            "fp8",
            lambda x: per_group(x, "fp8", 32),
            lambda d: d + 4 * d / 32,
            "fp8-kivi-sym with V on one scale per 32 channels",
        ),
    )
}


def unfit_reason(name: str, head_dim: int) -> str | None:
    """Why format `name` cannot hold vectors of head_dim, or None."""
    try:
        FORMATS[name].v(np.zeros((1, head_dim), np.float32))
    except TinyLLMError as e:
        return str(e)
    return None


def parse_formats(names) -> list[str]:
    out = []
    for n in names:
        if n not in FORMATS:
            raise TinyLLMError(f"unknown kv format {n!r}; choose from {', '.join(FORMATS)}")
        out.append(n)
    return list(dict.fromkeys(out))


class FormatKVCache(NumpyKVCache):
    """A float32 cache whose writes store fmt's round trip of K and V (see the module doc).

    One sequence at a time (the study runs Engine.logits): KIVI needs the raw keys of a
    block's earlier positions when the block closes, kept here by position in k_raw."""

    def __init__(self, spec: KVCacheSpec, fmt: KVFormat, block: int = KIVI_BLOCK):
        if spec.kv_dtype != "fp32":
            raise ValueError("a format study cache stores float32")
        super().__init__(spec)
        self.fmt, self.block = fmt, block
        if fmt.kivi:
            shape = (spec.max_seq_len, spec.n_kv_heads, spec.head_dim)
            self.k_raw = [np.zeros(shape, np.float32) for _ in range(spec.n_layers)]

    def write(
        self,
        layer: int,
        table: np.ndarray,
        pos: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        open_row: int = 0,
    ):
        """k, v (n, n_kv, D) float32 of consecutive positions pos (n,), through table (R,)."""
        pos = np.asarray(pos, np.int64)
        spec = self.spec
        self.v[layer][entries(table, pos, spec)] = self.fmt.v(v)
        if not self.fmt.kivi:
            self.k[layer][entries(table, pos, spec)] = self.fmt.k(k)
            return
        B, raw = self.block, self.k_raw[layer]
        raw[pos] = k
        p0, p1 = int(pos[0]), int(pos[-1]) + 1
        b0, closed = p0 // B * B, p1 // B * B  # blocks from b0 on are rewritten; < closed are full
        bs = spec.block_size  # positions the table still holds: its last R rows
        held = max(0, ((p1 - 1) // bs - spec.ring + 1) * bs)
        keep = np.arange(max(b0, held), p1)
        out = raw[keep]  # open block: exact
        if closed > b0:
            blocks = raw[b0:closed].reshape(-1, B, *k.shape[1:])
            deq = per_channel_blocks(
                blocks, self.fmt.k_block_kind, self.fmt.k_zero_point, self.fmt.k_fp16_meta
            ).reshape(-1, *k.shape[1:])
            done = keep < closed
            out[done] = deq[keep[done] - b0]
        self.k[layer][entries(table, keep, spec)] = out


class FormatBackend(NumpyBackend):
    """The numpy backend with a FormatKVCache."""

    def __init__(self, fmt: KVFormat, block: int = KIVI_BLOCK):
        self.fmt, self.block = fmt, block

    def alloc_kv(self, spec: KVCacheSpec) -> FormatKVCache:
        return FormatKVCache(spec, self.fmt, self.block)
