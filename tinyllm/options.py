"""Command-line options shared by every subcommand, and what they turn into: the model and
sampling flags, `sampling_from_args` and `load_llm`. cli.py builds the parsers from these;
chat.py and batch.py call `load_llm`/`sampling_from_args` from here, so dependencies flow one
way (cli -> chat/batch -> options), never back into cli.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TinyLLMError


def parse_memory(text: str) -> int:
    """'24GB', '512MiB', '1.5G' -> bytes (GB/GiB both taken as 2**30: memory, not disks)."""
    t = text.strip().upper().replace("I", "").rstrip("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        if t and t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(float(t))
    except ValueError:
        raise TinyLLMError(f"cannot read memory size {text!r}; write it like 24GB or 512MB") from None


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", "-m", default=None,
                   help="path, name under weights/, HF repo id or alias (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cuda"])
    p.add_argument("--dtype", default=None, help="compute dtype (cuda: bf16 | fp16; numpy: fp32)")
    p.add_argument("--kv-dtype", default="auto", help="auto | fp32 | fp16 | bf16 | int8 | fp8")
    p.add_argument("--ctx-size", "--max-seq-len", dest="max_seq_len", type=int, default=None,
                   help="context length to allocate (default: min(model max, 8192))")


def add_sampling_args(p: argparse.ArgumentParser):
    p.add_argument("--max-tokens", "-n", type=int, default=None)
    p.add_argument("--temperature", "-t", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_from_args(a):
    from .sampling import SamplingParams
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, repetition_penalty=a.repetition_penalty, seed=a.seed,
                          stop=a.stop).validate()


def load_llm(a, max_batch: int = 1, quiet: bool = False):
    from .api import LLM
    from .hub import resolve
    r = resolve(a.model)
    model_dir = r.path
    if not quiet:
        print(f"model: {r.describe()}", file=sys.stderr)
    llm = LLM(str(model_dir), backend=a.backend, dtype=a.dtype, kv_dtype=a.kv_dtype,
              max_seq_len=a.max_seq_len, max_batch=max_batch, progress=not quiet)
    if not quiet:
        why = " (auto: " + ("CuPy sees a GPU" if llm.backend.name == "cuda" else "no GPU visible to CuPy") + ")" \
            if a.backend == "auto" else ""
        print(f"backend: {llm.backend.name}{why} ({llm.backend.compute_dtype}), kv cache: {llm.kv_dtype}, "
              f"context: {llm.max_seq_len} tokens", file=sys.stderr)
    return llm
