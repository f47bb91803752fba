"""The paged KV cache (kv_cache.py layout, paging.py pool, engine.py scheduling) on the numpy
backend: scattered blocks give the logits of contiguous ones, prefix hits are counted
exactly, outputs survive eviction and preemption, nothing leaks, window models stay bounded.
(The CUDA kernels' paged addressing is checked against the numpy backend in test_cuda_ops.)"""

import dataclasses
from collections import OrderedDict

import numpy as np
import pytest

from tinyllm import LLM, SamplingParams
from tinyllm.config import KV_DTYPE_BYTES, ModelConfig
from tinyllm.engine import Request
from tinyllm.kv_cache import KVCacheSpec
from tinyllm.paging import ROOT, BlockPool, chain_hash

IDS = [int(t) for t in np.random.default_rng(7).integers(3, 256, 400)]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def scatter(llm, seed=0):
    """Hand out the pool's blocks in a random order from now on (so a sequence's table names
    blocks all over the pool, never a contiguous run)."""
    eng = llm.engine
    eng.ensure_cache()
    order = np.random.default_rng(seed).permutation(eng.cache.spec.n_blocks)
    eng.pool.free = OrderedDict((int(b), None) for b in order)


def check_empty(pool: BlockPool):
    assert pool.n_free == pool.spec.n_blocks and not pool.ref.any()


# ---- paged == contiguous -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["llama_mha", "llama_gqa", "llama_mqa", "llama3_rope", "mistral_window", "qwen2_bias"]
)
@pytest.mark.parametrize("kv", list(KV_DTYPE_BYTES))
def test_scattered_blocks_equal_contiguous_ones(tiny_factory, case, kv):
    """Logits of a 60-token prompt (Mistral: window 8, a ring of blocks of 4 that wraps) and 16
    greedy tokens after it: bit for bit the same whether the pool hands out blocks in order
    (contiguous, the old slot layout) or scattered, for every kv dtype. (Contiguous vs
    transformers is test_parity.)"""
    d = str(tiny_factory(case))
    runs = []
    for scattered in (False, True):
        llm = LLM(d, kv_dtype=kv, max_seq_len=96, block_size=4, prefill_chunk=8, max_batch=2)
        if scattered:
            scatter(llm)
        logits = llm.logits(IDS[:60])
        toks = llm.generate(
            [IDS[:30], IDS[30:50]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        )
        runs.append((logits, [c.token_ids for c in toks]))
        check_empty(llm.engine.pool)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]


# ---- prefix caching -------------------------------------------------------------------------


def test_prefix_hits_are_counted_exactly(tiny_factory):
    """Two requests sharing a 100-token prefix: the second takes the 6 full blocks of 16 (96
    tokens) and prefills only the other 24 of its 120; the tokens equal a run without the
    prefix cache."""
    d = str(tiny_factory("llama_gqa"))
    prefix = IDS[:100]
    a, b = prefix + IDS[100:110], prefix + IDS[200:220]
    out = {}
    for caching in (True, False):
        llm = LLM(d, max_seq_len=256, max_batch=1, enable_prefix_caching=caching)
        out[caching] = llm.generate([a, b], GREEDY)
    first, second = out[True]
    assert (first.cached_tokens, first.prefill_tokens) == (0, 110)
    assert (second.cached_tokens, second.prefill_tokens) == (96, 24)
    assert [c.cached_tokens for c in out[False]] == [0, 0]
    assert [c.token_ids for c in out[True]] == [c.token_ids for c in out[False]]


def test_requests_arriving_together_compute_a_shared_prompt_once(tiny_factory):
    """8 requests sharing a 48-token prompt, admitted in the same step: the first computes
    the shared 48 tokens (the whole step's prefill budget), the other 7 take them from the
    prefix cache before their first chunk (not only requests that come later)."""
    d = str(tiny_factory("llama_gqa"))
    prompts = [IDS[:48] + IDS[100 + 12 * i : 112 + 12 * i] for i in range(8)]
    runs = {}
    for caching in (True, False):
        llm = LLM(d, max_seq_len=128, max_batch=8, prefill_chunk=48, enable_prefix_caching=caching)
        runs[caching] = llm.generate(prompts, GREEDY)
    assert [c.cached_tokens for c in runs[True]] == [0] + [48] * 7
    assert [c.prefill_tokens for c in runs[True]] == [60] + [12] * 7
    assert [c.token_ids for c in runs[True]] == [c.token_ids for c in runs[False]]


