// embedding.cu: row gather.
//
// numpy twin: NumpyBackend.embed   out = table[tokens]
//             NumpyBackend.take_rows  out = x[rows]
// Both are the same byte copy, so one kernel serves both.
//
// Shapes: src (n_src, *) with a row stride of src_stride_vec vectors; idx (n_out,) int32;
//         out (n_out, row_vecs) contiguous. A "vector" is VEC bytes: the Python side picks
//         the widest of 16/4/2/1 that divides the row size, the source row stride and both
//         base addresses. An index outside [0, n_src) writes a zero row (never reads out of
//         bounds; the engine validates token ids before they get here).
// Launch: grid (n_out, ceil(row_vecs / GATHER_THREADS)), block GATHER_THREADS.
// Versions: v1 only (a memory copy: nothing to tune but the vector width).
#include "common.cuh"

#ifndef GATHER_THREADS
#define GATHER_THREADS 256
#endif

template <typename V>
__device__ __forceinline__ void gather_rows(const V* __restrict__ src, long long src_stride_vec, int n_src,
                                            const int* __restrict__ idx, V* __restrict__ out, int row_vecs) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * GATHER_THREADS + threadIdx.x;
    if (c >= row_vecs) return;
    const int i = idx[r];
    V val;
    if (i >= 0 && i < n_src) {
        val = src[(long long)i * src_stride_vec + c];
    } else {
        val = V();
    }
    out[(long long)r * row_vecs + c] = val;
}

extern "C" {
__global__ void __launch_bounds__(GATHER_THREADS) gather_rows_v16_v1(const uint4* src, long long stride, int n_src, const int* idx, uint4* out, int row_vecs) {
    gather_rows<uint4>(src, stride, n_src, idx, out, row_vecs);
}
__global__ void __launch_bounds__(GATHER_THREADS) gather_rows_v4_v1(const unsigned int* src, long long stride, int n_src, const int* idx, unsigned int* out, int row_vecs) {
    gather_rows<unsigned int>(src, stride, n_src, idx, out, row_vecs);
}
__global__ void __launch_bounds__(GATHER_THREADS) gather_rows_v2_v1(const unsigned short* src, long long stride, int n_src, const int* idx, unsigned short* out, int row_vecs) {
    gather_rows<unsigned short>(src, stride, n_src, idx, out, row_vecs);
}
__global__ void __launch_bounds__(GATHER_THREADS) gather_rows_v1_v1(const unsigned char* src, long long stride, int n_src, const int* idx, unsigned char* out, int row_vecs) {
    gather_rows<unsigned char>(src, stride, n_src, idx, out, row_vecs);
}
}
