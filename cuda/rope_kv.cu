// rope_kv.cu: rotary embedding on q and k, fused with the KV-cache write (and the int8/fp8
// quantization of values; int8/fp8 keys go on to kv_close.cu).
//
// numpy twins: NumpyBackend.rope_kv_write  (rope_rotate on q and k, then NumpyKVCache.write)
//              kv_cache.quantize            (int8 / fp8 values, per vector)
//   q' = rotate_half(q, pos);  k' = rotate_half(k, pos)
//   blk = tables[b, (pos // block_size) % ring]        (b = seq_of_token[t]; kv_cache.py)
//   cache.k[blk, pos % block_size] = k' ; cache.v[blk, pos % block_size] = v   (v quantized if int8/fp8)
//   int8/fp8: k' is written as float32 to kr[t] instead; kv_close.cu quantizes the blocks it
//   completes (keys per channel over a block) and keeps the open block's keys.
//   rotate_half: pairs (j, j + hd/2) turn by angle pos * inv_freq[j]:
//     x1' = x1*cos - x2*sin ; x2' = x2*cos + x1*sin
//
// Bit-exactness with numpy: cos/sin come from tables the host computes with numpy exactly as
// rope_rotate does (float32 pos * inv_freq, np.cos / np.sin), and the rotation uses __fmul_rn /
// __fadd_rn / __fsub_rn so no multiply-add is contracted. Quantization: scale = absmax / qmax
// and y = x / scale use __fdiv_rn (IEEE division, never the fast reciprocal), clip to +-qmax,
// then rintf (round half to even) for int8 or __nv_cvt_float_to_fp8(RNE, satfinite) for fp8.
// --use_fast_math cannot touch these intrinsics. -ftz=true (which CuPy always passes) only
// matters for fp32 denormals (|x| < 1.2e-38), which real activations never are; an all-zero
// vector stores scale 0 and zeros, as in numpy.
//
// Shapes: q (T, n_heads, hd) bf16, token stride ldq, heads contiguous (hd apart); rotated in
//         place. k, v (T, n_kv, hd) bf16, token strides ldk, ldv. cos/sin (n_pos, hd/2) fp32.
//         positions (T,), seq_of_token (T,), tables (B, ring) int32 block ids (device). Cache
//         arrays of one layer: kc, vc (n_blocks, block_size, n_kv, hd) of the storage kind;
//         vs (n_blocks, block_size, n_kv) fp32 value scales and kr (T, n_kv, hd) fp32 rotated
//         keys (quantized kinds only; null otherwise). hd even and
//         <= 256. Every written position's table entry names a block (the engine grows the
//         table before the forward); tokens of one forward never share an entry (rows that
//         repeat one, a CUDA graph's padding, write identical bytes).
// Launch: grid (T, ceil((n_heads + 2*n_kv) / ROPE_WARPS)), block 32 * ROPE_WARPS. One warp per
//         (token, vector); vectors are q heads, then k heads, then v heads. Lane l owns pairs
//         j = l, l+32, ... (coalesced 2-byte accesses; this kernel moves little data).
// Versions: v1. The KV storage kind is the compile-time define KV_KIND (see common.cuh), so one
//           module is compiled per cache dtype that is actually used.
#include "common.cuh"

#ifndef KV_KIND
#define KV_KIND 0
#endif
#ifndef ROPE_WARPS
#define ROPE_WARPS 4
#endif

typedef KVT<KV_KIND> KV;
typedef KV::T kv_t;

// vals[i] belongs to element index el[i] of the vector (el < 0: unused). The whole warp calls
// this (the quantized path reduces the absmax across it).
template <int KIND>
__device__ __forceinline__ void store_vector(const float (&vals)[8], const int (&el)[8],
                                             typename KVT<KIND>::T* __restrict__ dst, float* __restrict__ scale_dst) {
    if constexpr (!KVT<KIND>::quantized) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (el[i] >= 0) KVT<KIND>::store(dst + el[i], vals[i]);
    } else {
        const float qmax = KVT<KIND>::qmax;
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (el[i] >= 0) amax = fmaxf(amax, fabsf(vals[i]));
        amax = warp_max(amax);                       // max is exact in any order
        const float scale = __fdiv_rn(amax, qmax);
        const float safe = scale > 0.f ? scale : 1.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (el[i] >= 0) {
                const float y = fminf(fmaxf(__fdiv_rn(vals[i], safe), -qmax), qmax);
                dst[el[i]] = KVT<KIND>::quantize(y);
            }
        }
        if ((threadIdx.x & 31) == 0) *scale_dst = scale;
    }
}

extern "C" __global__ void __launch_bounds__(32 * ROPE_WARPS)
rope_kv_write_v1(bf16* q, int ldq, const bf16* k, int ldk, const bf16* v, int ldv,
                 const float* cos_tab, const float* sin_tab,
                 const int* positions, const int* seq_of_token, const int* tables,
                 kv_t* kc, kv_t* vc, float* vs, float* kr,
                 int ring, int block_size, int n_heads, int n_kv, int hd) {
    const int t = blockIdx.x;
    const int vec = blockIdx.y * ROPE_WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (vec >= n_heads + 2 * n_kv) return;
    const int half = hd >> 1;
    const int pos = positions[t];

    if (vec < n_heads) {                               // q head: rotate in place
        bf16* x = q + (long long)t * ldq + (long long)vec * hd;
        for (int j = lane; j < half; j += 32) {
            const float c = cos_tab[(long long)pos * half + j], s = sin_tab[(long long)pos * half + j];
            const float x1 = __bfloat162float(x[j]), x2 = __bfloat162float(x[j + half]);
            x[j] = __float2bfloat16_rn(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
            x[j + half] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
        }
        return;
    }

    const bool is_k = vec < n_heads + n_kv;
    const int g = is_k ? vec - n_heads : vec - n_heads - n_kv;
    const long long entry = kv_entry(tables + (long long)seq_of_token[t] * ring, ring, block_size, pos, n_kv, g);
    kv_t* dst = (is_k ? kc : vc) + entry * hd;
    float* sdst = KV::quantized ? vs + entry : nullptr;

    float vals[8];
    int el[8];
    if (is_k) {                                        // rotate k; lane owns pairs j = lane + 32 i
        const bf16* x = k + (long long)t * ldk + (long long)g * hd;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int j = lane + 32 * i;
            if (j < half) {
                const float c = cos_tab[(long long)pos * half + j], s = sin_tab[(long long)pos * half + j];
                const float x1 = __bfloat162float(x[j]), x2 = __bfloat162float(x[j + half]);
                vals[2 * i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
                vals[2 * i + 1] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
                el[2 * i] = j;
                el[2 * i + 1] = j + half;
            } else {
                vals[2 * i] = vals[2 * i + 1] = 0.f;
                el[2 * i] = el[2 * i + 1] = -1;
            }
        }
    } else {                                           // v: copied (and quantized) as is
        const bf16* x = v + (long long)t * ldv + (long long)g * hd;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int j = lane + 32 * i;
            vals[i] = j < hd ? __bfloat162float(x[j]) : 0.f;
            el[i] = j < hd ? j : -1;
        }
    }
    if (KV::quantized && is_k) {                       // int8/fp8 keys: rotated, float32, for kv_close.cu
        float* kdst = kr + ((long long)t * n_kv + g) * hd;
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (el[i] >= 0) kdst[el[i]] = vals[i];
        return;
    }
    store_vector<KV_KIND>(vals, el, dst, sdst);
}
