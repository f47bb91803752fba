// common.cuh: device helpers shared by every cuda/*.cu.
//
// tinyllm/backends/cuda_kernels.py INLINES this file into each kernel's source string before
// compiling (CuPy's disk cache keys on the source text only, so an edit here must change the
// text it hashes). Only CUDA's own headers are included: NVRTC has no host standard library.
//
// Conventions for every kernel file:
//   * entry points are extern "C" and named <op>_<dtype>_v<N>; templates stay internal;
//   * tile/block sizes arrive as -D defines from TILES in cuda_kernels.py (one table);
//   * scalars are int32 / float32 (the Python side wraps them as np.int32 / np.float32);
//   * bf16 activations, fp32 accumulation, fp32 softmax statistics.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

typedef __nv_bfloat16 bf16;

#define TL_FULL_MASK 0xffffffffu
#define TL_NEG_INF (-__int_as_float(0x7f800000))
#define TL_LOG2E 1.4426950408889634f

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- reductions ---------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TL_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(TL_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `red` is 32 floats of shared memory; the leading barrier lets callers reuse it.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : TL_NEG_INF;
    return warp_max(v);
}

// ---- bf16 <-> float, 8 at a time (one 16-byte vector) ---------------------------------------
// bf16 -> float is exact: the bf16 bits are the top half of the float's.

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

__device__ __forceinline__ void unpack_bf16x8(const uint4 u, float f[8]) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);   // round to nearest even
    return *reinterpret_cast<unsigned int*>(&h);
}

__device__ __forceinline__ uint4 pack_bf16x8(const float f[8]) {
    uint4 u;
    u.x = pack_bf16x2(f[0], f[1]);
    u.y = pack_bf16x2(f[2], f[3]);
    u.z = pack_bf16x2(f[4], f[5]);
    u.w = pack_bf16x2(f[6], f[7]);
    return u;
}

