"""The memory plan, decided once: weights + KV-cache pool + working memory, on the host or the GPU.

LLM asks this module, and only this module, how many KV blocks the pool gets (`budget_blocks`;
on a GPU without a budget, `measure_working` then `gpu_pool_blocks`), and hands the resulting
KVCacheSpec down to the engine. Three cases:

- an explicit budget (--kv-cache-memory): as many blocks as it holds;
- host (numpy backend): max_batch sequences of max_seq_len, checked against MemAvailable
  with the estimate below before anything large is allocated (check_host_fits);
- GPU (a backend with device_memory): before loading, weights + one sequence's blocks + an
  *estimate* of the working memory must fit (early refusal with the longest context that
  would); after loading, a warm-up forward of the largest step (one prefill chunk and
  max_batch - 1 decode tokens, in a scratch cache) is *measured* by the backend (the CuPy
  pool's high-water mark), and the pool gets what GPU_MEMORY_UTILIZATION of the memory then
  free holds next to that measured peak and the decode graphs' buffers, capped at max_batch
  sequences of max_seq_len (nano-vllm sizes its pool the same way).

Working memory of one numpy forward over a chunk of T <= prefill_chunk tokens (float32):
  activations   T * (4*dim + 3*q_dim + 2*kv_dim + 3*hidden_dim) * 4   x, h, q, k, v, a, gate, up, m
  attention     3 * n_heads * T * capacity * 4                        scores, mask, softmax
                                                                      (one sequence at a time)
  cache reads   2 * capacity * kv_dim * 4                             one layer's k, v as float32
  logits        max(T, max_batch) * vocab_size * 4
  dequantized   the largest quantized matrix as float32 (numpy's linear rebuilds one at a time)
plus a fixed FIXED_OVERHEAD for the interpreter, numpy/BLAS buffers and the tokenizer.

Weights count what the loader holds (`weights_nbytes`): quantized matrices at their format's
bytes (quant.py: q4_0 is 18 bytes per 32 weights), the rest at the compute dtype's (4 bytes on
numpy, 2 on cuda, 2 for a bf16 checkpoint on cpu: backend.float_bytes). Mistral-7B: 29.0 GB
in float32, 14.5 GB in bf16, 4.1 GB with q4_0 matrices and a bf16 embedding table.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace

import numpy as np

from . import quant
from .config import ModelConfig
from .errors import TinyLLMError
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCacheSpec

FIXED_OVERHEAD = 384 * 2**20
GPU_MEMORY_UTILIZATION = 0.9  # the share of free GPU memory the default KV pool may take (as vLLM)
# cuBLAS's default workspace is 32 MiB on Hopper (4 MiB before): CUDA docs, cublasSetWorkspace.
CUBLAS_WORKSPACE = 32 * 2**20
GPU_CONTEXT_MARGIN = (
    256 * 2**20
)  # allocations outside CuPy's pool (modules, cuBLAS handles, graphs)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt])(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
MAX_MEMORY = 2**60  # an exabyte: anything larger is a typo


def parse_memory(text: str) -> int:
    """'24GB', '512MiB', '1.5G' -> bytes (GB and GiB both mean 2**30: memory, not disks).
    A unit is required; zero, negative, non-finite and absurd sizes are errors."""
    t = str(text).strip()
    m = _SIZE.match(t)
    if not m:
        if re.fullmatch(r"[0-9.eE+]+", t):
            raise TinyLLMError(f"memory size {text!r} has no unit; write it like {t}GB or {t}MB")
        if t.startswith("-"):
            raise TinyLLMError(f"memory size {text!r} is negative; write a size like 24GB")
        raise TinyLLMError(f"cannot read memory size {text!r}; write it like 24GB or 512MB")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value > MAX_MEMORY:
        raise TinyLLMError(f"memory size {text!r} is too large; write a size like 24GB")
    if value < 1:
        raise TinyLLMError(f"memory size {text!r} must be more than zero")
    return int(value)


def weights_nbytes(cfg: ModelConfig, float_bytes: int, formats: dict | None = None) -> int:
    """Bytes of the weights as held: `formats` (HF name -> quant format, weights.planned_formats)
    at their quantized size, every other tensor at float_bytes per value."""
    from .weights import expected_shapes

    formats = formats or {}
    total = 0
    for name, shape in expected_shapes(cfg).items():
        fmt = formats.get(name)
        total += quant.quant_nbytes(fmt, *shape) if fmt else math.prod(shape) * float_bytes
    return total


def dequant_scratch(cfg: ModelConfig, formats: dict | None) -> int:
    """float32 bytes of the largest quantized matrix: numpy's linear rebuilds one at a time."""
    from .weights import expected_shapes

    shapes = expected_shapes(cfg)
    return max((math.prod(shapes[n]) * 4 for n in (formats or {}) if n in shapes), default=0)


