// attention_decode.cu: split-K flash decoding, one query token per sequence.
//
// numpy twin: NumpyBackend.attention (with every lens[b] == 1)
//   out[b, h] = softmax_p(q[b, h] . k[p, g] * scale) @ v[p, g],  g = h // n_rep,
//   p over the positions the query at qp = starts[b] sees (common.cuh key_visible), each read
//   through b's block table (common.cuh kv_entry: the paged cache of kv_cache.py).
//
// decode_split_hd<HD>_r<REP>_v1: grid (n_splits, n_dec, n_kv * rep_chunks), block 32*DEC_WARPS.
//   The batch's sequences that bring exactly one token are listed in dec_seqs (n_dec of them;
//   in a mixed step the others go through attention_prefill.cu, writing other output rows).
//   A CTA takes split s of sequence b = dec_seqs[y]'s visible key range [lo, qp] (split_len
//   positions each; lo = max(kmin, qp - W + 1), so no key below the window is ever loaded)
//   for kv head g and up to REP query heads of g's group: every K/V vector is loaded once for
//   all of them (GQA). Lanes work in groups of HD/8: a group owns one key at a time and each
//   lane of it 8 consecutive dims (16-byte loads for bf16/fp16, 8-byte for int8/fp8);
//   DEC_UNROLL keys per group (2 when REP = 8, for registers) are loaded before use, so a CTA
//   keeps DEC_WARPS*(256/HD)*DEC_UNROLL keys of K and V in flight. Scores are reduced across the group with shuffles;
//   each group keeps its own online-softmax state (m, l, acc) per head, and the CTA merges its
//   groups through shared memory into one partial (m, l, unnormalized acc) per (split, b, head).
//   Quantized caches: keys are dequantized per channel as they are loaded (common.cuh
//   load_key8: closed blocks from codes, scale and offset; the open block from the sequence's
//   float32 open row); a value's per-vector scale multiplies its probability, so value codes
//   are never rescaled element by element.
// decode_reduce_v1: grid (n_dec, n_heads), block DEC_RED_THREADS: merges the splits:
//   M = max m_s, L = sum l_s 2^(m_s - M), out = sum acc_s 2^(m_s - M) / L.
//
// Shapes: q (T, n_heads, hd) bf16, token stride ldq (multiple of 8); sequence b's token is row
//   cu_lens[b]; cache of one layer as in kv_cache.py: kc, vc (n_blocks, block_size, n_kv, hd),
//   and for int8/fp8 ks, kz (n_blocks, n_kv, hd) fp16 key scales and offsets, vs (n_blocks,
//   block_size, n_kv) fp32 value scales, k_open (n_open, block_size, n_kv, hd) fp32 and
//   opens (B,) int32 (kv_cache.py); tables (B, ring) int32 block ids;
//   part_m, part_l (n_splits, n_dec, n_heads)
//   fp32; part_o (n_splits, n_dec, n_heads, hd) fp32; out (T, n_heads*hd) bf16, token stride
//   ldo. hd % 8 == 0, hd <= HD in {64, 128}.
//   A CTA whose split is empty (short sequences in a ragged batch) writes m = -inf, l = 0.
// Versions: v1. KV_KIND is a compile-time define (one module per cache dtype in use).
#include "common.cuh"

#ifndef KV_KIND
#define KV_KIND 0
#endif
#ifndef DEC_WARPS
#define DEC_WARPS 4
#endif
#ifndef DEC_UNROLL
#define DEC_UNROLL 4
#endif

typedef KVT<KV_KIND> KV;
typedef KV::T kv_t;