def test_admission_reserves_the_blocks_it_counts(tiny_factory):
    """8 unrelated 60-token prompts (4 blocks of 16 each) and a pool of 20 blocks: 5 are
    admitted at once, the others wait for blocks; none is admitted only to be preempted
    (one new token each: nothing grows, so no preemption is ever needed)."""
    d = tiny_factory("llama_gqa")
    block = KVCacheSpec.for_model(ModelConfig.load(d), "fp32", 256).block_nbytes()
    llm = LLM(str(d), max_seq_len=256, max_batch=16, kv_cache_memory=20 * block)
    eng = llm.engine
    eng.reset()
    for i in range(8):
        eng.add(
            Request(
                IDS[60 * i % 300 : 60 * i % 300 + 60],
                SamplingParams(max_tokens=1, temperature=0).validate(),
                i,
            )
        )
    first = eng.step()  # 5 prompts run (and finish: one token each)
    assert sum(ev.kind == "finish" for ev in first) == 5 and len(eng.scheduler.waiting) == 3
    while eng.scheduler.running or eng.scheduler.waiting:
        eng.step()
    assert eng.stats["preemptions"] == 0
    check_empty(eng.pool)


def test_a_full_hit_still_computes_the_last_token(tiny_factory):
    """A prompt that is exactly 2 blocks, seen before: its logits are needed, so it takes 1
    block from the cache and recomputes the 16 tokens of the second."""
    llm = LLM(str(tiny_factory("llama_gqa")), max_seq_len=128, max_batch=1)
    a, b = llm.generate([IDS[:32], IDS[:32]], GREEDY)
    assert (b.cached_tokens, b.prefill_tokens) == (16, 16) and a.token_ids == b.token_ids


def test_chat_turns_reuse_the_conversation(tiny_factory):
    """Turn 2's prompt repeats turn 1's prompt and reply: every full block of what turn 1
    wrote (its prompt and all but its last token) comes from the prefix cache."""
    llm = LLM(str(tiny_factory("llama_gqa")), max_seq_len=256)
    one = llm.generate([IDS[:45]], GREEDY)[0]
    written = (
        len(one.prompt_token_ids) + len(one.token_ids) - 1
    )  # the last token's K/V is never written
    turn2 = one.prompt_token_ids + one.token_ids + IDS[300:310]
    two = llm.generate([turn2], GREEDY)[0]
    assert two.cached_tokens == written // 16 * 16 == 64
    assert two.prefill_tokens == len(turn2) - 64


def test_window_model_prefix_hits(tiny_factory):
    """A ring takes the hits it can hold (rows k-R+1 .. k-1) and gives fresh-prefill logits."""
    d = str(tiny_factory("mistral_window"))  # W = 8
    llm = LLM(d, max_seq_len=128, prefill_chunk=4, block_size=4, max_batch=1)
    llm.engine.spec = dataclasses.replace(
        llm.engine.spec, n_blocks=64
    )  # room to keep released blocks
    fresh = LLM(d, max_seq_len=128)
    assert llm.engine.spec.rolling and llm.engine.spec.ring == 4
    prompt = IDS[:70] + [5]
    llm.generate([IDS[:70] + [9]], GREEDY)
    last = []
    forward = llm.model.forward
    llm.model.forward = lambda *a, **k: last.append(np.array(forward(*a, **k))) or last[-1]
    c = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))[0]
    assert c.cached_tokens == 68 and c.prefill_tokens == 3  # 17 full blocks of 4 of the 70
    np.testing.assert_allclose(last[0][-1], fresh.logits(prompt)[-1], rtol=1e-5, atol=1e-5)


def test_pool_bookkeeping():
    """Reference counts, LRU reuse, hashes dropped when a block is handed out again."""
    spec = KVCacheSpec(1, 4, 2, 8, 1, 8, "fp32", None, 16)
    pool = BlockPool(spec)
    ids = [1, 2, 3, 4, 5]
    s = pool.admit(ids)
    assert pool.grow(s, 5) and s.table[:3].tolist() == [0, 1, 2] and pool.n_free == 1
    pool.commit(s, ids, 5)
    assert s.hashes == [chain_hash(ROOT, [1, 2]), chain_hash(chain_hash(ROOT, [1, 2]), [3, 4])]
    t = pool.admit([1, 2, 3, 4, 9])  # shares rows 0, 1
    assert t.cached_tokens == 4 and pool.ref[:3].tolist() == [2, 2, 1]
    pool.free_seq(s)
    assert pool.ref[:3].tolist() == [1, 1, 0] and list(pool.free) == [
        2,
        3,
    ]  # the unhashed block first
    pool.free_seq(t)
    assert list(pool.free) == [2, 3, 1, 0]  # hashed ones kept; a table frees tail first, head last
    u = pool.new_seq()
    assert pool.grow(u, 6) and u.table[:3].tolist() == [2, 3, 1]
    assert pool.match([1, 2, 3, 4, 9])[0] == 1  # block 1 (the chain's tail) went: row 0 still hits
    assert not pool.grow(u, 10) and u.rows == 4  # the pool ran dry after row 3
    pool.free_seq(u)
    check_empty(pool)


# ---- eviction, preemption, leaks ---------------------------------------------------------------


