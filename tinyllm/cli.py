"""The `tinyllm` command line. Thin: parses flags, builds an LLM, hands over to the module
that owns the job (chat.py, batch.py, gguf_convert.py, hub.py, evaluate.py).

A TinyLLMError anywhere becomes one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import TinyLLMError
from .memory import parse_memory
from .options import add_model_args, add_sampling_args, load_llm, sampling_from_args

# ---- commands ------------------------------------------------------------------------


def cmd_generate(a) -> int:
    if a.text is not None and a.prompt is not None:
        raise TinyLLMError("give the prompt once: as an argument or with --prompt, not both")
    prompt = a.text if a.text is not None else a.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise TinyLLMError(
                'no prompt: pass one (tinyllm generate "Once upon a time"), or pipe it into stdin'
            )
        prompt = sys.stdin.read().rstrip("\n")  # like chat: all piped input is the prompt
        if not prompt.strip():
            raise TinyLLMError("no prompt: stdin was empty")
    llm = load_llm(a)
    params = sampling_from_args(a)
    result: list = []
    t0 = time.perf_counter()
    for piece in llm.stream(prompt, params, result=result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    c = result[0]
    dt = time.perf_counter() - t0
    print(
        f"[{len(c.prompt_token_ids)} prompt tokens, {len(c.token_ids)} generated in {dt:.2f} s, "
        f"{c.decode_tokens_per_s:.1f} tok/s decode, finish: {c.finish_reason}]",
        file=sys.stderr,
    )
    return 0


def cmd_chat(a) -> int:
    from .chat import run_chat

    return run_chat(a)


def cmd_info(a) -> int:
    from .api import default_context
    from .backends import auto_backend, float_bytes
    from .memory import weights_nbytes
    from .weights import fmt_bytes

    budget, kv_budget = info_budgets(a)  # a bad size fails before the model is read
    d, cfg, formats = info_model(a)
    backend = a.backend if a.backend != "auto" else auto_backend()[0]
    compute_bytes = float_bytes(backend, cfg.torch_dtype)
    weight_bytes = weights_nbytes(cfg, compute_bytes, formats)
    left = budget - weight_bytes
    if left <= 0:
        print(
            f"\ndoes not fit: the weights alone take {fmt_bytes(weight_bytes)} at {compute_bytes} "
            "bytes/param "
            f"({backend}), more than the {fmt_bytes(budget)} budget (--memory)"
        )
        info_formats(cfg, backend, budget, formats, compute_bytes)
        return 0
    context = default_context(cfg, a.max_seq_len)  # as LLM picks it
    runtime = info_contexts(cfg, backend, budget, formats, compute_bytes, context, a.block_size)
    info_formats(cfg, backend, budget, formats, compute_bytes)
    info_pool(
        cfg,
        kv_budget if kv_budget is not None else left - runtime,
        kv_budget is not None,
        context,
        a.block_size,
    )
    return 0


def info_budgets(a) -> tuple[int, int | None]:
    """(--memory in bytes: this machine's available memory, 24GB where it is unknown;
    --kv-cache-memory in bytes or None)."""
    if a.memory is None:
        from .weights import available_memory

        avail = available_memory()
        a.memory = f"{avail / 2**30:.2f}GB" if avail else "24GB"
    budget = parse_memory(a.memory)
    return budget, parse_memory(a.kv_cache_memory) if a.kv_cache_memory is not None else None


def info_model(a):
    """Print the model's table (architecture, sizes, attention, rope); returns (model dir,
    config, planned weight formats)."""
    from .api import resolve_model_dir
    from .config import ModelConfig
    from .weights import checkpoint_dtype, detect_config, open_checkpoint, planned_formats

    d = resolve_model_dir(a.model)
    index = open_checkpoint(d)
    cfg = detect_config(ModelConfig.load(d), index)
    if a.quantize is not None:
        from .quant import check_format

        check_format(a.quantize)
    formats = planned_formats(cfg, a.quantize, index.formats())
    kind = {1: "MQA", cfg.n_heads: "MHA"}.get(cfg.n_kv_heads, "GQA")
    rows = [
        ("model", str(d)),
        ("architecture", cfg.arch),
        ("parameters", f"{cfg.n_params() / 1e6:.1f} M"),
        ("checkpoint dtype", checkpoint_dtype(d)),
        ("weights held", held_description(formats, a.quantize)),
        ("layers / dim / hidden", f"{cfg.n_layers} / {cfg.dim} / {cfg.hidden_dim}"),
        (
            "attention",
            f"{kind}: {cfg.n_heads} query heads, {cfg.n_kv_heads} KV heads, head_dim "
            f"{cfg.head_dim}",
        ),
        ("rope", f"{cfg.rope_type}, theta {cfg.rope_theta:g}"),
        ("sliding window", str(cfg.sliding_window or "none")),
        ("max context", str(cfg.max_position_embeddings)),
        ("vocab", str(cfg.vocab_size)),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return d, cfg, formats


def info_contexts(
    cfg, backend: str, budget: int, formats: dict, compute_bytes: int, context: int, bs: int
) -> int:
    """Per kv dtype: bytes per token and the longest context (one sequence) that fits in
    --memory next to the weights and the working memory. Returns that working memory at
    `context` (host: the plan the loader checks, memory.py; GPU: the pre-load estimate)."""
    from .config import KV_DTYPE_BYTES
    from .kv_cache import DEFAULT_PREFILL_CHUNK, KVCacheSpec
    from .memory import gpu_working_estimate, host_plan, largest, weights_nbytes
    from .weights import fmt_bytes

    weight_bytes = weights_nbytes(cfg, compute_bytes, formats)
    held_bytes = (
        f" at {compute_bytes} bytes/param"
        if not formats
        else f": quantized matrices, the rest at {compute_bytes} bytes/param"
    )
    chunk = DEFAULT_PREFILL_CHUNK
    if backend in ("numpy", "cpu"):  # the same plan the loader checks (memory.py)
        plan = functools.partial(host_plan, chunk=chunk, formats=formats, float_bytes=compute_bytes)
        low = plan(cfg, "fp32", 2, 1).runtime
        working = f"working memory ({fmt_bytes(low)} and up, growing with the context)"
        runtime = plan(cfg, "fp32", context, 1).runtime

        def fits(kv: str, n: int) -> bool:
            return plan(cfg, kv, n, 1).total <= budget
    else:
        runtime = gpu_working_estimate(cfg, chunk, 1)
        working = f"{fmt_bytes(runtime)} working memory (estimated; measured at load)"

        def fits(kv: str, n: int) -> bool:
            return (
                weight_bytes + runtime + KVCacheSpec.for_model(cfg, kv, n, 1, chunk=chunk).nbytes()
                <= budget
            )

    print(
        "\nKV cache per token, and the longest context (one sequence) that fits in "
        f"{fmt_bytes(budget)} "
        f"next to the weights ({fmt_bytes(weight_bytes)}{held_bytes}) and {working}:"
    )
    print(f"  {'kv dtype':<8} {'bytes/token':>12} {'MHA would need':>15}  max context")
    unbounded = 1 << 40
    for kv in KV_DTYPE_BYTES:
        per = cfg.kv_bytes_per_token(kv, bs)
        ctx = largest(lambda n, kv=kv: fits(kv, n), 2, unbounded)
        if ctx < 2:
            ctx_s = "0 (does not fit: no room for a cache)"
        elif cfg.sliding_window and ctx == unbounded:  # the rolling cache's size is bounded
            ctx_s = "unbounded (rolling window)"
        elif ctx > cfg.max_position_embeddings:
            ctx_s = f"{cfg.max_position_embeddings} (model max; memory allows {ctx:,})"
        else:
            ctx_s = str(ctx)
        print(f"  {kv:<8} {per:>12,} {cfg.mha_kv_bytes_per_token(kv):>15,}  {ctx_s}")
    return runtime


def held_description(formats: dict, quantize: str | None) -> str:
    """'q4_0: 225 matrices (the rest, embedding included, float)' or 'float'."""
    if not formats:
        return "float (no quantized matrices; --quantize FMT quantizes at load)"
    counts: dict[str, int] = {}
    for f in formats.values():
        counts[f] = counts.get(f, 0) + 1
    how = f"--quantize {quantize}" if quantize else "stored quantized"
    return (
        ", ".join(f"{f}: {n} matrices" for f, n in sorted(counts.items()))
        + f" ({how}; the embedding table and norms float)"
    )


def info_formats(cfg, backend: str, budget: int, formats: dict, compute_bytes: int):
    """Per weight format: the bytes the weights take and the longest context (one sequence,
    a KV cache in the compute dtype) that fits in --memory."""
    from .kv_cache import DEFAULT_PREFILL_CHUNK, KVCacheSpec
    from .memory import formats_for, gpu_working_estimate, host_plan, largest, weights_nbytes
    from .weights import fmt_bytes

    host = backend in ("numpy", "cpu")  # the host plan (memory.py), an fp32 KV cache
    chunk, kv = DEFAULT_PREFILL_CHUNK, ("fp32" if host else "bf16")
    print(
        f"\nweights per --quantize format ({backend}; quantized: every layer's projections and an "
        f"untied lm_head; the embedding table float) and the longest context (one sequence, "
        f"{kv} KV cache) that fits in {fmt_bytes(budget)}:"
    )
    print(f"  {'format':<8} {'bits/weight':>11} {'weights':>11}  max context")
    from .quant import BITS_PER_WEIGHT

    rows = [(f, f, formats_for(cfg, f)) for f in ("q8_0", "q6_k", "q4_k", "q4_1", "q4_0")]
    rows = [("float", None, {})] + rows + ([("this run", "-", formats)] if formats else [])
    for label, fmt, fm in rows:
        wb = weights_nbytes(cfg, compute_bytes, fm)
        if host:

            def fits(n: int, fm=fm) -> bool:
                plan = host_plan(cfg, kv, n, 1, chunk, formats=fm, float_bytes=compute_bytes)
                return plan.total <= budget
        else:

            def fits(n: int, wb=wb) -> bool:
                spec = KVCacheSpec.for_model(cfg, kv, n, 1, chunk=chunk)
                return wb + gpu_working_estimate(cfg, chunk, 1) + spec.nbytes() <= budget

        ctx = largest(fits, 2, cfg.max_position_embeddings)
        ctx_s = "does not fit" if ctx < 2 else str(ctx)
        if ctx == cfg.max_position_embeddings:
            ctx_s += " (model max)"
        bits = f"{BITS_PER_WEIGHT[fmt]:.2f}" if fmt in BITS_PER_WEIGHT else fmt or "32/16"
        if fmt is None:
            bits = str(8 * compute_bytes)
        print(f"  {label:<8} {bits:>11} {fmt_bytes(wb):>11}  {ctx_s}")


def info_pool(cfg, budget: int, given: bool, ctx: int, bs: int):
    """The paged cache a KV budget makes: --kv-cache-memory (given), else what --memory leaves
    after the weights and the working memory at the context ctx. Per kv dtype: blocks of bs
    tokens = budget // block bytes, tokens = blocks * bs (kv_cache.KVCacheSpec's arithmetic)."""
    from .config import KV_DTYPE_BYTES
    from .kv_cache import KVCacheSpec
    from .weights import fmt_bytes

    source = "--kv-cache-memory" if given else "what --memory leaves for the cache"
    if budget <= 0:
        print(f"\nno room for a KV cache: {source} is {fmt_bytes(max(budget, 0))}")
        return
    print(
        f"\nKV-cache blocks of {bs} tokens in {fmt_bytes(budget)} ({source}); a sequence of the "
        f"{ctx}-token context takes {KVCacheSpec.for_model(cfg, 'fp32', ctx, block_size=bs).ring} "
        "blocks:"
    )
    print(f"  {'kv dtype':<8} {'block bytes':>12} {'blocks':>12} {'tokens':>14}  full contexts")
    for kv in KV_DTYPE_BYTES:
        spec = KVCacheSpec.for_model(cfg, kv, ctx, block_size=bs)
        n = budget // spec.block_nbytes()
        print(f"  {kv:<8} {spec.block_nbytes():>12,} {n:>12,} {n * bs:>14,}  {n // spec.ring:,}")
    q8 = KVCacheSpec.for_model(cfg, "int8", ctx, block_size=bs)
    print(
        "  (int8 and fp8 blocks hold keys quantized per channel and values per token; each "
        "running "
        f"sequence also keeps its open block of keys in float32 outside the pool: "
        f"{fmt_bytes(q8.open_row_nbytes())} per sequence)"
    )