template <int HD, int REP>
__device__ __forceinline__ void decode_split(
    const bf16* __restrict__ q, int ldq, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const __half* __restrict__ ks, const __half* __restrict__ kz, const float* __restrict__ vs,
    const float* __restrict__ k_open, const int* __restrict__ opens, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_o, const int* dec_seqs, const int* tables,
    const int* starts, const int* cu_lens, int n_dec, int ring, int block_size, int n_heads, int n_kv, int hd,
    int window, float sl2, int split_len) {
    constexpr int G = HD / 8;                    // lanes per key
    constexpr int KPW = 32 / G;                  // keys per warp at a time
    constexpr int NG = DEC_WARPS * KPW;          // lane groups per CTA
    // 8 heads' state (q, acc) already takes ~130 registers: halve the unroll there.
    constexpr int U = (REP >= 8 && DEC_UNROLL > 2) ? 2 : DEC_UNROLL;
    constexpr int NT = 32 * DEC_WARPS;
    __shared__ float sm_m[REP][NG], sm_l[REP][NG];
    __shared__ __align__(16) float sm_acc[REP][NG][HD];

    const int n_rep = n_heads / n_kv;
    const int rep_chunks = (n_rep + REP - 1) / REP;
    const int split = blockIdx.x, y = blockIdx.y, b = dec_seqs[y];
    const int g = blockIdx.z / rep_chunks, h0 = g * n_rep + (blockIdx.z % rep_chunks) * REP;
    const int nh = min(REP, g * n_rep + n_rep - h0);   // heads of this CTA
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = warp * KPW + lane / G, d0 = (lane % G) * 8;
    const bool dvalid = d0 < hd;

    const int t = cu_lens[b];
    const int qp = starts[b];                    // the one query's position
    const int total = qp + 1;
    const int kmin = total - min(total, ring * block_size);
    const int lo = max(kmin, window > 0 ? qp - window + 1 : 0);
    const int s0 = lo + split * split_len;
    const int s1 = min(s0 + split_len, qp + 1);
    const long long part = ((long long)split * n_dec + y) * n_heads;

    if (s0 >= s1) {                              // nothing to do: an empty partial
        for (int e = threadIdx.x; e < nh; e += NT) {
            part_m[part + h0 + e] = TL_NEG_INF;
            part_l[part + h0 + e] = 0.f;
        }
        for (int e = threadIdx.x; e < nh * hd; e += NT) part_o[(part + h0 + e / hd) * hd + e % hd] = 0.f;
        return;
    }

    float qr[REP][8];
#pragma unroll
    for (int r = 0; r < REP; ++r) {
        if (r < nh && dvalid) {
            unpack_bf16x8(*reinterpret_cast<const uint4*>(q + (long long)t * ldq + (long long)(h0 + r) * hd + d0), qr[r]);
#pragma unroll
            for (int i = 0; i < 8; ++i) qr[r][i] *= sl2;
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) qr[r][i] = 0.f;
        }
    }
    float m[REP], l[REP], acc[REP][8];
#pragma unroll
    for (int r = 0; r < REP; ++r) {
        m[r] = TL_NEG_INF;
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[r][i] = 0.f;
    }
    const int* table = tables + (long long)b * ring;
    const int closed = total - total % block_size;                        // int8/fp8: the open block from here
    const float* open_row = KV::quantized ? k_open + (long long)opens[b] * block_size * n_kv * hd : nullptr;

    for (int base = s0; base < s1; base += NG * U) {
        typename KV::Raw8 kraw[U], vraw[U];
        float kq[U][8];                          // int8/fp8 keys, dequantized as loaded
        float sv[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int p = base + u * NG + grp;
            ok[u] = p < s1;
            sv[u] = 1.f;
            kraw[u] = typename KV::Raw8();
            vraw[u] = typename KV::Raw8();
#pragma unroll
            for (int i = 0; i < 8; ++i) kq[u][i] = 0.f;
            if (ok[u] && dvalid) {
                const long long entry = kv_entry(table, ring, block_size, p, n_kv, g);
                vraw[u] = KV::ld8(vc + entry * hd + d0);
                if constexpr (KV::quantized) {
                    load_key8<KV_KIND>(kc, ks, kz, open_row, table, ring, block_size, closed, p, n_kv, g, hd, d0, kq[u]);
                    sv[u] = vs[entry];
                } else {
                    kraw[u] = KV::ld8(kc + entry * hd + d0);
                }
            }
        }
        float s[U][REP];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kf[8];
            if constexpr (KV::quantized) {
#pragma unroll
                for (int i = 0; i < 8; ++i) kf[i] = kq[u][i];
            } else {
                KV::cvt8(kraw[u], kf);
            }
#pragma unroll
            for (int r = 0; r < REP; ++r) {
                float a = 0.f;
#pragma unroll
                for (int i = 0; i < 8; ++i) a = fmaf(qr[r][i], kf[i], a);
#pragma unroll
                for (int o = G / 2; o > 0; o >>= 1) a += __shfl_xor_sync(TL_FULL_MASK, a, o);
                s[u][r] = ok[u] ? a : TL_NEG_INF;
            }
        }