def formats_for(cfg: ModelConfig, quantization: str | None) -> dict:
    from .weights import planned_formats

    return planned_formats(cfg, quantization, {})


@dataclass(frozen=True)
class HostPlan:
    weights: int  # bytes as held (float32, quantized matrices at their size)
    kv: int  # bytes of the KV cache (the whole pool)
    runtime: int  # bytes of working memory at the largest step

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.runtime


def activation_elems(cfg: ModelConfig, t: int) -> int:
    """Activation values of one forward over t tokens: x, h, q|k|v, a, gate, up, m (module doc)."""
    return t * (4 * cfg.dim + 3 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.hidden_dim)


def host_plan(
    cfg: ModelConfig,
    kv_dtype: str,
    max_seq_len: int,
    max_batch: int,
    chunk: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    n_blocks: int | None = None,
    formats: dict | None = None,
    float_bytes: int = 4,
) -> HostPlan:
    """float_bytes: bytes per unquantized weight as the backend holds it
    (backend.float_bytes(cfg.torch_dtype): 4 on numpy, 2 for bf16 kept as bf16 on cpu)."""
    spec = KVCacheSpec.for_model(
        cfg, kv_dtype, max_seq_len, max_batch, chunk=chunk, block_size=block_size, n_blocks=n_blocks
    )
    t = min(chunk, max_seq_len)
    act = activation_elems(cfg, t) * 4
    attn = 3 * cfg.n_heads * t * spec.capacity * 4 + 2 * spec.capacity * cfg.kv_dim * 4
    logits = max(t, max_batch) * cfg.vocab_size * 4
    runtime = act + attn + logits + dequant_scratch(cfg, formats) + FIXED_OVERHEAD
    return HostPlan(weights_nbytes(cfg, float_bytes, formats), spec.nbytes(), runtime)