def cmd_convert(a) -> int:
    from .gguf_convert import convert_gguf

    t0 = time.perf_counter()
    out = convert_gguf(
        a.gguf,
        a.out_dir,
        dtype=a.dtype,
        overwrite=a.overwrite,
        keep_quantized=not a.dequantize,
        requantize=a.quantize,
    )
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    from .gguf_convert import PROVENANCE_FILE

    prov = json.loads((out / PROVENANCE_FILE).read_text())
    kept = prov.get("kept_quantized") or {}
    if kept:
        print("kept quantized: " + ", ".join(f"{n} {f} matrices" for f, n in sorted(kept.items())))
    for what, loss in sorted((prov.get("requantized") or {}).items()):
        print(
            f"requantized {loss['tensors']} matrices {what}: relative RMS error "
            f"{loss['rel_rms_error']:.2%} added to the GGUF's own"
        )
    return 0


def cmd_download(a) -> int:
    from .hub import download

    print(download(a.name))
    return 0


def cmd_list(a) -> int:
    from .hub import list_models
    from .weights import fmt_bytes

    rows = list_models()
    print(f"{'alias':<24} {'repository':<45} {'size':>10}  local")
    for r in rows:
        size = fmt_bytes(dir_size(r["path"])) if r.get("path") else "-"
        print(
            f"{r['alias']:<24} {r['repo']:<45} {size:>10}  {r.get('path') or r.get('note') or '-'}"
        )
    return 0