// Streaming 16-byte load for data read once per pass (weights): do not keep it in L1.
__device__ __forceinline__ uint4 ld_stream_u4(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// ---- KV-cache storage kinds (kv_cache.py NUMPY_STORAGE) --------------------------------------
// KV_KIND: 0 bf16, 1 fp16, 2 fp32, 3 int8, 4 fp8 e4m3 (stored as raw bytes). Each trait moves
// 8 consecutive elements at a time (16/16/32/8/8 bytes: the element offset must be a multiple
// of 8): ld8 loads them raw (so several loads can be in flight in few registers), cvt8 turns
// them into float *without* the per-vector scale (callers fold the scale in). store writes
// one element of an unquantized kind; quantize turns an already scaled and clipped value
// into the stored code of a quantized kind.

struct F32x8 { float4 a, b; };

template <int KIND> struct KVT;

template <> struct KVT<0> {
    typedef bf16 T;
    typedef uint4 Raw8;
    static constexpr bool quantized = false;
    __device__ static __forceinline__ Raw8 ld8(const T* p) { return *reinterpret_cast<const uint4*>(p); }
    __device__ static __forceinline__ void cvt8(const Raw8& u, float f[8]) { unpack_bf16x8(u, f); }
    __device__ static __forceinline__ void store(T* p, float x) { *p = __float2bfloat16_rn(x); }
};

template <> struct KVT<1> {
    typedef __half T;
    typedef uint4 Raw8;
    static constexpr bool quantized = false;
    __device__ static __forceinline__ Raw8 ld8(const T* p) { return *reinterpret_cast<const uint4*>(p); }
    __device__ static __forceinline__ void cvt8(const Raw8& u, float f[8]) {
        const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            __half2_raw hr;
            hr.x = (unsigned short)(w[i] & 0xffffu);
            hr.y = (unsigned short)(w[i] >> 16);
            const float2 t = __half22float2(__half2(hr));
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
    __device__ static __forceinline__ void store(T* p, float x) { *p = __float2half_rn(x); }
};

template <> struct KVT<2> {
    typedef float T;
    typedef F32x8 Raw8;
    static constexpr bool quantized = false;
    __device__ static __forceinline__ Raw8 ld8(const T* p) {
        Raw8 r;
        r.a = reinterpret_cast<const float4*>(p)[0];
        r.b = reinterpret_cast<const float4*>(p)[1];
        return r;
    }
    __device__ static __forceinline__ void cvt8(const Raw8& r, float f[8]) {
        f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w;
        f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
    }
    __device__ static __forceinline__ void store(T* p, float x) { *p = x; }
};

template <> struct KVT<3> {
    typedef signed char T;
    typedef uint2 Raw8;
    static constexpr bool quantized = true;
    static constexpr float qmax = 127.f;
    __device__ static __forceinline__ Raw8 ld8(const T* p) { return *reinterpret_cast<const uint2*>(p); }
    __device__ static __forceinline__ void cvt8(const Raw8& u, float f[8]) {
        const unsigned int w[2] = {u.x, u.y};
#pragma unroll
        for (int i = 0; i < 8; ++i)
            f[i] = (float)(signed char)((w[i >> 2] >> (8 * (i & 3))) & 0xffu);
    }
    // y is already x / scale clipped to [-qmax, qmax]: round half to even (np.rint).
    __device__ static __forceinline__ T quantize(float y) { return (T)(int)rintf(y); }
};

template <> struct KVT<4> {
    typedef unsigned char T;
    typedef uint2 Raw8;
    static constexpr bool quantized = true;
    static constexpr float qmax = 448.f;
    __device__ static __forceinline__ Raw8 ld8(const T* p) { return *reinterpret_cast<const uint2*>(p); }
    __device__ static __forceinline__ void cvt8(const Raw8& u, float f[8]) {
        const unsigned int w[2] = {u.x, u.y};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)((w[i >> 1] >> (16 * (i & 1))) & 0xffffu);
            const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);   // exact
            const float2 t = __half22float2(__half2(hr));
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
    // Round to nearest even with saturation, as ml_dtypes' float32 -> float8_e4m3fn does on
    // values already clipped to +-448 (so saturation never triggers).
    __device__ static __forceinline__ T quantize(float y) {
        return (T)__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
    }
};

// ---- tensor-core helpers (sm_80+: mma.sync m16n8k16 bf16, ldmatrix) ---------------------------

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* smem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* smem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

// d += a * b for one 16x8x16 tile: a 4 regs (row-major A 16x16), b 2 regs (B 16x8 "col"),
// d 4 floats (C 16x8). Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16".
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- the paged KV cache (kv_cache.py; NumpyKVCache.write / read) ---------------------------------
// Per layer k, v (n_blocks, block_size, n_kv, hd) and value scales (n_blocks, block_size, n_kv).
// Sequence b's block table is tables[b * ring .. b * ring + ring - 1] (int32 block ids, -1
// unused); C = ring * block_size positions fit before the table wraps (a sliding window's
// ring). Position p lives in block table[(p / block_size) % ring] at offset p % block_size:
// the entry of (p, kv head g) is (block * block_size + offset) * n_kv + g, its elements at
// entry * hd .. entry * hd + hd - 1 and a value's scale at entry. One table read per key row: the
// block size need not match any kernel tile.

__device__ __forceinline__ long long kv_entry(const int* __restrict__ table, int ring, int block_size,
                                              int p, int n_kv, int g) {
    const long long block = table[(p / block_size) % ring];
    return (block * block_size + p % block_size) * n_kv + g;
}

// ---- int8 / fp8 keys (kv_cache.py; NumpyKVCache.read) ---------------------------------------------
// Keys of a closed block are codes with one fp16 scale s and offset c per (block, kv head,
// channel) in k_scale, k_zero (n_blocks, n_kv, hd): k = q * s + c, rounded twice in float32
// as numpy's dequantize_block. Positions at or past `closed` (total - total % block_size: the
// sequence's open block) are read from its open row instead: open_row = k_open + opens[b] *
// block_size * n_kv * hd, float32, offset p % block_size. Values keep one fp32 scale per
// vector (callers fold it into the probability, as before).

template <int KIND>
__device__ __forceinline__ void load_key8(const typename KVT<KIND>::T* __restrict__ kc, const __half* __restrict__ k_scale,
                                          const __half* __restrict__ k_zero, const float* __restrict__ open_row,
                                          const int* __restrict__ table, int ring, int block_size, int closed,
                                          int p, int n_kv, int g, int hd, int d0, float f[8]) {
    if (p >= closed) {
        KVT<2>::cvt8(KVT<2>::ld8(open_row + ((long long)(p % block_size) * n_kv + g) * hd + d0), f);
        return;
    }
    const long long block = table[(p / block_size) % ring];
    KVT<KIND>::cvt8(KVT<KIND>::ld8(kc + ((block * block_size + p % block_size) * n_kv + g) * hd + d0), f);
    const long long m = (block * n_kv + g) * hd + d0;
    float sc[8], c[8];
    KVT<1>::cvt8(KVT<1>::ld8(k_scale + m), sc);
    KVT<1>::cvt8(KVT<1>::ld8(k_zero + m), c);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = __fadd_rn(__fmul_rn(f[i], sc[i]), c[i]);
}

// ---- attention key ranges (NumpyBackend.attention / kv_cache.visible_lo) ---------------------------
// After the write, sequence b holds total = start + len tokens; its table addresses the last
// C positions, so kmin = total - min(total, C). A query at position qp sees key positions p
// with  kmin <= p <= qp  and, with a window W > 0, p > qp - W. Kernels visit keys by position
// from lo = max(kmin, qp_first - W + 1) (qp_first: the first query of the CTA) and never LOAD
// a key below lo: with a ring, a position below its query's window may name a block the
// engine already replaced (kv_cache.py's worked example), i.e. stale or foreign data.

__device__ __forceinline__ bool key_visible(int p, int qp, int kmin, int window) {
    return p <= qp && p >= kmin && (window <= 0 || p > qp - window);
}
