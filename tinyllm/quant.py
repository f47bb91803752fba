"""Weight-only quantization in llama.cpp's block formats: the one module that knows them.

Formats (ggml's names; bits per weight include the scales):

    q8_0   blocks of 32:  fp16 d, 32 int8 q            w = d * q              8.5 b/w
    q4_0   blocks of 32:  fp16 d, 32 4-bit q           w = d * (q - 8)        4.5 b/w
    q4_1   blocks of 32:  fp16 d, fp16 m, 32 4-bit q   w = d * q + m          5.0 b/w
    q4_k   super-blocks of 256 = 8 sub-blocks of 32: fp16 d, dmin; per sub-block a 6-bit
           scale sc and 6-bit min mn;                  w = (d*sc) * q - (dmin*mn)   4.5 b/w
    q6_k   super-blocks of 256 = 16 sub-blocks of 16: fp16 d; per sub-block an int8 scale sc;
           6-bit q (4 low bits in ql, 2 high bits in qh);  w = (d*sc) * (q - 32)  6.5625 b/w

Values are exactly llama.cpp's: `dequantize` equals `gguf.quants.dequantize` bit for bit;
`quantize` is our port of ggml-quants.c's quantize_row_{q8_0,q4_0,q4_1,q4_K,q6_K}_ref (the
K-quants' scale search included) and writes the very bytes llama.cpp's compiled C writes
(tests/data/llamacpp_kquant_blocks.npz, made by scripts/make_kquant_reference.py). It also
equals `gguf.quants.quantize` for q8_0/q4_0/q4_1 except in one corner where gguf's Python
differs from the C: a q4_0/q4_1 block of zeros keeps the C's signed zero in d / m.

Layout (QuantTensor): a lossless repack of llama.cpp's blocks with the codes apart from the
scales, row-major, so a kernel reads a row's codes as one contiguous run (16-byte loads) and its
scales as another. A weight is HF (N out, K in); row n of every part belongs to weight row n:

    q8_0  qs int8 (N, K)        d float16 (N, K/32)
    q4_0  qs uint8 (N, K/2)     d float16 (N, K/32)
    q4_1  qs uint8 (N, K/2)     d, m float16 (N, K/32)
    q4_k  qs uint8 (N, K/2)     scales uint8 (N, K/256*12)   d, dmin float16 (N, K/256)
    q6_k  ql uint8 (N, K/2)     qh uint8 (N, K/4)   scales int8 (N, K/16)   d float16 (N, K/256)

The byte order inside a block is llama.cpp's, kept as is:
* q4_0 / q4_1: byte 16*b + j of a row holds element 32*b + j in its low nibble and element
  32*b + j + 16 in its high nibble.
* q4_k: per super-block s, 128 bytes qs[128*s : 128*s+128]; byte 32*c + l (c = 0..3) holds
  element 256*s + 64*c + l (sub-block 2c) low and 256*s + 64*c + 32 + l (sub-block 2c+1) high.
  The 12 scale bytes pack 8 scales and 8 mins of 6 bits: for j < 4 sc[j] = b[j] & 63,
  mn[j] = b[j+4] & 63; for j >= 4 sc[j] = (b[j+4] & 15) | (b[j-4] >> 6) << 4 and
  mn[j] = (b[j+4] >> 4) | (b[j] >> 6) << 4 (ggml's get_scale_min_k4).
* q6_k: per super-block, halves h = 0, 1 of 128 elements e = 128*h + i: ql byte 64*h + l holds
  i = l (low nibble) and i = l + 64 (high), byte 64*h + 32 + l holds i = l + 32 and l + 96;
  qh byte 32*h + l holds the high two bits of i = l, l+32, l+64, l+96 at bits 0, 2, 4, 6.
  Sub-block (16 elements) j uses scales[j].

Worked example (q4_0, one row of K = 32): x = [-1.0, 0.25, 0, ..., 0] (the rest zeros).
The absmax element is -1.0, so d = -1.0 / -8 = 0.125 and q = trunc(x / d + 8.5) clipped to
15: q[0] = trunc(-8 + 8.5) = 0, q[1] = trunc(2 + 8.5) = 10, q[j] = 8 elsewhere. Byte 0 = q[0]
| q[16] << 4 = 0x80, byte 1 = q[1] | q[17] << 4 = 0x8A, bytes 2..15 = 0x88; d = [0.125].
Read back: 0.125 * (0 - 8) = -1.0, 0.125 * (10 - 8) = 0.25, 0 elsewhere. The llama.cpp block
is the 2 bytes of d followed by those 16 bytes (`to_gguf_blocks`).

Backends receive QuantTensor objects through `ops.upload_quant(name, qt)` (backends/__init__.py)
and run `ops.linear(x, handle)` on what it returns.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 256, "q6_k": 256}
# Bytes of one llama.cpp block (GGML_QUANT_SIZES) and the bits per weight that follow.
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q4_k": 144, "q6_k": 210}
BITS_PER_WEIGHT = {f: BLOCK_BYTES[f] * 8 / BLOCK[f] for f in FORMATS}
GGML_TYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K", "q6_k": "Q6_K"}

# Fields of one llama.cpp block in memory order: (part, dtype, elements per block).
# Parts of the same name are concatenated per row in block order by from_gguf_blocks.
GGUF_FIELDS = {
    "q8_0": (("d", np.float16, 1), ("qs", np.int8, 32)),
    "q4_0": (("d", np.float16, 1), ("qs", np.uint8, 16)),
    "q4_1": (("d", np.float16, 1), ("m", np.float16, 1), ("qs", np.uint8, 16)),
    "q4_k": (
        ("d", np.float16, 1),
        ("dmin", np.float16, 1),
        ("scales", np.uint8, 12),
        ("qs", np.uint8, 128),
    ),
    "q6_k": (
        ("ql", np.uint8, 128),
        ("qh", np.uint8, 64),
        ("scales", np.int8, 16),
        ("d", np.float16, 1),
    ),
}

F32 = np.float32


@dataclass
class QuantTensor:
    fmt: str  # "q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k"
    shape: tuple[int, int]  # (N out, K in) as HF (out, in); K % BLOCK[fmt] == 0
    parts: dict[str, np.ndarray]  # C-contiguous, row n of each part belongs to weight row n

    @property
    def nbytes(self) -> int:
        return nbytes(self)


def nbytes(qt: QuantTensor) -> int:
    return sum(int(p.nbytes) for p in qt.parts.values())


def quant_nbytes(fmt: str, n: int, k: int) -> int:
    """Bytes of an (n, k) weight in fmt (equal to nbytes(quantize(...)))."""
    return n * (k // BLOCK[fmt]) * BLOCK_BYTES[fmt]


# What a format falls back to for a matrix whose K is not a multiple of its block (llama.cpp
# falls back the same way for K-quants: q6_k -> q8_0; its q4_k -> q5_0 becomes q4_1 here).
FALLBACK = {"q4_k": "q4_1", "q6_k": "q8_0"}


# What `quantization=` accepts: the formats, and int4 = q4_k blocks found by the weighted
# error-minimizing search (_q4_k_wmse; BENCHMARKS.md's study), held and run as q4_k.
QUANTIZATIONS = (*FORMATS, "int4")


def fallback(fmt: str, k: int) -> str | None:
    """The format a (N, k) matrix gets when fmt (a QUANTIZATIONS name) is asked for: fmt, its
    FALLBACK, or None (stays float) when k does not divide into 32-blocks either."""
    fmt = "q4_k" if fmt == "int4" else fmt
    if k % BLOCK[fmt] == 0:
        return fmt
    fmt = FALLBACK.get(fmt)
    return fmt if fmt is not None and k % BLOCK[fmt] == 0 else None


def check_format(fmt: str) -> str:
    if fmt not in QUANTIZATIONS:
        from .errors import TinyLLMError

        raise TinyLLMError(
            f"unknown quantization {fmt!r}; choose one of {', '.join(QUANTIZATIONS)}"
        )
    return fmt


# ---- llama.cpp blocks <-> parts -----------------------------------------------------------


def from_gguf_blocks(fmt: str, raw: np.ndarray, shape) -> QuantTensor:
    """llama.cpp's blocks (uint8, N rows of K / BLOCK blocks, as a GGUF stores them) -> parts."""
    n, k = int(shape[0]), int(shape[1])
    if k % BLOCK[fmt]:
        raise ValueError(f"{fmt} needs rows that are a multiple of {BLOCK[fmt]} (got K={k})")
    nb = k // BLOCK[fmt]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, nb, BLOCK_BYTES[fmt])
    parts, at = {}, 0
    for name, dt, count in GGUF_FIELDS[fmt]:
        size = count * np.dtype(dt).itemsize
        field = np.ascontiguousarray(blocks[:, :, at : at + size])
        parts[name] = field.view(dt).reshape(n, nb * count)
        at += size
    return QuantTensor(fmt, (n, k), parts)