def dir_size(path) -> int:
    """Bytes of the files in a model directory (symlinks followed: the HF cache links blobs)."""
    total = 0
    for p in Path(path).iterdir():
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


def cmd_batch(a) -> int:
    if a.ray is not None:
        from .ray_batch import run_ray_batch

        return run_ray_batch(a)
    if a.replicas is not None:
        raise TinyLLMError("--replicas needs --ray (replicas run on a Ray cluster)")
    from .batch import run_batch

    return run_batch(a)


def cmd_serve(a) -> int:
    from .serve import run_serve

    return run_serve(a)


def cmd_eval(a) -> int:
    from .evaluate import run_eval

    return run_eval(a)


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument(
        "text",
        nargs="?",
        default=None,
        metavar="PROMPT",
        help="the text to continue (default: --prompt, else all of stdin)",
    )
    g.add_argument(
        "--prompt", "-p", default=None, help="the text to continue, as an option (default: none)"
    )
    g.set_defaults(func=cmd_generate)


def _add_chat_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive chat (or one answer with a question argument)")
    add_model_args(c)
    add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt (default: none)")
    c.add_argument(
        "--verbose", "-v", action="store_true", help="print stats after every reply (default: off)"
    )
    c.add_argument(
        "question",
        nargs="?",
        default=None,
        help="answer this once and exit (default: piped stdin as one message, else interactive)",
    )
    c.set_defaults(func=cmd_chat)


