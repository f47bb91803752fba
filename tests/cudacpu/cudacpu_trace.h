// cudacpu_trace.h: the access-tracing build of a kernel module (tests/cudacpu/tracer.py), for
// the performance counters of tests/cudacpu/counters.py. Included after cudacpu.h; the ASan
// build (executor.py CUDACPU_SANITIZE=1) never sees this file.
//
// How accesses are seen: tracer.py compiles with GCC's -fsanitize=kernel-address and
// --param asan-instrumentation-with-call-threshold=0, so the compiler calls
// __asan_{load,store}{1,2,4,8,16,N}_noabort(addr[, size]) before every memory access of the
// translation unit (kernels and this header alike; stack and globals instrumentation off). The
// hooks below keep an access only while a kernel thread (a fiber) runs and only when it falls
// in a registered global buffer (tracer.py passes every argument's allocation) or in the
// block's shared memory; everything else (fiber stacks, the scheduler's state) is dropped.
// PTX emulations reach memory through memcpy, which is not instrumented: tracer.py redirects
// ptx_find to the wrappers here, which record ld.global.nc.v4 as one 16-byte global load per
// lane and ldmatrix.x4 as one 16-byte shared load per lane (lane 8i+r names row r of matrix i:
// exactly the 32 row reads the instruction performs), and count mma.sync for FLOPs.
//
// One record per access: (address, site = the hook's return address, per-thread occurrence of
// that site within the block, block, thread, size, flags). A thread's access that directly
// continues its previous record (same kind and space, adjacent address, another site, combined
// size <= 16 from a start aligned to the next power of two) extends that record: GCC sometimes
// splits a 16-byte vector access that nvcc emits as one instruction (stated in counters.py).
//
// Block sampling: with stride s > 1 only block 0 and the blocks whose hashed linear index is a
// multiple of s run (about 1 in s, spread over the grid; the others exit at once);
// counters.py scales counts by blocks / sampled blocks.
#pragma once
#include <unordered_map>

namespace cudacpu_trace {

struct Rec {
    uint64_t addr;      // global: the host address; shared: region << 24 | offset (cudacpu.h shared_address)
    uint64_t site;
    uint32_t occ;       // occurrence of (thread, site) within the block, from 0
    uint32_t block;     // linear block index
    uint16_t thread;    // linear thread index
    uint8_t size;       // bytes
    uint8_t flags;      // bit 0 store, bit 1 shared
    uint16_t buf;       // global: index of the registered buffer; shared: 0
    uint16_t pad;
};
static_assert(sizeof(Rec) == 32, "Rec is read by numpy as 32 bytes");

inline std::vector<Rec> recs;
inline std::vector<std::pair<uintptr_t, uintptr_t>> bufs;   // [lo, hi) per registered buffer
inline std::unordered_map<uint64_t, uint32_t> occ;           // (site, thread) -> next occurrence
inline long long cur_block = -1;
inline long long stride = 1;
inline long long sampled = 0;
inline long long mma_lane_calls = 0;
inline int quiet = 0;    // > 0 inside a wrapper that never yields (a global: fibers share it)

inline long long block_linear() {
    const auto& L = ::cudacpu::L;
    return (long long)L.bid.x + (long long)L.grid.x * ((long long)L.bid.y + (long long)L.grid.y * L.bid.z);
}

// Whether this block runs (called by every thread before the kernel body).
inline bool block_sampled() {
    const long long b = block_linear();
    uint32_t h = uint32_t(b);                                // a hash, so that the sample is
    h ^= h >> 16;                                            // spread over every grid dimension
    h *= 0x7feb352du;                                        // (b % stride would take one x
    h ^= h >> 15;                                            // column of a (128, 8) grid)
    h *= 0x846ca68bu;
    h ^= h >> 16;
    const bool run = stride <= 1 || b == 0 || h % uint32_t(stride) == 0;
    if (run && b != cur_block) {
        cur_block = b;
        occ.clear();
        ++sampled;
    }
    return run;
}

// Shared-space address of p, or 0 when p is not in the block's shared memory.
inline uint64_t shared_of(uintptr_t p) {
    const auto& L = ::cudacpu::L;
    const uintptr_t d = reinterpret_cast<uintptr_t>(L.dyn_smem);
    if (d && p >= d && p < d + L.dyn_bytes) return (1ull << 24) | (p - d);
    for (size_t i = 0; i < L.statics.size(); ++i) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(L.statics[i].first);
        if (p >= b && p < b + L.statics[i].second) return uint64_t(i + 2) << 24 | (p - b);
    }
    return 0;
}