def to_gguf_blocks(qt: QuantTensor) -> np.ndarray:
    """Parts -> llama.cpp's blocks, uint8 (N, K / BLOCK * BLOCK_BYTES): the inverse of
    from_gguf_blocks, bit for bit."""
    n, k = qt.shape
    nb = k // BLOCK[qt.fmt]
    fields = [
        np.ascontiguousarray(qt.parts[name]).view(np.uint8).reshape(n, nb, -1)
        for name, _, _ in GGUF_FIELDS[qt.fmt]
    ]
    return np.concatenate(fields, axis=2).reshape(n, nb * BLOCK_BYTES[qt.fmt])


def concat_rows(qts: list[QuantTensor]) -> QuantTensor:
    """Stack weights of one format along the output rows (fused q|k|v, gate|up)."""
    fmt, k = qts[0].fmt, qts[0].shape[1]
    if any(q.fmt != fmt or q.shape[1] != k for q in qts):
        raise ValueError("concat_rows needs one format and one K")
    parts = {name: np.concatenate([q.parts[name] for q in qts]) for name in qts[0].parts}
    return QuantTensor(fmt, (sum(q.shape[0] for q in qts), k), parts)


def take_rows(qt: QuantTensor, lo: int, hi: int) -> QuantTensor:
    """Rows lo..hi-1 (views of the parts)."""
    return QuantTensor(qt.fmt, (hi - lo, qt.shape[1]), {n: p[lo:hi] for n, p in qt.parts.items()})


