"""Invariants of our own machinery (each checked against a second path through it; the
parity tests check both against transformers)."""

import numpy as np
import pytest

from tinyllm import LLM, SamplingParams
from tinyllm.backends import Batch
from tinyllm.engine import Engine
from tinyllm.kv_cache import KVCacheSpec, slot_positions

IDS = [int(t) for t in np.random.default_rng(1).integers(3, 256, 50)]


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_window", "qwen2_bias"])
def test_cached_decode_equals_full_prefill(tiny_factory, case):
    llm = LLM(str(tiny_factory(case)), max_seq_len=64)
    full = llm.logits(IDS)
    m, eng = llm.model, llm.engine
    eng.ensure_cache(1)
    step_logits = [llm.backend.to_numpy(m.forward(np.asarray(IDS[:10], np.int32), Batch([0], [0], [10]), eng.cache))[0]]
    for p in range(10, len(IDS)):
        out = m.forward(np.asarray([IDS[p]], np.int32), Batch([0], [p], [1]), eng.cache)
        step_logits.append(llm.backend.to_numpy(out)[0])
    np.testing.assert_allclose(np.stack(step_logits), full[9:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
@pytest.mark.parametrize("case", ["llama_mqa", "mistral_window"])
def test_chunked_prefill_equals_one_shot(tiny_factory, case, chunk):
    llm = LLM(str(tiny_factory(case)), max_seq_len=64)
    one_shot = llm.logits(IDS)
    eng = Engine(llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1, prefill_chunk=chunk)
    np.testing.assert_allclose(eng.logits(IDS), one_shot, rtol=1e-4, atol=1e-4)


def test_rolling_cache_equals_full_cache_with_banded_mask(tiny_factory):
    llm = LLM(str(tiny_factory("mistral_window")), max_seq_len=64)
    W = llm.cfg.sliding_window
    rolling = Engine(llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1, prefill_chunk=4)
    assert rolling.spec(1).capacity == W + 4 < 64
    full = Engine(llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1, prefill_chunk=4)
    full.spec = lambda n: KVCacheSpec(llm.cfg.n_layers, n, 64, llm.cfg.n_kv_heads, llm.cfg.head_dim, "fp32", W, 64)
    np.testing.assert_allclose(rolling.logits(IDS), full.logits(IDS), rtol=1e-4, atol=1e-4)
    # Greedy generation running far past the window, through the rolling cache.
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    llm_full = LLM(str(tiny_factory("mistral_window")), max_seq_len=64)
    llm_full.engine.spec = full.spec
    a = llm.generate([IDS[:12]], p)[0].token_ids
    b = llm_full.generate([IDS[:12]], p)[0].token_ids
    assert a == b and len(a) == 40


@pytest.mark.filterwarnings("ignore::tinyllm.api.ContextWarning")   # contexts far past the trained 256, on purpose
def test_rolling_cache_memory_is_bounded_by_window(tiny_factory):
    d = str(tiny_factory("mistral_window"))
    specs = [LLM(d, max_seq_len=n).engine.spec(1) for n in (10_000, 1_000_000)]
    assert all(s.rolling and s.capacity == 8 + 512 for s in specs)       # W + prefill chunk
    assert specs[0].nbytes() == specs[1].nbytes()
    llm = LLM(d, max_seq_len=1_000_000)
    llm.generate([IDS], SamplingParams(max_tokens=2, temperature=0))
    assert llm.engine.cache.nbytes() == specs[1].nbytes() * llm.engine.max_batch


def test_slot_positions_worked_example():
    # the kv_cache docstring's example: C=6 after 9 tokens
    assert slot_positions(9, 6).tolist() == [6, 7, 8, 3, 4, 5]
    assert slot_positions(3, 6).tolist() == [0, 1, 2, -1, -1, -1]


def test_prefix_reuse_in_a_rolling_cache_never_reads_overwritten_keys(tiny_factory):
    """Slot reuse across requests (what chat turns do) must give fresh-prefill logits, also
    when the shared prefix ends inside the part of a rolling cache the old sequence wrapped."""
    d = str(tiny_factory("mistral_window"))                     # W = 8
    llm = LLM(d, max_seq_len=64, prefill_chunk=2, max_batch=1)   # rolling capacity 10
    fresh = LLM(d, max_seq_len=64, prefill_chunk=2, max_batch=1)
    last = []
    forward = llm.model.forward
    llm.model.forward = lambda *a, **k: last.append(np.array(forward(*a, **k))) or last[-1]
    a = IDS[:30]
    b = a[:28] + [7]            # reuses 28 of 30 positions
    c = b[:26] + [9, 11, 13]    # reuses a prefix whose window the old sequence overwrote
    for prompt in (a, b, c):
        list(llm.stream(prompt, SamplingParams(max_tokens=1, temperature=0), slot=0))
        np.testing.assert_allclose(last[-1][-1], fresh.logits(prompt)[-1], rtol=1e-5, atol=1e-5)
    assert llm.engine.stats["prefill_tokens"] < 3 * 30          # b did reuse its prefix


def test_bad_token_ids_and_sizes_are_user_errors(tiny_factory):
    from tinyllm import TinyLLMError
    d = str(tiny_factory("llama_gqa"))
    llm = LLM(d, max_seq_len=16)
    for ids in ([], [256], [-1], list(range(17))):
        with pytest.raises(TinyLLMError):
            llm.logits(ids)
    assert llm.logits(list(range(16))).shape == (16, 256)    # a full context is fine for logits
    for kw in ({"max_batch": 0}, {"prefill_chunk": 0}):
        with pytest.raises(TinyLLMError):
            LLM(d, **kw)
    for bad in ({"seed": -1}, {"seed": True}, {"stop": 5}, {"stop_token_ids": 5}):
        with pytest.raises(TinyLLMError):
            llm.generate("hi", SamplingParams(**bad))


def test_tiny_temperature_is_greedy_not_nan(tiny_factory):
    llm = LLM(str(tiny_factory("llama_gqa")))
    greedy = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0].token_ids
    cold = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=1e-300, seed=0, ignore_eos=True))[0].token_ids
    assert cold == greedy
