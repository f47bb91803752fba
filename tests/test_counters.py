"""The performance counters of the CPU executor (tests/cudacpu/tracer.py, counters.py) on small
hand-written kernels whose answers are known by construction (never on cuda/*.cu kernels):
a coalesced copy moves 100% useful sectors, a stride-2 float load 50%, 32 lanes in one bank
conflict 32 ways, a broadcast is free; plus the occupancy arithmetic against hand-worked cases
of the sm_90 limits and the stated performance model."""

from __future__ import annotations

import ctypes
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "cudacpu"))
import counters  # noqa: E402
import tracer  # noqa: E402

pytestmark = pytest.mark.skipif(
    tracer.available() is not None, reason=f"cudacpu trace: {tracer.available()}"
)

COMMON = (ROOT / "cuda" / "common.cuh").read_text()

KERNELS = tracer.TraceModule(
    COMMON
    + "\n"
    + textwrap.dedent("""
extern "C" __global__ void copy_f32(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}
extern "C" __global__ void write_read(const float* x, float* y, float* z, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = x[i];                  // y written, then read back by the same thread: an L2 hit
    z[i] = y[i] * 2.f;
    z[i] += 1.f;                  // z read after this launch wrote it: a hit too
}
extern "C" __global__ void in_place(float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = y[i] + 1.f;            // read first (from DRAM), then written
}
extern "C" __global__ void stride2_f32(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[2 * i];
}
extern "C" __global__ void copy_u4(const uint4* x, uint4* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = ld_stream_u4(x + i);
}
extern "C" __global__ void bank32(const float* x, float* y) {
    __shared__ float t[32 * 32];
    for (int i = threadIdx.x; i < 32 * 32; i += 32) t[i] = x[i];   // row-wise: conflict-free
    __syncthreads();
    y[threadIdx.x] = t[threadIdx.x * 32];                            // a column: one bank, 32 words
}
extern "C" __global__ void bank_pad(const float* x, float* y) {
    __shared__ float t[32 * 33];
    for (int i = threadIdx.x; i < 32 * 33; i += 32) t[i] = x[i];
    __syncthreads();
    y[threadIdx.x] = t[threadIdx.x * 33];                            // padded: 32 banks
}
extern "C" __global__ void broadcast(const float* x, float* y) {
    __shared__ float t[32];
    t[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = t[5] + x[7];                                    // every lane: one word
}
extern "C" __global__ void ldsm_pitch(const unsigned short* x, unsigned* y, int pitch) {
    // 16 rows of `pitch` bf16, read as four 8x8 matrices by ldmatrix.x4 (rows of 16 bytes)
    __shared__ __align__(16) unsigned short t[16 * 136];
    for (int i = threadIdx.x; i < 16 * 136; i += 32) t[i] = x[i];
    __syncthreads();
    const int row = (threadIdx.x & 7) + ((threadIdx.x >> 3) & 1) * 8, col = (threadIdx.x >> 4) * 8;
    unsigned r[4];
    ldsm_x4(r[0], r[1], r[2], r[3], t + row * pitch + col);
    y[threadIdx.x] = r[0] ^ r[1] ^ r[2] ^ r[3];
}
extern "C" __global__ void mma_once(float* y) {
    unsigned a[4] = {0u, 0u, 0u, 0u};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_bf16_16816(d, a, 0u, 0u);
    y[threadIdx.x] = d[0];
}
""")
)


def P(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.__array_interface__["data"][0])


def run(name, grid, block, arrays, scalars=(), max_blocks=None):
    args = [P(a) for a in arrays] + [ctypes.c_int(s) for s in scalars]
    bufs = [(a.__array_interface__["data"][0], a.nbytes) for a in arrays]
    recs, info = KERNELS.trace(name, grid, block, args, 0, bufs, max_blocks=max_blocks)
    return counters.count(recs, info, bufs), recs