# ---- dequantization (the math a kernel does) -----------------------------------------------


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """q4_0/q4_1 codes (N, K/2) -> (N, K/32, 32) uint8: low nibbles are elements 0..15 of a
    block, high nibbles 16..31."""
    b = qs.reshape(qs.shape[0], -1, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=2)


def q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed q4_k scale bytes (N, S*12) -> 6-bit scales and mins, each (N, S, 8) uint8."""
    b = scales.reshape(scales.shape[0], -1, 12)
    lo, hi, mix = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def q4k_codes(qs: np.ndarray) -> np.ndarray:
    """q4_k codes (N, K/2) -> (N, K/256, 8, 32) uint8 in element order."""
    b = qs.reshape(qs.shape[0], -1, 4, 1, 32)  # (N, S, chunk c, ., byte l)
    return np.concatenate([b & 0x0F, b >> 4], axis=3).reshape(qs.shape[0], -1, 8, 32)


def q6k_codes(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """q6_k codes -> (N, K/256, 16, 16) int8 q - 32, in element order."""
    n = ql.shape[0]
    lo = ql.reshape(n, -1, 2, 2, 1, 32)  # (N, S, half, byte group g, ., l): i = 32g + l (+64)
    lo = np.concatenate([lo & 0x0F, lo >> 4], axis=4)  # (N, S, half, g, nibble, l)
    lo = lo.transpose(0, 1, 2, 4, 3, 5)  # i = 64*nibble + 32*g + l
    hi = qh.reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    hi = (hi & 3).reshape(n, -1, 2, 2, 2, 32)  # shift 2*(2*nibble + g)
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    return q.reshape(n, -1, 16, 16)


def dequantize(qt: QuantTensor) -> np.ndarray:
    """QuantTensor -> float32 (N, K): the formulas of the module docstring, in float32 with
    ggml's operation order (bit-exact with gguf.quants.dequantize)."""
    n, k = qt.shape
    p = qt.parts
    if qt.fmt == "q8_0":
        q = p["qs"].reshape(n, -1, 32).astype(F32)
        w = q * p["d"].astype(F32)[..., None]
    elif qt.fmt == "q4_0":
        q = _nibbles32(p["qs"]).astype(np.int8) - np.int8(8)
        w = p["d"].astype(F32)[..., None] * q.astype(F32)
    elif qt.fmt == "q4_1":
        q = _nibbles32(p["qs"]).astype(F32)
        w = p["d"].astype(F32)[..., None] * q + p["m"].astype(F32)[..., None]
    elif qt.fmt == "q4_k":
        sc, mn = q4k_scale_min(p["scales"])
        d = p["d"].astype(F32)[..., None] * sc.astype(F32)  # (N, S, 8)
        dm = p["dmin"].astype(F32)[..., None] * mn.astype(F32)
        w = d[..., None] * q4k_codes(p["qs"]).astype(F32) - dm[..., None]
    elif qt.fmt == "q6_k":
        sc = p["scales"].reshape(n, -1, 16).astype(F32)
        d = p["d"].astype(F32)[..., None] * sc  # (N, S, 16)
        w = d[..., None] * q6k_codes(p["ql"], p["qh"]).astype(F32)
    else:
        raise ValueError(f"unknown format {qt.fmt}")
    return w.reshape(n, k)


