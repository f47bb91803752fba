// quant_matmul.cu: matrix products with weights held in llama.cpp's block formats (q8_0, q4_0,
// q4_1, q4_k, q6_k) in tinyllm/quant.py's repacked layout.
//
// numpy twin: NumpyBackend.linear on quant.dequantize(w)   y = x @ dequantize(w).T + b
//
// The layout (quant.py owns it; row n of every part belongs to weight row n, C-contiguous):
//   q8_0  qs int8 (N, K)                      d fp16 (N, K/32)        w = d * q
//   q4_0  qs uint8 (N, K/2)                   d fp16 (N, K/32)        w = d * (q - 8)
//   q4_1  qs uint8 (N, K/2)                   d, m fp16 (N, K/32)     w = d * q + m
//         (4-bit: byte 16b+j of a row = element 32b+j in the low nibble, 32b+j+16 in the high)
//   q4_k  qs uint8 (N, K/2), scales uint8 (N, K/256*12), d, dmin fp16 (N, K/256)
//         super-block s, 32-byte group c (0..3) of its 128 qs bytes, byte l: element
//         256s+64c+l (low nibble, sub-block 2c) and 256s+64c+32+l (high, sub-block 2c+1);
//         sub-block j's 6-bit (scale, min) from the 12 scale bytes as get_scale_min_k4;
//         w = d*scale_j * q - dmin*min_j
//   q6_k  ql uint8 (N, K/2), qh uint8 (N, K/4), scales int8 (N, K/16), d fp16 (N, K/256)
//         super-block s, half h (0..1; 64 ql, 32 qh, 8 scale bytes each), qh byte l (0..31):
//         elements 256s+128h+l+32r (r = 0..3) with codes
//           r=0: ql[l] & 15,  r=1: ql[l+32] & 15,  r=2: ql[l] >> 4,  r=3: ql[l+32] >> 4,
//           each | ((qh[l] >> 2r) & 3) << 4;   w = d * sc[8h + l/16 + 2r] * (code - 32)
//
// The lane unit. Every format splits a row into units of UNIT elements, one unit per lane per
// step, whose codes are whole 16-byte loads (1 for q8_0 / q4_*, 3 for q6_k) and whose elements
// are RUNS runs of 16 consecutive elements with one (scale, offset) each: w_i = scale * q_i +
// offset, q_i a small integer (exact in float). Units per row: q8_0 K/16, q4_0 / q4_1 / q4_k
// K/32, q6_k K/64.
//
// gemv_<fmt>_m<M>_<out>_v1: x (M, K) bf16 with row stride ldx; the weight parts; b (N,) bf16
//   or null; y (M, N) bf16 or fp32 with row stride ldy. Requires ldx % 8 == 0 and x 16-byte
//   aligned (the Python side checks); K a multiple of the block (32, or 256 for k-quants).
//   Launch: grid (ceil(N / QGEMV_WARPS)), block 32 * QGEMV_WARPS; one warp per output column
//   n as the bf16 GEMV of matmul.cu: each lane takes units lane, lane + 32, ... of row n
//   (UNROLL units' loads in flight, L1 bypassed), decodes the codes in registers (4-bit and
//   6-bit codes become floats by the 2^23 mantissa trick, no int->float conversion), and per
//   run and x row adds scale * sum(q_i x_i) (+ offset * sum(x_i)) in fp32; a warp reduction,
//   then lane 0 writes the M outputs (+ bias).
//
// dequant_<fmt>_bf16_v1: out (N, K) bf16 = dequantize(w) rounded to nearest even, each value
//   computed in fp32 as gguf.quants does (scale * q, then + offset: no fused multiply-add), so
//   it equals numpy's bf16(dequantize(w)) bit for bit. The prefill path (more rows than
//   GEMV_MAX_M) dequantizes a chunk of rows into a workspace and hands it to cuBLAS.
//   Launch: grid-stride over N * units, DEQUANT_THREADS threads per block; out row stride K.
#include "common.cuh"

#ifndef QGEMV_WARPS
#define QGEMV_WARPS 8
#endif
#ifndef QGEMV_UNROLL
#define QGEMV_UNROLL 4
#endif

// 2^23 + c as a float has c in its low mantissa bits: (c | 0x4B000000) - (2^23 + z) is c - z
// exactly, for 0 <= c < 2^23 (one logic op and one add instead of a slow int->float).
__device__ __forceinline__ float code_minus(unsigned c, float two23_plus_z) {
    return __uint_as_float(0x4B000000u | c) - two23_plus_z;
}

