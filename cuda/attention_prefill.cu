// attention_prefill.cu: flash attention of a ragged batch of query chunks over their paged
// KV cache (prefill, chunked prefill, and any batch with more than one query per sequence).
//
// numpy twin: NumpyBackend.attention
//   out[t, h] = softmax_p(q[t, h] . k[p, h // n_rep] * scale  masked) @ v[p, h // n_rep]
//   over the key positions p that query position qp sees (common.cuh key_visible: causal,
//   sliding window, only what the sequence's block table still holds). Scores are never
//   materialized: online softmax over key tiles (running max m, running sum l, fp32), exp2
//   with log2(e) folded into the scale. Quantized caches (int8/fp8) are dequantized on the fly:
//   keys per channel (common.cuh load_key8; the open block from the float32 open row),
//   values by their vector's scale.
//
// Rows: a CTA owns (sequence b, a tile of rows, kv head g). Rows are (token, query head) pairs of
//   that sequence and group: row r -> token cu_lens[b] + r / n_rep, head g*n_rep + r % n_rep,
//   so all query heads of a GQA group share every K/V tile the CTA loads. The host lists the
//   tiles (tile_seq, tile_row0), so the grid is (n_tiles, n_kv) with no idle CTAs.
//   Keys are visited by *position* from the smallest one any row of the tile sees to the
//   largest query position of the tile (causal tiles skip the future entirely): from
//   lo = max(kmin, qp_first - W + 1), qp_first the tile's first query, so no key below that
//   query's window is ever loaded (a ring may already have replaced its block). Position p is
//   read through the sequence's block table (common.cuh kv_entry: block
//   tables[b, (p / block_size) % ring], offset p % block_size); a key tile (32 or FA2_BN keys)
//   may span several blocks, each key row looks its block up on its own.
//
// Shapes: q (T, n_heads, hd) bf16 (already rotated), token stride ldq (a multiple of 8 for v2);
//         cache k, v of one layer (n_blocks, block_size, n_kv, hd) of kind KV_KIND; for
//         int8/fp8 ks, kz (n_blocks, n_kv, hd) fp16, vs (n_blocks, block_size, n_kv) fp32,
//         k_open (n_open, block_size, n_kv, hd) fp32, opens (B,) int32 (null otherwise);
//         tables (B, ring) int32 block ids;
//         out (T, n_heads*hd) bf16, token stride ldo. hd <= HD and hd % 8 == 0; HD (compile
//         time) is 64 or 128, unused columns are zero-padded. window 0 means none.
//         sl2 = softmax scale * log2(e).
//
// Versions (the registry VERSIONS in cuda_backend.py names the default):
//   v1  FMA: FA1_WARPS warps x FA1_RPW rows, key tiles of 32 (one key per lane for the scores,
//       then p broadcast by shuffles for P@V); K/V tiles in fp32 shared memory. Simple; the
//       reference for v2 on the GPU.
//   v2  tensor cores: mma.sync m16n8k16 bf16 -> fp32, ldmatrix (.trans for V), FA2-style:
//       4 warps x 16 rows = 64 rows, key tiles of FA2_BN; Q fragments stay in registers, the
//       row statistics live in the accumulator layout (a quad of lanes per row). K/V tiles are
//       staged in bf16 shared memory (dequantized and rounded to bf16 for non-bf16 caches);
//       P is rounded to bf16 before P@V (as every FA2 implementation does).
//       Shared memory: (64 + 2*FA2_BN) * (HD + 8) * 2 bytes: 52 KB at HD=128, above the 48 KB
//       default, so the Python side raises max_dynamic_shared_size_bytes.
#include "common.cuh"

#ifndef KV_KIND
#define KV_KIND 0
#endif
#ifndef FA1_WARPS
#define FA1_WARPS 4
#endif
#ifndef FA1_RPW
#define FA1_RPW 4
#endif
#ifndef FA2_BN
#define FA2_BN 64
#endif

typedef KVT<KV_KIND> KV;
typedef KV::T kv_t;

struct TileInfo {
    const int* table;                            // the sequence's block table (ring entries)
    int b, start, len, tok0, total, kmin, rows, r0;
};

