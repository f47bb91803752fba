"""Invariants of our own machinery (each checked against a second path through it; the
parity tests check both against transformers)."""

import dataclasses

import numpy as np
import pytest

from tinyllm import LLM, SamplingParams
from tinyllm.backends import Batch
from tinyllm.kv_cache import KVCacheSpec, entries, visible_lo
from tinyllm.memory import engine_for_model

IDS = [int(t) for t in np.random.default_rng(1).integers(3, 256, 50)]


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window", "qwen2_bias"])
def test_cached_decode_equals_full_prefill(tiny_factory, case):
    llm = LLM(str(tiny_factory(case)), max_seq_len=64)
    full = llm.logits(IDS)
    m, eng = llm.model, llm.engine
    eng.ensure_cache()
    table = eng.cache.spec.slot_tables([0])
    step_logits = [
        llm.backend.to_numpy(
            m.forward(np.asarray(IDS[:10], np.int32), Batch(table, [0], [10]), eng.cache)
        )[0]
    ]
    for p in range(10, len(IDS)):
        out = m.forward(np.asarray([IDS[p]], np.int32), Batch(table, [p], [1]), eng.cache)
        step_logits.append(llm.backend.to_numpy(out)[0])
    np.testing.assert_allclose(np.stack(step_logits), full[9:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
@pytest.mark.parametrize("case", ["llama_mqa", "mistral_window"])
def test_chunked_prefill_equals_one_shot(tiny_factory, case, chunk):
    llm = LLM(str(tiny_factory(case)), max_seq_len=64)
    one_shot = llm.logits(IDS)
    eng = engine_for_model(
        llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1, prefill_chunk=chunk
    )
    np.testing.assert_allclose(eng.logits(IDS), one_shot, rtol=1e-4, atol=1e-4)


def test_rolling_cache_equals_full_cache_with_banded_mask(tiny_factory):
    llm = LLM(str(tiny_factory("mistral_window")), max_seq_len=64)
    W = llm.cfg.sliding_window
    # Blocks of 4: a ring of ceil((W + 4) / 4) + 1 = 4 blocks (16 positions) that 50 tokens
    # wrap 3 times.
    rolling = engine_for_model(
        llm.model,
        llm.tokenizer,
        llm.backend,
        set(),
        64,
        "fp32",
        max_batch=1,
        prefill_chunk=4,
        block_size=4,
    )
    assert rolling.spec.ring == 4 and rolling.spec.capacity == 16 < 64
    full = engine_for_model(
        llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1, prefill_chunk=4
    )
    full.spec = KVCacheSpec(
        llm.cfg.n_layers, 16, 4, 16, llm.cfg.n_kv_heads, llm.cfg.head_dim, "fp32", W, 64, n_open=2
    )
    assert not full.spec.rolling
    np.testing.assert_allclose(rolling.logits(IDS), full.logits(IDS), rtol=1e-4, atol=1e-4)
    # Greedy generation running far past the window, through the rolling cache.
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm_full = LLM(str(tiny_factory("mistral_window")), max_seq_len=64)
    llm_full.engine.spec = full.spec
    a = llm.generate([IDS[:12]], p)[0].token_ids
    b = llm_full.generate([IDS[:12]], p)[0].token_ids
    assert a == b and len(a) == 40


@pytest.mark.filterwarnings(
    "ignore::tinyllm.api.ContextWarning"
)  # contexts far past the trained 256, on purpose
def test_rolling_cache_memory_is_bounded_by_window(tiny_factory):
    d = str(tiny_factory("mistral_window"))
    specs = [LLM(d, max_seq_len=n).engine.spec for n in (10_000, 1_000_000)]
    # a ring of ceil((W + prefill chunk) / block size) + 1 blocks per sequence
    assert all(s.rolling and s.ring == -(-(8 + 512) // 16) + 1 for s in specs)
    assert specs[0].nbytes() == specs[1].nbytes()
    llm = LLM(d, max_seq_len=1_000_000)
    llm.generate([IDS], SamplingParams(max_tokens=2, temperature=0))
    assert llm.engine.cache.nbytes() == specs[1].nbytes()


def test_kv_cache_worked_examples():
    """The two worked examples of kv_cache.py's docstring."""
    flat = KVCacheSpec(1, 8, 4, 4, 1, 8, "fp32", None, 16)
    table = np.array([7, 2, 5, -1], np.int32)
    blocks, offsets = entries(table, np.arange(10), flat)
    assert blocks.tolist() == [7] * 4 + [2] * 4 + [5] * 2 and offsets.tolist() == [
        0,
        1,
        2,
        3,
    ] * 2 + [0, 1]
    ring = KVCacheSpec.for_model(
        type("C", (), {"sliding_window": 4, "n_layers": 1, "n_kv_heads": 1, "head_dim": 8})(),
        "fp32",
        100,
        chunk=2,
        block_size=2,
    )
    assert (ring.ring, ring.capacity, ring.max_chunk) == (4, 8, 4)
    assert entries(np.array([10, 11, 12, 13], np.int32), [8], ring)[0].tolist() == [
        10
    ]  # row 4 -> entry 0
    assert visible_lo(9, 8, ring) == 5


@pytest.mark.parametrize("pool_blocks", [None, 64])
def test_prefix_reuse_in_a_rolling_cache_never_reads_overwritten_keys(tiny_factory, pool_blocks):
    """Prefix-cache hits across requests (what chat turns do) must give fresh-prefill logits,
    also when the shared prefix ends inside the part of a ring the old sequence wrapped, with
    a pool so small that wrapped blocks are reused at once (None: one ring) or large enough
    to keep them."""
    d = str(tiny_factory("mistral_window"))  # W = 8
    llm = LLM(
        d, max_seq_len=64, prefill_chunk=2, max_batch=1, block_size=2
    )  # ring of 6 blocks of 2
    if pool_blocks:
        llm.engine.spec = dataclasses.replace(llm.engine.spec, n_blocks=pool_blocks)
    fresh = LLM(d, max_seq_len=64, prefill_chunk=2, max_batch=1)
    last = []
    forward = llm.model.forward
    llm.model.forward = lambda *a, **k: last.append(np.array(forward(*a, **k))) or last[-1]
    a = IDS[:30]
    b = a[:28] + [7]  # reuses 28 of 30 positions
    c = b[:26] + [9, 11, 13]  # reuses a prefix whose window the old sequence overwrote
    cached = []
    for prompt in (a, b, c):
        out = []
        list(llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0), result=out))
        cached.append(out[0].cached_tokens)
        np.testing.assert_allclose(last[-1][-1], fresh.logits(prompt)[-1], rtol=1e-5, atol=1e-5)
    # b reuses 14 full blocks (28 tokens); c shares 26 tokens with b: 13 blocks, which a ring
    # can take only if rows 8..12 are all still in the pool (not with one ring's worth).
    assert cached == ([0, 28, 0] if pool_blocks is None else [0, 28, 26])


def test_bad_token_ids_and_sizes_are_user_errors(tiny_factory):
    from tinyllm import TinyLLMError

    d = str(tiny_factory("llama_gqa"))
    llm = LLM(d, max_seq_len=16)
    for ids in ([], [256], [-1], list(range(17))):
        with pytest.raises(TinyLLMError):
            llm.logits(ids)
    assert llm.logits(list(range(16))).shape == (16, 256)  # a full context is fine for logits
    for kw in ({"max_batch": 0}, {"prefill_chunk": 0}):
        with pytest.raises(TinyLLMError):
            LLM(d, **kw)
    for bad in ({"seed": -1}, {"seed": True}, {"stop": 5}, {"stop_token_ids": 5}):
        with pytest.raises(TinyLLMError):
            llm.generate("hi", SamplingParams(**bad))


def test_tiny_temperature_is_greedy_not_nan(tiny_factory):
    llm = LLM(str(tiny_factory("llama_gqa")))
    greedy = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[
        0
    ].token_ids
    cold = llm.generate(
        "Hello", SamplingParams(max_tokens=4, temperature=1e-300, seed=0, ignore_eos=True)
    )[0].token_ids
    assert cold == greedy