def _add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="architecture, parameters and KV-cache sizes")
    add_model_args(i)
    i.add_argument(
        "--memory",
        default=None,
        help="memory budget for the context estimate and, without --kv-cache-memory, for the "
        "table of KV tokens it holds, with a unit: 24GB, 512MB (default: this machine's available "
        "memory)",
    )
    i.set_defaults(func=cmd_info)


def _add_convert_parser(sub) -> None:
    cv = sub.add_parser("convert", help="convert a GGUF file into an HF-layout directory")
    cv.add_argument("gguf", help="the .gguf file to read")
    cv.add_argument(
        "out_dir", help="directory to write config.json, tokenizer files and model.safetensors into"
    )
    cv.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="one float dtype for every tensor, dequantizing quantized ones (default: "
        "Q8_0/Q4_0/Q4_1/Q4_K/Q6_K matrices kept quantized, F16/BF16 kept, the rest float32)",
    )
    cv.add_argument(
        "--dequantize",
        action="store_true",
        help="write every quantized tensor as float32, as transformers can load it "
        "(default: keep supported formats quantized)",
    )
    cv.add_argument(
        "--quantize",
        default=None,
        choices=["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"],
        help="the format matrices of other GGUF types (Q5_0, Q5_K, Q3_K, IQ4_NL, ...) are "
        "requantized to (default: Q5_0 -> q8_0, exactly; otherwise the nearest at or above "
        "their bits: Q5_1/Q5_K -> q6_k, "
        "Q2_K/Q3_K/IQ4_* -> q4_k; q8_0 / q4_1 where rows do not divide into 256)",
    )
    cv.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory (default: refuse)",
    )
    cv.set_defaults(func=cmd_convert)


