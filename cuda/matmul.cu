// matmul.cu: the decode-time matrix product (GEMV over a few rows) and the bias add that
// follows a cuBLAS GEMM.
//
// numpy twin: NumpyBackend.linear   y = x @ w.T + b      (w is HF (out, in) = (N, K))
//
// gemv_bf16_m<M>_<out>_v1:
//   x (M, K) bf16, row stride ldx; W (N, K) bf16 contiguous; b (N,) bf16 or null;
//   y (M, N) bf16 or fp32, row stride ldy.  fp32 accumulation in a fixed order per lane.
//   Requires K % 8 == 0 and ldx % 8 == 0 (16-byte loads; the Python side checks and falls
//   back to cuBLAS otherwise). M is a template parameter, 1..GEMV_MAX_M.
//   Launch: grid (ceil(N / GEMV_WARPS)), block 32 * GEMV_WARPS; one warp per output column n:
//   each lane streams 16-byte chunks of W's row n (GEMV_UNROLL loads in flight, L1 bypassed)
//   and multiplies them with the M rows of x (L1-resident, shared by all warps of the block),
//   then a warp reduction; lane 0 writes the M outputs.
//   Memory bound: W is read once per step, so the floor is N*K*2 bytes / bandwidth.
//
// bias_add_<out>_v1: y[m, n] += b[n] after a cuBLAS product (cuBLAS has no bias epilogue
//   without cuBLASLt). y (M, N) with row stride ldy. grid-stride loop over M*N.
#include "common.cuh"

#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 4
#endif

__device__ __forceinline__ float dot8(const uint4 a, const uint4 b) {
    float fa[8], fb[8];
    unpack_bf16x8(a, fa);
    unpack_bf16x8(b, fb);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(fa[i], fb[i], s);
    return s;
}

__device__ __forceinline__ void store_out(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }

template <int M, typename OutT>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, int ldx, const bf16* __restrict__ W,
                                     const bf16* __restrict__ bias, OutT* __restrict__ y, int ldy, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;                                   // whole warp exits together
    const int nk8 = K >> 3;
    const uint4* wrow = reinterpret_cast<const uint4*>(W + (long long)n * K);
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    const int ldx8 = ldx >> 3;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

    for (int base = lane; base < nk8; base += 32 * GEMV_UNROLL) {
        uint4 w[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int k8 = base + 32 * u;
            w[u] = k8 < nk8 ? ld_stream_u4(wrow + k8) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int k8 = base + 32 * u;
            if (k8 < nk8) {
#pragma unroll
                for (int m = 0; m < M; ++m) acc[m] += dot8(w[u], __ldg(xv + m * ldx8 + k8));
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
        const float bn = bias != nullptr ? __bfloat162float(bias[n]) : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) store_out(y + (long long)m * ldy + n, acc[m] + bn);
    }
}

#define GEMV_ENTRY(M, OUTNAME, OUTT)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                     \
        gemv_bf16_m##M##_##OUTNAME##_v1(const bf16* x, int ldx, const bf16* W, const bf16* bias,     \
                                         OUTT* y, int ldy, int N, int K) {                            \
        gemv<M, OUTT>(x, ldx, W, bias, y, ldy, N, K);                                                 \
    }

GEMV_ENTRY(1, bf16, bf16)
GEMV_ENTRY(2, bf16, bf16)
GEMV_ENTRY(3, bf16, bf16)
GEMV_ENTRY(4, bf16, bf16)
GEMV_ENTRY(5, bf16, bf16)
GEMV_ENTRY(6, bf16, bf16)
GEMV_ENTRY(7, bf16, bf16)
GEMV_ENTRY(8, bf16, bf16)
GEMV_ENTRY(1, f32, float)
GEMV_ENTRY(2, f32, float)
GEMV_ENTRY(3, f32, float)
GEMV_ENTRY(4, f32, float)
GEMV_ENTRY(5, f32, float)
GEMV_ENTRY(6, f32, float)
GEMV_ENTRY(7, f32, float)
GEMV_ENTRY(8, f32, float)

extern "C" {
__global__ void bias_add_bf16_v1(bf16* y, int ldy, const bf16* b, int M, int N) {
    const long long total = (long long)M * N;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int m = (int)(i / N), n = (int)(i % N);
        bf16* p = y + (long long)m * ldy + n;
        *p = __float2bfloat16_rn(__bfloat162float(*p) + __bfloat162float(b[n]));
    }
}
__global__ void bias_add_f32_v1(float* y, int ldy, const bf16* b, int M, int N) {
    const long long total = (long long)M * N;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x) {
        const int m = (int)(i / N), n = (int)(i % N);
        y[(long long)m * ldy + n] += __bfloat162float(b[n]);
    }
}
}