def test_outputs_survive_a_pool_far_too_small(tiny_factory):
    """8 requests (prompts of 20-60 tokens, 40 new each, greedy and seeded sampling) through a
    pool of 24 blocks of 4 — a fifth of what they need at once — preempt and recompute, and
    produce exactly the tokens of a pool that holds them all."""
    d = str(tiny_factory("llama_gqa"))
    rng = np.random.default_rng(3)
    prompts = [IDS[i * 40 : i * 40 + int(n)] for i, n in enumerate(rng.integers(20, 60, 8))]
    params = [
        SamplingParams(max_tokens=40, ignore_eos=True, temperature=0 if i % 2 else 0.8, seed=i)
        for i in range(8)
    ]
    big = LLM(d, max_seq_len=128, max_batch=8, block_size=4)
    block = big.engine.spec.block_nbytes()
    small = LLM(d, max_seq_len=128, max_batch=8, block_size=4, kv_cache_memory=24 * block)
    assert small.engine.spec.n_blocks == 24
    want = [c.token_ids for c in big.generate(prompts, params)]
    got = small.generate(prompts, params)
    assert [c.token_ids for c in got] == want
    assert small.engine.stats["preemptions"] > 0
    check_empty(small.engine.pool)


def test_a_sequence_longer_than_the_pool_ends_with_length(tiny_factory):
    d = tiny_factory("llama_gqa")
    block = KVCacheSpec.for_model(ModelConfig.load(d), "fp32", 128, block_size=4).block_nbytes()
    llm = LLM(str(d), max_seq_len=128, block_size=4, kv_cache_memory=5 * block)  # 20 tokens
    c = llm.generate([IDS[:10]], GREEDY)[0]
    assert c.finish_reason == "length" and len(c.prompt_token_ids) + len(c.token_ids) == 20 + 1
    from tinyllm import TinyLLMError

    with pytest.raises(TinyLLMError, match="KV-cache blocks.*kv-cache-memory"):
        llm.generate([IDS[:30]], GREEDY)


def test_no_leak_after_1000_random_requests_with_aborts(tiny_factory):
    """1,000 requests of random lengths through add/step/abort with random aborts (waiting
    and running) and a pool that preempts: afterwards every block is free, every count 0."""
    llm = LLM(
        str(tiny_factory("llama_mqa")), max_seq_len=64, max_batch=8, block_size=4, prefill_chunk=32
    )
    llm.engine.spec = dataclasses.replace(llm.engine.spec, n_blocks=40)
    eng = llm.engine
    eng.reset()
    rng = np.random.default_rng(11)
    pending, done, aborted = list(range(1000)), 0, 0
    live_ids: set[int] = set()
    seq_of: dict[int, int] = {}
    while pending or live_ids:
        for _ in range(int(rng.integers(0, 4))):
            if pending:
                i = pending.pop()
                n = int(rng.integers(1, 40))
                seq_of[i] = eng.add(
                    Request(
                        IDS[i % 300 : i % 300 + n],
                        SamplingParams(
                            max_tokens=int(rng.integers(1, 12)), temperature=0, ignore_eos=True
                        ).validate(),
                        i,
                    )
                )
                live_ids.add(i)
        if live_ids and rng.random() < 0.15:
            victim = int(rng.choice(sorted(live_ids)))
            assert eng.abort(seq_of[victim])
            live_ids.discard(victim)
            aborted += 1
        for ev in eng.step():
            if ev.kind in ("finish", "error"):
                live_ids.discard(ev.index)
                done += 1
        held = np.zeros(
            eng.cache.spec.n_blocks, np.int32
        )  # every count = the live tables naming it
        for s in eng.scheduler.running:
            np.add.at(held, s.blocks.table[s.blocks.table >= 0], 1)
        assert (held == eng.pool.ref).all() and eng.pool.n_used == int((held > 0).sum())
    assert done + aborted == 1000 and aborted > 50 and eng.stats["preemptions"] > 0
    check_empty(eng.pool)
    assert set(eng.pool.hash_of) == set(eng.pool.block_of.values())


@pytest.mark.filterwarnings("ignore::tinyllm.api.ContextWarning")
def test_window_model_holds_a_bounded_number_of_blocks(tiny_factory):
    """A 10,000-token generation of the window-8 model with blocks of 4 and chunks of 4 holds
    at most ceil((W + chunk) / block) + 1 = 3 + 1 = 4 blocks at every step."""
    llm = LLM(
        str(tiny_factory("mistral_window")),
        max_seq_len=10_100,
        block_size=4,
        prefill_chunk=4,
        max_batch=1,
    )
    eng = llm.engine
    eng.reset()
    eng.add(
        Request(
            IDS[:20],
            SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True).validate(),
            0,
        )
    )
    peak, n = 0, 0
    while eng.scheduler.running or eng.scheduler.waiting:
        for ev in eng.step():
            if ev.kind == "finish":
                n = len(ev.completion.token_ids)
        peak = max(peak, eng.pool.n_used)
    assert n == 10_000 and peak == eng.spec.ring == 4
    check_empty(eng.pool)
