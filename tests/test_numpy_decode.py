"""The numpy backend's batched paths against its per-sequence reference: a decode step's
attention for all sequences at once (padded to the longest, masked) and the one-scatter cache
write. The per-sequence loop is the reference (each sequence alone in its own Batch takes it);
the caches come from test_cuda_ops' helpers: scattered block tables, shared prefixes, wrapped
rings, and NaN wherever a query may not read (a gather of such an entry shows in the output)."""

from __future__ import annotations

import numpy as np
import pytest
from test_cuda_ops import GQA, cache_for, paged_tables, randn, spec_for

from tinyllm.backends import Batch
from tinyllm.backends.numpy_backend import NumpyBackend, NumpyKVCache, rope_rotate

REF = NumpyBackend()

# (name, starts, lens, block_size, ring, window): the sequences of one new token go together
DECODE = [
    ("lengths_apart", [0, 4096, 77, 5], [1, 1, 1, 1], 16, 257, None),  # 1 key beside 4097
    ("window_rolling", [100, 3, 40], [1, 1, 1], 8, 6, 32),  # C = 48, W = 32: wrapped twice
    ("same_length", [9, 9, 9], [1, 1, 1], 4, 8, None),
    ("with_a_prefill", [30, 0, 12, 50], [1, 20, 1, 1], 8, 8, None),  # the chunk: the loop
]


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("n_heads,n_kv", GQA)
@pytest.mark.parametrize("case", DECODE, ids=[c[0] for c in DECODE])
def test_decode_attention_equals_each_sequence_alone(case, n_heads, n_kv, kv_dtype):
    name, starts, lens, bs, ring, window = case
    rng = np.random.default_rng(len(name) * 100 + n_heads * 10 + n_kv)
    hd = 32
    spec = spec_for(starts, lens, bs, ring, window, n_kv, hd, kv_dtype)
    tables = paged_tables(rng, spec, starts, lens, shared_rows=1)
    cache = cache_for(rng, spec, tables, starts, lens)  # NaN wherever no query may read
    batch = Batch(tables, starts, lens)
    q = randn(rng, batch.n_tokens, n_heads, hd)
    got = REF.attention(q, cache, 0, batch, hd**-0.5)
    assert np.isfinite(got).all()  # no padding or stale entry reached the output
    for b in range(len(starts)):
        r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
        alone = Batch(tables[b : b + 1], starts[b : b + 1], lens[b : b + 1], [b])
        want = REF.attention(q[r], cache, 0, alone, hd**-0.5)  # the loop
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "bf16"])
def test_batched_cache_write_equals_each_sequence_written_alone(kv_dtype):
    """A ragged batch (a prompt chunk, decode tokens, one across a block edge and one into a
    wrapped ring) writes the same bytes as NumpyKVCache.write per sequence."""
    rng = np.random.default_rng(0)
    starts, lens, n_kv, hd = [0, 15, 60, 7], [9, 1, 1, 3], 2, 16
    spec = spec_for(starts, lens, 8, 4, 16, n_kv, hd, kv_dtype)
    tables = paged_tables(rng, spec, starts, lens)
    batch = Batch(tables, starts, lens)
    q = randn(rng, batch.n_tokens, 4, hd)
    k, v = randn(rng, batch.n_tokens, n_kv, hd), randn(rng, batch.n_tokens, n_kv, hd)
    got, want = NumpyKVCache(spec), NumpyKVCache(spec)
    inv_freq = 1.0 / 10000 ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    REF.rope_kv_write(q, k, v, got, 0, batch, inv_freq)
    k_rot = rope_rotate(k, batch.positions, inv_freq)
    for b in range(len(starts)):
        r = slice(batch.cu_lens[b], batch.cu_lens[b + 1])
        want.write(0, tables[b], batch.positions[r], k_rot[r], v[r])
    for a, w in zip(got.arrays(), want.arrays()):
        np.testing.assert_array_equal(a.view(np.uint8), w.view(np.uint8))