def _add_download_parser(sub) -> None:
    dl = sub.add_parser(
        "download", help="fetch a model from the Hugging Face Hub into the local HF cache"
    )
    dl.add_argument(
        "name",
        help="an alias (tinyllm list), or a repo id such as Qwen/Qwen2.5-0.5B-Instruct[@revision]",
    )
    dl.set_defaults(func=cmd_download)


def _add_list_parser(sub) -> None:
    ls = sub.add_parser("list", help="known aliases and which are present locally")
    ls.set_defaults(func=cmd_list)


def _add_batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="generate for every request of a JSONL file")
    add_model_args(b)
    add_sampling_args(b)
    b.add_argument(
        "-i",
        "--input",
        required=True,
        help="JSONL requests: OpenAI Batch lines (custom_id, body) or {id, prompt|messages, ...} "
        "(required)",
    )
    b.add_argument(
        "-o",
        "--output",
        required=True,
        help="JSONL results, one line per id, appended and fsync'd as each finishes; locked while "
        "a run "
        "writes it (required)",
    )
    b.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="sequences decoded together; refused before starting if it does not fit in memory "
        "(default: 8)",
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="skip the requests already in the output; stops if any of them changed since "
        "(default: off, "
        "a non-empty output is refused)",
    )
    b.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar or model lines on stderr (default: off)",
    )
    from .ray_batch import add_ray_args

    add_ray_args(b)
    b.set_defaults(func=cmd_batch)


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat/completions, completions)"
    )
    add_model_args(sv)
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)",
    )
    sv.add_argument(
        "--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: 8000)"
    )
    sv.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="requests decoded together; more wait in a queue, as they do when the KV cache has no "
        "free blocks for them (default: 8)",
    )
    sv.add_argument(
        "--fanout-slots",
        type=int,
        default=0,
        metavar="N",
        help="while a request of one choice runs, requests of several choices (n > 1, several "
        "prompts) hold at most N batch slots between them, one each at least: its latency then "
        "grows less with the flood's width, at the flood's throughput; worth it where a batch "
        "step costs much more than one sequence's (the numpy backend) (default: 0, no cap)",
    )
    sv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes and /metrics "
        "(default: $TINYLLM_API_KEY, else none)",
    )
    sv.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve /metrics without the API key (default: off: with a key, /metrics needs it too, "
        "since its counts tell an outsider how busy the server is; Prometheus can send it)",
    )
    sv.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model id(s) clients send and /v1/models lists, the first one public (default: "
        "the --model name, its HF repo id and its directory's name; a path is never made public)",
    )
    from .serve_limits import add_limit_args

    add_limit_args(sv)
    sv.set_defaults(func=cmd_serve)


