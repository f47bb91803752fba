"""The cpu backend (numba kernels) against the numpy reference: each kernel against numpy's
dequantize-then-matmul within the bound fp32 reassociation allows, and whole models
(every parity config, every kv dtype, quantized weights) with the same greedy tokens.

First run: numba compiles the kernels (~1-2 min on 2 busy cores) and caches them on disk
(tinyllm/backends/__pycache__); later runs load them in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_CASES

pytest.importorskip("numba")

import ml_dtypes  # noqa: E402

from tinyllm import LLM, SamplingParams, quant  # noqa: E402
from tinyllm.backends import cpu_kernels as ck  # noqa: E402
from tinyllm.backends.cpu_backend import GEMV_MAX_ROWS, CpuBackend  # noqa: E402
from tinyllm.backends.numpy_backend import NumpyBackend  # noqa: E402

PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, 256, 40)]
CASES = [(c, "float32", False) for c in TINY_CASES] + [
    ("llama_gqa", "float32", True),
    ("llama_gqa", "bfloat16", False),
    ("mistral_window", "float16", True),
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def cpu():
    return CpuBackend(threads=2)


def assert_reassociation(y, x, w, b=None):
    """y equals x @ w.T (+ b) computed in float64 up to the error any fp32 summation order
    can make: |err| <= K * eps * (|x| @ |w|.T) per element (Higham's gamma_K bound, with
    slack for the final fp32 rounding)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T + (0 if b is None else b)
    bound = (x.shape[1] + 2) * EPS * (np.abs(x64) @ np.abs(w64).T + (0 if b is None else abs(b)))
    assert np.all(np.abs(y - ref) <= bound), float(np.max(np.abs(y - ref) / bound))


def test_f16_decoder_is_exact():
    """cpu_kernels.f16 (numba has no float16: LLVM's half-to-float conversion on the bits),
    through f16_row, against numpy on every one of the 65536 bit patterns: normals,
    subnormals, ±0, ±inf bit for bit, and NaNs stay NaNs."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    rows = np.empty(len(bits), np.float32)
    ck.f16_row(bits, rows)
    assert np.array_equal(np.isnan(rows), nan)
    assert np.array_equal(rows[~nan].view(np.uint32), ref[~nan].view(np.uint32))  # ±0 too


def weights(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    w[1, 5] = 3.0  # an outlier
    w[2, :256] = 0.0  # a zero (super-)block
    return w


@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 12])  # GEMV, then tiles
@pytest.mark.parametrize("fmt", ["fp32", "bf16", *quant.FORMATS])
def test_linear_matches_dequantize_then_matmul(cpu, fmt, rows):
    """N = 37 rows (not a multiple of the kernels' 4 or 16), K = 512 (two K-quant
    super-blocks), with a bias: the reference is numpy's linear on the dequantized weight."""
    n, k = 37, 512
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    w32 = weights(n, k)
    if fmt == "fp32":
        w, dense = cpu.upload("w", w32), w32
    elif fmt == "bf16":
        w = cpu.upload("w", w32.astype(ml_dtypes.bfloat16))
        assert w.dtype == ml_dtypes.bfloat16  # kept at 2 bytes per weight
        dense = w.astype(np.float32)
    else:
        qt = quant.quantize(w32, fmt)
        w, dense = cpu.upload_quant("w", qt), quant.dequantize(qt)
    y = cpu.linear(x, w, bias)
    assert y.shape == (rows, n) and y.dtype == np.float32
    assert_reassociation(y, x, dense, bias.astype(np.float64))
    np.testing.assert_allclose(y, NumpyBackend().linear(x, dense, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, GEMV_MAX_ROWS + 12])
@pytest.mark.parametrize("n,k,group", [(40, 576, 4), (42, 576, 2), (37, 576, 1), (48, 96, 16)])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_narrow_rows_held_in_groups(cpu, fmt, n, k, group, rows):
    """Narrow weights (K = 576 as SmolLM2's, 18 blocks per row; K = 96, 3) are held G rows
    to a plane-order group (G the largest power of two dividing N, at most 16, with at most
    80 blocks): decode, prefill tiles and embedding rows still give numpy's results."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    qt = quant.quantize(weights(n, k), fmt)
    w, dense = cpu.upload_quant("w", qt), quant.dequantize(qt)
    assert w.group == group
    y = cpu.linear(x, w)
    assert_reassociation(y, x, dense)
    np.testing.assert_allclose(y, NumpyBackend().linear(x, dense), rtol=1e-5, atol=1e-5)
    tokens = np.array([n - 1, 0, group, n // 2], np.int32)
    np.testing.assert_array_equal(cpu.embed(w, tokens), dense[tokens])


@pytest.mark.parametrize("fmt", ["fp32", "bf16", *quant.FORMATS])
def test_fused_projections_are_the_separate_ones(cpu, fmt):
    """concat_rows (q|k|v, gate|up on this backend): one linear on the fused weight gives
    each part's linear bit for bit, and the row views it returns hold the parts' values in
    the fused weight's memory (the inputs can be freed)."""
    parts32 = [weights(n, 512, seed=n) for n in (64, 32, 32)]
    if fmt in ("fp32", "bf16"):
        parts = [
            cpu.upload("w", p.astype(ml_dtypes.bfloat16 if fmt == "bf16" else np.float32))
            for p in parts32
        ]
    else:
        parts = [cpu.upload_quant("w", quant.quantize(p, fmt)) for p in parts32]
    fused, views = cpu.concat_rows(parts)
    assert fused.shape == (128, 512) and [v.shape for v in views] == [p.shape for p in parts]
    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    for rows in (x[:1], x):  # GEMV with one row and with two
        y = cpu.linear(rows, fused)
        np.testing.assert_array_equal(y, np.concatenate([cpu.linear(rows, p) for p in parts], 1))
        np.testing.assert_array_equal(np.concatenate([cpu.linear(rows, v) for v in views], 1), y)

    def data(w):  # the array holding a weight's values (codes)
        if isinstance(w, np.ndarray):
            return w
        return next(iter(w.parts.values())) if isinstance(w, quant.QuantTensor) else w.qs

    assert all(np.shares_memory(data(v), data(fused)) for v in views)


