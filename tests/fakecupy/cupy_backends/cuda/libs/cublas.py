"""cuBLAS gemmEx for the CuPy stand-in (see tests/fakecupy/cupy/__init__.py): only the call
tinyllm makes (row-major y = x . w^T as column-major "TN", bf16 inputs, fp32 compute, bf16 or
fp32 output, alpha 1, beta 0), computed in float64 from the raw, bounds-checked pointers. As
in CuPy 14, it cannot be called while a stream captures a CUDA graph."""

import ctypes
import time

import numpy as np

import cupy
from cupy import mem
from cupy._emu import bf2f, f2bf

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
           computeType, algo):
    if cupy._capturing is not None:      # CuPy's cublas.setStream refuses (cupy/cupy#6290)
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
    t0 = time.perf_counter()
    _gemm(m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, transa, transb)
    cupy.STATS["launches"] += 1
    cupy.STATS["emu_seconds"] += time.perf_counter() - t0


def _gemm(m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc, computeType, transa, transb):
    assert (transa, transb, Atype, Btype, computeType) == (CUBLAS_OP_T, CUBLAS_OP_N, CUDA_R_16BF, CUDA_R_16BF,
                                                           CUBLAS_COMPUTE_32F)
    assert Ctype in (CUDA_R_32F, CUDA_R_16BF) and lda >= k and ldb >= k and ldc >= m
    assert ctypes.c_float.from_address(alpha).value == 1 and ctypes.c_float.from_address(beta).value == 0
    # Column-major: op(A) = A^T with A (k x m, lda), B (k x n, ldb), C (m x n, ldc).
    At = np.stack([bf2f(mem(A + 2 * i * lda, k, np.uint16)) for i in range(m)]).astype(np.float64)   # (m, k)
    Bt = np.stack([bf2f(mem(B + 2 * j * ldb, k, np.uint16)) for j in range(n)]).astype(np.float64)   # (n, k)
    Ct = (Bt @ At.T).astype(np.float32)                                                               # (n, m)
    for j in range(n):
        if Ctype == CUDA_R_32F:
            mem(C + 4 * j * ldc, m, np.float32)[:] = Ct[j]
        else:
            mem(C + 2 * j * ldc, m, np.uint16)[:] = f2bf(Ct[j])