__device__ __forceinline__ unsigned u4_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Byte k (0..15) of a 16-byte vector; k may be a run-time value (selects, no local memory).
__device__ __forceinline__ unsigned u4_byte(const uint4& v, int k) {
    return (u4_word(v, k >> 2) >> (8 * (k & 3))) & 0xffu;
}

__device__ __forceinline__ float h2f(const __half h) { return __half2float(h); }

// ---- the formats ----------------------------------------------------------------------------
// Each: Args (the kernel's part pointers), a constructor taking row n's pointers, Raw (what a
// unit loads), load(t), scale(raw, t, r, scale, offset) of run r, codes(raw, r, q) (run r's 16
// integer codes as floats, the format's zero point subtracted) and run0(t, r) (the first
// element of run r of unit t).

struct Q8_0 {
    static constexpr int UNIT = 16, RUNS = 1, UNROLL = QGEMV_UNROLL, RUN_UNROLL = 1;
    static constexpr bool HAS_OFFSET = false;
    struct Args { const uint4* qs; const __half* d; };
    struct Raw { uint4 q; __half d; };
    const uint4* qs;
    const __half* d;
    __device__ Q8_0(const Args& a, long long n, int K) : qs(a.qs + n * (K / 16)), d(a.d + n * (K / 32)) {}
    __device__ __forceinline__ Raw load(int t) const { return Raw{ld_stream_u4(qs + t), d[t >> 1]}; }
    __device__ __forceinline__ static int run0(int t, int) { return 16 * t; }
    __device__ __forceinline__ static void scale(const Raw& r, int, int, float& sc, float& off) {
        sc = h2f(r.d);
        off = 0.f;
    }
    __device__ __forceinline__ static void codes(const Raw& r, int, float q[16]) {
#pragma unroll
        for (int j = 0; j < 16; ++j)   // int8 code b: (b ^ 0x80) = b + 128 as unsigned
            q[j] = code_minus(((u4_word(r.q, j >> 2) >> (8 * (j & 3))) & 0xffu) ^ 0x80u, 8388736.f);
    }
};

// q4_0 and q4_1: one 16-byte unit = one block of 32; low nibbles run 0, high nibbles run 1.
template <bool MIN>
struct Q4_01 {
    static constexpr int UNIT = 32, RUNS = 2, UNROLL = QGEMV_UNROLL, RUN_UNROLL = 2;
    static constexpr bool HAS_OFFSET = MIN;
    struct Args { const uint4* qs; const __half* d; const __half* m; };
    struct Raw { uint4 q; __half d, m; };
    const uint4* qs;
    const __half* d;
    const __half* m;
    __device__ Q4_01(const Args& a, long long n, int K)
        : qs(a.qs + n * (K / 32)), d(a.d + n * (K / 32)), m(MIN ? a.m + n * (K / 32) : nullptr) {}
    __device__ __forceinline__ Raw load(int t) const {
        Raw r;
        r.q = ld_stream_u4(qs + t);
        r.d = d[t];
        r.m = MIN ? m[t] : __float2half(0.f);
        return r;
    }
    __device__ __forceinline__ static int run0(int t, int run) { return 32 * t + 16 * run; }
    __device__ __forceinline__ static void scale(const Raw& r, int, int, float& sc, float& off) {
        sc = h2f(r.d);
        off = MIN ? h2f(r.m) : 0.f;
    }
    __device__ __forceinline__ static void codes(const Raw& r, int run, float q[16]) {
        const float z = MIN ? 8388608.f : 8388616.f;   // q4_0 codes are offset by 8
#pragma unroll
        for (int j = 0; j < 16; ++j)
            q[j] = code_minus((u4_word(r.q, j >> 2) >> (8 * (j & 3) + 4 * run)) & 15u, z);
    }
};
typedef Q4_01<false> Q4_0;
typedef Q4_01<true> Q4_1;

