"""The `tinyllm` command line. Thin: parses flags, builds an LLM, hands over to the module
that owns the job (chat.py, batch.py, gguf_convert.py, hub.py, evaluate.py).

A TinyLLMError anywhere becomes one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="cuda: run decode steps eagerly instead of replaying captured CUDA graphs")


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
              max_seq_len=a.max_seq_len, max_batch=max_batch, progress=not quiet,
              cuda_graph=getattr(a, "cuda_graph", True))
    if not quiet:
        why = " (auto: " + ("CuPy sees a GPU" if llm.backend.name == "cuda" else "no GPU visible to CuPy") + ")" \
            if a.backend == "auto" else ""
        graphs = getattr(llm.backend, "graphs", None)
        decode = "" if graphs is None else ", decode: " + ("CUDA graphs" if graphs.enabled else "eager")
        print(f"backend: {llm.backend.name}{why} ({llm.backend.compute_dtype}), kv cache: {llm.kv_dtype}, "
              f"context: {llm.max_seq_len} tokens{decode}", file=sys.stderr)
    return llm


# ---- commands ------------------------------------------------------------------------

def cmd_generate(a) -> int:
    llm = load_llm(a)
    params = sampling_from_args(a)
    result: list = []
    t0 = time.perf_counter()
    for piece in llm.stream(a.prompt, params, result=result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = result[0]
    dt = time.perf_counter() - t0
    print(f"[{len(c.prompt_token_ids)} prompt tokens, {len(c.token_ids)} generated in {dt:.2f} s, "
          f"{c.decode_tokens_per_s:.1f} tok/s decode, finish: {c.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from .chat import run_chat
    return run_chat(a)


def cmd_info(a) -> int:
    from .api import resolve_model_dir
    from .config import KV_DTYPE_BYTES, ModelConfig
    from .kv_cache import DEFAULT_PREFILL_CHUNK
    from .weights import checkpoint_dtype, detect_config, fmt_bytes, open_checkpoint
    d = resolve_model_dir(a.model)
    cfg = detect_config(ModelConfig.load(d), open_checkpoint(d))
    budget = parse_memory(a.memory)
    kind = {1: "MQA", cfg.n_heads: "MHA"}.get(cfg.n_kv_heads, "GQA")
    rows = [
        ("model", str(d)), ("architecture", cfg.arch),
        ("parameters", f"{cfg.n_params() / 1e6:.1f} M"), ("checkpoint dtype", checkpoint_dtype(d)),
        ("layers / dim / hidden", f"{cfg.n_layers} / {cfg.dim} / {cfg.hidden_dim}"),
        ("attention", f"{kind}: {cfg.n_heads} query heads, {cfg.n_kv_heads} KV heads, head_dim {cfg.head_dim}"),
        ("rope", f"{cfg.rope_type}, theta {cfg.rope_theta:g}"),
        ("sliding window", str(cfg.sliding_window or "none")),
        ("max context", str(cfg.max_position_embeddings)),
        ("vocab", str(cfg.vocab_size)),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    from .backends import cuda_available
    backend = a.backend if a.backend != "auto" else ("cuda" if cuda_available() else "numpy")
    compute_bytes = 4 if backend == "numpy" else 2
    weight_bytes = cfg.n_params() * compute_bytes
    print(f"\nKV cache per token, and the longest context that fits in {fmt_bytes(budget)} "
          f"next to the weights ({fmt_bytes(weight_bytes)} at {compute_bytes} bytes/param):")
    print(f"  {'kv dtype':<8} {'bytes/token':>12} {'MHA would need':>15}  max context")
    for kv in KV_DTYPE_BYTES:
        per = cfg.kv_bytes_per_token(kv)
        left = budget - weight_bytes
        ctx = max(0, left // per) if left > 0 else 0
        if cfg.sliding_window and ctx >= cfg.sliding_window + DEFAULT_PREFILL_CHUNK:  # the rolling capacity
            ctx_s = "unbounded (rolling window)"
        elif ctx > cfg.max_position_embeddings:
            ctx_s = f"{cfg.max_position_embeddings} (model max; memory allows {ctx:,})"
        else:
            ctx_s = str(ctx)
        print(f"  {kv:<8} {per:>12,} {cfg.mha_kv_bytes_per_token(kv):>15,}  {ctx_s}")
    return 0


def cmd_convert(a) -> int:
    from .gguf_convert import convert_gguf
    t0 = time.perf_counter()
    out = convert_gguf(a.gguf, a.out_dir, dtype=a.dtype, overwrite=a.overwrite)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_download(a) -> int:
    from .hub import download
    print(download(a.name))
    return 0


def cmd_list(a) -> int:
    from .hub import list_models
    rows = list_models()
    print(f"{'alias':<24} {'repository':<45} local")
    for r in rows:
        print(f"{r['alias']:<24} {r['repo']:<45} {r.get('path') or '-'}")
    return 0


def cmd_batch(a) -> int:
    from .batch import run_batch
    return run_batch(a)


def cmd_eval(a) -> int:
    from .evaluate import run_eval
    return run_eval(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyllm", description="Run LLaMA-family models (Llama, Mistral, Qwen2).")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", "-p", required=True)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (or one answer with a question argument)")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--verbose", "-v", action="store_true", help="print stats after every reply")
    c.add_argument("question", nargs="?", default=None, help="answer this once and exit")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, parameters and KV-cache sizes")
    add_model_args(i)
    i.add_argument("--memory", default="24GB", help="memory budget for the context estimate (e.g. 24GB)")
    i.set_defaults(func=cmd_info)

    cv = sub.add_parser("convert", help="convert a GGUF file into an HF-layout directory")
    cv.add_argument("gguf")
    cv.add_argument("out_dir")
    cv.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="one dtype for every tensor (default: float32 for quantized, F16/BF16 kept)")
    cv.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    cv.set_defaults(func=cmd_convert)

    dl = sub.add_parser("download", help="fetch a model from the Hugging Face Hub into the local HF cache")
    dl.add_argument("name")
    dl.set_defaults(func=cmd_download)

    ls = sub.add_parser("list", help="known aliases and which are present locally")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("batch", help="generate for every request of a JSONL file")
    add_model_args(b)
    add_sampling_args(b)
    b.add_argument("-i", "--input", required=True,
                   help="JSONL requests: OpenAI Batch lines (custom_id, body) or {id, prompt|messages, ...}")
    b.add_argument("-o", "--output", required=True,
                   help="JSONL results, one line per id, appended and fsync'd as each finishes (resumable)")
    b.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    b.add_argument("--resume", action="store_true", help="skip ids already in the output")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_batch)

    e = sub.add_parser("eval", help="perplexity and KL divergence per KV-cache dtype")
    e.add_argument("--model", "-m", default=None, help="as for the other commands (default: the embedded model)")
    e.add_argument("--backend", default="auto", choices=["auto", "numpy", "cuda"])
    e.add_argument("--dtype", default=None, help="compute dtype (cuda: bf16; numpy: fp32)")
    e.add_argument("--text", default=None, help="text file (default: a license text on this machine)")
    e.add_argument("--tokens", type=int, default=4096)
    e.add_argument("--window", type=int, default=1024, help="tokens per evaluated segment")
    e.add_argument("--kv-dtypes", default="fp32,fp16,bf16,int8,fp8",
                   help="comma-separated; each is compared with the fp32 cache on the same backend")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TinyLLMError as e:
        print(f"tinyllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