__device__ __forceinline__ TileInfo tile_info(const int* tile_seq, const int* tile_row0, const int* tables,
                                              const int* starts, const int* lens, const int* cu_lens,
                                              int ring, int block_size, int n_rep) {
    TileInfo ti;
    ti.b = tile_seq[blockIdx.x];
    ti.r0 = tile_row0[blockIdx.x];
    ti.table = tables + (long long)ti.b * ring;
    ti.start = starts[ti.b];
    ti.len = lens[ti.b];
    ti.tok0 = cu_lens[ti.b];
    ti.total = ti.start + ti.len;
    ti.kmin = ti.total - min(ti.total, ring * block_size);
    ti.rows = ti.len * n_rep;
    return ti;
}

// ================================ v1: FMA ==========================================================

template <int HD>
__device__ __forceinline__ void flash_prefill_fma(
    const bf16* __restrict__ q, int ldq, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const __half* __restrict__ ks, const __half* __restrict__ kz, const float* __restrict__ vs,
    const float* __restrict__ k_open, const int* __restrict__ opens, bf16* __restrict__ out, int ldo,
    const int* tile_seq, const int* tile_row0, const int* tables, const int* starts, const int* lens,
    const int* cu_lens, int ring, int block_size, int n_heads, int n_kv, int hd, int window, float sl2) {
    constexpr int BM = FA1_WARPS * FA1_RPW;
    constexpr int BN = 32;
    constexpr int NT = 32 * FA1_WARPS;
    constexpr int DPL = HD / 32;                 // output dims per lane
    __shared__ float Qs[BM][HD];
    __shared__ float Ks[BN][HD + 1];             // +1: lane j reads row j, conflict-free
    __shared__ float Vs[BN][HD];

    const int n_rep = n_heads / n_kv;
    const int g = blockIdx.y;
    const TileInfo ti = tile_info(tile_seq, tile_row0, tables, starts, lens, cu_lens, ring, block_size, n_rep);
    const int closed = ti.total - ti.total % block_size;                  // int8/fp8: the open block from here
    const float* open_row = KV::quantized ? k_open + (long long)opens[ti.b] * block_size * n_kv * hd : nullptr;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Q tile (pre-scaled by scale*log2e), zero rows/columns outside the problem.
    for (int e = threadIdx.x; e < BM * HD; e += NT) {
        const int r = e / HD, d = e % HD, rg = ti.r0 + r;
        float val = 0.f;
        if (rg < ti.rows && d < hd) {
            const int tok = ti.tok0 + rg / n_rep, h = g * n_rep + rg % n_rep;
            val = __bfloat162float(q[(long long)tok * ldq + (long long)h * hd + d]) * sl2;
        }
        Qs[r][d] = val;
    }
    int qpos[FA1_RPW];
    float m[FA1_RPW], l[FA1_RPW], acc[FA1_RPW][DPL];
#pragma unroll
    for (int i = 0; i < FA1_RPW; ++i) {
        const int rg = ti.r0 + warp * FA1_RPW + i;
        qpos[i] = rg < ti.rows ? ti.start + rg / n_rep : -1;
        m[i] = TL_NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) acc[i][j] = 0.f;
    }
    const int qp_first = ti.start + ti.r0 / n_rep;
    const int hi = ti.start + (min(ti.r0 + BM, ti.rows) - 1) / n_rep;
    const int lo = max(ti.kmin, window > 0 ? qp_first - window + 1 : 0);

    for (int kt = lo; kt <= hi; kt += BN) {
        __syncthreads();                         // previous tile fully consumed (and Qs written)
        for (int e = threadIdx.x; e < BN * (HD / 8); e += NT) {
            const int j = e / (HD / 8), d0 = (e % (HD / 8)) * 8, p = kt + j;
            float kf[8], vf[8];
            if (p <= hi && d0 < hd) {
                const long long entry = kv_entry(ti.table, ring, block_size, p, n_kv, g);
                if constexpr (KV::quantized) {
                    load_key8<KV_KIND>(kc, ks, kz, open_row, ti.table, ring, block_size, closed, p, n_kv, g, hd, d0, kf);
#pragma unroll
                    for (int i = 0; i < 8; ++i) Ks[j][d0 + i] = kf[i];   // K stored before V loads: no spill
                    KV::cvt8(KV::ld8(vc + entry * hd + d0), vf);
                    const float sv = vs[entry];
#pragma unroll
                    for (int i = 0; i < 8; ++i) vf[i] *= sv;
                } else {
                    KV::cvt8(KV::ld8(vc + entry * hd + d0), vf);
                    KV::cvt8(KV::ld8(kc + entry * hd + d0), kf);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) kf[i] = vf[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) { Ks[j][d0 + i] = kf[i]; Vs[j][d0 + i] = vf[i]; }
        }
        __syncthreads();
        const int p = kt + lane;                 // this lane's key for the scores
#pragma unroll
        for (int i = 0; i < FA1_RPW; ++i) {
            const int r = warp * FA1_RPW + i;
            float s = 0.f;
#pragma unroll 8
            for (int d = 0; d < HD; ++d) s = fmaf(Qs[r][d], Ks[lane][d], s);
            s = key_visible(p, qpos[i], ti.kmin, window) ? s : TL_NEG_INF;
            const float m_new = fmaxf(m[i], warp_max(s));
            const float m_use = m_new == TL_NEG_INF ? 0.f : m_new;    // nothing visible yet
            const float alpha = exp2f(m[i] - m_use);
            const float pj = exp2f(s - m_use);
            l[i] = l[i] * alpha + warp_sum(pj);
            m[i] = m_new;
#pragma unroll
            for (int j = 0; j < DPL; ++j) acc[i][j] *= alpha;
            for (int jj = 0; jj < BN; ++jj) {
                const float pb = __shfl_sync(TL_FULL_MASK, pj, jj);
#pragma unroll
                for (int j = 0; j < DPL; ++j) acc[i][j] = fmaf(pb, Vs[jj][lane + 32 * j], acc[i][j]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < FA1_RPW; ++i) {
        const int rg = ti.r0 + warp * FA1_RPW + i;
        if (rg >= ti.rows) continue;
        const int tok = ti.tok0 + rg / n_rep, h = g * n_rep + rg % n_rep;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) {
            const int d = lane + 32 * j;
            if (d < hd) out[(long long)tok * ldo + (long long)h * hd + d] = __float2bfloat16_rn(acc[i][j] * inv);
        }
    }
}

// ================================ v2: mma.sync ====================================================

template <int HD, int KIND>
__device__ __forceinline__ void flash_prefill_mma(
    const bf16* __restrict__ q, int ldq, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
    const __half* __restrict__ ks, const __half* __restrict__ kz, const float* __restrict__ vs,
    const float* __restrict__ k_open, const int* __restrict__ opens, bf16* __restrict__ out, int ldo,
    const int* tile_seq, const int* tile_row0, const int* tables, const int* starts, const int* lens,
    const int* cu_lens, int ring, int block_size, int n_heads, int n_kv, int hd, int window, float sl2) {
    constexpr int BM = 64;                       // 4 warps x 16 rows
    constexpr int BN = FA2_BN;
    constexpr int NT = 128;
    constexpr int PITCH = HD + 8;                // bf16 elements per smem row (16-byte aligned rows,
                                                 // consecutive rows 4 banks apart: ldmatrix conflict-free)
    constexpr int KSTEPS = HD / 16;              // k-steps of Q K^T
    constexpr int NTILES = BN / 8;               // 8-key column tiles of S
    constexpr int DTILES = HD / 8;               // 8-wide column tiles of O
    static_assert(BN % 16 == 0, "FA2_BN must be a multiple of 16");
    extern __shared__ __align__(16) unsigned char fa2_smem[];
    bf16* Qs = reinterpret_cast<bf16*>(fa2_smem);
    bf16* Ks = Qs + BM * PITCH;
    bf16* Vs = Ks + BN * PITCH;

    const int n_rep = n_heads / n_kv;
    const int g = blockIdx.y;
    const TileInfo ti = tile_info(tile_seq, tile_row0, tables, starts, lens, cu_lens, ring, block_size, n_rep);
    const int closed = ti.total - ti.total % block_size;                  // int8/fp8: the open block from here
    const float* open_row = KV::quantized ? k_open + (long long)opens[ti.b] * block_size * n_kv * hd : nullptr;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid4 = lane & 3;

    // Q tile -> smem (16-byte chunks), zero outside the problem.
    for (int e = threadIdx.x; e < BM * (HD / 8); e += NT) {
        const int r = e / (HD / 8), d0 = (e % (HD / 8)) * 8, rg = ti.r0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (rg < ti.rows && d0 < hd) {
            const int tok = ti.tok0 + rg / n_rep, h = g * n_rep + rg % n_rep;
            val = *reinterpret_cast<const uint4*>(q + (long long)tok * ldq + (long long)h * hd + d0);
        }
        *reinterpret_cast<uint4*>(Qs + r * PITCH + d0) = val;
    }
    __syncthreads();
    unsigned qf[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = kk * 16 + (lane >> 4) * 8;
        ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], Qs + row * PITCH + col);
    }

    // This thread's two rows: gid and gid + 8 of the warp's 16.
    int qpos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int rg = ti.r0 + warp * 16 + gid + 8 * i;
        qpos[i] = rg < ti.rows ? ti.start + rg / n_rep : -1;
    }
    float m[2] = {TL_NEG_INF, TL_NEG_INF}, l[2] = {0.f, 0.f};
    float o[DTILES][4];
