"""Mistral's native format (params.json + consolidated.safetensors + tokenizer.model.v*):
a tiny random Mistral written in native layout, derived here from a tiny HF checkpoint by
inverting the HF Q/K permutation, must give the HF checkpoint's logits."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from tinyllm import LLM, TinyLLMError

HF_TO_NATIVE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def hf_to_native_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert transformers' convert_mistral_weights_to_hf permute (native interleaved pairs
    -> rotate-half): HF = view(h, d/2, 2, dim).transpose(1, 2) of native."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


@pytest.fixture(scope="module")
def native_pair(tmp_path_factory):
    import mistral_common

    tok_file = os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")
    root = tmp_path_factory.mktemp("native")
    hf = root / "hf"
    make_tiny_checkpoint(hf, "mistral_window")
    cfg = json.loads((hf / "config.json").read_text())
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    # v0.1-shaped params.json: no rope_theta (must mean 1e4), a sliding window.
    assert float(cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta"))) == 10000.0
    native = root / "native"
    native.mkdir()
    sd = load_file(str(hf / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers.") :].split(".", 1)
            new = f"layers.{i}.{HF_TO_NATIVE[rest]}"
            if rest.startswith("self_attn.q_proj"):
                t = hf_to_native_rows(t, n_heads)
            elif rest.startswith("self_attn.k_proj"):
                t = hf_to_native_rows(t, n_kv)
        else:
            new = HF_TO_NATIVE[name]
        out[new] = t.contiguous()
    save_file(out, str(native / "consolidated.safetensors"))
    (native / "params.json").write_text(
        json.dumps(
            {
                "dim": cfg["hidden_size"],
                "n_layers": cfg["num_hidden_layers"],
                "head_dim": cfg["hidden_size"] // n_heads,
                "hidden_dim": cfg["intermediate_size"],
                "n_heads": n_heads,
                "n_kv_heads": n_kv,
                "norm_eps": cfg["rms_norm_eps"],
                "vocab_size": cfg["vocab_size"],
                "sliding_window": cfg["sliding_window"],
            }
        )
    )
    shutil.copy(tok_file, native / "tokenizer.model.v1")
    return hf, native


def test_native_layout_gives_hf_logits(native_pair):
    hf, native = native_pair
    ids = [
        int(t) for t in np.random.default_rng(3).integers(3, 256, 30)
    ]  # longer than the window (8)
    a = LLM(str(hf), max_seq_len=64, prefill_chunk=8)
    b = LLM(str(native), max_seq_len=64, prefill_chunk=8)
    assert b.cfg.sliding_window == 8 and b.cfg.rope_theta == 10000.0
    np.testing.assert_allclose(b.logits(ids), a.logits(ids), rtol=1e-5, atol=1e-5)


def test_native_qk_left_interleaved_would_be_wrong(native_pair, monkeypatch):
    """Guard against a vacuous pass: loading the native Q/K rows without the un-permutation
    must change the logits."""
    from tinyllm import weights

    hf, native = native_pair
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 256, 30)]
    monkeypatch.setattr(weights, "unpermute_native", lambda w, n: w)
    wrong = LLM(str(native), max_seq_len=64).logits(ids)
    right = LLM(str(hf), max_seq_len=64).logits(ids)
    assert np.abs(wrong - right).max() > 1e-3


def test_tekken_is_a_clear_error(native_pair, tmp_path):
    _, native = native_pair
    d = tmp_path / "tekken"
    shutil.copytree(native, d)
    (d / "tokenizer.model.v1").unlink()
    (d / "tekken.json").write_text("{}")
    with pytest.raises(TinyLLMError, match="(?i)tekken"):
        LLM(str(d))


def test_native_weights_next_to_a_config_json_are_still_unpermuted(native_pair, tmp_path):
    """Some repos carry config.json beside params.json + consolidated.safetensors: the Q/K
    rows still come from the native file and need the un-interleave."""
    hf, native = native_pair
    d = tmp_path / "both"
    shutil.copytree(native, d)
    shutil.copy(hf / "config.json", d / "config.json")
    ids = [int(t) for t in np.random.default_rng(4).integers(3, 256, 20)]
    np.testing.assert_allclose(
        LLM(str(d), max_seq_len=64).logits(ids),
        LLM(str(hf), max_seq_len=64).logits(ids),
        rtol=1e-5,
        atol=1e-5,
    )
