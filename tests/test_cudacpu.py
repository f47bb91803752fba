"""The CUDA-on-CPU executor (tests/cudacpu) itself: its warp collectives and PTX emulations
against the PTX ISA's documented per-lane formulas, its conversions against ml_dtypes, and the
bugs it must catch (races, deadlocks, unwritten shared memory, out-of-bounds accesses).

The fragment formulas below are transcribed from the PTX ISA ("Matrix Fragments for
mma.m16n8k16 with floating point type" and "Warp-level matrix load instruction: ldmatrix"),
written out independently of tests/cudacpu/cudacpu.h; no kernel of cuda/ is used here.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cudacpu"))
import executor  # noqa: E402

pytestmark = pytest.mark.skipif(
    executor.available() is not None, reason=f"cudacpu: {executor.available()}"
)

COMMON = (ROOT / "cuda" / "common.cuh").read_text()


def module(body: str) -> executor.Module:
    """A test module: cuda/common.cuh (for its PTX wrappers) + body."""
    return executor.Module(COMMON + "\n" + textwrap.dedent(body))


def P(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.__array_interface__["data"][0])


def I(x: int) -> ctypes.c_int:  # noqa: E743  (int argument, beside P for pointers)
    return ctypes.c_int(x)


# ---- warp shuffles ------------------------------------------------------------------------------

SHUFFLES = module("""
extern "C" __global__ void shuffles(const int* arg, int width, int* out) {
    const int l = threadIdx.x, a = arg[0];
    out[l]      = __shfl_sync(0xffffffffu, 100 + l, a, width);
    out[32 + l] = __shfl_xor_sync(0xffffffffu, 100 + l, a, width);
    out[64 + l] = __shfl_down_sync(0xffffffffu, 100 + l, a, width);
    out[96 + l] = __shfl_up_sync(0xffffffffu, 100 + l, a, width);
    out[128 + l] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
}
""")


@pytest.mark.parametrize("arg,width", [(1, 32), (5, 32), (3, 8), (16, 32), (2, 4)])
def test_shuffles_follow_the_cuda_programming_guide(arg, width):
    out = np.zeros(160, np.int32)
    SHUFFLES.launch("shuffles", (1,), (32,), [P(np.array([arg], np.int32)), I(width), P(out)])
    lanes = np.arange(32)
    base = lanes - lanes % width
    idx = base + arg % width
    xor = lanes ^ arg
    xor = np.where(
        (xor >= base) & (xor < base + width), xor, lanes
    )  # outside the segment: own value
    down = np.where(lanes + arg < base + width, lanes + arg, lanes)
    up = np.where(lanes - arg >= base, lanes - arg, lanes)
    np.testing.assert_array_equal(out[:32], 100 + idx)
    np.testing.assert_array_equal(out[32:64], 100 + xor)
    np.testing.assert_array_equal(out[64:96], 100 + down)
    np.testing.assert_array_equal(out[96:128], 100 + up)
    ballot = sum(1 << int(ln) for ln in lanes if ln % 3 == 0)
    assert (out[128:] == np.int32(np.uint32(ballot).view(np.int32))).all()


# ---- ldmatrix ------------------------------------------------------------------------------------

LDSM = module("""
extern "C" __global__ void ldsm(const unsigned short* src, int trans, unsigned* out) {
    __shared__ __align__(16) unsigned short tile[4 * 8 * 8];        // four 8x8 b16 matrices
    for (int i = threadIdx.x; i < 256; i += 32) tile[i] = src[i];
    __syncthreads();
    const int l = threadIdx.x;
    const unsigned short* row = tile + (l / 8) * 64 + (l % 8) * 8;  // lane 8i+r: row r of matrix i
    unsigned r[4];
    if (trans) ldsm_x4_trans(r[0], r[1], r[2], r[3], row);
    else ldsm_x4(r[0], r[1], r[2], r[3], row);
    for (int i = 0; i < 4; ++i) out[l * 4 + i] = r[i];
}
""")


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_fragments_match_the_ptx_isa(trans):
    mats = np.arange(256, dtype=np.uint16).reshape(4, 8, 8) * 3 + 1  # distinct values
    out = np.zeros(128, np.uint32)
    LDSM.launch("ldsm", (1,), (32,), [P(mats.reshape(-1)), I(int(trans)), P(out)])
    got = out.reshape(32, 4)
    for lane in range(32):
        for i in range(4):
            # PTX ISA: each thread receives two consecutive elements of a row of matrix i:
            # row lane/4, columns 2*(lane%4) and 2*(lane%4)+1; .trans delivers the transpose.
            m = mats[i].T if trans else mats[i]
            lo, hi = m[lane // 4, 2 * (lane % 4)], m[lane // 4, 2 * (lane % 4) + 1]
            assert got[lane, i] == int(lo) | int(hi) << 16, (lane, i)


def test_ldmatrix_outside_shared_memory_fails_naming_the_kernel():
    mod = module("""
    extern "C" __global__ void bad_ldsm(unsigned* out) {
        __shared__ __align__(16) unsigned short tile[64];
        tile[threadIdx.x] = 0; tile[threadIdx.x + 32] = 0;
        __syncthreads();
        unsigned r[4];
        // rows past the tile
        ldsm_x4(r[0], r[1], r[2], r[3], tile + (threadIdx.x % 8) * 8 + (threadIdx.x / 8) * 64);
        out[threadIdx.x] = r[0];
    }
    """)
    with pytest.raises(AssertionError, match=r"bad_ldsm: .*(outside shared memory|outside shared)"):
        mod.launch("bad_ldsm", (1,), (32,), [P(np.zeros(32, np.uint32))])


# ---- mma.sync m16n8k16 bf16 -> f32 ---------------------------------------------------------------

MMA = module("""
extern "C" __global__ void mma(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int l = threadIdx.x;
    unsigned af[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    mma_bf16_16816(acc, af, b[2 * l], b[2 * l + 1]);
    for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}
""")


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.uint32:
    return np.uint32(int(lo.view(np.uint16)) | int(hi.view(np.uint16)) << 16)


def test_mma_m16n8k16_bf16_is_a_times_b_plus_c_in_the_ptx_fragment_layouts():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16)
    B = rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, t = lane // 4, lane % 4  # groupID, threadID_in_group
        # A: a_i (i = 0..7) at row g for i in {0,1,4,5} else g+8, column 2t + (i & 1)
        # (+8 for i >= 4); register j holds a_{2j}, a_{2j+1}.
        for j in range(4):
            row = g if j in (0, 2) else g + 8
            col = 2 * t + (8 if j >= 2 else 0)
            a[lane, j] = _pack(A[row, col], A[row, col + 1])
        # B: b_i at row (k) 2t + (i & 1) (+8 for i >= 2), column g.
        for j in range(2):
            k = 2 * t + 8 * j
            b[lane, j] = _pack(B[k, g], B[k + 1, g])
        # C/D: c_i at row g (i < 2) or g+8, column 2t + (i & 1).
        for i in range(4):
            c[lane, i] = C[g + 8 * (i >= 2), 2 * t + (i & 1)]
    d = np.zeros((32, 4), np.float32)
    MMA.launch("mma", (1,), (32,), [P(a), P(b), P(c), P(d)])
    want = A.astype(np.float64) @ B.astype(np.float64) + C
    got = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            got[g + 8 * (i >= 2), 2 * t + (i & 1)] = d[lane, i]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---- conversions: CUDA's own headers vs ml_dtypes -----------------------------------------------

CONV = module("""
extern "C" __global__ void conv(const float* x, int n, unsigned short* bf, unsigned short* h,
                                unsigned char* f8, float* back) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const bf16 b = __float2bfloat16_rn(x[i]);
        bf[i] = *reinterpret_cast<const unsigned short*>(&b);
        const __half hh = __float2half_rn(x[i]);
        h[i] = *reinterpret_cast<const unsigned short*>(&hh);
        f8[i] = (unsigned char)__nv_cvt_float_to_fp8(fminf(fmaxf(x[i], -448.f), 448.f),
                                                     __NV_SATFINITE, __NV_E4M3);
        const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)f8[i], __NV_E4M3);
        back[i] = __half2float(__half(__half_raw{r.x}));
    }
}
""")


def test_bf16_fp16_fp8_conversions_round_as_ml_dtypes():
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(20000) * 10.0 ** rng.integers(-6, 4, 20000),
            # exact ties of each format (halfway between neighbours)
            (np.arange(1, 2000) * 2 + 1) * 2.0**-9,
            [0.0, -0.0, 447.9, 448.0, 1e-9, 65504.0, 3.0e38],
        ]
    ).astype(np.float32)
    n = len(x)
    bf, h, f8, back = (
        np.zeros(n, np.uint16),
        np.zeros(n, np.uint16),
        np.zeros(n, np.uint8),
        np.zeros(n, np.float32),
    )
    CONV.launch("conv", (1,), (256,), [P(x), I(n), P(bf), P(h), P(f8), P(back)])
    np.testing.assert_array_equal(bf, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    with np.errstate(over="ignore"):  # 3e38 -> inf in both
        np.testing.assert_array_equal(h, x.astype(np.float16).view(np.uint16))
    want8 = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(f8, want8.view(np.uint8))
    np.testing.assert_array_equal(back, want8.astype(np.float32))


def test_denormals_flush_to_zero_as_with_cupys_ftz():
    mod = module("""
    extern "C" __global__ void ftz(const float* x, float* y) {
        y[threadIdx.x] = x[threadIdx.x] * 1.0f + 0.0f;
    }
    """)
    x = np.array([1e-40, -1e-41, 1e-30, 2.0], np.float32)
    y = np.zeros(4, np.float32)
    mod.launch("ftz", (1,), (4,), [P(x), P(y)])
    np.testing.assert_array_equal(y, np.array([0.0, 0.0, 1e-30, 2.0], np.float32))


# ---- what the executor must catch ----------------------------------------------------------------

RACY = module("""
extern "C" __global__ void neighbours(const float* x, float* y, int sync) {
    __shared__ float s[64];
    s[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
    if (sync) __syncthreads();
    y[blockIdx.x * 64 + threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
extern "C" __global__ void partial_barrier(float* y) {
    if (threadIdx.x < 16) __syncthreads();
    y[threadIdx.x] = 1.f;
}
extern "C" __global__ void mixed_collectives(float* y) {
    float v = threadIdx.x;
    if (threadIdx.x == 3) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}
extern "C" __global__ void unwritten_shared(float* y) {
    __shared__ float s[64];
    if (blockIdx.x == 0) s[threadIdx.x] = 1.f;    // block 1 reads what only block 0 wrote
    __syncthreads();
    y[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
}
""")


def test_a_missing_syncthreads_is_a_race_between_thread_orders():
    x = np.arange(128, dtype=np.float32)
    y = np.zeros(128, np.float32)
    buffers = [(y.view(np.uint8), "y")]
    RACY.launch_checked("neighbours", (2,), (64,), [P(x), P(y), I(1)], 0, buffers, orders=(0, 1))
    np.testing.assert_array_equal(y.reshape(2, 64), np.roll(x.reshape(2, 64), -1, axis=1))
    with pytest.raises(AssertionError, match=r"neighbours: race: .*missing __syncthreads"):
        RACY.launch_checked(
            "neighbours", (2,), (64,), [P(x), P(y), I(0)], 0, buffers, orders=(0, 1)
        )


@pytest.mark.parametrize(
    "kernel,msg",
    [
        ("partial_barrier", r"deadlock.*__syncthreads.*16 of 32 threads have exited"),
        ("mixed_collectives", r"deadlock"),
    ],
)
def test_a_barrier_or_collective_not_reached_by_all_is_an_error_not_a_hang(kernel, msg):
    with pytest.raises(AssertionError, match=rf"{kernel}: {msg}"):
        RACY.launch(kernel, (1,), (32,), [P(np.zeros(32, np.float32))])


def test_shared_memory_starts_each_block_as_nan():
    y = np.zeros(128, np.float32)
    RACY.launch("unwritten_shared", (2,), (64,), [P(y)])
    assert (y[:64] == 1).all() and np.isnan(y[64:]).all()


def test_misaligned_vector_load_fails():
    mod = module("""
    extern "C" __global__ void nc(const unsigned char* p, unsigned* out) {
        uint4 v = ld_stream_u4(p + 4); out[0] = v.x;
    }
    """)
    with pytest.raises(AssertionError, match="nc: ld.global.nc.v4.u32: misaligned"):
        mod.launch("nc", (1,), (1,), [P(np.zeros(64, np.uint8)), P(np.zeros(1, np.uint32))])


OOB_SCRIPT = """
import ctypes, sys, numpy as np
sys.path.insert(0, {cudacpu!r})
import executor
mod = executor.Module('extern "C" __global__ void {name}(float* y, int n) {{ {body} }}')
y = np.zeros(64, np.float32)
mod.launch("{name}", (1,), (64,), [ctypes.c_void_p(y.ctypes.data), ctypes.c_int(64)])
print("no error")
"""


@pytest.mark.parametrize(
    "name,body,report",
    [
        ("global_overrun", "y[threadIdx.x + 1] = 1.f;", "heap-buffer-overflow"),
        (
            "shared_overrun",
            "__shared__ float s[64]; s[threadIdx.x + 1] = 1.f; __syncthreads(); y[threadIdx.x] = "
            "s[0];",
            "global-buffer-overflow",
        ),
    ],
)
def test_out_of_bounds_accesses_are_caught_under_the_sanitizer(tmp_path, name, body, report):
    """Sanitized builds (CUDACPU_SANITIZE=1, libasan preloaded) abort with AddressSanitizer's
    report on the first out-of-bounds byte; the kernel's name is in the report's stack."""
    script = tmp_path / "oob.py"
    script.write_text(
        OOB_SCRIPT.format(cudacpu=str(ROOT / "tests" / "cudacpu"), name=name, body=body)
    )
    env = dict(os.environ, CUDACPU_CACHE=str(tmp_path / "cache"), **executor.asan_env())
    p = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "no error" not in p.stdout, p.stdout + p.stderr[-3000:]
    assert report in p.stderr and name in p.stderr, p.stderr[-3000:]