#pragma unroll
    for (int j = 0; j < DTILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

    const int qp_first = ti.start + ti.r0 / n_rep;
    const int hi = ti.start + (min(ti.r0 + BM, ti.rows) - 1) / n_rep;
    const int lo = max(ti.kmin, window > 0 ? qp_first - window + 1 : 0);

    for (int kt = lo; kt <= hi; kt += BN) {
        __syncthreads();                         // everyone is done with the previous K/V tile
        for (int e = threadIdx.x; e < BN * (HD / 8); e += NT) {
            const int j = e / (HD / 8), d0 = (e % (HD / 8)) * 8, p = kt + j;
            uint4 kv4 = make_uint4(0u, 0u, 0u, 0u), vv4 = make_uint4(0u, 0u, 0u, 0u);
            if (p <= hi && d0 < hd) {
                const long long entry = kv_entry(ti.table, ring, block_size, p, n_kv, g);
                if constexpr (KIND == 0) {           // bf16 cache: a straight 16-byte copy
                    kv4 = KVT<KIND>::ld8(kc + entry * hd + d0);
                    vv4 = KVT<KIND>::ld8(vc + entry * hd + d0);
                } else {
                    float kf[8], vf[8];
                    KVT<KIND>::cvt8(KVT<KIND>::ld8(vc + entry * hd + d0), vf);
                    if constexpr (KVT<KIND>::quantized) {
                        load_key8<KIND>(kc, ks, kz, open_row, ti.table, ring, block_size, closed, p, n_kv, g, hd, d0, kf);
                        const float sv = vs[entry];
#pragma unroll
                        for (int i = 0; i < 8; ++i) vf[i] *= sv;
                    } else {
                        KVT<KIND>::cvt8(KVT<KIND>::ld8(kc + entry * hd + d0), kf);
                    }
                    kv4 = pack_bf16x8(kf);
                    vv4 = pack_bf16x8(vf);
                }
            }
            *reinterpret_cast<uint4*>(Ks + j * PITCH + d0) = kv4;
            *reinterpret_cast<uint4*>(Vs + j * PITCH + d0) = vv4;
        }
        __syncthreads();

        // S = Q K^T (16 x BN per warp, fp32).
        float s[NTILES][4];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int nt2 = 0; nt2 < NTILES / 2; ++nt2) {
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                const int key = nt2 * 16 + (lane >> 4) * 8 + (lane & 7);
                const int col = kk * 16 + ((lane >> 3) & 1) * 8;
                unsigned b0, b1, b2, b3;
                ldsm_x4(b0, b1, b2, b3, Ks + key * PITCH + col);
                mma_bf16_16816(s[2 * nt2], qf[kk], b0, b1);
                mma_bf16_16816(s[2 * nt2 + 1], qf[kk], b2, b3);
            }
        }

        // Mask, online softmax (base 2). Element (nt, c): row gid + 8*(c >> 1), key kt + nt*8 + 2*tid4 + (c & 1).
        float mx[2] = {TL_NEG_INF, TL_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int p = kt + nt * 8 + 2 * tid4 + (c & 1);
                const int i = c >> 1;
                const float v = key_visible(p, qpos[i], ti.kmin, window) ? s[nt][c] * sl2 : TL_NEG_INF;
                s[nt][c] = v;
                mx[i] = fmaxf(mx[i], v);
            }
        }
        float alpha[2], m_use[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(TL_FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(TL_FULL_MASK, mx[i], 2));
            const float m_new = fmaxf(m[i], mx[i]);
            m_use[i] = m_new == TL_NEG_INF ? 0.f : m_new;
            alpha[i] = exp2f(m[i] - m_use[i]);
            m[i] = m_new;
            l[i] *= alpha[i];                    // per-thread partial sums; the quad is summed at the end
        }
