"""Every CUDA kernel against its numpy twin (numpy_backend.py / kv_cache.py), on the shapes
that break kernels: sizes off the block (1, 7, 33, 4097), GQA ratios 1/4/8/all (and 12,
more heads than one decode CTA takes), head_dim 64, 128 and the zero-padded 16/24, window
edges, position 0 and the last position, a rolling cache that wraps, every KV dtype, strided
inputs. GPU tests carry the `gpu` marker (skipped without CuPy and a device); the tests at the
bottom check the backend's pure-Python parts and run everywhere.

Tolerances (bf16). Inputs are rounded to bf16 once and the numpy reference is given the *same*
rounded values in float32, so a kernel differs from numpy only by (a) its bf16 output
rounding, at most half an ulp = 2^-9 relative, (b) fp32 accumulation order (~1e-6 relative
here), and in attention (c) P rounded to bf16 before P@V in the tensor-core kernel and K/V
re-rounded to bf16 when the cache is not bf16 (2^-9 relative each). `close` therefore allows
rtol 2^-7 (two ulps) plus an atol of a few ulps of the output's scale. Where no rounding
happens at all (gathers, the residual sum, RoPE with the host-computed tables, quantized cache
bytes) the comparison is exact.
"""

from __future__ import annotations

import os
import zlib

import ml_dtypes
import numpy as np
import pytest

from tinyllm.backends import Batch
from tinyllm.backends import cuda_backend as cb
from tinyllm.backends import cuda_kernels as ck
from tinyllm.backends.numpy_backend import NumpyBackend, NumpyKVCache
from tinyllm.errors import TinyLLMError
from tinyllm.kv_cache import KVCacheSpec, visible_lo

REF = NumpyBackend()
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend():
    from tinyllm.backends.cuda_backend import CudaBackend

    return CudaBackend()


@pytest.fixture
def be(backend):
    backend.versions = dict(cb.VERSIONS)  # each test starts from the registry defaults
    return backend


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def bf(a) -> np.ndarray:
    """Round to bf16 and back (what the device holds)."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def randn(rng, *shape, scale=1.0) -> np.ndarray:
    return bf(rng.standard_normal(shape).astype(np.float32) * scale)


def close(got, want, rtol=2**-7, atol_ulps=4):
    want = np.asarray(want, np.float64)
    atol = atol_ulps * 2**-9 * max(float(np.abs(want).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# ---- gathers ------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("V,dim", [(1, 8), (33, 64), (4097, 24), (7, 4097)])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_embed_is_exact(be, rng, V, dim, T):
    table = randn(rng, V, dim)
    tokens = rng.integers(0, V, T).astype(np.int32)
    tokens[0], tokens[-1] = 0, V - 1
    got = be.to_numpy(be.embed(be.upload("model.embed_tokens.weight", table), tokens))
    np.testing.assert_array_equal(got, REF.embed(table, tokens))


@gpu
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_take_rows_is_exact(be, rng, dtype):
    x = randn(rng, 33, 40)
    rows = np.array([32, 0, 5, 5], np.int64)
    dx = be.from_numpy(x) if dtype == "bf16" else be.cp.asarray(x)
    np.testing.assert_array_equal(be.to_numpy(be.take_rows(dx, rows)), REF.take_rows(x, rows))
    wide = be.from_numpy(randn(rng, 33, 64))[:, 8:48]  # strided rows
    np.testing.assert_array_equal(be.to_numpy(be.take_rows(wide, rows)), be.to_numpy(wide)[rows])


@gpu
@pytest.mark.parametrize("dtype,width", [(np.float32, 5), (np.float16, 3), (np.int8, 7)])
def test_take_rows_narrow_vectors(be, rng, dtype, width):
    """Rows of 20, 6 and 7 bytes: the 4-, 2- and 1-byte gathers."""
    x = (rng.standard_normal((9, width)) * 50).astype(dtype)
    rows = np.array([8, 0, 3, 3], np.int64)
    np.testing.assert_array_equal(be.cp.asnumpy(be.take_rows(be.cp.asarray(x), rows)), x[rows])


# ---- RMSNorm -------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("rows,dim", [(1, 8), (7, 64), (33, 4096), (3, 4097), (2, 24)])
def test_rms_norm(be, rng, version, rows, dim):
    be.versions["rms_norm"] = version
    x, w = randn(rng, rows, dim, scale=3.0), randn(rng, dim)
    got = be.to_numpy(be.rms_norm(be.from_numpy(x), be.upload("w", w), 1e-5))
    close(got, REF.rms_norm(x, w, 1e-5))


@gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("rows,dim", [(1, 8), (7, 64), (33, 4096), (3, 4097)])
def test_add_rms_norm(be, rng, version, rows, dim):
    be.versions["rms_norm"] = version
    x, d, w = randn(rng, rows, dim), randn(rng, rows, dim), randn(rng, dim)
    s, h = be.add_rms_norm(be.from_numpy(x), be.from_numpy(d), be.upload("w", w), 1e-6)
    s_ref = bf(x + d)  # fp32 sum rounded once: the same bits on both sides
    np.testing.assert_array_equal(be.to_numpy(s), s_ref)
    close(be.to_numpy(h), REF.rms_norm(s_ref, w, 1e-6))


@gpu
def test_rms_norm_strided_input(be, rng):
    big = randn(rng, 7, 80)
    w = randn(rng, 64)
    x = be.from_numpy(big)[:, 16:]  # row stride 80, offset 32 bytes
    close(be.to_numpy(be.rms_norm(x, be.upload("w", w), 1e-5)), REF.rms_norm(big[:, 16:], w, 1e-5))


@gpu
def test_graph_replay_reads_device_memory_as_it_is_at_launch(be, rng):
    """The CUDA-graph semantics the decode graphs rely on (cuda_graphs.py), the same on a GPU
    and on the stand-in: a launch made while a stream captures does not run; a replay runs it
    with its captured arguments over the buffers as they are at launch time, so an input
    rewritten by a host-to-device copy between replays is seen."""
    import ctypes

    cp = be.cp
    xs, w = [randn(rng, 3, 64, scale=3.0) for _ in range(3)], randn(rng, 64)
    x, wd, out = be.from_numpy(xs[0]), be.upload("w", w), cp.zeros((3, 64), be.bf16)
    k = ck.get("rmsnorm.cu", "rms_norm_bf16_v1")
    s = cp.cuda.Stream(non_blocking=False)
    with s:
        s.begin_capture()
        k(
            (3,),
            (ck.TILES["RMS_THREADS"],),
            (x, np.int32(64), wd, out, np.int32(64), np.float32(1e-5)),
        )
        g = s.end_capture()
        assert not be.to_numpy(out).any(), "a captured launch ran"
        for xh in xs[1:]:
            staged = cb.to_bf16_bits(xh)
            x.data.copy_from_host_async(ctypes.c_void_p(staged.ctypes.data), staged.nbytes, s)
            g.launch(stream=s)
            close(be.to_numpy(out), REF.rms_norm(xh, w, 1e-5))


@gpu
@pytest.mark.skipif(
    os.environ.get("TINYLLM_FAKE_CUPY") != "1", reason="rules of the CuPy stand-in's capture model"
)
def test_stand_in_capture_model(be, rng):
    """What tests/fakecupy makes of a capture, beyond what a GPU shows without failing: the
    captured scalar is replayed (dim 64 though the host now means 32), a buffer freed after
    capture fails the replay's bounds check, and allocations, device-to-host copies and cuBLAS
    inside a capture are refused."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    cp = be.cp
    x, w = be.from_numpy(randn(rng, 2, 64)), be.upload("w", randn(rng, 64))
    out = cp.zeros((2, 64), be.bf16)
    k = ck.get("rmsnorm.cu", "rms_norm_bf16_v1")
    s = cp.cuda.Stream()
    with s:
        s.begin_capture()
        dim = 64
        k((2,), (256,), (x, np.int32(64), w, out, np.int32(dim), np.float32(1e-5)))
        for refused in (
            lambda: cp.empty(4, np.float32),
            out.get,
            lambda: cublas.gemmEx(*[0] * 19),
        ):
            with pytest.raises((AssertionError, NotImplementedError), match="capture"):
                refused()
        g = s.end_capture()
        dim = 32  # noqa: F841  (the graph keeps 64)
        g.launch(stream=s)
        assert np.isfinite(be.to_numpy(out)[:, 32:]).all() and be.to_numpy(out)[:, 32:].any()
        del out
        import gc

        gc.collect()
        with pytest.raises(AssertionError, match="out-of-bounds|no live allocation"):
            g.launch(stream=s)
    assert cupy.STATS["launches"] > 0