# ---- quantization --------------------------------------------------------------------------

# Rows are quantized a chunk at a time so that the float32 temporaries stay about this size.
CHUNK_ELEMS = 1 << 16


def quantize(w: np.ndarray, fmt: str, search: str | None = None) -> QuantTensor:
    """float (N, K) (any float dtype, e.g. a bf16 memmap) -> QuantTensor, llama.cpp's
    reference quantizer for fmt. Works through the rows in chunks (bounded memory).
    fmt "int4", or fmt "q4_k" with search "int4" (what `quantization="int4"` asked for): q4_k
    blocks from the weighted error-minimizing search instead."""
    check_format(fmt)
    if fmt == "int4" or (fmt == "q4_k" and search == "int4"):
        fmt, quantizer = "q4_k", _q4_k_wmse
    else:
        quantizer = _QUANTIZERS[fmt]  # (a study_quantizer may stand in for it)
    n, k = w.shape
    if k % BLOCK[fmt]:
        raise ValueError(f"{fmt} needs rows that are a multiple of {BLOCK[fmt]} (got K={k})")
    step = max(1, CHUNK_ELEMS // max(k, 1))
    chunks = []
    for lo in range(0, n, step):
        x = np.asarray(w[lo : lo + step], dtype=F32)
        chunks.append(quantizer(x.reshape(-1, BLOCK[fmt]), x.shape[0], k))
    parts = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    return QuantTensor(fmt, (n, k), parts)


def _q8_0(x: np.ndarray, n: int, k: int) -> dict:
    # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1/d)) (halves away from zero).
    d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
    y = np.abs(x * inv)
    q = np.sign(x * inv) * (np.floor(y) + np.floor(F32(2) * (y - np.floor(y))))  # exact roundf
    return {"qs": q.astype(np.int8).reshape(n, k), "d": d.astype(np.float16).reshape(n, -1)}


def _pack_nibbles32(q: np.ndarray, n: int) -> np.ndarray:
    q = q.reshape(-1, 2, 16)
    return (q[:, 0] | (q[:, 1] << 4)).astype(np.uint8).reshape(n, -1)


def _q4_0(x: np.ndarray, n: int, k: int) -> dict:
    # quantize_row_q4_0_ref: d = (the signed absmax element) / -8, q = min(15, (int)(x/d + 8.5)).
    # ggml's scan starts from max = +0.0 and takes an element only if |v| is strictly larger,
    # so an all-zero block (of either sign) has d = +0 / -8 = -0.0 (fp16 0x8000).
    imax = np.abs(x).argmax(axis=1)[:, None]
    mx = np.take_along_axis(x, imax, axis=1)
    d = np.where(mx == 0, F32(0), mx) / F32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
    q = np.trunc(x * inv + F32(8.5)).astype(np.uint8).clip(0, 15)
    return {"qs": _pack_nibbles32(q, n), "d": d.astype(np.float16).reshape(n, -1)}


def _q4_1(x: np.ndarray, n: int, k: int) -> dict:
    # quantize_row_q4_1_ref: d = (max - min) / 15, m = min, q = min(15, (int)((x-min)/d + 0.5)).
    # min is the first smallest element in scan order (strict '<'), so its zero keeps the sign
    # of the first zero (argmin's first occurrence; x.min() may return either zero).
    mn = np.take_along_axis(x, x.argmin(axis=1)[:, None], axis=1)
    mx = np.take_along_axis(x, x.argmax(axis=1)[:, None], axis=1)
    d = (mx - mn) / F32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d)
    q = np.trunc((x - mn) * inv + F32(0.5)).astype(np.uint8).clip(0, 15)
    return {
        "qs": _pack_nibbles32(q, n),
        "d": d.astype(np.float16).reshape(n, -1),
        "m": mn.astype(np.float16).reshape(n, -1),
    }