inline void record_(uintptr_t p, size_t n, bool store, uint64_t site, const ::cudacpu::Launch& L) {
    uint8_t flags = store ? 1 : 0;
    uint64_t a = 0;
    uint16_t buf = 0;
    const uint64_t s = shared_of(p);
    if (s) {
        a = s;
        flags |= 2;
    } else {
        size_t i = 0;
        for (; i < bufs.size(); ++i)
            if (p >= bufs[i].first && p < bufs[i].second) break;
        if (i == bufs.size()) return;                        // stack, scheduler state: not device memory
        a = p;
        buf = uint16_t(i);
    }
    const uint16_t t = uint16_t(L.cur->linear);
    if (!recs.empty()) {                                     // a split vector access: extend it
        Rec& r = recs.back();
        const size_t m = r.size + n;
        if (r.thread == t && r.block == uint32_t(cur_block) && r.flags == flags && r.buf == buf &&
            r.site != site && r.addr + r.size == a && m <= 16 && r.addr % (m <= 4 ? 4 : m <= 8 ? 8 : 16) == 0) {
            r.size = uint8_t(m);
            return;
        }
    }
    uint32_t& o = occ[site * 1024 + t];
    while (n > 0) {                                          // wider than 16 bytes: 16-byte pieces
        const size_t k = n > 16 ? 16 : n;
        recs.push_back(Rec{a, site, o, uint32_t(cur_block), t, uint8_t(k), flags, buf, 0});
        a += k;
        n -= k;
    }
    ++o;
}

inline int busy = 0;                                         // > 0 inside record (its own accesses)

__attribute__((no_sanitize_address)) inline void record(uintptr_t p, size_t n, bool store, uint64_t site) {
    const auto& L = ::cudacpu::L;
    if (busy || quiet || !L.cur || n == 0) return;
    ++busy;
    record_(p, n, store, site, L);
    --busy;
}

// ---- PTX wrappers (tracer.py rewrites ::cudacpu::ptx_find to this one) --------------------------
__attribute__((noinline)) inline void ld_nc_v4(const ::cudacpu::Opnd* ops, int n) {
    if (n == 5) record(uintptr_t(ops[4].v), 16, false, uint64_t(__builtin_return_address(0)));
    ++quiet;
    ::cudacpu::ptx_ld_nc_v4(ops, n);
    --quiet;
}

inline void ldsm_record(const ::cudacpu::Opnd* ops, int n, uint64_t site) {
    if (n != 5) return;
    const unsigned a = unsigned(ops[4].v);
    const unsigned char* p = ::cudacpu::shared_pointer(a, 16);
    if (p) record(uintptr_t(p), 16, false, site);
}
__attribute__((noinline)) inline void ldsm_n(const ::cudacpu::Opnd* ops, int n) {
    ldsm_record(ops, n, uint64_t(__builtin_return_address(0)));
    ::cudacpu::ptx_ldsm_n(ops, n);       // a collective: it yields, so no `quiet` around it
}
__attribute__((noinline)) inline void ldsm_t(const ::cudacpu::Opnd* ops, int n) {
    ldsm_record(ops, n, uint64_t(__builtin_return_address(0)));
    ::cudacpu::ptx_ldsm_t(ops, n);       // a collective: it yields, so no `quiet` around it
}
__attribute__((noinline)) inline void mma(const ::cudacpu::Opnd* ops, int n) {
    ++mma_lane_calls;
    ::cudacpu::ptx_mma(ops, n);
}