def test_fusing_needs_one_format_and_one_group_size(cpu):
    """Parts in different formats, or plane-order parts held in groups of different sizes
    (576 rows: groups of 4; 42 rows: 2), are not fused: (None, the parts)."""
    a = cpu.upload_quant("w", quant.quantize(weights(576, 576), "q8_0"))
    b = cpu.upload_quant("w", quant.quantize(weights(42, 576), "q8_0"))
    c = cpu.upload_quant("w", quant.quantize(weights(576, 576), "q4_0"))
    assert (a.group, b.group) == (4, 2)
    for parts in ([a, b], [a, c], [a, weights(8, 576)]):
        fused, same = cpu.concat_rows(parts)
        assert fused is None and all(x is y for x, y in zip(same, parts))


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0", "q4_1", "q4_k"])
def test_embed_rows_of_stored_formats(cpu, fmt):
    w32 = weights(10, 256)
    if fmt == "bf16":
        table = cpu.upload("e", w32.astype(ml_dtypes.bfloat16))
        dense = table.astype(np.float32)
    else:
        qt = quant.quantize(w32, fmt)
        table, dense = cpu.upload_quant("e", qt), quant.dequantize(qt)
    tokens = np.array([3, 0, 9, 3], np.int32)
    np.testing.assert_array_equal(cpu.embed(table, tokens), dense[tokens])


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_decode_ops_match_numpy(cpu, window, kv):
    """The compiled small ops (rms_norm, rope, the cache write, attention) against numpy's
    on a ragged batch of three sequences (1, 3 and 2 new tokens after 0, 9 and 17 cached,
    block size 4, ring 5: the third wraps its ring; GQA 4 query heads on 2 KV heads; a
    sliding window of 6 or none); with an fp16 cache the write and attention fall back to
    numpy's."""
    from tinyllm.backends import Batch
    from tinyllm.kv_cache import KVCacheSpec

    rng = np.random.default_rng(4)
    ref = NumpyBackend()
    x, g = rng.standard_normal((6, 32)).astype(np.float32), rng.random(32).astype(np.float32)
    np.testing.assert_allclose(cpu.rms_norm(x, g, 1e-5), ref.rms_norm(x, g, 1e-5), rtol=1e-5)
    spec = KVCacheSpec(1, 16, 4, 5, 2, 8, kv, window, 64)
    caches = [b.alloc_kv(spec) for b in (cpu, ref)]
    for name in ("k", "v"):  # the same random cache contents in both
        data = rng.standard_normal(caches[0].k[0].shape)
        for c in caches:
            getattr(c, name)[0][...] = data
    tables = np.arange(15, dtype=np.int32).reshape(3, 5)[:, ::-1].copy()
    batch = Batch(tables, [0, 9, 17], [1, 3, 2])
    inv_freq = 1.0 / (10000 ** (np.arange(0, 8, 2, dtype=np.float32) / 8))
    q, k, v = (rng.standard_normal((6, n, 8)).astype(np.float32) for n in (4, 2, 2))
    rq = cpu.rope(q, batch.positions, inv_freq)
    np.testing.assert_allclose(rq, ref.rope(q, batch.positions, inv_freq), rtol=1e-5, atol=1e-6)
    rqs = [b.rope_kv_write(q, k, v, c, 0, batch, inv_freq) for b, c in zip((cpu, ref), caches)]
    np.testing.assert_allclose(rqs[0], rqs[1], rtol=1e-5, atol=1e-6)
    for name in ("k", "v"):  # the same positions written, with the same values
        a, b = (np.asarray(getattr(c, name)[0], np.float32) for c in caches)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    got, want = (b.attention(rq, c, 0, batch, 0.35) for b, c, rq in zip((cpu, ref), caches, rqs))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def pair(d, **kw):
    kw = dict(max_seq_len=128, prefill_chunk=32, **kw)
    return LLM(str(d), backend="cpu", threads=2, **kw), LLM(str(d), backend="numpy", **kw)


