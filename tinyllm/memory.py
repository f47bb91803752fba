"""Host memory plan for the numpy backend: weights + KV cache + runtime working memory,
checked against MemAvailable before anything large is allocated. (The cuda backend checks
free GPU memory itself: CudaBackend.check_fits.)

Working memory of one numpy forward over a chunk of T <= prefill_chunk tokens (float32):
  activations   T * (4*dim + 3*q_dim + 2*kv_dim + 3*hidden_dim) * 4     x, h, q, k, v, a, gate, up, m
  attention     3 * n_heads * T * capacity * 4                          scores, mask, softmax (one sequence at a time)
  cache reads   2 * capacity * kv_dim * 4                               one layer's k, v as float32
  logits        max(T, max_batch) * vocab_size * 4
plus a fixed FIXED_OVERHEAD for the interpreter, numpy/BLAS buffers and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import TinyLLMError
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCacheSpec

FIXED_OVERHEAD = 384 * 2**20


@dataclass(frozen=True)
class HostPlan:
    weights: int      # bytes, float32
    kv: int           # bytes of the KV cache (the whole pool)
    runtime: int      # bytes of working memory at the largest step

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.runtime


def host_plan(cfg: ModelConfig, kv_dtype: str, max_seq_len: int, max_batch: int, chunk: int,
              block_size: int = DEFAULT_BLOCK_SIZE, n_blocks: int | None = None) -> HostPlan:
    spec = KVCacheSpec.for_model(cfg, kv_dtype, max_seq_len, max_batch, chunk=chunk, block_size=block_size,
                                 n_blocks=n_blocks)
    t = min(chunk, max_seq_len)
    act = t * (4 * cfg.dim + 3 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.hidden_dim) * 4
    attn = 3 * cfg.n_heads * t * spec.capacity * 4 + 2 * spec.capacity * cfg.kv_dim * 4
    logits = max(t, max_batch) * cfg.vocab_size * 4
    return HostPlan(cfg.n_params() * 4, spec.nbytes(), act + attn + logits + FIXED_OVERHEAD)


def largest(fits, lo: int, hi: int) -> int:
    """The largest v in [lo, hi] with fits(v) (fits is monotone, decreasing); lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_host_fits(cfg: ModelConfig, kv_dtype: str, max_seq_len: int, max_batch: int, chunk: int,
                    available: int | None, block_size: int = DEFAULT_BLOCK_SIZE,
                    n_blocks: int | None = None) -> None:
    """Raise TinyLLMError with the numbers, and the largest context and batch that fit,
    unless the plan fits in `available` bytes (None: unknown, not checked)."""
    from .weights import fmt_bytes
    if available is None:
        return
    plan = host_plan(cfg, kv_dtype, max_seq_len, max_batch, chunk, block_size, n_blocks)
    if plan.total <= available:
        return
    msg = (f"context {max_seq_len} x batch {max_batch} needs {fmt_bytes(plan.total)} of RAM "
           f"({fmt_bytes(plan.weights)} float32 weights + {fmt_bytes(plan.kv)} {kv_dtype} KV cache + "
           f"{fmt_bytes(plan.runtime)} working memory) and {fmt_bytes(available)} is available")
    base = host_plan(cfg, kv_dtype, 2, 1, chunk)
    if base.total > available:
        raise TinyLLMError(f"{msg}; even the weights with the smallest cache do not fit: "
                           f"use a smaller model or --backend cuda")
    ctx = largest(lambda n: host_plan(cfg, kv_dtype, n, max_batch, chunk).total <= available, 2, max_seq_len)
    batch = largest(lambda b: host_plan(cfg, kv_dtype, max_seq_len, b, chunk).total <= available, 1, max_batch)
    hints = []
    if ctx >= 2:
        hints.append(f"the largest --ctx-size that fits with --max-batch {max_batch} is {ctx}")
    if batch >= 1:
        hints.append(f"the largest --max-batch that fits with --ctx-size {max_seq_len} is {batch}")
    if not hints:
        hints.append("lower both --ctx-size and --max-batch")
    if kv_dtype in ("fp32", "fp16", "bf16"):
        hints.append("--kv-dtype int8 stores the cache in a quarter of fp32's space")
    raise TinyLLMError(f"{msg}; " + "; ".join(hints))