// The identity, opaque to the optimizer (tracer.py's static __shared__ references).
template <class T> inline T* opaque(T* p) {
    asm volatile("" : "+r"(p));
    return p;
}

// __shared__ arrays register on first use, inside a kernel thread: no records meanwhile (the
// registry is being written; tracer.py rewrites ::cudacpu::shared_static to this one).
inline bool shared_static(void* p, size_t n) {
    ++quiet;
    const bool r = ::cudacpu::shared_static(p, n);
    --quiet;
    return r;
}

inline ::cudacpu::PtxFn ptx_find(const char* tmpl) {
    const ::cudacpu::PtxFn f = ::cudacpu::ptx_find(tmpl);
    if (f == ::cudacpu::ptx_ld_nc_v4) return ld_nc_v4;
    if (f == ::cudacpu::ptx_ldsm_n) return ldsm_n;
    if (f == ::cudacpu::ptx_ldsm_t) return ldsm_t;
    if (f == ::cudacpu::ptx_mma) return mma;
    return f;
}

}  // namespace cudacpu_trace

// ---- the compiler's hooks ----------------------------------------------------------------------
#define CUDACPU_TRACE_HOOK(N)                                                                        \
    extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_load##N##_noabort(uintptr_t p) {    \
        ::cudacpu_trace::record(p, N, false, uint64_t(__builtin_return_address(0)));                 \
    }                                                                                                \
    extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_store##N##_noabort(uintptr_t p) {   \
        ::cudacpu_trace::record(p, N, true, uint64_t(__builtin_return_address(0)));                  \
    }
CUDACPU_TRACE_HOOK(1)
CUDACPU_TRACE_HOOK(2)
CUDACPU_TRACE_HOOK(4)
CUDACPU_TRACE_HOOK(8)
CUDACPU_TRACE_HOOK(16)
#undef CUDACPU_TRACE_HOOK
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_loadN_noabort(uintptr_t p, size_t n) {
    ::cudacpu_trace::record(p, n, false, uint64_t(__builtin_return_address(0)));
}
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_storeN_noabort(uintptr_t p, size_t n) {
    ::cudacpu_trace::record(p, n, true, uint64_t(__builtin_return_address(0)));
}
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_handle_no_return() {}
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_before_dynamic_init(const char*) {}
extern "C" __attribute__((visibility("hidden"), no_sanitize_address)) void __asan_after_dynamic_init() {}
// kernel-address defines __SANITIZE_ADDRESS__, so cudacpu.h announces its fiber switches to a
// sanitizer runtime; there is none in this build.
extern "C" __attribute__((visibility("hidden"))) void __sanitizer_start_switch_fiber(void**, const void*, size_t) {}
extern "C" __attribute__((visibility("hidden"))) void __sanitizer_finish_switch_fiber(void*, const void**, size_t*) {}

// ---- control from tracer.py -------------------------------------------------------------------------
extern "C" {
__attribute__((visibility("default"))) void cudacpu_trace_begin(const uint64_t* lohi, int n, long long stride) {
    ::cudacpu_trace::recs.clear();
    ::cudacpu_trace::bufs.clear();
    for (int i = 0; i < n; ++i) ::cudacpu_trace::bufs.emplace_back(uintptr_t(lohi[2 * i]), uintptr_t(lohi[2 * i + 1]));
    ::cudacpu_trace::stride = stride;
    ::cudacpu_trace::sampled = 0;
    ::cudacpu_trace::cur_block = -1;
    ::cudacpu_trace::mma_lane_calls = 0;
    ::cudacpu_trace::occ.clear();
}
// Records of the last launch: *data, returns their count; sampled blocks and mma lane calls out.
__attribute__((visibility("default"))) long long cudacpu_trace_end(void** data, long long* sampled, long long* mma) {
    *data = ::cudacpu_trace::recs.data();
    *sampled = ::cudacpu_trace::sampled;
    *mma = ::cudacpu_trace::mma_lane_calls;
    return (long long)::cudacpu_trace::recs.size();
}
}
