"""Kernel loading: cuda/*.cu -> one cupy.RawModule per (file, variant), compiled once per
process (lazily, on first use) and cached on disk by CuPy.

Owns the tile table (TILES: every block/tile size, passed to the kernels as -D defines and
read by the launch code, so the two never disagree), the source assembly (cuda/common.cuh is
INLINED: CuPy's disk cache keys on the source text and would not see a header edit) and the
compile options (no -arch: CuPy adds the device's). Does not know what the kernels compute:
cuda_backend.py launches them. Imports cupy only inside functions, so scripts/check_kernels.py
can build the exact same sources and options on a machine without a GPU.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

# ---- where the kernels live ----------------------------------------------------------------


def _find_cuda_dir() -> Path:
    """cuda/ sits at the repository root next to tinyllm/ (a source checkout or an editable
    install); a wheel ships it as tinyllm/cuda. TINYLLM_CUDA_DIR overrides both."""
    env = os.environ.get("TINYLLM_CUDA_DIR")
    pkg = Path(__file__).resolve().parent.parent  # .../tinyllm
    candidates = ([Path(env)] if env else []) + [pkg.parent / "cuda", pkg / "cuda"]
    for c in candidates:
        if (c / "common.cuh").is_file():
            return c
    return candidates[0]


CUDA_DIR = _find_cuda_dir()

# ---- the tile table --------------------------------------------------------------------------
# Measurement notes go beside each entry once a GPU has timed it (scripts/bench_gpu.py).
TILES = {
    "GATHER_THREADS": 256,  # embedding / take_rows copy
    "RMS_THREADS": 256,  # one block per row; dim 4096 = 2 16-byte chunks per thread
    "SWIGLU_THREADS": 256,
    "GEMV_WARPS": 8,  # output columns per block (one warp each)
    "GEMV_UNROLL": 4,  # 16-byte weight loads in flight per lane
    "QGEMV_WARPS": 8,  # quantized GEMV (quant_matmul.cu): output columns per block
    "QGEMV_UNROLL": 2,  #   lane units in flight (q6_k: half as many, 48 bytes each); at 4,
    # ptxas (sm_90) gave q6_k 251-255 registers at M 6-8 and spilled q4_k: at 2, <= 100, none
    "DEQUANT_THREADS": 256,  # quantized weight -> bf16 (the prefill path)
    "ROPE_WARPS": 4,  # (token, head) vectors per block
    "CLOSE_THREADS": 128,  # kv_close: channels of one (sequence, kv head) in flight
    "FA1_WARPS": 4,  # prefill v1 (FMA): warps per CTA
    "FA1_RPW": 4,  #   rows per warp -> 16-row tiles
    "FA2_BN": 64,  # prefill v2 (mma.sync): keys per tile (rows per CTA fixed at 64)
    "DEC_WARPS": 4,  # decode split kernel: warps per CTA
    "DEC_UNROLL": 4,  #   keys per lane group loaded before use
    "DEC_RED_THREADS": 128,  # decode reduce: threads per (seq, head); must be >= head_dim
    "SAMPLE_THREADS": 1024,  # argmax / sampling: one block per row
}
FA2_BM = 64  # rows per prefill-v2 CTA (4 warps x 16, fixed by the kernel)
GEMV_MAX_M = 8  # gemv_bf16_m1..m8 exist; more rows go to cuBLAS
HEAD_DIMS = (64, 128)  # compiled head-dim tiles; smaller head_dims are zero-padded
DECODE_REPS = (1, 2, 4, 8)  # query heads per decode CTA (more are split over CTAs)

# Cache storage kinds -> the KV_KIND define (cuda/common.cuh KVT<KIND>).
KV_KINDS = {"bf16": 0, "fp16": 1, "fp32": 2, "int8": 3, "fp8": 4}

# Files compiled once per KV storage kind (only the kinds in use are ever compiled); kv_close.cu
# only exists for the quantized kinds.
KV_VARIANT_FILES = ("rope_kv.cu", "kv_close.cu", "attention_prefill.cu", "attention_decode.cu")
QUANTIZED_ONLY_FILES = ("kv_close.cu",)

# Base options: CuPy itself adds -arch=sm_XX, -ftz=true, --device-as-default-execution-space
# and the CUDA/CCCL include paths; --std=c++17 is its default too but stated for clarity.
# No --use_fast_math: the kernels pick fast intrinsics explicitly (exp2f in softmax), and the
# quantization path relies on IEEE division (__fdiv_rn) either way.
BASE_OPTIONS = ("--std=c++17", "-lineinfo")

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.M)


def kernel_files() -> list[str]:
    return sorted(p.name for p in CUDA_DIR.glob("*.cu"))


def source(filename: str) -> str:
    """The file's text with every local #include "x.cuh" inlined (each header once)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        path = CUDA_DIR / name
        text = path.read_text(encoding="utf-8")

        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// (already inlined: {inc})"
            seen.add(inc)
            body = expand(inc).replace("#pragma once", "")
            nxt = text[: m.end()].count("\n") + 2  # line number of the line after the include
            return f'#line 1 "{inc}"\n{body}\n#line {nxt} "{name}"'

        return _INCLUDE.sub(repl, text)

    return expand(filename)


def variants(filename: str) -> list[dict]:
    """Extra defines each compiled variant of a file gets."""
    if filename in KV_VARIANT_FILES:
        kinds = (
            (KV_KINDS["int8"], KV_KINDS["fp8"])
            if filename in QUANTIZED_ONLY_FILES
            else KV_KINDS.values()
        )
        return [{"KV_KIND": k} for k in sorted(set(kinds))]
    return [{}]


def options(extra: dict | None = None) -> tuple[str, ...]:
    defs = dict(TILES)
    defs.update(extra or {})
    return BASE_OPTIONS + tuple(f"-D{k}={v}" for k, v in sorted(defs.items()))


# ---- runtime (needs CuPy and a GPU) -----------------------------------------------------------


@cache
def _module(filename: str, extra: tuple):
    import cupy

    return cupy.RawModule(code=source(filename), options=options(dict(extra)))


_kernels: dict = {}


def get(filename: str, name: str, smem: int = 0, **extra):
    """The RawKernel `name` of `filename` compiled with the extra defines; `smem` > 48 KB of
    dynamic shared memory is enabled on the kernel (once)."""
    key = (filename, name, tuple(sorted(extra.items())))
    k = _kernels.get(key)
    if k is None:
        k = _module(filename, key[2]).get_function(name)
        _kernels[key] = k
    if smem > 48 * 1024 and k.max_dynamic_shared_size_bytes < smem:
        k.max_dynamic_shared_size_bytes = smem
    return k


def prefill_v2_smem(head_dim_tile: int) -> int:
    """Dynamic shared memory of flash_prefill_hd*_v2: Q, K and V tiles of (HD + 8) bf16 columns."""
    return (FA2_BM + 2 * TILES["FA2_BN"]) * (head_dim_tile + 8) * 2