# K-quants. ggml accumulates its sums element by element in float32 (no reassociation, no
# fused multiply-add in the reference build), so the sums below run over the element axis in
# order; everything else is vectorized over blocks. nearest_int is round-half-to-even (np.rint).


def _seqsum(t: np.ndarray) -> np.ndarray:
    """Sum over the first axis in order, in float32, as a C loop `s += t[i]` from s = 0.
    (The element axis comes first so that each step reads one contiguous row.)"""
    s = np.zeros(t.shape[1:], F32)
    for i in range(t.shape[0]):
        s += t[i]
    return s


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants (use_mad false) on blocks x, weights w (B, n) float32:
    codes L (B, n) in 0..nmax, scale (B,) and the_min (B,) with x ≈ scale * L - the_min.
    Internally element-major (n, B): one row per element of every block."""
    x, w = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)
    nmax_f = F32(nmax)
    mn = np.minimum(x.min(axis=0), F32(0))
    mx = x.max(axis=0)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(np.rint(iscale * (x - mn)), 0, nmax)
        diff = scale * L + mn - x
        best = _seqsum(w * (diff * diff))
        for step in range(nstep + 1):
            # ggml updates `min` when a step wins, and later steps use the updated one
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + nmax_f) / (mx - mn)
            la = x - mn  # in place from here: the same float32 operations, fewer temporaries
            la *= iscale
            np.clip(np.rint(la, out=la), 0, nmax, out=la)
            t = np.empty((x.shape[0], 3, x.shape[1]), F32)  # three sums in one ordered pass
            np.multiply(w, la, out=t[:, 0])
            np.multiply(t[:, 0], la, out=t[:, 1])
            np.multiply(t[:, 0], x, out=t[:, 2])
            sum_l, sum_l2, sum_xl = _seqsum(t)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale * la  # w * (diff * diff), diff = this_scale * la + this_min - x
            diff += this_min
            diff -= x
            diff *= diff
            diff *= w
            cur = _seqsum(diff)
            better = (D > 0) & (cur < best)
            np.copyto(L, la, where=better)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    L = np.where(flat, 0, L)
    scale = np.where(flat, F32(0), scale)
    return L.T.astype(np.uint8), scale.astype(F32), (-mn).astype(F32)


def _q4_k(x: np.ndarray, n: int, k: int) -> dict:
    """quantize_row_q4_K_ref on super-blocks x (S, 256)."""
    return _pack_q4k(*_q4k_search(x), n)


def _q4k_search(x: np.ndarray):
    """quantize_row_q4_K_ref's search on super-blocks x (S, 256) -> codes (S, 8, 32),
    6-bit sc, mn (S, 8) int64 and fp16 d, dmin (S,)."""
    S = x.shape[0]
    xb = x.reshape(S * 8, 32)
    av_x = np.sqrt(_seqsum(np.ascontiguousarray((xb * xb).T)) / F32(32))
    w = av_x[:, None] + np.abs(xb)
    L, scales, mins = make_qkx2_quants(xb, w, 15, -1.0, 0.1, 20)
    L, scales, mins = L.reshape(S, 8, 32), scales.reshape(S, 8), mins.reshape(S, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # uint8_t ls = nearest_int(...); MIN(63, ls)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    L = np.where(*_q4k_recode(x.reshape(S, 8, 32), d16, dmin16, ls, lm), L)
    return L, ls, lm, d16, dmin16


def _q4k_recode(xs, d16, dmin16, ls, lm):
    """ggml's second q4_K pass: codes for super-blocks xs (S, 8, 32) under the stored fp16
    d, dmin (S,) and 6-bit sc, mn (S, 8). Returns (d != 0 per sub-block (S, 8, 1), codes);
    ggml keeps the first pass's codes where d == 0."""
    d = d16.astype(F32)[:, None] * ls.astype(F32)  # (S, 8) = fp16(d) * sc
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = np.clip(np.rint((xs + dm[..., None]) / d[..., None]), 0, 15)
    return (d != 0)[..., None], l2


