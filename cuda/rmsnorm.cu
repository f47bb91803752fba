// rmsnorm.cu: RMSNorm, plain and fused with the residual add.
//
// numpy twins: NumpyBackend.rms_norm      out = x / sqrt(mean(x*x) + eps) * w
//              NumpyBackend.add_rms_norm  s = x + d ; out = rms_norm(s, w, eps) ; returns (s, out)
//
// Shapes: x, d (rows, dim) bf16 with row strides ldx, ldd (elements); w (dim,) bf16;
//         out, s (rows, dim) bf16 contiguous. s is rounded to bf16 *before* it is normalized,
//         so rms_norm(s) computed later from the stored s gives the same bits (and this is
//         what transformers does in bf16: the residual stream is a bf16 tensor).
//         Math in fp32: sum of squares by a block reduction, rsqrtf.
// Launch: grid (rows), block RMS_THREADS; one block per row, two passes over the row (the
//         second re-reads the row from L1/L2).
// Versions: v1 = scalar (any dim and stride), v2 = 16-byte vectors (dim, ldx, ldd multiples
//           of 8; the Python side picks v2 when it can).
#include "common.cuh"

#ifndef RMS_THREADS
#define RMS_THREADS 256
#endif

template <bool ADD>
__device__ __forceinline__ void rms_norm_scalar(const bf16* __restrict__ x, int ldx, const bf16* __restrict__ d, int ldd,
                                                const bf16* __restrict__ w, bf16* __restrict__ s_out,
                                                bf16* __restrict__ out, int dim, float eps) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * ldx;
    bf16* orow = out + row * dim;
    float ss = 0.f;
    for (int c = threadIdx.x; c < dim; c += RMS_THREADS) {
        float v = __bfloat162float(xr[c]);
        if (ADD) {
            const bf16 sb = __float2bfloat16_rn(v + __bfloat162float(d[row * ldd + c]));
            s_out[row * dim + c] = sb;
            v = __bfloat162float(sb);
        }
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float rstd = rsqrtf(ss / (float)dim + eps);
    const bf16* src = ADD ? s_out + row * dim : xr;
    for (int c = threadIdx.x; c < dim; c += RMS_THREADS)
        orow[c] = __float2bfloat16_rn(__bfloat162float(src[c]) * rstd * __bfloat162float(w[c]));
}

template <bool ADD>
__device__ __forceinline__ void rms_norm_vec(const bf16* __restrict__ x, int ldx, const bf16* __restrict__ d, int ldd,
                                             const bf16* __restrict__ w, bf16* __restrict__ s_out,
                                             bf16* __restrict__ out, int dim, float eps) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    const int n8 = dim >> 3;
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * ldx);
    const uint4* dr = reinterpret_cast<const uint4*>(d + row * ldd);
    uint4* sr = reinterpret_cast<uint4*>(s_out + row * dim);
    uint4* orow = reinterpret_cast<uint4*>(out + row * dim);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    float ss = 0.f;
    for (int c = threadIdx.x; c < n8; c += RMS_THREADS) {
        float v[8];
        unpack_bf16x8(xr[c], v);
        if (ADD) {
            float dv[8];
            unpack_bf16x8(dr[c], dv);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] += dv[i];
            const uint4 packed = pack_bf16x8(v);
            sr[c] = packed;
            unpack_bf16x8(packed, v);   // continue from the rounded residual
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
    ss = block_sum(ss, red);
    const float rstd = rsqrtf(ss / (float)dim + eps);
    const uint4* src = ADD ? reinterpret_cast<const uint4*>(sr) : xr;
    for (int c = threadIdx.x; c < n8; c += RMS_THREADS) {
        float v[8], g[8];
        unpack_bf16x8(src[c], v);
        unpack_bf16x8(wr[c], g);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = v[i] * rstd * g[i];
        orow[c] = pack_bf16x8(v);
    }
}

extern "C" {
__global__ void __launch_bounds__(RMS_THREADS) rms_norm_bf16_v1(const bf16* x, int ldx, const bf16* w, bf16* out, int dim, float eps) {
    rms_norm_scalar<false>(x, ldx, nullptr, 0, w, nullptr, out, dim, eps);
}
__global__ void __launch_bounds__(RMS_THREADS) rms_norm_bf16_v2(const bf16* x, int ldx, const bf16* w, bf16* out, int dim, float eps) {
    rms_norm_vec<false>(x, ldx, nullptr, 0, w, nullptr, out, dim, eps);
}
__global__ void __launch_bounds__(RMS_THREADS) add_rms_norm_bf16_v1(const bf16* x, int ldx, const bf16* d, int ldd, const bf16* w,
                                                                    bf16* s_out, bf16* out, int dim, float eps) {
    rms_norm_scalar<true>(x, ldx, d, ldd, w, s_out, out, dim, eps);
}
__global__ void __launch_bounds__(RMS_THREADS) add_rms_norm_bf16_v2(const bf16* x, int ldx, const bf16* d, int ldd, const bf16* w,
                                                                    bf16* s_out, bf16* out, int dim, float eps) {
    rms_norm_vec<true>(x, ldx, d, ldd, w, s_out, out, dim, eps);
}
}
