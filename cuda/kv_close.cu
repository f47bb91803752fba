// kv_close.cu: the key half of an int8 / fp8 cache write (kv_cache.py): quantize every block a
// forward completes, per channel, and keep the keys of each sequence's open block in full
// precision. Runs after rope_kv.cu (which rotates the keys in place and stores the values).
//
// numpy twin: NumpyKVCache.write (keys), kv_cache.quantize_block
//   For sequence b (start s, len L, end e = s + L, row0 = s - s % bs) the keys of positions
//   row0 .. e-1 are: positions < s from its open row k_open[opens[b]] (offset p % bs), the rest
//   from the forward's rotated keys kr (token cu_lens[b] + p - s), float32 both (as numpy). Every block row completed by
//   position e - 1 (rows starting below e - e % bs) is quantized, per kv head g and channel:
//     c = fp16((max x + min x) * 0.5);  y = x - c;  s = fp16(max|y| / qmax)
//     q = rint (int8) / e4m3 RNE (fp8) of clip(y / s, -qmax, qmax), 0 where s = 0
//   into the row's block tables[b, (r / bs) % R]: codes kc[blk, 0..bs-1, g, ch], k_scale /
//   k_zero[blk, g, ch]. The keys of positions e - e % bs .. e-1 (those >= s) are copied to
//   the open row. All float32 steps use __fadd_rn / __fmul_rn / __fdiv_rn (no contraction,
//   IEEE division), fp16 conversions round to nearest even, as numpy does: stored bytes agree
//   bit for bit (tests/test_cuda_ops.py).
//
// Ownership: thread ch of CTA (b, g) owns channel ch of sequence b's head g in every array it
//   touches, so reading the old open keys and then overwriting them needs no barrier, and
//   CTAs never share an element (graph padding rows repeat a real row: they write the same
//   bytes to the same elements).
// Launch: grid (B, n_kv), block CLOSE_THREADS; channels ch = threadIdx.x, += CLOSE_THREADS.
// Shapes: kr (T, n_kv, hd) fp32 (from rope_kv.cu); starts, lens, cu_lens, opens (B,) int32;
//   tables (B, R) int32; k_open (n_open, bs, n_kv, hd) fp32; kc (n_blocks, bs, n_kv, hd) of
//   kind KV_KIND (3 int8, 4 fp8); k_scale, k_zero (n_blocks, n_kv, hd) fp16.
// Versions: v1.
#include "common.cuh"

#ifndef KV_KIND
#define KV_KIND 3
#endif
#ifndef CLOSE_THREADS
#define CLOSE_THREADS 64
#endif

typedef KVT<KV_KIND> KV;
typedef KV::T kv_t;

// The key of position p (row0 <= p < e) for one channel: the open row below s, kr from s on.
__device__ __forceinline__ float key_at(int p, int s, const float* kr_tok0, const float* open_g,
                                        int bs, int n_kv, int hd, int ch) {
    return p < s ? open_g[(long long)(p % bs) * n_kv * hd + ch] : kr_tok0[(long long)(p - s) * n_kv * hd + ch];
}

extern "C" __global__ void __launch_bounds__(CLOSE_THREADS)
kv_close_v1(const float* kr, const int* starts, const int* lens, const int* cu_lens, const int* opens,
            const int* tables, int ring, int bs, float* k_open, kv_t* kc, __half* k_scale, __half* k_zero,
            int n_kv, int hd) {
    if constexpr (KV::quantized) {
        const int b = blockIdx.x, g = blockIdx.y;
        const int s = starts[b], e = s + lens[b];
        const int row0 = s - s % bs, closed = e - e % bs;
        const float* kr_tok0 = kr + ((long long)cu_lens[b] * n_kv + g) * hd;
        float* open_g = k_open + (long long)opens[b] * bs * n_kv * hd + (long long)g * hd;
        const float qmax = KV::qmax;
        for (int ch = threadIdx.x; ch < hd; ch += CLOSE_THREADS) {
            for (int r = row0; r < closed; r += bs) {
                float mx = TL_NEG_INF, mn = -TL_NEG_INF;
                for (int p = r; p < r + bs; ++p) {
                    const float x = key_at(p, s, kr_tok0, open_g, bs, n_kv, hd, ch);
                    mx = fmaxf(mx, x);
                    mn = fminf(mn, x);
                }
                const __half c = __float2half_rn(__fmul_rn(__fadd_rn(mx, mn), 0.5f));
                const float cf = __half2float(c);
                float amax = 0.f;
                for (int p = r; p < r + bs; ++p)
                    amax = fmaxf(amax, fabsf(__fsub_rn(key_at(p, s, kr_tok0, open_g, bs, n_kv, hd, ch), cf)));
                const __half sc = __float2half_rn(__fdiv_rn(amax, qmax));
                const float sf = __half2float(sc);
                const long long blk = tables[(long long)b * ring + (r / bs) % ring];
                for (int p = r; p < r + bs; ++p) {
                    const float y = __fsub_rn(key_at(p, s, kr_tok0, open_g, bs, n_kv, hd, ch), cf);
                    const float t = sf > 0.f ? fminf(fmaxf(__fdiv_rn(y, sf), -qmax), qmax) : 0.f;
                    kc[((blk * bs + (p - r)) * n_kv + g) * hd + ch] = KV::quantize(t);
                }
                k_scale[(blk * n_kv + g) * hd + ch] = sc;
                k_zero[(blk * n_kv + g) * hd + ch] = c;
            }
            // The new open block: its positions from s on (those below s are there already).
            for (int p = max(closed, s); p < e; ++p)
                open_g[(long long)(p % bs) * n_kv * hd + ch] = kr_tok0[(long long)(p - s) * n_kv * hd + ch];
        }
    }
}
