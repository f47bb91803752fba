// sample.cu: next-token choice on the device, one block per row of logits.
//
// numpy twins: argmax  -> np.argmax(logits, axis=-1)   (first index among equal maxima; NaN ignored)
//              sample  -> tinyllm/sampling.py's order: temperature -> top-k -> top-p -> draw,
//                         with temperature 0 meaning greedy. The draw differs from sampling.py's
//                         numpy Generator stream (a different RNG), so it matches in distribution,
//                         not token for token; it is reproducible for a given (seed, step).
//
// argmax_f32_v1: logits (rows, V) fp32, row stride ld -> out (rows,) int32.
// sample_f32_v1: per row temperature (f32), top_k (int32, 0 = off), top_p (f32, 1 = off),
//   seed (uint64), step (int32) arrays on the device.
//   v = logits / temperature. top-k and top-p keep {v >= threshold}: the threshold is found by
//   a radix search over the order-preserving uint32 image of the float values (32 block-wide
//   passes each, so no sort and no scratch memory): top-k's is exactly the k-th largest value
//   (ties at it are kept), top-p's the largest one whose kept probability mass still reaches
//   top_p (the smallest top set with mass >= top_p, as transformers' TopPLogitsWarper keeps).
//   The draw is Gumbel-max: argmax over kept i of v_i - log(-log u_i), u_i a counter-based
//   hash of (seed, step, i): an exact sample from softmax(v) restricted to the kept set.
// Launch: grid (rows), block SAMPLE_THREADS.
// Versions: v1.
#include "common.cuh"

#ifndef SAMPLE_THREADS
#define SAMPLE_THREADS 1024
#endif

// Larger float <-> larger key (NaN maps above +inf or below -inf; logits are never NaN).
__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (value, index) argmax over the block: larger value wins, then the smaller index.
__device__ __forceinline__ void better(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
}

__device__ __forceinline__ int block_argmax(float v, int i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(TL_FULL_MASK, v, o), __shfl_xor_sync(TL_FULL_MASK, i, o));
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < nw ? sv[lane] : TL_NEG_INF;
    i = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(TL_FULL_MASK, v, o), __shfl_xor_sync(TL_FULL_MASK, i, o));
    return i;
}

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {   // splitmix64 finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

__device__ __forceinline__ float uniform01(unsigned long long seed, int step, int i) {
    const unsigned long long h = mix64(mix64(seed + 0x9e3779b97f4a7c15ull * (unsigned long long)(step + 1)) ^
                                       (0xd1b54a32d192ed03ull * (unsigned long long)(i + 1)));
    return ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);                    // in (0, 1)
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) argmax_f32_v1(const float* logits, int ld, int V, int* out) {
    const float* row = logits + (long long)blockIdx.x * ld;
    float best = TL_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) better(best, bi, row[i], i);
    const int r = block_argmax(best, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = r == 0x7fffffff ? 0 : r;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_f32_v1(const float* logits, int ld, int V, const float* temperature, const int* top_k, const float* top_p,
              const unsigned long long* seeds, const int* steps, int* out) {
    __shared__ float red[32];
    const int rowi = blockIdx.x;
    const float* row = logits + (long long)rowi * ld;
    const float temp = temperature[rowi];
    if (!(temp > 0.f)) {                                    // greedy
        float best = TL_NEG_INF;
        int bi = 0x7fffffff;
        for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) better(best, bi, row[i], i);
        const int r = block_argmax(best, bi);
        if (threadIdx.x == 0) out[rowi] = r == 0x7fffffff ? 0 : r;
        return;
    }
    // Scaled logits are (x - max) / temp: the largest is 0 and a tiny temperature sends the
    // rest to -inf instead of overflowing to +inf (the numpy twin does the same).
    float rmax = TL_NEG_INF;
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) rmax = fmaxf(rmax, row[i]);
    rmax = block_max(rmax, red);
    const float vmax = 0.f;

    // top-k: the k-th largest key (radix search, most significant bit first).
    unsigned int thr_k = 0u;
    const int k = top_k[rowi];
    if (k > 0 && k < V) {
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned int cand = thr_k | (1u << bit);
            float cnt = 0.f;
            for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) cnt += order_key((row[i] - rmax) / temp) >= cand ? 1.f : 0.f;
            if (block_sum(cnt, red) >= (float)k) thr_k = cand;
        }
    }
    // top-p over what top-k kept: the largest threshold whose mass still reaches top_p * Z.
    unsigned int thr = thr_k;
    const float pp = top_p[rowi];
    if (pp < 1.f) {
        float z = 0.f;
        for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
            const float v = (row[i] - rmax) / temp;
            z += order_key(v) >= thr_k ? expf(v - vmax) : 0.f;
        }
        const float target = pp * block_sum(z, red);
        unsigned int t = 0u;
        for (int bit = 31; bit >= 0; --bit) {
            const unsigned int cand = t | (1u << bit);
            const unsigned int lim = cand > thr_k ? cand : thr_k;
            float mass = 0.f;
            for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
                const float v = (row[i] - rmax) / temp;
                mass += order_key(v) >= lim ? expf(v - vmax) : 0.f;
            }
            if (block_sum(mass, red) >= target) t = cand;
        }
        thr = t > thr_k ? t : thr_k;
    }
    // Gumbel-max draw among the kept tokens.
    const unsigned long long seed = seeds[rowi];
    const int step = steps[rowi];
    float best = TL_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
        const float v = (row[i] - rmax) / temp;
        if (order_key(v) >= thr) better(best, bi, v - logf(-logf(uniform01(seed, step, i))), i);
    }
    const int r = block_argmax(best, bi);
    if (threadIdx.x == 0) out[rowi] = r == 0x7fffffff ? 0 : r;
}
