"""Backends: the op interface the model is written against, and how to pick one.

A backend provides these ops (arrays are the backend's own type; shapes in comments).
The model never asks which backend it runs on.

    name, compute_dtype                    "numpy"/"cpu"/"cuda", "fp32"/"bf16"/"fp16"
    upload(name, a: np.ndarray)            a weight to the device, in the compute dtype
    upload_quant(name, qt: QuantTensor) -> handle
                                           a weight-only quantized matrix (quant.py's
                                           layout, formats in `quant_formats`) to the
                                           device; `linear` accepts the handle as w
    to_numpy(x) -> np.ndarray float32
    alloc_kv(spec: KVCacheSpec) -> cache   zeroed storage per kv_cache.py's layout
    prepare(batch: Batch) -> batch'        per-forward metadata (device copies on cuda)
    embed(table, tokens) -> x              (V, dim), (T,) int32 -> (T, dim)
    rms_norm(x, w, eps)                    x / sqrt(mean(x²) + eps) * w
    add_rms_norm(x, d, w, eps) -> (x+d, rms_norm(x+d, w, eps))
    linear(x, w, b=None)                   x @ wᵀ + b; w is HF (out, in), a float array
                                           or an upload_quant handle (x stays float)
    silu_mul(gate, up)                     silu(gate) * up
    rope_kv_write(q, k, v, cache, layer, batch, inv_freq) -> q
                                           rotate q (T, n_heads, hd) and k (T, n_kv, hd)
                                           (rotate-half), write k, v at each token's cache
                                           entry through its block table (quantizing if the
                                           cache is int8/fp8)
    attention(q, cache, layer, batch, scale) -> (T, n_heads*hd)
                                           causal (+ sliding window) GQA attention of the
                                           batch's queries over their sequences' blocks
    take_rows(x, rows)                     x[rows]

and declares what it can do beyond that (class attributes; nothing probes with hasattr):

    graphs            None, or the captured decode graphs (cuda_graphs.DecodeGraphs)
    device_sampling   sample(logits, temperature, top_k, top_p, seeds, steps) draws on the device
    device_memory     weights and KV live in device memory: free_memory(), total_memory(),
                      peak_memory() and check_fits() exist (memory.py plans with them)
    fused_projections concat_rows(arrays) fuses q|k|v and gate|up into one matrix each
                      (arrays all float, or all upload_quant handles of one format; the
                      model does not fuse a group of mixed formats)
    quant_formats     the quant.py formats upload_quant/linear take (() for none); the
                      loader refuses other formats with a message before uploading
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TinyLLMError

BACKENDS = ("numpy", "cpu", "cuda", "auto")
CUDA_INSTALL_HINT = "pip install 'tinyllm[cuda12]' (CUDA 12) or 'tinyllm[cuda13]' (CUDA 13)"


@dataclass
class Batch:
    """One forward's ragged batch: sequence b reads and writes the cache blocks its block
    table tables[b] names (kv_cache.py) and brings lens[b] new tokens at positions
    starts[b] .. starts[b]+lens[b]-1 (starts[b] tokens are cached). Tokens of all sequences
    are concatenated in that order (T = lens.sum()). An int8/fp8 cache keeps sequence b's
    open block of keys in open row opens[b] (kv_cache.py; default: row b)."""

    tables: np.ndarray  # (B, R) int32 block ids, -1 where unused
    starts: np.ndarray  # (B,) int32
    lens: np.ndarray  # (B,) int32
    opens: np.ndarray | None = None  # (B,) int32

    def __post_init__(self):
        self.opens = np.asarray(
            np.arange(len(self.lens)) if self.opens is None else self.opens, np.int32
        )
        self.tables = np.ascontiguousarray(
            np.asarray(self.tables, np.int32).reshape(len(self.lens), -1)
        )
        self.starts = np.asarray(self.starts, np.int32)
        self.lens = np.asarray(self.lens, np.int32)
        self.cu_lens = np.concatenate([[0], np.cumsum(self.lens)]).astype(np.int32)  # (B+1,)
        self.positions = (
            np.concatenate(
                [np.arange(s, s + n, dtype=np.int32) for s, n in zip(self.starts, self.lens)]
            )
            if len(self.lens)
            else np.zeros(0, np.int32)
        )  # (T,)
        self.seq_of_token = np.repeat(np.arange(len(self.lens), dtype=np.int32), self.lens)
        self.last_rows = self.cu_lens[1:] - 1  # (B,)

    @property
    def n_tokens(self) -> int:
        return int(self.cu_lens[-1])


def cuda_available() -> bool:
    try:
        import cupy
    except Exception:
        return False
    try:
        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


def auto_backend() -> tuple[str, str]:
    """What --backend auto picks, and why: cuda when CuPy sees a GPU, else cpu when numba
    imports (compiled kernels), else numpy."""
    if cuda_available():
        return "cuda", "CuPy sees a GPU"
    import importlib.util

    no_gpu = "no GPU visible to CuPy" if importlib.util.find_spec("cupy") else "CuPy not installed"
    if numba_available():
        return "cpu", f"{no_gpu}; numba compiles the CPU kernels"
    return "numpy", f"{no_gpu}, numba not installed: pip install 'tinyllm[cpu]'"


def float_bytes(backend: str, checkpoint_dtype: str) -> int:
    """Bytes per unquantized weight as `backend` holds it (the memory plans): numpy float32
    whatever is read; cpu keeps a bf16 checkpoint's matrices bf16 (2; the few 1-D norms,
    float32 there, are counted at 2 too: kilobytes), else float32; cuda bf16."""
    if backend == "cuda":
        return 2
    return 2 if backend == "cpu" and checkpoint_dtype == "bfloat16" else 4


def get_backend(
    name: str = "numpy",
    dtype: str | None = None,
    checkpoint_dtype: str = "float32",
    threads: int = 1,
):
    """Instantiate a backend ('auto': see auto_backend). `threads`: the cpu backend's numba
    threads (threads.py's choice)."""
    if name not in BACKENDS:
        raise TinyLLMError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        name = auto_backend()[0]
    if name in ("numpy", "cpu"):
        if dtype not in (None, "fp32", "float32"):
            raise TinyLLMError(
                f"the {name} backend computes in float32 only (got dtype={dtype!r}); "
                "drop --dtype or use --backend cuda"
            )
        if name == "numpy":
            from .numpy_backend import NumpyBackend

            return NumpyBackend()
        if not numba_available():
            raise TinyLLMError(
                "the cpu backend needs numba: pip install 'tinyllm[cpu]' (or use --backend numpy)"
            )
        from .cpu_backend import CpuBackend

        return CpuBackend(threads)
    try:
        import cupy  # noqa: F401
    except Exception:
        raise TinyLLMError(f"the cuda backend needs CuPy: {CUDA_INSTALL_HINT}") from None
    if not cuda_available():
        raise TinyLLMError(
            "the cuda backend needs an NVIDIA GPU, and CuPy sees none; use --backend numpy"
        )
    from .cuda_backend import CudaBackend

    return CudaBackend(dtype=dtype, checkpoint_dtype=checkpoint_dtype)
