"""Command-line options shared by every subcommand, and what they turn into: the model and
sampling flags, `sampling_from_args` and `load_llm`. cli.py builds the parsers from these;
chat.py and batch.py call `load_llm`/`sampling_from_args` from here, so dependencies flow one
way (cli -> chat/batch -> options), never back into cli.
"""

from __future__ import annotations

import argparse
import sys

from .kv_cache import DEFAULT_BLOCK_SIZE
from .memory import GPU_MEMORY_UTILIZATION, parse_memory


def _positive_int(text: str) -> int:
    """argparse type for counts: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument(
        "--model",
        "-m",
        default=None,
        help="path, name under weights/, HF repo id or alias (default: the embedded "
        "SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpu", "numpy", "cuda"],
        help="where to compute: cuda (NVIDIA GPU through CuPy), cpu (numba-compiled kernels) "
        "or numpy (the reference); auto picks cuda when CuPy sees a GPU, else cpu when numba "
        "is installed, else numpy (default: auto)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: cuda bf16 | fp16, numpy fp32 (default: bf16 on cuda, fp32 on numpy)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int4"],
        help="hold the projection matrices (and an untied lm_head) in this llama.cpp block "
        "format, quantized at load tensor by tensor (int4: q4_k blocks from a better scale "
        "search, BENCHMARKS.md); the embedding table stays float; a "
        "checkpoint stored quantized (tinyllm convert FILE.gguf) needs no flag (default: none)",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        help="KV-cache storage: auto | fp32 | fp16 | bf16 | int8 | fp8 (default: auto = the "
        "compute dtype)",
    )
    p.add_argument(
        "--ctx-size",
        "--max-seq-len",
        dest="max_seq_len",
        type=_positive_int,
        default=None,
        help="context length (tokens) to allocate; above the model's trained maximum it warns "
        "(default: min(model max, 8192))",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for the matrix products (BLAS, and the cpu backend's kernels) "
        "(default: the cores not busy with other processes at start, at least 1)",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="cuda: run decode steps eagerly instead of replaying captured CUDA graphs "
        "(default: CUDA graphs on)",
    )
    add_kv_cache_args(p)


def add_kv_cache_args(p: argparse.ArgumentParser):
    """The paged KV cache (kv_cache.py, paging.py): its size, block size and prefix caching."""
    p.add_argument(
        "--kv-cache-memory",
        default=None,
        metavar="SIZE",
        help="bytes of KV-cache blocks, with a unit: 4GB, 512MB; sequences take blocks as they "
        "grow (up to --max-batch run at once), and wait or are preempted when none are free "
        f"(default: enough for --max-batch sequences of the full --ctx-size; on the GPU, "
        f"when that does not fit, what {GPU_MEMORY_UTILIZATION:.0%}% of the free memory holds next "
        f"to the weights)",
    )
    p.add_argument(
        "--block-size",
        type=_positive_int,
        default=DEFAULT_BLOCK_SIZE,
        metavar="N",
        help=f"tokens per KV-cache block: the unit of allocation and of prefix sharing "
        f"(default: {DEFAULT_BLOCK_SIZE}, as vLLM)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing the KV blocks of an earlier "
        "prompt with the same leading tokens (default: prefix caching on)",
    )


def add_sampling_args(p: argparse.ArgumentParser):
    model = "the model's generation_config.json"
    p.add_argument(
        "--max-tokens", "-n", type=int, default=None, help="most tokens to generate (default: 512)"
    )
    p.add_argument(
        "--temperature",
        "-t",
        type=float,
        default=None,
        help=f"sampling temperature, 0 = greedy (default: {model} when it sets do_sample, else 0)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"nucleus sampling mass in (0, 1] (default: {model} when it sets do_sample, else 1 = "
        "off)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help=f"sample among the k most likely tokens, 0 = off (default: {model} when it sets "
        f"do_sample, 50 if it names none; else 0)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help=f"HF-style penalty for repeated tokens, 1 = off (default: {model}, else 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed for sampling (default: none, varies per run)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        help="stop when this text appears, not included in the output; repeatable (default: none)",
    )


def sampling_from_args(a):
    from .sampling import SamplingParams

    return SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        stop=a.stop,
    ).validate()


def load_llm(a, max_batch: int = 1, quiet: bool = False):
    """The LLM the flags describe; what was picked (model, backend, threads, context) goes to
    stderr unless quiet."""
    from .api import LLM
    from .hub import resolve

    kv_memory = getattr(a, "kv_cache_memory", None)
    kv_memory = (
        None if kv_memory is None else parse_memory(kv_memory)
    )  # a bad size fails before loading
    r = resolve(a.model)
    model_dir = r.path
    if not quiet:
        print(f"model: {r.describe()}", file=sys.stderr)
    llm = LLM(
        str(model_dir),
        backend=a.backend,
        dtype=a.dtype,
        kv_dtype=a.kv_dtype,
        max_seq_len=a.max_seq_len,
        max_batch=max_batch,
        progress=not quiet,
        threads=getattr(a, "threads", None),  # warnings: one line each (cli.main)
        cuda_graph=getattr(a, "cuda_graph", True),
        kv_cache_memory=kv_memory,
        block_size=getattr(a, "block_size", DEFAULT_BLOCK_SIZE),
        enable_prefix_caching=getattr(a, "prefix_caching", True),
        quantization=getattr(a, "quantize", None),
    )
    if not quiet:
        from .backends import auto_backend

        why = f" (auto: {auto_backend()[1]})" if a.backend == "auto" else ""
        threads = (
            f", {llm.threads} {'BLAS' if llm.backend.name == 'numpy' else 'CPU'} "
            f"thread{'s' if llm.threads > 1 else ''}"
            if llm.backend.name in ("numpy", "cpu")
            else ""
        )
        graphs = getattr(llm.backend, "graphs", None)
        decode = (
            "" if graphs is None else ", decode: " + ("CUDA graphs" if graphs.enabled else "eager")
        )
        spec = llm.engine.spec
        prefix = "" if llm.engine.prefix_caching else ", no prefix caching"
        fmts = sorted(set(llm.weight_formats.values()))
        held = f", weights: {'/'.join(fmts)} (embedding float)" if fmts else ""
        print(
            f"backend: {llm.backend.name}{why} ({llm.backend.compute_dtype}{threads}), kv cache: "
            f"{llm.kv_dtype} "
            f"({spec.tokens():,} tokens in {spec.n_blocks:,} blocks of {spec.block_size}{prefix}), "
            f"context: {llm.max_seq_len} tokens{decode}{held}",
            file=sys.stderr,
        )
    return llm


def model_names(model: str | None, model_dir) -> tuple[str, ...]:
    """The names a model answers to in API output and requests (serve's /v1/models, batch's
    `model` field), the public one first: the name given to --model (or the default's), unless
    it is a local path (a path would expose the file system: the directory's name then), then
    its HF repo id and the directory's name as aliases (vLLM users send the repo id)."""
    from pathlib import Path

    from .hub import DEFAULT_MODEL, alias_repo, resolve

    try:
        r = resolve(model, progress=False)
        source, repo = r.source, r.repo_id
    except Exception:  # (already loaded: only naming is at stake here)
        source, repo = "path", None
    name = model or DEFAULT_MODEL
    public = Path(model_dir).name if source == "path" else name
    repo = repo or (alias_repo(name) if source != "path" else None)
    return tuple(dict.fromkeys(n for n in (public, repo, Path(model_dir).name) if n))
