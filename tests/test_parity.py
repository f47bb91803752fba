"""Parity with transformers (torch on CPU) on tiny random checkpoints: full-prefill logits
and greedy continuations through the KV cache."""

import numpy as np
import pytest
import torch
from conftest import TINY_CASES
from transformers import AutoModelForCausalLM

from tinyllm import LLM, SamplingParams

PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, 256, 40)]  # longer than every window


def hf_model(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def max_rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [(c, "float32", False) for c in TINY_CASES] + [
    ("llama_gqa", "float32", True),
    ("llama_gqa", "bfloat16", False),
    ("mistral_window", "float16", True),
]


@pytest.mark.parametrize(
    "case,dtype,shard", CASES, ids=[f"{c}-{d}{'-sharded' if s else ''}" for c, d, s in CASES]
)
def test_logits_and_greedy_match_transformers(tiny_factory, case, dtype, shard):
    d = tiny_factory(case, dtype, shard)
    if shard:
        assert (d / "model.safetensors.index.json").is_file()
    ref_model = hf_model(d)  # the same (bf16/f16-exact) weights, computed in float32
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].numpy()
    # prefill_chunk 16: prompts run in chunks, and the sliding-window model (W=8) gets a
    # rolling cache of 8 + 16 entries that the 40 + 24 tokens wrap around.
    llm = LLM(str(d), max_seq_len=128, prefill_chunk=16)
    assert llm.engine.spec.rolling == bool(llm.cfg.sliding_window)
    ours = llm.logits(PROMPT)
    err = max_rel_err(ours, ref)
    print(f"{case} {dtype} shard={shard}: max rel err {err:.2e}")
    assert err < 1e-4

    # 24 greedy tokens through the cache (prefill, then one-token decode steps).
    with torch.no_grad():
        gen = ref_model.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(PROMPT) :].tolist()
    out = llm.generate([PROMPT], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == gen
    assert out.finish_reason == "length"


def test_sliding_window_really_masks(tiny_factory):
    """The Mistral case is only meaningful if the window changes the result: the same weights
    without a window must give different logits past position W."""
    import json

    d = tiny_factory("mistral_window")
    llm = LLM(str(d), max_seq_len=128, prefill_chunk=16)
    assert llm.cfg.sliding_window == 8 and llm.engine.spec.rolling
    with_window = llm.logits(PROMPT)
    cfg = json.loads((d / "config.json").read_text())
    no_window = d.parent / "no_window"
    no_window.mkdir(exist_ok=True)
    for f in d.iterdir():
        if f.is_file():
            (no_window / f.name).write_bytes(f.read_bytes())
    cfg["sliding_window"] = None
    (no_window / "config.json").write_text(json.dumps(cfg))
    full = LLM(str(no_window), max_seq_len=128).logits(PROMPT)
    np.testing.assert_allclose(with_window[:8], full[:8], rtol=1e-5, atol=1e-5)
    assert np.abs(with_window[9:] - full[9:]).max() > 1e-3