#pragma unroll
        for (int j = 0; j < DTILES; ++j) {
            o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
            o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
        }
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float pv = exp2f(s[nt][c] - m_use[c >> 1]);
                s[nt][c] = pv;
                l[c >> 1] += pv;
            }
        }

        // O += P V. P's accumulator layout is the A-fragment layout of the next product.
#pragma unroll
        for (int kk2 = 0; kk2 < BN / 16; ++kk2) {
            unsigned pa[4];
            pa[0] = pack_bf16x2(s[2 * kk2][0], s[2 * kk2][1]);
            pa[1] = pack_bf16x2(s[2 * kk2][2], s[2 * kk2][3]);
            pa[2] = pack_bf16x2(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]);
            pa[3] = pack_bf16x2(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3]);
#pragma unroll
            for (int dt2 = 0; dt2 < DTILES / 2; ++dt2) {
                const int key = kk2 * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
                const int col = dt2 * 16 + (lane >> 4) * 8;
                unsigned b0, b1, b2, b3;
                ldsm_x4_trans(b0, b1, b2, b3, Vs + key * PITCH + col);
                mma_bf16_16816(o[2 * dt2], pa, b0, b1);
                mma_bf16_16816(o[2 * dt2 + 1], pa, b2, b3);
            }
        }
    }

    // Finish: sum l over the quad, normalize, write bf16 pairs.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(TL_FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(TL_FULL_MASK, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int rg = ti.r0 + warp * 16 + gid + 8 * i;
        if (rg >= ti.rows) continue;
        const int tok = ti.tok0 + rg / n_rep, h = g * n_rep + rg % n_rep;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        bf16* orow = out + (long long)tok * ldo + (long long)h * hd;