#pragma unroll
        for (int r = 0; r < REP; ++r) {
            float mx = m[r];
#pragma unroll
            for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][r]);
            const float m_use = mx == TL_NEG_INF ? 0.f : mx;
            const float alpha = exp2f(m[r] - m_use);
            m[r] = mx;
            l[r] *= alpha;
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r][i] *= alpha;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const float p = exp2f(s[u][r] - m_use);
                l[r] += p;
                s[u][r] = p * sv[u];             // v's scale folded into the weight
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float vf[8];
            KV::cvt8(vraw[u], vf);
#pragma unroll
            for (int r = 0; r < REP; ++r)
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[r][i] = fmaf(s[u][r], vf[i], acc[r][i]);
        }
    }

    // Merge the CTA's lane groups.
#pragma unroll
    for (int r = 0; r < REP; ++r) {
        if (lane % G == 0) {
            sm_m[r][grp] = m[r];
            sm_l[r][grp] = l[r];
        }
        // two 16-byte stores: lanes of a quarter warp 32 bytes apart conflict 2 ways at most
        // (8 scalar stores 32 bytes apart conflicted 8 ways; scripts/kernel_profile.py)
        float4* dst = reinterpret_cast<float4*>(&sm_acc[r][grp][d0]);
        dst[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        dst[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nh * hd; e += NT) {
        const int r = e / hd, d = e % hd;
        float M = TL_NEG_INF;
        for (int k = 0; k < NG; ++k) M = fmaxf(M, sm_m[r][k]);
        const float M_use = M == TL_NEG_INF ? 0.f : M;
        float L = 0.f, O = 0.f;
        for (int k = 0; k < NG; ++k) {
            const float w = exp2f(sm_m[r][k] - M_use);
            L += sm_l[r][k] * w;
            O += sm_acc[r][k][d] * w;
        }
        part_o[(part + h0 + r) * hd + d] = O;
        if (d == 0) {
            part_m[part + h0 + r] = M;
            part_l[part + h0 + r] = L;
        }
    }
}

#define DECODE_ARGS                                                                                    \
    const bf16 *q, int ldq, const kv_t *kc, const kv_t *vc, const __half *ks, const __half *kz,       \
        const float *vs, const float *k_open, const int *opens, float *part_m, float *part_l, float *part_o, const int *dec_seqs, const int *tables,           \
        const int *starts, const int *cu_lens, int n_dec, int ring, int block_size, int n_heads,       \
        int n_kv, int hd, int window, float sl2, int split_len
#define DECODE_PASS q, ldq, kc, vc, ks, kz, vs, k_open, opens, part_m, part_l, part_o, dec_seqs, tables, starts, cu_lens, n_dec, ring, block_size, n_heads, n_kv, hd, window, sl2, split_len

#define DECODE_ENTRY(HD, REP)                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS) decode_split_hd##HD##_r##REP##_v1(DECODE_ARGS) { \
        decode_split<HD, REP>(DECODE_PASS);                                                            \
    }

DECODE_ENTRY(64, 1)
DECODE_ENTRY(64, 2)
DECODE_ENTRY(64, 4)
DECODE_ENTRY(64, 8)
DECODE_ENTRY(128, 1)
DECODE_ENTRY(128, 2)
DECODE_ENTRY(128, 4)
DECODE_ENTRY(128, 8)

#ifndef DEC_RED_THREADS
#define DEC_RED_THREADS 128
#endif

extern "C" __global__ void __launch_bounds__(DEC_RED_THREADS)
decode_reduce_v1(const float* part_m, const float* part_l, const float* part_o, const int* dec_seqs,
                 const int* cu_lens, bf16* out, int ldo, int n_splits, int n_dec, int n_heads, int hd) {
    const int y = blockIdx.x, h = blockIdx.y;
    const long long t = cu_lens[dec_seqs[y]];
    float M = TL_NEG_INF;
    for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_m[((long long)s * n_dec + y) * n_heads + h]);
    const float M_use = M == TL_NEG_INF ? 0.f : M;
    for (int d = threadIdx.x; d < hd; d += DEC_RED_THREADS) {
        float L = 0.f, O = 0.f;
        for (int s = 0; s < n_splits; ++s) {
            const long long i = ((long long)s * n_dec + y) * n_heads + h;
            const float w = exp2f(part_m[i] - M_use);
            L += part_l[i] * w;
            O += part_o[i * hd + d] * w;
        }
        out[t * ldo + (long long)h * hd + d] = __float2bfloat16_rn(L > 0.f ? O / L : 0.f);
    }
}