// q4_k: unit t = 16 qs bytes: super-block s = t / 8, group c = (t % 8) / 2, half h = t % 2.
struct Q4_K {
    static constexpr int UNIT = 32, RUNS = 2, UNROLL = QGEMV_UNROLL, RUN_UNROLL = 1;
    static constexpr bool HAS_OFFSET = true;
    struct Args { const uint4* qs; const unsigned* scales; const __half* d; const __half* dmin; };
    struct Raw { uint4 q; unsigned s0, s1, s2; __half d, dmin; };
    const uint4* qs;
    const unsigned* scales;
    const __half* d;
    const __half* dmin;
    __device__ Q4_K(const Args& a, long long n, int K)
        : qs(a.qs + n * (K / 32)), scales(a.scales + n * (K / 256 * 3)), d(a.d + n * (K / 256)),
          dmin(a.dmin + n * (K / 256)) {}
    __device__ __forceinline__ Raw load(int t) const {
        const int s = t >> 3;
        Raw r;
        r.q = ld_stream_u4(qs + t);
        r.s0 = scales[3 * s];
        r.s1 = scales[3 * s + 1];
        r.s2 = scales[3 * s + 2];
        r.d = d[s];
        r.dmin = dmin[s];
        return r;
    }
    __device__ __forceinline__ static int run0(int t, int run) {
        return 256 * (t >> 3) + 64 * ((t >> 1) & 3) + 16 * (t & 1) + 32 * run;
    }
    // llama.cpp get_scale_min_k4: sub-block j's 6-bit scale and min from the 12 bytes.
    __device__ __forceinline__ static void scale_min(const Raw& r, int j, unsigned& sc, unsigned& mn) {
        const uint4 v = make_uint4(r.s0, r.s1, r.s2, 0u);
        if (j < 4) {
            sc = u4_byte(v, j) & 63u;
            mn = u4_byte(v, j + 4) & 63u;
        } else {
            sc = (u4_byte(v, j + 4) & 15u) | ((u4_byte(v, j - 4) >> 6) << 4);
            mn = (u4_byte(v, j + 4) >> 4) | ((u4_byte(v, j) >> 6) << 4);
        }
    }
    __device__ __forceinline__ static void codes(const Raw& r, int run, float q[16]) {
#pragma unroll
        for (int j = 0; j < 16; ++j)
            q[j] = code_minus((u4_word(r.q, j >> 2) >> (8 * (j & 3) + 4 * run)) & 15u, 8388608.f);
    }
    __device__ __forceinline__ static void scale(const Raw& r, int t, int run, float& sc, float& off) {
        unsigned s, mn;
        scale_min(r, 2 * ((t >> 1) & 3) + run, s, mn);
        sc = __fmul_rn(h2f(r.d), (float)s);
        off = -__fmul_rn(h2f(r.dmin), (float)mn);
    }
};

// q6_k: unit t = 16 qh bytes: super-block s = t / 4, half h = (t / 2) % 2, g = t % 2 (qh
// bytes l = 16g .. 16g+15 of the half); it loads ql bytes l and l + 32 and the super-block's
// 16 scales.
struct Q6_K {
    static constexpr int UNIT = 64, RUNS = 4, UNROLL = (QGEMV_UNROLL + 1) / 2, RUN_UNROLL = 1;
    static constexpr bool HAS_OFFSET = false;
    struct Args { const uint4* ql; const uint4* qh; const uint4* scales; const __half* d; };
    struct Raw { uint4 l0, l1, h, sc; __half d; };
    const uint4* ql;
    const uint4* qh;
    const uint4* scales;
    const __half* d;
    __device__ Q6_K(const Args& a, long long n, int K)
        : ql(a.ql + n * (K / 32)), qh(a.qh + n * (K / 64)), scales(a.scales + n * (K / 256)),
          d(a.d + n * (K / 256)) {}
    __device__ __forceinline__ Raw load(int t) const {
        const int s = t >> 2, h = (t >> 1) & 1, g = t & 1;
        Raw r;
        r.l0 = ld_stream_u4(ql + 8 * s + 4 * h + g);
        r.l1 = ld_stream_u4(ql + 8 * s + 4 * h + g + 2);
        r.h = ld_stream_u4(qh + 4 * s + 2 * h + g);
        r.sc = scales[s];
        r.d = d[s];
        return r;
    }
    __device__ __forceinline__ static int run0(int t, int run) {
        return 256 * (t >> 2) + 128 * ((t >> 1) & 1) + 16 * (t & 1) + 32 * run;
    }
    // run r: low 4 bits from ql byte l (r even) or l + 32 (r odd), its low nibble for r < 2,
    // high nibble for r >= 2; bits 4-5 from qh byte l at bit 2r.
    __device__ __forceinline__ static void codes(const Raw& r, int run, float q[16]) {
        const uint4& lo = (run & 1) ? r.l1 : r.l0;
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int sh = 8 * (j & 3);
            const unsigned a = (u4_word(lo, j >> 2) >> (sh + 4 * (run >> 1))) & 15u;
            const unsigned hb = (u4_word(r.h, j >> 2) >> (sh + 2 * run)) & 3u;
            q[j] = code_minus(a | (hb << 4), 8388640.f);
        }
    }
    __device__ __forceinline__ static void scale(const Raw& r, int t, int run, float& sc, float& off) {
        const int k = 8 * ((t >> 1) & 1) + (t & 1) + 2 * run;
        sc = __fmul_rn(h2f(r.d), (float)(signed char)u4_byte(r.sc, k));
        off = 0.f;
    }
};