def largest(fits, lo: int, hi: int) -> int:
    """The largest v in [lo, hi] with fits(v) (fits is monotone, decreasing); lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_host_fits(
    cfg: ModelConfig,
    kv_dtype: str,
    max_seq_len: int,
    max_batch: int,
    chunk: int,
    available: int | None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    n_blocks: int | None = None,
    formats: dict | None = None,
    float_bytes: int = 4,
) -> None:
    """Raise TinyLLMError with the numbers, and the largest context and batch that fit,
    unless the plan fits in `available` bytes (None: unknown, not checked). A float model
    that does not fit is told which --quantize would (never quantized silently)."""
    from .weights import fmt_bytes

    if available is None:
        return
    # plan_of(context, batch, **overrides): this model's plan at another size
    plan_of = functools.partial(
        host_plan, cfg, kv_dtype, chunk=chunk, formats=formats, float_bytes=float_bytes
    )
    asked = dict(block_size=block_size, n_blocks=n_blocks)
    plan = plan_of(max_seq_len, max_batch, **asked)
    if plan.total <= available:
        return
    what = "float32" if float_bytes == 4 else "bf16"
    if formats:
        what = f"quantized ({', '.join(sorted(set(formats.values())))}; the rest {what})"
    msg = (
        f"context {max_seq_len} x batch {max_batch} needs {fmt_bytes(plan.total)} of RAM "
        f"({fmt_bytes(plan.weights)} {what} weights + {fmt_bytes(plan.kv)} {kv_dtype} KV cache + "
        f"{fmt_bytes(plan.runtime)} working memory) and {fmt_bytes(available)} is available"
    )
    quantize_hint = ""
    if not formats:
        fits = quantize_that_fits(
            lambda f: plan_of(max_seq_len, max_batch, **asked, formats=f).total <= available, cfg
        )
        if fits:
            quantize_hint = f"; --quantize {fits} would fit (weights quantized at load)"
    if plan_of(2, 1).total > available:
        raise TinyLLMError(
            f"{msg}; even the weights with the smallest cache do not fit"
            + (quantize_hint or ": use a smaller model or --backend cuda")
        )
    hints = [quantize_hint[2:]] if quantize_hint else []
    hints += _host_flag_hints(
        plan_of, plan, available, max_seq_len, max_batch, block_size, n_blocks
    )
    if kv_dtype in ("fp32", "fp16", "bf16"):
        hints.append("--kv-dtype int8 stores the cache in a quarter of fp32's space")
    raise TinyLLMError(f"{msg}; " + "; ".join(hints))


def pool_hint(pool: int, room: int) -> str:
    """The hint when a --kv-cache-memory pool of `pool` bytes does not fit and `room` (> 0)
    bytes would (host and GPU plans alike)."""
    from .weights import fmt_bytes

    return (
        f"the --kv-cache-memory pool takes {fmt_bytes(pool)}: at most {fmt_bytes(room)} fits "
        "next to the weights and working memory"
    )


def _host_flag_hints(
    plan_of, plan: HostPlan, available: int, max_seq_len, max_batch, block_size, n_blocks
) -> list[str]:
    """The flag at fault in a host plan that does not fit: a pool sized by --kv-cache-memory,
    or a --block-size that makes blocks (and so the per-sequence working set) large, before
    the context and the batch (the largest of each that fits with the other)."""
    if n_blocks is not None:
        room = available - (plan.total - plan.kv)
        return [pool_hint(plan.kv, room) if room > 0 else "lower --kv-cache-memory"]
    if block_size != DEFAULT_BLOCK_SIZE and (plan_of(max_seq_len, max_batch).total <= available):
        return [
            f"--block-size {block_size} is what does not fit: the default {DEFAULT_BLOCK_SIZE} does"
        ]

    def total(n: int, b: int) -> int:
        return plan_of(n, b, block_size=block_size).total

    hints = []
    ctx = largest(lambda n: total(n, max_batch) <= available, 2, max_seq_len)
    batch = largest(lambda b: total(max_seq_len, b) <= available, 1, max_batch)
    if 2 <= ctx < max_seq_len:
        hints.append(f"the largest --ctx-size that fits with --max-batch {max_batch} is {ctx}")
    if 1 <= batch < max_batch:
        hints.append(f"the largest --max-batch that fits with --ctx-size {max_seq_len} is {batch}")
    return hints or ["lower both --ctx-size and --max-batch"]


# The order --quantize hints try: the best quality first (BENCHMARKS.md, issue 20's table).
QUANTIZE_PREFERENCE = ("q8_0", "q6_k", "q4_k", "q4_1", "q4_0")


def quantize_that_fits(fits, cfg: ModelConfig) -> str | None:
    """The first format of QUANTIZE_PREFERENCE with fits(formats) true, or None."""
    for fmt in QUANTIZE_PREFERENCE:
        if fits(formats_for(cfg, fmt)):
            return fmt
    return None


# ---- the KV pool: how many blocks ----------------------------------------------------------------


def budget_blocks(one_block: KVCacheSpec, kv_cache_memory) -> int | None:
    """Blocks in a pool of kv_cache_memory bytes ('4GB' or an int); None: the default pool."""
    if kv_cache_memory is None:
        return None
    budget = parse_memory(kv_cache_memory) if isinstance(kv_cache_memory, str) else kv_cache_memory
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise TinyLLMError(
            f"kv_cache_memory={kv_cache_memory!r} must be a size like '4GB' or a byte count >= 1"
        )
    n = budget // one_block.block_nbytes()
    if n < 1:
        raise TinyLLMError(
            f"kv_cache_memory={kv_cache_memory!r} holds no KV block: one block of "
            f"{one_block.block_size} tokens takes {one_block.block_nbytes():,} bytes for "
            f"this model (--kv-cache-memory)"
        )
    return int(n)


def engine_for_model(
    model,
    tokenizer,
    backend,
    eos_ids: set[int],
    max_seq_len: int,
    kv_dtype: str,
    max_batch: int = 8,
    prefill_chunk: int = 512,
    block_size: int = DEFAULT_BLOCK_SIZE,
    n_blocks: int | None = None,
    prefix_caching: bool = True,
):
    """An Engine with the pool of max_batch sequences of max_seq_len (or n_blocks blocks), for
    tools and tests that plan no memory (LLM hands down its own plan's spec):

        engine_for_model(llm.model, llm.tokenizer, llm.backend, set(), 64, "fp32", max_batch=1)
    """
    from .engine import Engine

    spec = KVCacheSpec.for_model(
        model.cfg,
        kv_dtype,
        max_seq_len,
        max_batch,
        chunk=prefill_chunk,
        block_size=block_size,
        n_blocks=n_blocks,
    )
    return Engine(
        model, tokenizer, backend, eos_ids, spec, max_batch, prefill_chunk, prefix_caching
    )


def gpu_working_estimate(cfg: ModelConfig, chunk: int, max_batch: int) -> int:
    """Working memory of the largest step *before* it can be measured (the pre-load check,
    `tinyllm info`): T = chunk + max_batch - 1 tokens of bf16 activations (x, h, q|k|v,
    attention out, gate|up, m: the same terms as the host plan), max_batch rows of float32
    logits, cuBLAS's workspace and a margin for allocations outside CuPy's pool."""
    act = activation_elems(cfg, chunk + max_batch - 1) * 2
    return act + max_batch * cfg.vocab_size * 4 + CUBLAS_WORKSPACE + GPU_CONTEXT_MARGIN


def measure_working(backend, model, spec: KVCacheSpec, chunk: int, max_batch: int) -> int:
    """The measured working memory of the largest step: a forward of one prompt chunk and
    max_batch - 1 decode tokens through a scratch cache of just their blocks, as the backend's
    allocator saw it (backend.measure_peak), plus what lives outside CuPy's pool (cuBLAS's
    workspace and the margin: the same terms gpu_working_estimate adds)."""
    from .backends import Batch

    t = max(1, min(chunk, spec.max_chunk))
    bs, first = spec.block_size, -(-(t + 1) // spec.block_size)
    scratch = KVCacheSpec(
        spec.n_layers,
        first + max_batch - 1,
        bs,
        first,
        spec.n_kv_heads,
        spec.head_dim,
        spec.kv_dtype,
        spec.window,
        first * bs,
        n_open=max_batch + 1,
    )
    tables = np.full((max_batch, first), -1, np.int32)
    tables[0] = np.arange(first)
    tables[1:, 0] = first + np.arange(max_batch - 1)
    batch = Batch(tables, [0] * max_batch, [t] + [1] * (max_batch - 1), list(range(max_batch)))
    tokens = np.zeros(t + max_batch - 1, np.int32)
    cache = backend.alloc_kv(scratch)  # (freed on return, before the pool is sized)
    peak = backend.measure_peak(lambda: model.forward(tokens, batch, cache))
    return peak + CUBLAS_WORKSPACE + GPU_CONTEXT_MARGIN


def gpu_pool_blocks(backend, full: KVCacheSpec, working: int, graph_bytes: int) -> int:
    """The default GPU pool after the weights are loaded: GPU_MEMORY_UTILIZATION of the free
    memory, less the measured working memory and the decode graphs' buffers, in blocks; at
    most `full` (max_batch sequences of max_seq_len); at least one sequence's ring."""
    from .weights import fmt_bytes

    free = backend.free_memory()
    room = int(GPU_MEMORY_UTILIZATION * free) - working - graph_bytes
    n = min(full.n_blocks, max(room, 0) // full.block_nbytes())
    if n < full.ring:
        bs = full.block_size
        fix = (
            f"--block-size {bs} is what does not fit (a sequence takes whole blocks of {bs} "
            f"tokens): the default {DEFAULT_BLOCK_SIZE} does"
            if _default_block_fits(full, room)
            else "lower --ctx-size or --max-batch, or use --kv-dtype int8"
        )
        raise TinyLLMError(
            f"after loading the weights {fmt_bytes(free)} of GPU memory is free; the working "
            f"memory ({fmt_bytes(working)} measured) and decode graphs ({fmt_bytes(graph_bytes)}) "
            f"leave room for {n} KV blocks of {bs} tokens and one sequence of "
            f"{full.max_seq_len} tokens needs {full.ring}: {fix}"
        )
    return int(n)


def _default_block_fits(full: KVCacheSpec, room: int) -> bool:
    """Whether one sequence of a model without a sliding window fits in `room` bytes at the
    default block size, when another was asked (its ring is then the context in whole blocks;
    the working memory measured with the larger blocks is, if anything, an overestimate)."""
    if full.block_size == DEFAULT_BLOCK_SIZE or full.window:
        return False
    ring = -(-full.max_seq_len // DEFAULT_BLOCK_SIZE)
    small = replace(full, block_size=DEFAULT_BLOCK_SIZE, ring=ring, n_blocks=ring)
    return max(room, 0) // small.block_nbytes() >= ring


def check_gpu_fits(
    backend,
    cfg: ModelConfig,
    spec_of,
    max_batch: int,
    n_blocks: int | None,
    chunk: int,
    graph_bytes_of,
    formats: dict | None = None,
) -> None:
    """Before loading: bf16 weights + the KV pool (n_blocks, or for the default pool the one
    sequence it must at least hold) + the estimated working memory + decode graphs must fit in
    free GPU memory; else the backend's refusal names the longest context, and the largest
    --max-batch that fits is added; a float model is told which --quantize would fit.
    spec_of(batch, n_blocks) -> KVCacheSpec; graph_bytes_of(batch)."""

    def beside_kv(batch: int, formats=formats) -> tuple[int, int]:
        """(weights + decode graphs, working memory) at this batch: what the pool sits beside."""
        fixed = weights_nbytes(cfg, 2, formats) + graph_bytes_of(batch)
        return fixed, gpu_working_estimate(cfg, chunk, batch)

    def check(batch: int, formats=formats):
        spec = spec_of(batch, n_blocks)
        kv = (
            spec.nbytes()
            if n_blocks is not None
            else spec.ring * spec.block_nbytes() + spec.open_nbytes()
        )
        fixed, working = beside_kv(batch, formats)
        backend.check_fits(
            fixed,
            kv,
            working,
            # (a --kv-cache-memory pool does not shrink with the context: no longest context)
            kv_bytes_per_token=cfg.kv_bytes_per_token(spec.kv_dtype) if n_blocks is None else None,
            max_seq_len=spec.max_seq_len,
        )

    try:
        check(max_batch)
    except TinyLLMError as e:
        fmt = None if formats else quantize_that_fits(lambda f: _fits(check, max_batch, f), cfg)
        if fmt:
            raise TinyLLMError(
                f"{e}; --quantize {fmt} would fit (weights quantized at load)"
            ) from None
        if n_blocks is not None:  # the flag at fault is the pool's, not the context or batch
            room = backend.free_memory() - sum(beside_kv(max_batch))
            if room <= 0:
                raise
            kv = spec_of(max_batch, n_blocks).nbytes()
            raise TinyLLMError(f"{e}; {pool_hint(kv, room)}") from None
        best = largest(lambda b: _fits(check, b), 1, max_batch - 1) if max_batch > 1 else 0
        if best < 1:
            raise
        raise TinyLLMError(
            f"{e}; with context {spec_of(1, None).max_seq_len} the largest --max-batch "
            f"that fits is {best}"
        ) from None


def _fits(check, *args) -> bool:
    try:
        check(*args)
    except TinyLLMError:
        return False
    return True
