// swiglu.cu: the SwiGLU gate.
//
// numpy twin: NumpyBackend.silu_mul   out = gate / (1 + exp(-gate)) * up
//
// Shapes: gate, up (rows, H) bf16 with row strides ldg, ldu (so they may be two halves of
//         one fused w1|w3 product); out (rows, H) bf16 contiguous. fp32 math, expf (not the
//         fast __expf: the result is rounded to bf16 anyway, and this keeps large |gate| exact).
// Launch: grid-stride loop; grid (min(ceil(total / SWIGLU_THREADS), 65535*...)), block SWIGLU_THREADS.
// Versions: v1 scalar (any H / strides), v2 8 elements per thread with 16-byte accesses
//           (H, ldg, ldu multiples of 8).
#include "common.cuh"

#ifndef SWIGLU_THREADS
#define SWIGLU_THREADS 256
#endif

__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.f + expf(-g)) * u; }

extern "C" {
__global__ void __launch_bounds__(SWIGLU_THREADS) silu_mul_bf16_v1(const bf16* gate, int ldg, const bf16* up, int ldu,
                                                                   bf16* out, int rows, int H) {
    const long long total = (long long)rows * H;
    for (long long i = blockIdx.x * (long long)SWIGLU_THREADS + threadIdx.x; i < total;
         i += (long long)gridDim.x * SWIGLU_THREADS) {
        const long long r = i / H, c = i % H;
        out[i] = __float2bfloat16_rn(silu_mul1(__bfloat162float(gate[r * ldg + c]), __bfloat162float(up[r * ldu + c])));
    }
}

__global__ void __launch_bounds__(SWIGLU_THREADS) silu_mul_bf16_v2(const bf16* gate, int ldg, const bf16* up, int ldu,
                                                                   bf16* out, int rows, int H) {
    const int h8 = H >> 3;
    const long long total = (long long)rows * h8;
    for (long long i = blockIdx.x * (long long)SWIGLU_THREADS + threadIdx.x; i < total;
         i += (long long)gridDim.x * SWIGLU_THREADS) {
        const long long r = i / h8, c = i % h8;
        float g[8], u[8];
        unpack_bf16x8(reinterpret_cast<const uint4*>(gate + r * ldg)[c], g);
        unpack_bf16x8(reinterpret_cast<const uint4*>(up + r * ldu)[c], u);
#pragma unroll
        for (int j = 0; j < 8; ++j) g[j] = silu_mul1(g[j], u[j]);
        reinterpret_cast<uint4*>(out)[i] = pack_bf16x8(g);
    }
}
}