def assert_same(ours, ref, tol=1e-4):
    a, b = ours.logits(PROMPT), ref.logits(PROMPT)
    assert float(np.abs(a - b).max() / np.abs(b).max()) < tol
    assert (
        ours.generate([PROMPT], GREEDY)[0].token_ids == ref.generate([PROMPT], GREEDY)[0].token_ids
    )


@pytest.mark.parametrize(
    "case,dtype,shard", CASES, ids=[f"{c}-{d}{'-sharded' if s else ''}" for c, d, s in CASES]
)
def test_cpu_matches_numpy_on_parity_configs(tiny_factory, case, dtype, shard):
    """Prefill in chunks of 32 (> GEMV_MAX_ROWS: BLAS / dequantized tiles) and 8 (the GEMV
    kernels), then 24 greedy one-token decode steps; the bf16 checkpoint stays bf16 on cpu."""
    ours, ref = pair(tiny_factory(case, dtype, shard))
    assert ours.backend.name == "cpu"
    if dtype == "bfloat16":
        assert ours.model.w.layers[0].wq.dtype == ml_dtypes.bfloat16
    assert_same(ours, ref)


@pytest.mark.parametrize("kv", ["fp16", "bf16", "int8", "fp8"])
@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window"])
def test_cpu_matches_numpy_for_every_kv_dtype(tiny_factory, case, kv):
    ours, ref = pair(tiny_factory(case), kv_dtype=kv)
    assert ours.kv_dtype == ref.kv_dtype == kv
    assert ours.generate([PROMPT], GREEDY)[0].token_ids == (
        ref.generate([PROMPT], GREEDY)[0].token_ids
    )


def quantize_linears(llm, fmt):
    """Every projection and the lm_head of a loaded LLM as `fmt` (the same QuantTensor on
    both backends; K = 64 or 128 here, so the 32-element formats). The cpu backend runs
    q|k|v and gate|up fused (wqkv, w13): those are quantized too (row by row, so the same
    blocks as the separate matrices' on numpy)."""
    w = llm.model.w
    for L in w.layers:
        for f in ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "wqkv", "w13"):
            if getattr(L, f) is not None:
                qt = quant.quantize(np.asarray(getattr(L, f)), fmt)
                setattr(L, f, llm.backend.upload_quant(f, qt))
    w.lm_head = llm.backend.upload_quant("lm_head", quant.quantize(np.asarray(w.lm_head), fmt))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_cpu_matches_numpy_with_quantized_weights(tiny_factory, fmt):
    ours, ref = pair(tiny_factory("llama_gqa"))
    quantize_linears(ours, fmt)
    quantize_linears(ref, fmt)
    assert_same(ours, ref)


def test_auto_picks_cuda_then_cpu_then_numpy(monkeypatch):
    import tinyllm.backends as b

    monkeypatch.setattr(b, "cuda_available", lambda: False)
    assert b.auto_backend()[0] == "cpu"
    assert b.get_backend("auto").name == "cpu"
    monkeypatch.setattr(b, "numba_available", lambda: False)
    name, why = b.auto_backend()
    assert name == "numpy" and "tinyllm[cpu]" in why
    with pytest.raises(b.TinyLLMError, match=r"tinyllm\[cpu\]"):
        b.get_backend("cpu")
    monkeypatch.setattr(b, "cuda_available", lambda: True)
    assert b.auto_backend()[0] == "cuda"


def test_threads_reach_numba():
    import numba

    CpuBackend(threads=1)
    assert numba.get_num_threads() == 1
    CpuBackend(threads=2)
    assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)


def test_host_plan_counts_bf16_at_two_bytes_on_cpu(tiny_factory):
    """The cpu backend keeps a bf16 checkpoint's matrices as bf16: the RAM check before
    loading counts 2 bytes per weight there (4 on numpy), so a budget between the two plans
    passes on cpu and is refused on numpy."""
    from tinyllm import memory
    from tinyllm.config import ModelConfig
    from tinyllm.errors import TinyLLMError

    cfg = ModelConfig.load(tiny_factory("llama_gqa", "bfloat16"))
    assert cfg.torch_dtype == "bfloat16"
    cpu_fb, np_fb = CpuBackend().float_bytes(cfg.torch_dtype), NumpyBackend().float_bytes("x")
    assert (cpu_fb, np_fb, CpuBackend().float_bytes("float16")) == (2, 4, 2 * 2)
    args = (cfg, "fp32", 128, 1, 16)
    on_cpu, on_numpy = (memory.host_plan(*args, float_bytes=b) for b in (cpu_fb, np_fb))
    assert on_numpy.weights == 2 * on_cpu.weights == memory.weights_nbytes(cfg, 4)
    budget = (on_cpu.total + on_numpy.total) // 2
    memory.check_host_fits(*args, budget, float_bytes=cpu_fb)
    with pytest.raises(TinyLLMError, match="float32 weights"):
        memory.check_host_fits(*args, budget, float_bytes=np_fb)