// ---- GEMV ---------------------------------------------------------------------------------------

__device__ __forceinline__ void qstore(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void qstore(float* p, float v) { *p = v; }

template <int M, class F, typename OutT>
__device__ __forceinline__ void qgemv(const bf16* __restrict__ x, int ldx, const typename F::Args& a,
                                      const bf16* __restrict__ bias, OutT* __restrict__ y, int ldy, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * QGEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;                                   // whole warp exits together
    const F f(a, n, K);
    const int units = K / F::UNIT;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int ldx8 = ldx >> 3;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

    for (int base = lane; base < units; base += 32 * F::UNROLL) {
        typename F::Raw raw[F::UNROLL];
#pragma unroll
        for (int u = 0; u < F::UNROLL; ++u) {
            const int t = base + 32 * u;
            if (t < units) raw[u] = f.load(t);
        }
#pragma unroll
        for (int u = 0; u < F::UNROLL; ++u) {
            const int t = base + 32 * u;
            if (t >= units) continue;
#pragma unroll F::RUN_UNROLL
            for (int run = 0; run < F::RUNS; ++run) {
                float q[16], sc, off;
                F::codes(raw[u], run, q);
                F::scale(raw[u], t, run, sc, off);
                const int e8 = F::run0(t, run) >> 3;
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float xf[16];
                    unpack_bf16x8(__ldg(xv + m * ldx8 + e8), xf);
                    unpack_bf16x8(__ldg(xv + m * ldx8 + e8 + 1), xf + 8);
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 16; ++i) s = fmaf(q[i], xf[i], s);
                    acc[m] = fmaf(sc, s, acc[m]);
                    if (F::HAS_OFFSET) {
                        float sx = 0.f;
#pragma unroll
                        for (int i = 0; i < 16; ++i) sx += xf[i];
                        acc[m] = fmaf(off, sx, acc[m]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
        const float bn = bias != nullptr ? __bfloat162float(bias[n]) : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) qstore(y + (long long)m * ldy + n, acc[m] + bn);
    }
}

// ---- dequantize to bf16 (the prefill path) ------------------------------------------------------

template <class F>
__device__ __forceinline__ void dequant(const typename F::Args& a, bf16* __restrict__ out, int N, int K) {
    const int units = K / F::UNIT;
    const long long total = (long long)N * units;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long n = i / units;
        const int t = (int)(i % units);
        const F f(a, n, K);
        const typename F::Raw raw = f.load(t);
#pragma unroll
        for (int run = 0; run < F::RUNS; ++run) {
            float q[16], w[16], sc, off;
            F::codes(raw, run, q);
            F::scale(raw, t, run, sc, off);
#pragma unroll
            for (int i2 = 0; i2 < 16; ++i2) {
                const float p = __fmul_rn(sc, q[i2]);
                w[i2] = F::HAS_OFFSET ? __fadd_rn(p, off) : p;
            }
            uint4* dst = reinterpret_cast<uint4*>(out + n * K + F::run0(t, run));
            dst[0] = pack_bf16x8(w);
            dst[1] = pack_bf16x8(w + 8);
        }
    }
}

// ---- entry points ---------------------------------------------------------------------------------

#define QGEMV_FOR_M(ENTRY, OUTNAME, OUTT) \
    ENTRY(1, OUTNAME, OUTT) ENTRY(2, OUTNAME, OUTT) ENTRY(3, OUTNAME, OUTT) ENTRY(4, OUTNAME, OUTT) \
    ENTRY(5, OUTNAME, OUTT) ENTRY(6, OUTNAME, OUTT) ENTRY(7, OUTNAME, OUTT) ENTRY(8, OUTNAME, OUTT)
#define QGEMV_ALL(ENTRY) QGEMV_FOR_M(ENTRY, bf16, bf16) QGEMV_FOR_M(ENTRY, f32, float)
#define QGEMV_HEAD(FMT, M, OUTNAME) \
    extern "C" __global__ void __launch_bounds__(32 * QGEMV_WARPS) gemv_##FMT##_m##M##_##OUTNAME##_v1

#define QGEMV_Q8_0(M, OUTNAME, OUTT)                                                                \
    QGEMV_HEAD(q8_0, M, OUTNAME)(const bf16* x, int ldx, const uint4* qs, const __half* d,           \
                                 const bf16* bias, OUTT* y, int ldy, int N, int K) {                 \
        qgemv<M, Q8_0, OUTT>(x, ldx, Q8_0::Args{qs, d}, bias, y, ldy, N, K);                         \
    }
#define QGEMV_Q4_0(M, OUTNAME, OUTT)                                                                \
    QGEMV_HEAD(q4_0, M, OUTNAME)(const bf16* x, int ldx, const uint4* qs, const __half* d,           \
                                 const bf16* bias, OUTT* y, int ldy, int N, int K) {                 \
        qgemv<M, Q4_0, OUTT>(x, ldx, Q4_0::Args{qs, d, nullptr}, bias, y, ldy, N, K);                \
    }
#define QGEMV_Q4_1(M, OUTNAME, OUTT)                                                                \
    QGEMV_HEAD(q4_1, M, OUTNAME)(const bf16* x, int ldx, const uint4* qs, const __half* d,           \
                                 const __half* m, const bf16* bias, OUTT* y, int ldy, int N, int K) {\
        qgemv<M, Q4_1, OUTT>(x, ldx, Q4_1::Args{qs, d, m}, bias, y, ldy, N, K);                      \
    }
#define QGEMV_Q4_K(M, OUTNAME, OUTT)                                                                \
    QGEMV_HEAD(q4_k, M, OUTNAME)(const bf16* x, int ldx, const uint4* qs, const unsigned int* scales, \
                                 const __half* d, const __half* dmin, const bf16* bias, OUTT* y,     \
                                 int ldy, int N, int K) {                                            \
        qgemv<M, Q4_K, OUTT>(x, ldx, Q4_K::Args{qs, scales, d, dmin}, bias, y, ldy, N, K);           \
    }
#define QGEMV_Q6_K(M, OUTNAME, OUTT)                                                                \
    QGEMV_HEAD(q6_k, M, OUTNAME)(const bf16* x, int ldx, const uint4* ql, const uint4* qh,           \
                                 const uint4* scales, const __half* d, const bf16* bias, OUTT* y,    \
                                 int ldy, int N, int K) {                                            \
        qgemv<M, Q6_K, OUTT>(x, ldx, Q6_K::Args{ql, qh, scales, d}, bias, y, ldy, N, K);             \
    }

QGEMV_ALL(QGEMV_Q8_0)
QGEMV_ALL(QGEMV_Q4_0)
QGEMV_ALL(QGEMV_Q4_1)
QGEMV_ALL(QGEMV_Q4_K)
QGEMV_ALL(QGEMV_Q6_K)

extern "C" {
__global__ void dequant_q8_0_bf16_v1(const uint4* qs, const __half* d, bf16* out, int N, int K) {
    dequant<Q8_0>(Q8_0::Args{qs, d}, out, N, K);
}
__global__ void dequant_q4_0_bf16_v1(const uint4* qs, const __half* d, bf16* out, int N, int K) {
    dequant<Q4_0>(Q4_0::Args{qs, d, nullptr}, out, N, K);
}
__global__ void dequant_q4_1_bf16_v1(const uint4* qs, const __half* d, const __half* m, bf16* out, int N, int K) {
    dequant<Q4_1>(Q4_1::Args{qs, d, m}, out, N, K);
}
__global__ void dequant_q4_k_bf16_v1(const uint4* qs, const unsigned int* scales, const __half* d,
                                     const __half* dmin, bf16* out, int N, int K) {
    dequant<Q4_K>(Q4_K::Args{qs, scales, d, dmin}, out, N, K);
}
__global__ void dequant_q6_k_bf16_v1(const uint4* ql, const uint4* qh, const uint4* scales, const __half* d,
                                     bf16* out, int N, int K) {
    dequant<Q6_K>(Q6_K::Args{ql, qh, scales, d}, out, N, K);
}
}