def _add_eval_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="perplexity and KL divergence per KV-cache dtype or study format"
    )
    e.add_argument(
        "--model",
        "-m",
        default=None,
        help="as for the other commands (default: the embedded model)",
    )
    e.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "numpy", "cuda"],
        help="cuda (GPU) or numpy (CPU); auto picks cuda when CuPy sees a GPU (default: auto)",
    )
    e.add_argument(
        "--dtype", default=None, help="compute dtype (default: bf16 on cuda, fp32 on numpy)"
    )
    e.add_argument(
        "--text", default=None, help="text file to score (default: a license text on this machine)"
    )
    e.add_argument(
        "--tokens",
        type=int,
        default=2048,
        help="tokens of the text to score (default: 2048, a few minutes on 2 cores; 4096 for the "
        "full measurement)",
    )
    e.add_argument(
        "--window", type=int, default=1024, help="tokens per evaluated segment (default: 1024)"
    )
    e.add_argument(
        "--kv-dtypes",
        default=None,
        help="real caches, comma-separated; each is compared with the fp32 cache on the same "
        "backend "
        "(default on cuda: fp32,fp16,bf16,int8,fp8; on numpy: bf16,int8,fp8 next to the study "
        "formats)",
    )
    e.add_argument(
        "--kv-formats",
        default=None,
        help="study formats on the numpy backend (fake-quantized caches, tinyllm/kv_formats.py): "
        "fp32, bf16, int8-token, fp8-token, q8_0, fp8-vllm, int8-kivi, int8-kivi-zp, fp8-kivi, "
        "int8-kivi-zp-f16 and fp8-kivi-f16 (what the int8 and fp8 caches store), fp8-kivi-sym, "
        "fp8-kivi-v32 "
        "(default on numpy when --kv-dtypes is not given: "
        "int8-token,q8_0,fp8-token,fp8-vllm next to the real caches bf16,int8,fp8; the fp32 "
        "reference always runs)",
    )
    e.add_argument(
        "--weights",
        default=None,
        help="weight formats to compare instead of KV caches, comma-separated: fp32 (the "
        "unquantized reference), q8_0, q6_k, q4_k, q4_1, q4_0, int4 (quantized at load, KV "
        "cache fp32); q4_k-mse, q4_k-wmse: study searches for q4_k blocks (default: the KV study)",
    )
    e.add_argument(
        "--kivi-block",
        type=int,
        default=16,
        help="tokens per block of the KIVI formats' per-channel key scales (default: 16)",
    )
    e.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinyllm", description="Run LLaMA-family models (Llama, Mistral, Qwen2)."
    )
    p.add_argument("--version", action="version", version=f"tinyllm {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate_parser(sub)
    _add_chat_parser(sub)
    _add_info_parser(sub)
    _add_convert_parser(sub)
    _add_download_parser(sub)
    _add_list_parser(sub)
    _add_batch_parser(sub)
    _add_serve_parser(sub)
    _add_eval_parser(sub)
    # Each subcommand's --help: its one-line summary as the description, and examples.
    for action in sub._choices_actions:
        sp = sub.choices[action.dest]
        sp.description = sp.description or action.help
        sp.epilog = EXAMPLES.get(action.dest)
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


EXAMPLES = {
    "generate": "examples:\n  tinyllm generate 'Once upon a time' --max-tokens 64\n"
    "  echo 'def fib(n):' | tinyllm generate -m qwen2.5-0.5b --temperature 0",
    "chat": "examples:\n"
    "  tinyllm chat                        interactive; /help lists the commands\n"
    "  tinyllm chat 'What is 2+2?'        one answer and exit\n"
    "in the chat:\n  /set temperature=0.7 max_tokens=200   change sampling for the next replies\n"
    "  /stats                              tokens and speed of the last reply\n"
    '  """ ... """                         a multi-line message\n'
    "  /system TEXT, /reset, /bye",
    "info": "examples:\n  tinyllm info -m smollm2-135m\n  tinyllm info -m ./my-model --memory 8GB",
    "convert": "examples:\n  tinyllm convert model.Q8_0.gguf weights/my-model\n"
    "  tinyllm convert model.gguf weights/my-model --overwrite --dtype bfloat16",
    "download": "examples:\n  tinyllm download qwen2.5-0.5b\n"
    "  tinyllm download Qwen/Qwen2.5-0.5B-Instruct@main",
    "list": "examples:\n  tinyllm list            every alias, its repo id, and whether it is here",
    "batch": "examples:\n  tinyllm batch -i requests.jsonl -o results.jsonl --max-batch 8\n"
    "  tinyllm batch -i requests.jsonl -o results.jsonl --resume   after an interruption",
    "serve": "examples:\n  tinyllm serve --port 8000 --max-batch 8\n"
    "  TINYLLM_API_KEY=sk-... tinyllm serve --host 0.0.0.0 --served-model-name my-model",
    "eval": "examples:\n  tinyllm eval -m smollm2-135m --tokens 2048",
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.stderr is None:  # started with stderr closed: nowhere to report anything
        return 2
    args = build_parser().parse_args(argv)
    warnings.showwarning = _warning_line
    try:
        if sys.stdout is None:  # Python sets it to None when fd 1 was closed at start
            raise TinyLLMError(
                "stdout is closed; tinyllm writes its output there: redirect it to a file "
                "or /dev/null instead of closing it"
            )
        return args.func(args)
    except TinyLLMError as e:
        print(f"tinyllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        _silence_stdout()
        return 0


def _warning_line(message, category, filename, lineno, file=None, line=None):
    """Warnings (a context above the model's trained maximum, ...) as one line, without the
    source location Python prints by default."""
    print(f"tinyllm: warning: {message}", file=sys.stderr)


def _silence_stdout():
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does
    not report the same error again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