# ---- linear --------------------------------------------------------------------------------------

LINEAR_SHAPES = [(7, 64), (33, 4096), (4097, 64), (64, 4097), (256, 1024)]


@gpu
@pytest.mark.parametrize("gemv", ["v1", "cublas"])
@pytest.mark.parametrize("M", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("N,K", LINEAR_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_linear(be, rng, gemv, M, N, K, bias):
    be.versions["gemv"] = gemv
    x, w = randn(rng, M, K), randn(rng, N, K, scale=K**-0.5)
    b = randn(rng, N) if bias else None
    y = be.linear(be.from_numpy(x), be.upload("w", w), be.upload("b", b) if bias else None)
    assert y.shape == (M, N) and y.dtype == be.bf16
    want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    # + bias after a bf16 cuBLAS output rounds twice: one more ulp.
    close(be.to_numpy(y), want, atol_ulps=6)


@gpu
@pytest.mark.parametrize("M", [9, 16, 33])
def test_linear_gemv_row_chunks(be, rng, M):
    """gemv "v1-all" (what a decode graph's bucket of more than 8 rows uses): GEMV_MAX_M-row
    chunks, the last one shorter, fp32 logits output too."""
    be.versions["gemv"] = "v1-all"
    x, w = randn(rng, M, 64), randn(rng, 40, 64, scale=0.125)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    close(be.to_numpy(be.linear(be.from_numpy(x), be.upload("w", w))), want)
    wl = be.upload("w", w)
    be.mark_logits_weight(wl)
    y = be.linear(be.from_numpy(x), wl)
    assert y.dtype == np.float32
    close(be.to_numpy(y), want)


@gpu
@pytest.mark.parametrize("gemv", ["v1", "cublas"])
@pytest.mark.parametrize("M", [1, 5, 6, 7, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_logits_are_fp32(be, rng, M, gemv, bias):
    be.versions["gemv"] = gemv
    V, K = 4097, 256
    x, w = randn(rng, M, K), randn(rng, V, K, scale=K**-0.5)
    b = randn(rng, V) if bias else None  # a biased vocabulary projection
    y = be.linear(
        be.from_numpy(x).reshape(M, K),
        be.upload("lm_head.weight", w),
        be.upload("lm_head.bias", b) if bias else None,
    )
    assert y.dtype == np.float32
    want = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    # fp32 output: only accumulation order differs (cuBLAS may use split-K)
    np.testing.assert_allclose(be.to_numpy(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@gpu
def test_linear_3d_input(be, rng):
    x, w = randn(rng, 2, 3, 64), randn(rng, 16, 64)
    y = be.linear(be.from_numpy(x), be.upload("w", w))
    assert y.shape == (2, 3, 16)
    close(be.to_numpy(y), x.astype(np.float64) @ w.T.astype(np.float64))


# ---- quantized linear (cuda/quant_matmul.cu) -----------------------------------------------
# Reference: x @ quant.dequantize(w).T in float64 (quant.py's numpy twin, itself checked bit for
# bit against gguf.quants). Weights are random codes and random fp16 scales: every byte
# pattern is a valid block, so every nibble, 6-bit field and scale of the layout matters.
# GEMV tolerance as test_linear (fp32 accumulation, one bf16 output rounding); the prefill
# path multiplies bf16(dequantize(w)) in cuBLAS, so its reference rounds the weight first.

QFMTS = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]


def random_quant(rng, fmt: str, N: int, K: int, scale: float = 1.0):
    """A QuantTensor of random codes and scales in quant.py's layout, weights of size ~scale."""
    from tinyllm.quant import QuantTensor

    def u8(*shape):
        return rng.integers(0, 256, shape, dtype=np.uint8)

    def f16(cols, s):  # scales of either sign, magnitude s within a factor of 2
        sign = rng.choice([-1.0, 1.0], (N, cols))
        return (sign * rng.uniform(0.5, 1.5, (N, cols)) * s).astype(np.float16)

    if fmt == "q8_0":
        parts = {"qs": u8(N, K).view(np.int8), "d": f16(K // 32, scale / 64)}
    elif fmt == "q4_0":
        parts = {"qs": u8(N, K // 2), "d": f16(K // 32, scale / 8)}
    elif fmt == "q4_1":
        parts = {"qs": u8(N, K // 2), "d": f16(K // 32, scale / 8), "m": f16(K // 32, scale)}
    elif fmt == "q4_k":
        parts = {
            "qs": u8(N, K // 2),
            "scales": u8(N, K // 256 * 12),
            "d": np.abs(f16(K // 256, scale / 256)),
            "dmin": np.abs(f16(K // 256, scale / 64)),
        }
    else:
        parts = {
            "ql": u8(N, K // 2),
            "qh": u8(N, K // 4),
            "scales": u8(N, K // 16).view(np.int8),
            "d": f16(K // 256, scale / 2048),
        }
    return QuantTensor(fmt=fmt, shape=(N, K), parts=parts)


def qdeq(qt) -> np.ndarray:
    from tinyllm.quant import dequantize

    return np.asarray(dequantize(qt), np.float32)


def qK(fmt: str, long: bool = False) -> int:
    """In-features: more lane units than a warp has lanes (a second round, a ragged last one),
    or (long) several unrolled rounds."""
    if fmt in ("q4_k", "q6_k"):
        return 4096 if long else 768
    return 4096 if long else 1312


@gpu
@pytest.mark.parametrize("fmt", QFMTS)
def test_quant_dequantize_is_exact(be, rng, fmt):
    """dequant_<fmt>_bf16_v1 (the prefill path's first half) equals bf16(quant.dequantize)."""
    N, K = 7, qK(fmt)
    qt = random_quant(rng, fmt, N, K)
    w = be.upload_quant("w", qt)
    out = be.cp.zeros((N, K), be.bf16)
    k = ck.get("quant_matmul.cu", f"dequant_{fmt}_bf16_v1")
    k((2,), (64,), (*w.args(), out, np.int32(N), np.int32(K)))  # a grid-stride loop
    np.testing.assert_array_equal(be.to_numpy(out), bf(qdeq(qt)))


@gpu
@pytest.mark.parametrize("fmt", QFMTS)
@pytest.mark.parametrize("M", range(1, ck.GEMV_MAX_M + 1))
@pytest.mark.parametrize("logits", [False, True])
def test_quant_gemv(be, rng, fmt, M, logits):
    """Every gemv_<fmt>_m<M>_<out>_v1; 13 outputs (a partly filled block), bias on odd M."""
    N, K = 13, qK(fmt)
    qt = random_quant(rng, fmt, N, K, scale=K**-0.5)
    x, b = randn(rng, M, K), randn(rng, N)
    bias = M % 2 == 1
    w = be.upload_quant("lm_head.weight" if logits else "w", qt)
    y = be.linear(be.from_numpy(x), w, be.upload("b", b) if bias else None)
    assert y.shape == (M, N) and y.dtype == (np.float32 if logits else be.bf16)
    want = x.astype(np.float64) @ qdeq(qt).T.astype(np.float64) + (b if bias else 0)
    close(be.to_numpy(y), want)


@gpu
@pytest.mark.parametrize("fmt", QFMTS)
@pytest.mark.parametrize("M", [1, 8])
def test_quant_gemv_long_rows(be, rng, fmt, M):
    """K = 4096: every lane runs several unrolled rounds."""
    N, K = 9, qK(fmt, long=True)
    qt = random_quant(rng, fmt, N, K, scale=K**-0.5)
    x = randn(rng, M, K)
    y = be.linear(be.from_numpy(x), be.upload_quant("w", qt))
    close(be.to_numpy(y), x.astype(np.float64) @ qdeq(qt).T.astype(np.float64))


@gpu
@pytest.mark.parametrize("fmt", QFMTS)
@pytest.mark.parametrize("gemv,M", [("v1", 33), ("cublas", 2)])
@pytest.mark.parametrize("logits", [False, True])
def test_quant_linear_prefill(be, rng, monkeypatch, fmt, gemv, M, logits):
    """More rows than GEMV_MAX_M (or gemv "cublas"): dequantize chunks of 5 weight rows (13 =
    5 + 5 + 3) to bf16, each one cuBLAS product into its columns of y; then the bias."""
    be.versions["gemv"] = gemv
    N, K = 13, qK(fmt)
    monkeypatch.setattr(cb, "DEQUANT_CHUNK_BYTES", 5 * 2 * K)
    assert cb.dequant_rows(N, K) == 5
    qt = random_quant(rng, fmt, N, K, scale=K**-0.5)
    x, b = randn(rng, M, K), randn(rng, N)
    w = be.upload_quant("lm_head.weight" if logits else "w", qt)
    y = be.linear(be.from_numpy(x), w, be.upload("b", b))
    assert y.shape == (M, N) and y.dtype == (np.float32 if logits else be.bf16)
    want = x.astype(np.float64) @ bf(qdeq(qt)).T.astype(np.float64) + b
    close(be.to_numpy(y), want, atol_ulps=6)  # + bias after a bf16 output: one more rounding


@gpu
def test_quant_gemv_row_chunks_and_strided_input(be, rng):
    """gemv "v1-all" (a decode graph's bucket of 17 rows: 8 + 8 + 1) and an input whose row
    stride is not a multiple of 8 (copied before the 16-byte loads)."""
    be.versions["gemv"] = "v1-all"
    N, K = 11, 256
    qt = random_quant(rng, "q4_k", N, K, scale=K**-0.5)
    w = be.upload_quant("w", qt)
    x = randn(rng, 17, K)
    close(be.to_numpy(be.linear(be.from_numpy(x), w)), x.astype(np.float64) @ qdeq(qt).T)
    wide = randn(rng, 3, K + 4)
    xs = be.from_numpy(wide)[:, 4:]
    close(be.to_numpy(be.linear(xs, w)), wide[:, 4:].astype(np.float64) @ qdeq(qt).T)


@gpu
def test_quant_concat_rows_fuses_one_format(be, rng):
    """q|k|v of one format fuse part by part (one GEMV, row views equal to the inputs); mixed
    formats (a Q4_K_M file's q6_k v) and quantized with float do not fuse."""
    K = 512
    qts = [random_quant(rng, "q4_k", n, K, scale=K**-0.5) for n in (16, 8, 8)]
    ws = [be.upload_quant("w", q) for q in qts]
    fused, views = be.concat_rows(ws)
    assert fused.shape == (32, K) and [v.shape for v in views] == [(16, K), (8, K), (8, K)]
    x = randn(rng, 2, K)
    dx = be.from_numpy(x)
    want = x.astype(np.float64) @ np.concatenate([qdeq(q) for q in qts]).T
    close(be.to_numpy(be.linear(dx, fused)), want)
    close(be.to_numpy(be.linear(dx, views[2])), want[:, 24:])
    q6 = be.upload_quant("w", random_quant(rng, "q6_k", 8, K))
    assert be.concat_rows([ws[0], ws[1], q6]) == (None, [ws[0], ws[1], q6])
    wf = be.upload("w", randn(rng, 8, K))
    assert be.concat_rows([ws[0], wf])[0] is None


@gpu
def test_quant_upload_counts_bytes_and_refuses_unknown_formats(be, rng):
    from tinyllm.quant import QuantTensor

    before = be.uploaded_bytes
    qt = random_quant(rng, "q4_0", 4, 64)
    w = be.upload_quant("w", qt)
    assert be.uploaded_bytes - before == w.nbytes == 4 * 32 + 4 * 2 * 2  # 4.5 bits per weight
    with pytest.raises(TinyLLMError, match="q5_k"):
        be.upload_quant("w", QuantTensor(fmt="q5_k", shape=(4, 256), parts={}))


# ---- SwiGLU --------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("rows,H", [(1, 7), (33, 4097), (7, 4096), (2, 8)])
def test_silu_mul(be, rng, version, rows, H):
    be.versions["silu_mul"] = version
    g, u = randn(rng, rows, H, scale=4.0), randn(rng, rows, H)
    close(be.to_numpy(be.silu_mul(be.from_numpy(g), be.from_numpy(u))), REF.silu_mul(g, u))


@gpu
def test_silu_mul_fused_halves(be, rng):
    """gate and up as the two halves of one (rows, 2H) product: strided views."""
    fused = randn(rng, 5, 2 * 64)
    d = be.from_numpy(fused)
    got = be.to_numpy(be.silu_mul(d[:, :64], d[:, 64:]))
    close(got, REF.silu_mul(fused[:, :64], fused[:, 64:]))


# ---- KV cache helpers ----------------------------------------------------------------------------

KV_DTYPES = ["bf16", "fp16", "fp32", "int8", "fp8"]


def storage_bits(a: np.ndarray) -> np.ndarray:
    """Raw bits of a cache array (numpy or device copy) for exact comparison."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def cache_to_device(be, np_cache: NumpyKVCache, cu_cache):
    """Copy a numpy cache's bytes (every array: codes, scales, offsets, open rows) into a CUDA
    cache of the same spec."""
    cp = be.cp
    for a, d in zip(np_cache.arrays(), cu_cache.arrays(), strict=True):
        assert a.shape == d.shape and a.dtype.itemsize == d.dtype.itemsize
        d.view(storage_bits(a).dtype)[...] = cp.asarray(storage_bits(a))


# ---- paged block tables -------------------------------------------------------------------------


def paged_tables(rng, spec: KVCacheSpec, starts, lens, shared_rows: int = 0) -> np.ndarray:
    """(B, R) block tables as the engine hands them out, scattered over the pool: every block
    row a sequence still reads or writes (its positions from kv_cache.visible_lo on) gets its
    own block, drawn from a shuffled pool; the first `shared_rows` rows are the same blocks in
    every table (a shared prefix, read-only). Entries no visible row uses are -1, or, once a
    ring has wrapped, the stale block of an older row (still held: what a kernel must never
    read). The blocks are numbered over the whole pool (n_blocks), not handed out in order."""
    pool = iter(rng.permutation(spec.n_blocks).tolist())
    shared = [next(pool) for _ in range(shared_rows)]
    tables = np.full((len(starts), spec.ring), -1, np.int32)
    for b, (st, n) in enumerate(zip(starts, lens)):
        total = st + n
        rows = range(visible_lo(total, st, spec) // spec.block_size, -(-total // spec.block_size))
        assert len(rows) <= spec.ring, "a ring holding more rows than entries (max_chunk exceeded)"
        for j in rows:
            tables[b, j % spec.ring] = shared[j] if j < shared_rows else next(pool)
        if total > spec.capacity:  # wrapped: stale blocks in the other entries
            tables[b, tables[b] < 0] = [next(pool) for _ in range(int((tables[b] < 0).sum()))]
    return tables


def pool_blocks(starts, lens, block_size: int, ring: int, spare: int = 3) -> int:
    """A pool big enough for paged_tables' sequences (a wrapped ring holds all its R entries,
    stale ones included), plus spare blocks nobody uses."""
    return (
        sum(
            ring if s + n > ring * block_size else -(-(s + n) // block_size)
            for s, n in zip(starts, lens)
        )
        + spare
    )


def test_paged_tables_helper():
    """The test tables really are scattered, shared and stale where asked (not slot tables)."""
    rng = np.random.default_rng(0)
    spec = KVCacheSpec(1, 40, 4, 5, 1, 8, "bf16", 8, 64)  # C = 20, W = 8
    t = paged_tables(rng, spec, [30, 0, 6], [5, 12, 1], shared_rows=1)
    assert t.shape == (3, 5) and (t[1:, 0] == t[2, 0]).all() and t[1, 3:].tolist() == [-1, -1]
    assert (t[0] >= 0).all() and len(set(t[0].tolist())) == 5  # wrapped: all 5 held
    held = t[t >= 0].tolist()
    assert len(set(held)) == len(held) - 1  # only the shared block repeats
    assert held != sorted(held)


def cache_for(rng, spec: KVCacheSpec, tables, starts, lens, loud_tail: int = 0) -> NumpyKVCache:
    """A numpy cache holding random K/V at every position each sequence may read (from
    kv_cache.visible_lo on, through its table; shared blocks hold what the last sequence
    wrote) and NaN everywhere else: unwritten offsets, stale blocks, unused blocks (quantized
    kinds: NaN scales). A kernel that loads a key no query may see gets NaN into its output
    (through P@V even where the score is masked). loud_tail > 0: the last loud_tail positions
    of the first sequence get values of +-2000, so that their share of the softmax (however
    small) dominates the output."""
    c = NumpyKVCache(spec)
    for arrays in (c.k, c.v) if not spec.quantized else (c.k_scale, c.k_zero, c.v_scale, c.k_open):
        for a in arrays:
            a[...] = np.nan
    n_kv, hd = spec.n_kv_heads, spec.head_dim
    for i, (table, st, n) in enumerate(zip(tables, starts, lens)):
        lo = visible_lo(st + n, st, spec)
        if spec.quantized:  # a key block is quantized from all its keys: write it whole
            lo -= lo % spec.block_size
        pos = np.arange(lo, st + n)
        v = randn(rng, len(pos), n_kv, hd)
        if i == 0 and loud_tail:
            v[-loud_tail:] = np.where(rng.random((loud_tail, n_kv, hd)) < 0.5, -2000.0, 2000.0)
        for layer in range(spec.n_layers):
            c.write(layer, table, pos, randn(rng, len(pos), n_kv, hd, scale=2.0), v, open_row=i)
    return c


# ---- RoPE + cache write ------------------------------------------------------------------------

ROPE_CASES = [(4, 4, 64), (8, 2, 128), (32, 8, 128), (8, 1, 64), (4, 2, 16), (4, 2, 24)]


def check_rope_kv_write(be, rng, spec: KVCacheSpec, batch: Batch, n_heads: int):
    """rope_kv_write on both backends from an all-zero cache: q bit-exact, every byte of the
    cache (blocks written and untouched alike) equal."""
    T, n_kv, hd = batch.n_tokens, spec.n_kv_heads, spec.head_dim
    q, k, v = (
        randn(rng, T, n_heads, hd),
        randn(rng, T, n_kv, hd, scale=2.0),
        randn(rng, T, n_kv, hd),
    )
    k[0, 0] = 0.0  # an all-zero vector: scale 0
    inv_freq = (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    np_cache = NumpyKVCache(spec)
    q_ref = REF.rope_kv_write(q, k, v, np_cache, 1, batch, inv_freq)
    cu_cache = be.alloc_kv(spec)
    q_got = be.rope_kv_write(
        be.from_numpy(q),
        be.from_numpy(k),
        be.from_numpy(v),
        cu_cache,
        1,
        be.prepare(batch),
        inv_freq,
    )
    np.testing.assert_array_equal(cb.to_bf16_bits(be.to_numpy(q_got)), cb.to_bf16_bits(q_ref))
    for name in ("k", "v") + (("k_scale", "k_zero", "v_scale", "k_open") if spec.quantized else ()):
        for layer in (0, 1):
            want = getattr(np_cache, name)[layer]
            got = getattr(cu_cache, name)[layer].get()
            np.testing.assert_array_equal(
                storage_bits(got), storage_bits(want), err_msg=f"{name}[{layer}]"
            )


@gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd", ROPE_CASES)
def test_rope_kv_write_is_bit_exact(be, rng, kv_dtype, n_heads, n_kv, hd):
    # Three sequences in blocks of 4 scattered over a pool of 20, a ring of 4 (C = 16): from
    # position 0; wrapping around the ring (14..17: rows 3 and 4, entries 3 and 0, entry 0 a
    # fresh block); the last position (63) of max_seq_len.
    spec = KVCacheSpec(
        n_layers=2,
        n_blocks=20,
        block_size=4,
        ring=4,
        n_kv_heads=n_kv,
        head_dim=hd,
        kv_dtype=kv_dtype,
        window=8,
        max_seq_len=64,
        n_open=3,
    )
    starts, lens = [0, 14, 62], [5, 4, 2]
    check_rope_kv_write(
        be, rng, spec, Batch(paged_tables(rng, spec, starts, lens), starts, lens), n_heads
    )


@gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_rope_kv_write_paged_block_sizes(be, rng, kv_dtype, block_size):
    """Chunks that start and end inside blocks and span several, two sequences writing after
    a prefix they share (rows 0-1: only read, never written), a decode token at a block's
    last offset."""
    starts, lens = [2 * block_size, 2 * block_size + 3, 5 * block_size - 1], [block_size + 5, 2, 1]
    spec = KVCacheSpec(
        2,
        pool_blocks(starts, lens, block_size, 8),
        block_size,
        8,
        2,
        128,
        kv_dtype,
        None,
        8 * block_size,
        n_open=3,
    )
    tables = paged_tables(rng, spec, starts, lens, shared_rows=2)
    check_rope_kv_write(be, rng, spec, Batch(tables, starts, lens), 8)


# ---- attention -----------------------------------------------------------------------------------

# (name, starts, lens, block_size, ring, window); the tables come from paged_tables
ATTN_BATCHES = [
    ("prefill_from_0", [0], [33], 16, 4, None),
    ("chunk_after_40", [40], [7], 8, 8, None),
    ("ragged", [0, 20, 5], [9, 1, 17], 16, 4, None),
    ("window_rolling", [30, 0], [5, 12], 4, 5, 8),  # C = 20 = W + 12, first one wrapped
    ("window_edge", [7], [2], 4, 4, 8),  # query 8 drops key 0
    ("decode", [0, 4096, 77], [1, 1, 1], 16, 257, None),  # position 0 and 4097 keys
    ("decode_rolling", [100, 3], [1, 1], 8, 6, 32),  # C = 48, W = 32: wrapped twice
]
GQA = [(4, 4), (8, 2), (16, 2), (4, 1), (12, 1)]  # n_rep 1, 4, 8, all, 12


def spec_for(starts, lens, bs, ring, window, n_kv, hd, kv_dtype) -> KVCacheSpec:
    """The one-layer spec of a test batch: a pool for paged_tables, an open row each."""
    return KVCacheSpec(
        1,
        pool_blocks(starts, lens, bs, ring),
        bs,
        ring,
        n_kv,
        hd,
        kv_dtype,
        window,
        max_seq_len=max(s + n for s, n in zip(starts, lens)) + 1,
        n_open=len(starts),
    )


def run_attention(
    be, rng, batch_case, n_heads, n_kv, hd, kv_dtype, loud_tail: int = 0, shared_rows: int = 0
):
    """Attention of one batch on both backends over the same cache bytes (cache_for: random
    where visible, NaN elsewhere) and the same scattered block tables."""
    name, starts, lens, bs, ring, window = batch_case
    spec = spec_for(starts, lens, bs, ring, window, n_kv, hd, kv_dtype)
    tables = paged_tables(rng, spec, starts, lens, shared_rows)
    np_cache = cache_for(rng, spec, tables, starts, lens, loud_tail)
    batch = Batch(tables, starts, lens)
    q = randn(rng, batch.n_tokens, n_heads, hd)
    scale = hd**-0.5
    want = REF.attention(q, np_cache, 0, batch, scale)
    assert np.isfinite(want).all()
    cu_cache = be.alloc_kv(spec)
    cache_to_device(be, np_cache, cu_cache)
    got = be.to_numpy(be.attention(be.from_numpy(q), cu_cache, 0, be.prepare(batch), scale))
    return got, want


@gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("n_heads,n_kv", GQA)
@pytest.mark.parametrize("batch_case", ATTN_BATCHES, ids=[b[0] for b in ATTN_BATCHES])
@pytest.mark.parametrize("hd", [64, 128, 24])
def test_attention_bf16_cache(be, rng, version, n_heads, n_kv, batch_case, hd):
    """Prefill kernel versions (decode batches go through them too with decode_attention
    routed to the prefill kernel) and the split-K decode kernel."""
    be.versions["prefill_attention"] = version
    be.versions["decode_attention"] = "prefill" if version == "v1" else "v1"
    got, want = run_attention(be, rng, batch_case, n_heads, n_kv, hd, "bf16")
    assert got.shape == want.shape
    close(got, want, atol_ulps=8)


@gpu
@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("path", ["v1", "v2", "decode"])
@pytest.mark.parametrize(
    "batch_case",
    [ATTN_BATCHES[2], ATTN_BATCHES[3], ATTN_BATCHES[5], ATTN_BATCHES[6]],
    ids=["ragged", "window_rolling", "decode", "decode_rolling"],
)
def test_attention_every_kv_dtype(be, rng, kv_dtype, path, batch_case):
    """Quantized caches are dequantized in the kernel: numpy dequantizes the same bytes."""
    be.versions["prefill_attention"] = "v1" if path == "v1" else "v2"
    be.versions["decode_attention"] = "v1" if path == "decode" else "prefill"
    got, want = run_attention(be, rng, batch_case, 8, 2, 128, kv_dtype)
    close(got, want, atol_ulps=8)


def paged_case(scenario: str, bs: int) -> tuple:
    """A batch case of block size bs. "shared_prefix": three sequences over the same first
    three blocks (shared_rows=3): a prefill chunk starting right after the prefix and running
    into a second block, a decode token and a two-token chunk, each in its own blocks past the
    prefix. "ring_wrap": a window W = 2 bs in a ring of R = 4 entries (C = 4 bs, max_chunk
    bs + 2) wrapped many times (a chunk starting inside a block; a decode token at a block's
    last offset), next to a sequence that has not wrapped."""
    if scenario == "shared_prefix":
        return (scenario, [3 * bs, 3 * bs + 5, 4 * bs + 1], [bs + 3, 1, 2], bs, 8, None)
    return (scenario, [25 * bs + 3, 40 * bs - 1, 5], [bs // 2 + 1, 1, bs + 2], bs, 4, 2 * bs)


PAGED_DTYPES = [(d, 16) for d in KV_DTYPES] + [("bf16", 8), ("bf16", 32), ("int8", 8), ("fp8", 32)]


@gpu
@pytest.mark.parametrize(
    "kv_dtype,block_size", PAGED_DTYPES, ids=[f"{d}-bs{b}" for d, b in PAGED_DTYPES]
)
@pytest.mark.parametrize("path", ["v1", "v2", "decode"])
@pytest.mark.parametrize("scenario", ["shared_prefix", "ring_wrap"])
def test_attention_paged(be, rng, kv_dtype, block_size, path, scenario):
    """Shuffled, non-contiguous tables; three sequences sharing their first three blocks
    (read-only); a sliding-window ring wrapped many times whose replaced entries hold stale
    blocks of NaN; block sizes 8, 16, 32: each kernel path equals numpy's attention through
    the same tables (and never loads a stale or unwritten key: those are NaN)."""
    be.versions["prefill_attention"] = "v1" if path == "v1" else "v2"
    be.versions["decode_attention"] = "v1" if path == "decode" else "prefill"
    got, want = run_attention(
        be,
        rng,
        paged_case(scenario, block_size),
        8,
        2,
        64,
        kv_dtype,
        shared_rows=3 if scenario == "shared_prefix" else 0,
    )
    close(got, want, atol_ulps=8)


@gpu
def test_decode_every_split_counts(be, rng):
    """A 4097-key decode in many splits whose last key (always in the last split) holds a loud
    value: a reduction that skipped the last split would be off by far more than the
    tolerance (with plain random values a last split of 1..65 keys hides inside it)."""
    be.versions["decode_attention"] = "v1"
    case = ("decode_one", [4096], [1], 16, 257, None)
    got, want = run_attention(be, rng, case, 8, 2, 128, "bf16", loud_tail=1)
    close(got, want, atol_ulps=8)


@gpu
def test_decode_kernel_gqa_ratio_2_head_dim_128(be, rng):
    be.versions["decode_attention"] = "v1"
    got, want = run_attention(be, rng, ATTN_BATCHES[5], 4, 2, 128, "bf16")
    close(got, want, atol_ulps=8)


@gpu
def test_decode_kernel_at_32k_context(be, rng):
    """The split-K reduction over many splits (32k positions, 64 splits on an H100)."""
    case = ("long", [32767], [1], 16, 2048, None)
    be.versions["decode_attention"] = "v1"
    got, want = run_attention(be, rng, case, 32, 8, 128, "bf16")
    close(got, want, atol_ulps=8)


# ---- next-token choice ---------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("rows,V", [(1, 7), (7, 4097), (3, 32000), (2, 151936)])
def test_argmax_matches_numpy_first_index(be, rng, rows, V):
    x = rng.standard_normal((rows, V)).astype(np.float32)
    x[:, V // 2] = x[:, V - 1] = x.max(axis=1) + 1.0  # a tie: the first index wins
    np.testing.assert_array_equal(be.argmax(be.cp.asarray(x)), np.argmax(x, axis=-1))
    # bf16 logits are widened first
    xb = bf(x)
    np.testing.assert_array_equal(be.argmax(be.from_numpy(xb)), np.argmax(xb, axis=-1))


@gpu
def test_sample_greedy_topk1_and_reproducible(be, rng):
    x = be.cp.asarray(rng.standard_normal((5, 4097)).astype(np.float32))
    am = be.argmax(x)
    np.testing.assert_array_equal(be.sample(x, 0.0, 0, 1.0, 0, 0), am)
    np.testing.assert_array_equal(be.sample(x, 1.0, 1, 1.0, 123, 7), am)
    a = be.sample(x, 1.0, 0, 0.9, [1, 2, 3, 4, 5], 11)
    np.testing.assert_array_equal(a, be.sample(x, 1.0, 0, 0.9, [1, 2, 3, 4, 5], 11))
    draws = {tuple(be.sample(x, 2.0, 0, 1.0, 9, s)) for s in range(20)}
    assert len(draws) > 1


@gpu
def test_sample_distribution_top_k_top_p(be):
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    # On the CPU executor each 1024-thread sampling block costs milliseconds: fewer draws, and
    # every bound below is 4.5 standard errors of its own R.
    R = 600 if os.environ.get("TINYLLM_FAKE_CUPY") == "1" else 8000
    x = be.cp.asarray(np.tile(logits, (R, 1)))
    steps = np.arange(R)

    def within(freq, p):
        p = np.asarray(p)
        return np.all(np.abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / R) + 1e-3)

    freq = np.bincount(be.sample(x, 1.0, 0, 1.0, 42, steps), minlength=4) / R
    assert within(freq, [0.1, 0.2, 0.3, 0.4]), freq
    top2 = np.bincount(be.sample(x, 1.0, 2, 1.0, 42, steps), minlength=4) / R
    assert top2[0] == top2[1] == 0 and within(top2[3], 4 / 7), top2
    # top_p 0.5: the smallest top set with mass >= 0.5 is {3 (0.4), 2 (0.3)}
    topp = np.bincount(be.sample(x, 1.0, 0, 0.5, 42, steps), minlength=4) / R
    assert topp[0] == topp[1] == 0 and within(topp[3], 4 / 7), topp
    # temperature sharpens: p ~ x^4 -> 0.4^4 / sum = 0.7004
    cold = np.bincount(be.sample(x, 0.25, 0, 1.0, 42, steps), minlength=4) / R
    assert within(cold[3], 0.4**4 / (0.1**4 + 0.2**4 + 0.3**4 + 0.4**4)), cold


# ---- memory --------------------------------------------------------------------------------------


@gpu
def test_free_memory_and_check_fits(be):
    free = be.free_memory()
    assert 0 < free <= be.total_memory() + be.cp.get_default_memory_pool().total_bytes()
    be.check_fits(1 << 20, 1 << 20)
    with pytest.raises(TinyLLMError, match="longest context that fits is"):
        be.check_fits(free // 2, 10 * free, kv_bytes_per_token=1 << 20, max_seq_len=10**9)


@gpu
def test_upload_casts_fp32_fp16_bf16_on_the_host(be, rng):
    x = rng.standard_normal((3, 5000)).astype(np.float32)
    for a in (x, x.astype(np.float16), x.astype(ml_dtypes.bfloat16)):
        got = be.to_numpy(be.upload("w", a))
        np.testing.assert_array_equal(got, bf(a.astype(np.float32)))
    big = rng.standard_normal(cb.UPLOAD_CHUNK_BYTES // 2 + 4097).astype(np.float32)  # > one chunk
    np.testing.assert_array_equal(be.to_numpy(be.upload("w", big)), bf(big))


# ---- pure Python: runs without a GPU -------------------------------------------------------------


def test_kernel_sources_inline_the_common_header():
    for f in ck.kernel_files():
        src = ck.source(f)
        assert '#include "common.cuh"' not in src
        assert "ceil_div" in src and '#line 1 "common.cuh"' in src


def test_every_launched_kernel_exists_in_the_sources():
    text = {f: ck.source(f) for f in ck.kernel_files()}
    names = [("embedding.cu", f"gather_rows_v{v}_v1") for v in (16, 4, 2, 1)]
    names += [
        ("rmsnorm.cu", f"{op}_bf16_{v}")
        for op in ("rms_norm", "add_rms_norm")
        for v in ("v1", "v2")
    ]
    names += [("swiglu.cu", f"silu_mul_bf16_{v}") for v in ("v1", "v2")]
    names += [
        ("matmul.cu", f"gemv_bf16_m{m}_{o}_v1")
        for m in range(1, ck.GEMV_MAX_M + 1)
        for o in ("bf16", "f32")
    ]
    names += [
        ("matmul.cu", "bias_add_bf16_v1"),
        ("matmul.cu", "bias_add_f32_v1"),
        ("rope_kv.cu", "rope_kv_write_v1"),
    ]
    names += [
        ("attention_prefill.cu", f"flash_prefill_hd{h}_{v}")
        for h in ck.HEAD_DIMS
        for v in ("v1", "v2")
    ]
    names += [
        ("attention_decode.cu", f"decode_split_hd{h}_r{r}_v1")
        for h in ck.HEAD_DIMS
        for r in ck.DECODE_REPS
    ]
    names += [
        ("quant_matmul.cu", f"{k}_{f}_{v}")
        for f in cb.QUANT_PARTS
        for k, v in [("dequant", "bf16_v1")]
        + [("gemv", f"m{m}_{o}_v1") for m in range(1, ck.GEMV_MAX_M + 1) for o in ("bf16", "f32")]
    ]
    names += [
        ("attention_decode.cu", "decode_reduce_v1"),
        ("sample.cu", "argmax_f32_v1"),
        ("sample.cu", "sample_f32_v1"),
    ]
    for f, n in names:
        src = text[f]
        # entry points are extern "C": either spelled out or produced by the file's ENTRY macro
        macro_ok = (
            ("gemv_bf16_m##M" in src and n.startswith("gemv_"))
            or (
                "gemv_##FMT##_m##M" in src
                and f"QGEMV_ALL(QGEMV_{n[5 : n.find('_m')].upper()})" in src
            )
            or ("decode_split_hd##HD" in src and n.startswith("decode_split"))
        )
        assert n in src or macro_ok, f"{n} missing from {f}"


def test_options_carry_the_tile_table_and_no_arch():
    opts = ck.options({"KV_KIND": 3})
    assert "--std=c++17" in opts and "-DKV_KIND=3" in opts
    assert not any(o.startswith(("-arch", "--gpu-architecture")) for o in opts)
    for k, v in ck.TILES.items():
        assert f"-D{k}={v}" in opts
    assert ck.variants("attention_decode.cu") == [{"KV_KIND": i} for i in range(5)]
    assert ck.variants("rmsnorm.cu") == [{}]


def test_launch_geometry_helpers():
    assert (
        cb.head_dim_tile(16) == 64 and cb.head_dim_tile(64) == 64 and cb.head_dim_tile(128) == 128
    )
    for bad in (12, 130, 256):
        with pytest.raises(TinyLLMError, match="head_dim"):
            cb.head_dim_tile(bad)
    assert cb.decode_rep(1) == (1, 1) and cb.decode_rep(3) == (4, 1) and cb.decode_rep(4) == (4, 1)
    assert (
        cb.decode_rep(8) == (8, 1) and cb.decode_rep(12) == (8, 2) and cb.decode_rep(32) == (8, 4)
    )
    # Mistral-7B decode at 32k, batch 1, 132 SMs: 64 splits of 512 positions -> 512 CTAs
    assert cb.decode_splits([32768], 8, 132) == (512, 64)
    split_len, n = cb.decode_splits([5, 1, 300], 3 * 8, 132)
    assert split_len % 32 == 0 and split_len >= cb.DECODE_MIN_SPLIT and split_len * n >= 300
    seq, row0 = cb.prefill_tiles(np.array([3, 17, 1]), 4, 16)
    assert seq.tolist() == [0, 1, 1, 1, 1, 1, 2] and row0.tolist() == [0, 0, 16, 32, 48, 64, 0]
    assert cb.visible_range(100, 1, 40, 30) == (71, 100)  # window binds
    assert cb.visible_range(100, 1, 40, None) == (61, 100)  # rolling capacity binds
    assert cb.visible_range(0, 1, 10, None) == (0, 0)
    assert cb.gather_vec_bytes(128, 256, 0, 512) == 16 and cb.gather_vec_bytes(6, 6, 0, 0) == 2
    assert ck.prefill_v2_smem(128) == (64 + 2 * ck.TILES["FA2_BN"]) * 136 * 2


def test_fits_message_names_longest_context():
    gb = 1 << 30
    assert cb.fits_message(2 * gb, gb, 80 * gb) is None
    msg = cb.fits_message(
        14 * gb, 4 * gb, 16 * gb, gb, kv_bytes_per_token=128 << 10, max_seq_len=32768
    )
    assert "19.0 GB" in msg and "longest context that fits is 8192 tokens" in msg
    assert "weights alone do not fit" in cb.fits_message(20 * gb, 0, 16 * gb, gb, 1)


def test_bf16_bit_helpers_round_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -0.0, 3.0e38], np.float32)
    bits = cb.to_bf16_bits(x)
    assert bits.tolist() == [0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F62]
    np.testing.assert_array_equal(cb.bf16_bits_to_f32(bits), bf(x))


def test_graph_buckets():
    from tinyllm.backends.cuda_graphs import bucket_for, buckets

    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(9) == [1, 2, 4, 8, 16]
    assert buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert [bucket_for(n, 64) for n in (1, 2, 3, 5, 8, 9, 17, 63, 64)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        64,
        64,
    ]