#pragma unroll
        for (int j = 0; j < DTILES; ++j) {
            const int col = j * 8 + 2 * tid4;
            if (col < hd)
                *reinterpret_cast<unsigned*>(orow + col) = pack_bf16x2(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
        }
    }
}

#define PREFILL_ARGS                                                                                   \
    const bf16 *q, int ldq, const kv_t *kc, const kv_t *vc, const __half *ks, const __half *kz,       \
        const float *vs, const float *k_open, const int *opens, bf16 *out,                           \
        int ldo, const int *tile_seq, const int *tile_row0, const int *tables, const int *starts,        \
        const int *lens, const int *cu_lens, int ring, int block_size, int n_heads, int n_kv, int hd,    \
        int window, float sl2
#define PREFILL_PASS q, ldq, kc, vc, ks, kz, vs, k_open, opens, out, ldo, tile_seq, tile_row0, tables, starts, lens, cu_lens, ring, block_size, n_heads, n_kv, hd, window, sl2

extern "C" {
__global__ void __launch_bounds__(32 * FA1_WARPS) flash_prefill_hd64_v1(PREFILL_ARGS) { flash_prefill_fma<64>(PREFILL_PASS); }
__global__ void __launch_bounds__(32 * FA1_WARPS) flash_prefill_hd128_v1(PREFILL_ARGS) { flash_prefill_fma<128>(PREFILL_PASS); }
__global__ void __launch_bounds__(128) flash_prefill_hd64_v2(PREFILL_ARGS) { flash_prefill_mma<64, KV_KIND>(PREFILL_PASS); }
__global__ void __launch_bounds__(128) flash_prefill_hd128_v2(PREFILL_ARGS) { flash_prefill_mma<128, KV_KIND>(PREFILL_PASS); }
}