def aligned(n: int, dtype) -> np.ndarray:
    """n elements of dtype at a 256-byte aligned address (as cudaMalloc returns)."""
    item = np.dtype(dtype).itemsize
    raw = np.zeros(n * item + 256, np.uint8)
    off = (-raw.__array_interface__["data"][0]) % 256
    return raw[off : off + n * item].view(dtype)


def test_coalesced_copy_is_100_percent_and_moves_each_byte_once():
    n = 4096
    x, y = aligned(n, np.float32), aligned(n, np.float32)
    x[:] = np.arange(n)
    c, _ = run("copy_f32", (n // 128,), (128,), [x, y], [n])
    np.testing.assert_array_equal(y, x)  # the traced build still computes
    assert c["global_ld_requests"] == n // 32  # one request per warp
    assert c["global_ld_sectors"] == n * 4 // 32  # 4 sectors per request
    assert c["global_ld_sector_efficiency"] == 1.0
    assert c["global_st_sector_efficiency"] == 1.0
    assert c["dram_bytes"] == 2 * n * 4


def test_dram_bytes_count_a_launch_s_own_output_read_back_once():
    n = 1024
    x, y, z = (aligned(n, np.float32) for _ in range(3))
    c, _ = run("write_read", (n // 128,), (128,), [x, y, z], [n])
    assert c["dram_bytes"] == 3 * n * 4  # x read, y and z written; the read-backs hit


def test_known_blind_spot_a_store_right_after_a_load_of_the_same_place():
    # GCC checks one memory reference once per basic block, so y[i] = y[i] + 1 reports the
    # load only: in-place writes are missing from the counters (stated in counters.py). If a
    # compiler ever reports both, this test tells us to drop the caveat.
    n = 1024
    y = aligned(n, np.float32)
    c, recs = run("in_place", (n // 128,), (128,), [y], [n])
    assert c["global_st_requests"] == 0 and c["dram_bytes"] == n * 4


def test_stride2_float_load_wastes_half_of_every_sector():
    n = 2048
    x, y = aligned(2 * n, np.float32), aligned(n, np.float32)
    c, _ = run("stride2_f32", (n // 128,), (128,), [x, y], [n])
    assert c["global_ld_requests"] == n // 32
    assert c["global_ld_sectors"] == n // 32 * 8  # 32 lanes span 256 bytes = 8 sectors
    assert c["global_ld_sector_efficiency"] == 0.5
    assert c["global_st_sector_efficiency"] == 1.0
    assert c["dram_bytes"] == 2 * n * 4 + n * 4  # every sector of x is still touched


def test_16_byte_loads_through_the_ptx_emulation_are_counted():
    n = 1024
    x, y = aligned(n * 4, np.uint32), aligned(n * 4, np.uint32)
    c, recs = run("copy_u4", (n // 256,), (256,), [x, y], [n])
    ld = recs[(recs["flags"] == 0)]
    assert (ld["size"] == 16).all() and len(ld) == n
    assert c["global_ld_requests"] == n // 32
    assert c["global_ld_sectors"] == n * 16 // 32  # 16 sectors per request
    assert c["global_ld_sector_efficiency"] == 1.0


def test_block_sampling_scales_counts_but_not_past_a_buffer():
    n = 8192
    x, y = aligned(n, np.float32), aligned(n, np.float32)
    full, _ = run("copy_f32", (n // 128,), (128,), [x, y], [n])
    samp, _ = run("copy_f32", (n // 128,), (128,), [x, y], [n], max_blocks=8)
    assert 1 <= samp["sampled_blocks"] < 64
    for k in ("global_ld_requests", "global_ld_sectors", "dram_bytes"):
        assert samp[k] == full[k], k


def test_32_way_bank_conflict_and_its_padded_fix():
    x, y = aligned(32 * 33, np.float32), aligned(32, np.float32)
    x[:] = np.arange(32 * 33)
    c, _ = run("bank32", (1,), (32,), [x, y])
    np.testing.assert_array_equal(y, np.arange(32) * 32)
    # 32 row stores (1 wavefront each) + one column load (32 wavefronts, ideal 1)
    assert c["shared_requests"] == 33
    assert c["shared_wavefronts"] == 32 + 32
    assert c["shared_ideal_wavefronts"] == 33
    assert c["bank_conflict_ways_worst_site"] == 32
    p, _ = run("bank_pad", (1,), (32,), [x, y])
    np.testing.assert_array_equal(y, np.arange(32) * 33)
    assert p["bank_conflict_ways_worst_site"] == 1
    assert p["bank_conflict_ways"] == 1


def test_ldmatrix_rows_one_pitch_apart_conflict_8_ways_unless_padded():
    # Each 8x8 matrix is one phase of 8 lanes, 16 bytes each. Rows 256 bytes apart (pitch 128
    # bf16) fall in the same 4 banks: 8 words per bank -> 8 wavefronts where 1 would do. A
    # pitch of 136 (+16 bytes) moves each row 4 banks on: conflict-free.
    x, y = aligned(16 * 136, np.uint16), aligned(32, np.uint32)
    c, _ = run("ldsm_pitch", (1,), (32,), [x, y], [128])
    assert c["bank_conflict_ways_worst_site"] == 8
    p, _ = run("ldsm_pitch", (1,), (32,), [x, y], [136])
    assert p["bank_conflict_ways_worst_site"] == 1


def test_broadcast_is_free_in_shared_and_global_memory():
    x, y = aligned(32, np.float32), aligned(32, np.float32)
    c, _ = run("broadcast", (1,), (32,), [x, y])
    assert c["shared_requests"] == 2
    assert c["shared_wavefronts"] == 2  # the store and the broadcast load: one each
    assert c["bank_conflict_ways"] == 1
    # the global broadcast x[7]: one sector, nothing wasted
    assert c["global_ld_requests"] == 2
    assert c["global_ld_sectors"] == 4 + 1
    assert c["global_ld_sector_efficiency"] == 1.0


def test_mma_flops():
    y = aligned(64, np.float32)
    c, _ = run("mma_once", (1,), (64,), [y])
    assert c["flops"] == 2 * 2 * 16 * 8 * 16  # two warps, one m16n8k16 each


def test_occupancy_follows_the_sm90_limits():
    # 256 threads, 32 regs: threads limit 8 CTAs (2048 / 256), registers 65536 / (32*32*8) = 8
    o = counters.occupancy(256, 32, 0)
    assert o["ctas_per_sm"] == 8 and o["occupancy"] == 1.0
    # 128 regs/thread x 256 threads = 32768 registers per CTA: 2 CTAs, 16 of 64 warps
    o = counters.occupancy(256, 128, 0)
    assert (o["ctas_per_sm"], o["limited_by"], o["occupancy"]) == (2, "registers", 0.25)
    # 52 KB dynamic + 1 KB reserved per CTA: 228 KB // 53 KB = 4 CTAs
    o = counters.occupancy(128, 64, 52 * 1024)
    assert (o["ctas_per_sm"], o["limited_by"]) == (4, "shared")
    # tiny blocks: the 32-CTA limit
    assert counters.occupancy(32, 16, 0)["ctas_per_sm"] == 32
    assert counters.waves(132 * 8, 8) == 1.0


def test_the_model_charges_idle_sms_and_partial_waves():
    dev = {"bw": 1e12, "mma_flops": 1e15, "launch_us": 2.0}
    full = counters.predict_us(1e6, 0, 132, dev, graph=True)
    assert full["predicted_us"] == pytest.approx(1.0) and full["bound"] == "memory"
    eight = counters.predict_us(1e6, 0, 8, dev, graph=True)
    assert eight["predicted_us"] == pytest.approx(132 / 8)
    tail = counters.predict_us(1e6, 0, 133, dev, graph=False)
    assert tail["predicted_us"] == pytest.approx(264 / 133 + 2.0)
    comp = counters.predict_us(1e3, 1e9, 132, dev, graph=True)
    assert comp["bound"] == "compute" and comp["predicted_us"] == pytest.approx(1.0)