def _pack_q4k(L, ls, lm, d16, dmin16, n: int) -> dict:
    """Codes L (S, 8, 32), 6-bit sc, mn (S, 8), fp16 d, dmin (S,) -> q4_k parts of n rows."""
    S = L.shape[0]
    packed = np.zeros((S, 12), np.int64)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    # qs: per super-block, byte 32c + l = L[2c][l] | L[2c+1][l] << 4
    L = L.astype(np.uint8).reshape(S, 4, 2, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 4)
    return {
        "qs": qs.reshape(n, -1),
        "scales": packed.astype(np.uint8).reshape(n, -1),
        "d": d16.reshape(n, -1),
        "dmin": dmin16.reshape(n, -1),
    }


def make_qx_quants(x: np.ndarray, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 and no importance weights, on blocks x (B, n):
    codes L (B, n) in 0..2*nmax-1 (q + nmax) and scale (B,) with x ≈ scale * (L - nmax).
    Internally element-major (n, B), as make_qkx2_quants."""
    B = x.shape[0]
    imax = np.abs(x).argmax(axis=1)  # the first largest |x|, as ggml's strict '>' scan
    mx = x[np.arange(B), imax]
    zero = np.abs(mx) < F32(1e-15)
    x = np.ascontiguousarray(x.T)
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-nmax) / mx
        lq = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
        L = lq + nmax
        sumlx, suml2 = _seqsum(wx * lq), _seqsum(w * lq * lq)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for s in range(-9, 10):
            if s == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(s)) / mx
            lq = np.clip(np.rint(iscale * x), -nmax, nmax - 1)
            sumlx, suml2 = _seqsum(wx * lq), _seqsum(w * lq * lq)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, lq + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(zero, 0, L)
    scale = np.where(zero, F32(0), scale)
    return L.T.astype(np.int64), scale.astype(F32)


def _q6_k(x: np.ndarray, n: int, k: int) -> dict:
    """quantize_row_q6_K_ref on super-blocks x (S, 256)."""
    S = x.shape[0]
    L, scales = make_qx_quants(x.reshape(S * 16, 16), 32)
    L, scales = L.reshape(S, 16, 16), scales.reshape(S, 16)
    imax = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(S), imax]
    empty = np.abs(max_scale) < F32(1e-15)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d16 = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
        sc = np.minimum(np.rint(iscale[:, None] * scales), 127)
        sc = np.where(empty[:, None], 0, sc).astype(np.int64)
        d = d16.astype(F32)[:, None] * sc.astype(F32)  # (S, 16)
        l2 = np.clip(np.rint(x.reshape(S, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], l2, L).astype(np.int64)
    L = np.where(empty[:, None, None], 0, L)  # an all-zero super-block is all zero bytes
    L = L.reshape(S, 2, 4, 32)  # (S, half, quarter, l): element 128h + 32g + l
    ql = np.concatenate(
        [
            (L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4),
            (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4),
        ],
        axis=2,
    )  # (S, 2, 64)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
    qh = qh | ((L[:, :, 3] >> 4) << 6)  # (S, 2, 32)
    return {
        "ql": ql.astype(np.uint8).reshape(n, -1),
        "qh": qh.astype(np.uint8).reshape(n, -1),
        "scales": sc.astype(np.int8).reshape(n, -1),
        "d": d16.reshape(n, -1),
    }


_QUANTIZERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q4_k": _q4_k, "q6_k": _q6_k}


# ---- beyond llama.cpp: a study quantizer in q4_k's layout (BENCHMARKS.md, issue 20) --------
# Not a format of its own: it writes ordinary q4_k blocks (the kernels are unchanged), chosen
# to minimize the plain squared error of the dequantized super-block instead of stopping at
# ggml's search. Selected only by `tinyllm eval --weights q4_k-mse` (study_quantizer).

MSE_D_FACTORS = (0.96, 0.98, 1.0, 1.02, 1.04)  # super-block d tried, times ggml's


def _q4k_err(xs, wt, L, ls, lm, d16, dmin16):
    """Error sum(wt * e^2) per sub-block (S, 8) of codes L under (d16 * ls, dmin16 * lm)."""
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    e = d[..., None] * L.astype(F32) - dm[..., None] - xs
    return (wt * e * e).sum(axis=-1)


def _q4_k_mse(x: np.ndarray, n: int, k: int, weighted: bool = False) -> dict:
    """q4_k blocks from ggml's search, then per super-block d in d * MSE_D_FACTORS and per
    sub-block sc, mn in their +-1 neighbourhood, codes re-rounded, keeping what lowers the
    squared error (weighted: by ggml's own weights rms(sub-block) + |x|). ggml's choice is a
    candidate, so the error never grows."""
    xs = x.reshape(x.shape[0], 8, 32)
    wt = F32(1)
    if weighted:
        wt = np.sqrt((xs * xs).mean(axis=-1, keepdims=True)) + np.abs(xs)
    L, ls, lm, d16, dmin16 = _q4k_search(x)
    best = _q4k_err(xs, wt, L, ls, lm, d16, dmin16)
    for f in MSE_D_FACTORS:
        df = (d16.astype(F32) * F32(f)).astype(np.float16)
        with np.errstate(divide="ignore", invalid="ignore"):
            base = np.where(df[:, None] > 0, np.rint(ls * d16[:, None] / df[:, None]), 0)
        fL, fls, flm = L.copy(), ls.copy(), lm.copy()
        ferr = np.full(ls.shape, np.inf, F32)
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                cls = np.clip(base + a, 0, 63).astype(np.int64)
                clm = np.clip(lm + b, 0, 63)
                ok, cL = _q4k_recode(xs, df, dmin16, cls, clm)
                cL = np.where(ok, cL, 0)
                err = _q4k_err(xs, wt, cL, cls, clm, df, dmin16)
                win = err < ferr
                ferr = np.where(win, err, ferr)
                fL = np.where(win[..., None], cL, fL)
                fls, flm = np.where(win, cls, fls), np.where(win, clm, flm)
        take = ferr.sum(axis=1) < best.sum(axis=1)  # per super-block: d is shared
        best = np.where(take[:, None], ferr, best)
        L = np.where(take[:, None, None], fL, L)
        ls, lm = np.where(take[:, None], fls, ls), np.where(take[:, None], flm, lm)
        d16 = np.where(take, df, d16)
    return _pack_q4k(L, ls, lm, d16, dmin16, n)


def _q4_k_wmse(x: np.ndarray, n: int, k: int) -> dict:
    return _q4_k_mse(x, n, k, weighted=True)


# study name -> (the format whose blocks it writes, its quantizer)
STUDY = {"q4_k-mse": ("q4_k", _q4_k_mse), "q4_k-wmse": ("q4_k", _q4_k_wmse)}


@contextmanager
def study_quantizer(name: str):
    """Within the block, quantize(w, fmt) for the study's format runs the study quantizer;
    yields that format (e.g. for LLM(quantization=...))."""
    fmt, fn = STUDY[name]
    saved = _QUANTIZERS[fmt]
    _QUANTIZERS[fmt] = fn
    try:
        yield fmt
    finally:
        _QUANTIZERS[fmt] = saved
