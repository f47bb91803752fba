// cudacpu.h: the CUDA built-ins tinyllm's kernels use, for the host C++ compiler, so that
// cuda/*.cu runs on the CPU (tests/cudacpu/executor.py compiles and launches it).
//
// Execution model (what a GPU guarantees, and no more):
//   * a launch runs its blocks one after another; the threads of a block are cooperative
//     fibers on one OS thread. A fiber runs until it reaches a barrier (__syncthreads) or a
//     warp collective (__shfl_*_sync, ldmatrix, mma.sync). Warps run in the launch's ORDER,
//     lanes within a warp too, and a warp runs as far as it can (through its collectives)
//     before the next one starts. executor.py runs every launch in two orders (forward and
//     reverse) and compares the outputs bit for bit: a race between barriers, inside a warp
//     or across warps, shows up as a difference.
//   * __syncthreads() releases when every thread of the block waits at one; a warp
//     collective resolves when every lane of its mask waits at one of the same kind. When no
//     fiber can run and nothing can be released (a barrier skipped by some threads, a lane
//     that exited, collectives of different kinds), the launch fails with "deadlock": it is
//     an error, never a hang.
//   * shared memory (static __shared__ arrays and the dynamic extern __shared__ buffer) is
//     filled with 0xFF bytes (NaN as floats and bf16) at the start of every block, so a read
//     of shared memory no thread of the block wrote poisons the output.
//   * the floating-point environment of every fiber flushes denormals (MXCSR FTZ + DAZ), as
//     CuPy's -ftz=true does on the GPU.
//   * bf16 / fp16 / fp8-e4m3 types and conversions are CUDA's own (the toolkit's cuda_bf16.h,
//     cuda_fp16.h, cuda_fp8.h compiled for the host): CUDA's rounding, not a re-implementation.
//   * the PTX in cuda/common.cuh (ld.global.nc, ldmatrix .x4 / .x4.trans, mma.sync m16n8k16
//     bf16 -> f32) is emulated; executor.py rewrites each asm statement into a call to ptx()
//     below. Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16" and "Warp-level
//     matrix load instruction: ldmatrix" (tests/test_cudacpu.py checks them against the
//     documented per-lane index formulas, not against our kernels).
// What it cannot see: timing, the GPU's weak memory model across blocks, register and
// shared-memory limits (ptxas reports those: scripts/check_kernels.py), bank conflicts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cmath>
#include <math.h>      // expf, exp2f, rintf, fmaxf, ... in the global namespace, as CUDA has them
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <sys/mman.h>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDACPU_ASAN 1
#else
#define CUDACPU_ASAN 0
#endif

// ---- function-space qualifiers: plain host C++ ----------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// __shared__ is rewritten by executor.py (static storage, registered for poisoning).

namespace cudacpu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = CUDACPU_ASAN ? (512u << 10) : (128u << 10);

enum State : int { RUNNABLE, AT_SYNC, AT_WARP, DONE };

// One warp-collective call: what a lane brings and what it gets back.
struct WarpSlot {
    int kind;
    unsigned mask;
    uint64_t in[8];
    uint64_t out[8];
};

struct Fiber {
    uint3 tid;
    int linear;
    State state;
    void* sp;                   // saved stack pointer while switched out
    char* stack;                // stack memory (lowest address; a guard page at the bottom)
    WarpSlot slot;
};

struct Launch {
    const char* kernel;
    dim3 grid, block;
    uint3 bid;
    std::function<void()> body;
    Fiber fibers[kMaxThreads];
    int nthreads;
    int order;                  // 0: thread 0 first; 1: last thread first
    void* sched_sp;
    char* err;
    int errlen;
    bool failed;
    unsigned char* dyn_smem;
    size_t dyn_bytes;
    std::vector<std::pair<void*, size_t>> statics;   // registered __shared__ arrays
    Fiber* cur;
    void* fake_stack;           // ASan fiber bookkeeping
    const void* sched_bottom;   // the scheduler's (the calling thread's) stack, for ASan
    size_t sched_size;
};

inline Launch L;
inline char* stack_pool = nullptr;

}  // namespace cudacpu

// ---- the thread's coordinates -------------------------------------------------------------------
#define threadIdx (::cudacpu::L.cur->tid)
#define blockIdx (::cudacpu::L.bid)
#define blockDim (::cudacpu::L.block)
#define gridDim (::cudacpu::L.grid)
#define warpSize 32

namespace cudacpu {

// ---- fibers: a minimal x86-64 context switch -------------------------------------------------------
// swap(save, to): pushes the callee-saved registers and MXCSR/x87 control word on the current
// stack, stores rsp in *save, loads `to` as rsp and pops the same frame. A new fiber's stack
// is laid out as such a frame whose return address is fiber_entry.
extern "C" void cudacpu_swap(void** save, void* to) __attribute__((visibility("hidden")));
asm(R"(
.text
.globl cudacpu_swap
.hidden cudacpu_swap
.type cudacpu_swap,@function
cudacpu_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size cudacpu_swap, .-cudacpu_swap
)");

inline void switch_to_fiber(Fiber* f) {
    L.cur = f;
#if CUDACPU_ASAN
    __sanitizer_start_switch_fiber(&L.fake_stack, f->stack, kStack);
#endif
    cudacpu_swap(&L.sched_sp, f->sp);
#if CUDACPU_ASAN
    __sanitizer_finish_switch_fiber(L.fake_stack, nullptr, nullptr);
#endif
    L.cur = nullptr;
}

// From a fiber back to the scheduler (the fiber's state says why).
inline void yield_to_scheduler() {
    Fiber* f = L.cur;
#if CUDACPU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(f->state == DONE ? nullptr : &fake, L.sched_bottom, L.sched_size);
#endif
    cudacpu_swap(&f->sp, L.sched_sp);
#if CUDACPU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
#if CUDACPU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_bottom, &L.sched_size);   // where we came from
#endif
    L.body();
    L.cur->state = DONE;
    yield_to_scheduler();
    __builtin_trap();            // a finished fiber is never resumed
}

inline void init_fiber(Fiber* f) {
    uint64_t* top = reinterpret_cast<uint64_t*>(f->stack + kStack);
    *--top = 0;                                            // keeps rsp % 16 == 8 at entry
    *--top = reinterpret_cast<uint64_t>(&fiber_entry);     // return address
    for (int i = 0; i < 6; ++i) *--top = 0;                // rbp rbx r12 r13 r14 r15
    *--top = 0x1F80u | 0x8040u | (uint64_t(0x037F) << 32); // MXCSR (masked, FTZ, DAZ), x87 CW
    f->sp = top;
    f->state = RUNNABLE;
}

// ---- errors: the launch stops, the message names kernel, block and thread ---------------------------
// set_error records the first error (scheduler side: the caller returns); fail() is for code
// running on a fiber: it records and never returns to the thread.
inline void set_error(const Fiber* f, const char* what) {
    if (!L.failed) {
        if (f)
            snprintf(L.err, L.errlen, "%s: %s (block (%u,%u,%u), thread (%u,%u,%u))", L.kernel, what,
                     L.bid.x, L.bid.y, L.bid.z, f->tid.x, f->tid.y, f->tid.z);
        else
            snprintf(L.err, L.errlen, "%s: %s (block (%u,%u,%u))", L.kernel, what, L.bid.x, L.bid.y, L.bid.z);
    }
    L.failed = true;
}

[[noreturn]] inline void fail(const char* what) {
    Fiber* f = L.cur;
    set_error(f, what);
    if (f) {
        f->state = DONE;
        yield_to_scheduler();
    }
    __builtin_trap();            // fail() outside a fiber is a bug of this header
}

// ---- shared memory ------------------------------------------------------------------------------------
inline bool shared_static(void* p, size_t n) {
    L.statics.emplace_back(p, n);
    memset(p, 0xFF, n);          // registered on first use, inside a block: poison it now too
    return true;
}

inline void* dynamic_shared() { return L.dyn_smem; }

// __cvta_generic_to_shared: a 32-bit shared-space address. Region r (0: the dynamic buffer,
// 1..: the static arrays) at offset o becomes ((r + 1) << 24) | o.
inline unsigned shared_address(const void* p) {
    const char* c = static_cast<const char*>(p);
    if (L.dyn_smem && c >= (char*)L.dyn_smem && c < (char*)L.dyn_smem + L.dyn_bytes)
        return (1u << 24) | unsigned(c - (char*)L.dyn_smem);
    for (size_t i = 0; i < L.statics.size(); ++i) {
        const char* b = static_cast<const char*>(L.statics[i].first);
        if (c >= b && c < b + L.statics[i].second) return unsigned(i + 2) << 24 | unsigned(c - b);
    }
    fail("__cvta_generic_to_shared of an address outside shared memory");
}

// The host pointer of `bytes` bytes at shared-space address a, or nullptr.
inline const unsigned char* shared_pointer(unsigned a, size_t bytes) {
    const unsigned r = a >> 24, o = a & 0xFFFFFFu;
    const unsigned char* base = nullptr;
    size_t n = 0;
    if (r == 1) { base = L.dyn_smem; n = L.dyn_bytes; }
    else if (r >= 2 && r - 2 < L.statics.size()) {
        base = static_cast<const unsigned char*>(L.statics[r - 2].first);
        n = L.statics[r - 2].second;
    }
    return base && o + bytes <= n ? base + o : nullptr;
}

// ---- warp collectives ---------------------------------------------------------------------------
enum Kind : int { SHFL_IDX = 1, SHFL_XOR, SHFL_DOWN, SHFL_UP, BALLOT, SYNCWARP, LDSM_X4, LDSM_X4_T, MMA_16816 };

inline const char* kind_name(int k) {
    static const char* names[] = {"?", "__shfl_sync", "__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                                  "__ballot_sync", "__syncwarp", "ldmatrix.x4", "ldmatrix.x4.trans", "mma.sync.m16n8k16"};
    return k >= 0 && k < int(sizeof(names) / sizeof(names[0])) ? names[k] : "?";
}

// Deposit this lane's inputs, wait for the warp, return the slot with the outputs.
inline WarpSlot& warp_collective(int kind, unsigned mask) {
    Fiber* f = L.cur;
    if (!(mask >> (f->linear & 31) & 1u)) fail("warp collective called by a lane outside its mask");
    f->slot.kind = kind;
    f->slot.mask = mask;
    f->state = AT_WARP;
    yield_to_scheduler();
    return f->slot;
}

template <class T> inline uint64_t bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

template <class T> inline T shfl(int kind, unsigned mask, T v, int arg, int width) {
    if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width is not a power of two <= 32");
    WarpSlot& s = L.cur->slot;
    s.in[0] = bits(v);
    s.in[1] = uint64_t(uint32_t(arg));
    s.in[2] = uint64_t(width);
    return from_bits<T>(warp_collective(kind, mask).out[0]);
}

// ---- PTX emulation (operands as GCC's asm numbers them: outputs, then inputs) --------------------------
struct Opnd {
    char mode;                  // '=' output, '+' input and output, 'i' input
    char cons;                  // 'r' 32-bit register, 'f' float, 'l' 64-bit
    void* p;                    // outputs: where the value goes
    uint64_t v;                 // inputs: the value's bits
};
template <class T> inline Opnd out(char mode, char cons, T* p) {
    Opnd o{mode, cons, static_cast<void*>(p), 0};
    if (mode == '+') memcpy(&o.v, p, sizeof(T) < 8 ? sizeof(T) : 8);
    return o;
}
template <class T> inline Opnd in(char cons, T v) {
    Opnd o{'i', cons, nullptr, 0};
    if constexpr (std::is_pointer_v<T>) o.v = reinterpret_cast<uintptr_t>(v);
    else o.v = bits(v);
    return o;
}

typedef void (*PtxFn)(const Opnd* ops, int n);

inline void want(const Opnd* ops, int n, int expect, const char* what) {
    if (n != expect) fail(what);
    (void)ops;
}
inline void put32(const Opnd& o, uint32_t v) { memcpy(o.p, &v, 4); }

// ld.global.nc.L1::no_allocate.v4.u32 {%0..%3}, [%4]: a 16-byte aligned load.
inline void ptx_ld_nc_v4(const Opnd* ops, int n) {
    want(ops, n, 5, "ld.global.nc.v4.u32: expected 4 outputs and an address");
    const uintptr_t a = ops[4].v;
    if (a % 16) fail("ld.global.nc.v4.u32: misaligned address (16-byte alignment required)");
    uint32_t w[4];
    memcpy(w, reinterpret_cast<const void*>(a), 16);
    for (int i = 0; i < 4; ++i) put32(ops[i], w[i]);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 {%0..%3}, [%4].
// Lane 8*i + r gives the address of row r of matrix i (8 b16 = 16 bytes, 16-byte aligned).
// Without .trans lane l receives, in register i, matrix i's (row l/4, columns 2(l%4), 2(l%4)+1);
// with .trans it receives (rows 2(l%4), 2(l%4)+1 of column l/4): the low half holds the first.
inline void ptx_ldsm(const Opnd* ops, int n, bool trans) {
    want(ops, n, 5, "ldmatrix.x4: expected 4 outputs and an address");
    WarpSlot& s = L.cur->slot;
    s.in[0] = ops[4].v;
    WarpSlot& r = warp_collective(trans ? LDSM_X4_T : LDSM_X4, 0xffffffffu);
    for (int i = 0; i < 4; ++i) put32(ops[i], uint32_t(r.out[i]));
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0,b1}, {c0..c3}.
inline void ptx_mma(const Opnd* ops, int n) {
    // Our only form: "+f"(d0..d3) then a0..a3, b0, b1 -> C is D's input.
    if (n != 10) fail("mma.sync.m16n8k16: expected 4 accumulators, 4 A and 2 B registers");
    WarpSlot& s = L.cur->slot;
    for (int i = 0; i < 4; ++i) s.in[i] = ops[4 + i].v & 0xffffffffu;          // A
    s.in[4] = ops[8].v & 0xffffffffu;                                          // B
    s.in[5] = ops[9].v & 0xffffffffu;
    s.in[6] = (ops[0].v & 0xffffffffu) | (ops[1].v << 32);                      // C
    s.in[7] = (ops[2].v & 0xffffffffu) | (ops[3].v << 32);
    WarpSlot& r = warp_collective(MMA_16816, 0xffffffffu);
    for (int i = 0; i < 4; ++i) put32(ops[i], uint32_t(r.out[i]));
}

inline void ptx_ldsm_n(const Opnd* ops, int n) { ptx_ldsm(ops, n, false); }
inline void ptx_ldsm_t(const Opnd* ops, int n) { ptx_ldsm(ops, n, true); }

inline void ptx_unknown(const Opnd*, int) { fail("PTX instruction not emulated by tests/cudacpu"); }

inline PtxFn ptx_find(const char* tmpl) {
    const char* sp = strchr(tmpl, ' ');
    const size_t len = sp ? size_t(sp - tmpl) : strlen(tmpl);
    auto is = [&](const char* op) { return strlen(op) == len && !strncmp(tmpl, op, len); };
    if (is("ld.global.nc.L1::no_allocate.v4.u32")) return ptx_ld_nc_v4;
    if (is("ldmatrix.sync.aligned.m8n8.x4.shared.b16")) return ptx_ldsm_n;
    if (is("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16")) return ptx_ldsm_t;
    if (is("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")) return ptx_mma;
    return ptx_unknown;
}

inline void ptx_call(PtxFn fn, std::initializer_list<Opnd> ops) { fn(ops.begin(), int(ops.size())); }

// ---- resolving a warp's collective ------------------------------------------------------------------
inline float bf16_lo(uint32_t w) { uint32_t u = w << 16; float f; memcpy(&f, &u, 4); return f; }
inline float bf16_hi(uint32_t w) { uint32_t u = w & 0xffff0000u; float f; memcpy(&f, &u, 4); return f; }

// All lanes of `lanes` (a mask) wait at a collective of slot kind `kind`. Fills their outputs.
inline void resolve(Fiber** lane, unsigned lanes, int kind) {
    auto in = [&](int l, int i) { return lane[l]->slot.in[i]; };
    switch (kind) {
    case SHFL_IDX: case SHFL_XOR: case SHFL_DOWN: case SHFL_UP:
        for (int l = 0; l < 32; ++l) {
            if (!(lanes >> l & 1u)) continue;
            const int arg = int(uint32_t(in(l, 1))), w = int(in(l, 2));
            const int base = l & ~(w - 1);
            int src = l;
            if (kind == SHFL_IDX) src = base + (arg & (w - 1));
            else if (kind == SHFL_XOR) { src = l ^ arg; if (src >= base + w || src < base) src = l; }
            else if (kind == SHFL_DOWN) { src = l + arg; if (src >= base + w) src = l; }
            else { src = l - arg; if (src < base) src = l; }
            if (src < 0 || src > 31 || !(lanes >> src & 1u))
                return set_error(lane[l], "shuffle reads a lane outside the mask");
            lane[l]->slot.out[0] = in(src, 0);
        }
        break;
    case BALLOT: {
        uint64_t b = 0;
        for (int l = 0; l < 32; ++l) if ((lanes >> l & 1u) && in(l, 0)) b |= 1ull << l;
        for (int l = 0; l < 32; ++l) if (lanes >> l & 1u) lane[l]->slot.out[0] = b;
        break;
    }
    case SYNCWARP:
        break;
    case LDSM_X4: case LDSM_X4_T:
        for (int l = 0; l < 32; ++l) {
            for (int m = 0; m < 4; ++m) {
                uint16_t e[2];
                for (int k = 0; k < 2; ++k) {
                    // (row, col) of matrix m that lane l's register m holds, element k
                    const int row = kind == LDSM_X4 ? l / 4 : 2 * (l % 4) + k;
                    const int col = kind == LDSM_X4 ? 2 * (l % 4) + k : l / 4;
                    const unsigned a = unsigned(in(8 * m + row, 0));
                    if (a % 16) return set_error(lane[8 * m + row], "ldmatrix: row address not 16-byte aligned");
                    const unsigned char* p = shared_pointer(a, 16);
                    if (!p) return set_error(lane[8 * m + row], "ldmatrix: row address outside shared memory");
                    memcpy(&e[k], p + 2 * col, 2);
                }
                lane[l]->slot.out[m] = uint64_t(e[0]) | uint64_t(e[1]) << 16;
            }
        }
        break;
    case MMA_16816: {
        // PTX ISA fragment layouts for .bf16 m16n8k16 (groupID g = lane / 4, t = lane % 4):
        //   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
        //   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
        //   C/D (16x8 f32): c0,c1 = (g, 2t, 2t+1), c2,c3 = (g+8, 2t, 2t+1)
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            for (int r = 0; r < 4; ++r) {
                const uint32_t w = uint32_t(in(l, r));
                const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
                A[row][col] = bf16_lo(w);
                A[row][col + 1] = bf16_hi(w);
            }
            for (int r = 0; r < 2; ++r) {
                const uint32_t w = uint32_t(in(l, 4 + r));
                B[2 * t + 8 * r][g] = bf16_lo(w);
                B[2 * t + 8 * r + 1][g] = bf16_hi(w);
            }
            const uint64_t c01 = in(l, 6), c23 = in(l, 7);
            C[g][2 * t] = from_bits<float>(c01 & 0xffffffffu);
            C[g][2 * t + 1] = from_bits<float>(c01 >> 32);
            C[g + 8][2 * t] = from_bits<float>(c23 & 0xffffffffu);
            C[g + 8][2 * t + 1] = from_bits<float>(c23 >> 32);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            for (int c = 0; c < 4; ++c) {
                const int row = g + 8 * (c >> 1), col = 2 * t + (c & 1);
                double acc = C[row][col];               // bf16 products are exact; one rounding
                for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
                lane[l]->slot.out[c] = bits(float(acc));
            }
        }
        break;
    }
    default:
        set_error(lane[__builtin_ctz(lanes)], "unknown warp collective");
    }
}

// ---- the scheduler ------------------------------------------------------------------------------
inline void describe_deadlock() {
    char buf[512];
    int n = snprintf(buf, sizeof buf, "deadlock: no thread can proceed;");
    int shown = 0;
    for (int i = 0; i < L.nthreads && shown < 6; ++i) {
        const Fiber& f = L.fibers[i];
        if (f.state == DONE) continue;
        n += snprintf(buf + n, sizeof buf - n, " thread %d waits at %s;", i,
                      f.state == AT_SYNC ? "__syncthreads()" : kind_name(f.slot.kind));
        ++shown;
        if (n >= int(sizeof buf) - 64) break;
    }
    int exited = 0;
    for (int i = 0; i < L.nthreads; ++i) exited += L.fibers[i].state == DONE;
    snprintf(buf + n, sizeof buf - n, " %d of %d threads have exited (a barrier or collective not reached by every thread)",
             exited, L.nthreads);
    set_error(nullptr, buf);
}

// Release warp w's collective if every lane of its mask waits at one of the same kind.
// Returns true when lanes were released (or the launch failed).
inline bool try_release(int w) {
    Fiber* lane[32] = {};
    unsigned waiting = 0, present = 0;
    for (int l = 0; l < 32 && w * 32 + l < L.nthreads; ++l) {
        lane[l] = &L.fibers[w * 32 + l];
        present |= 1u << l;
        if (lane[l]->state == AT_WARP) waiting |= 1u << l;
    }
    if (!waiting) return false;
    const int first = __builtin_ctz(waiting);
    const unsigned want = lane[first]->slot.mask;
    const int kind = lane[first]->slot.kind;
    if (want & ~present) {
        set_error(lane[first], "warp collective mask names lanes the block does not have");
        return true;
    }
    if ((waiting & want) != want) return false;               // some lane of the mask is elsewhere
    for (int l = 0; l < 32; ++l)
        if ((want >> l & 1u) && (lane[l]->slot.kind != kind || lane[l]->slot.mask != want)) return false;
    resolve(lane, want, kind);
    for (int l = 0; l < 32; ++l) if (want >> l & 1u) lane[l]->state = RUNNABLE;
    return true;
}

// One block. Schedule: warps in ORDER, and within a warp its lanes in ORDER; a warp runs as
// far as it can (through its collectives) before the next warp starts, so a warp that reads
// shared memory another warp writes later in program order sees a different value in the
// other order. Then the block barrier releases, or the launch deadlocks.
inline void run_block() {
    if (L.dyn_smem) memset(L.dyn_smem, 0xFF, L.dyn_bytes);   // poison shared memory
    for (auto& s : L.statics) memset(s.first, 0xFF, s.second);
    for (int i = 0; i < L.nthreads; ++i) {
        Fiber& f = L.fibers[i];
        f.linear = i;
        f.tid = make_uint3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
        init_fiber(&f);
    }
    const int nwarps = (L.nthreads + 31) / 32;
    for (;;) {
        bool ran = false;
        for (int k = 0; k < nwarps; ++k) {
            const int w = L.order ? nwarps - 1 - k : k;
            const int n = L.nthreads - 32 * w < 32 ? L.nthreads - 32 * w : 32;
            for (;;) {
                for (int j = 0; j < n; ++j) {
                    Fiber* f = &L.fibers[32 * w + (L.order ? n - 1 - j : j)];
                    if (f->state != RUNNABLE) continue;
                    switch_to_fiber(f);
                    ran = true;
                    if (L.failed) return;
                }
                if (!try_release(w)) break;
                if (L.failed) return;
            }
        }
        if (ran) continue;
        int at_sync = 0, done = 0;
        for (int i = 0; i < L.nthreads; ++i) {
            at_sync += L.fibers[i].state == AT_SYNC;
            done += L.fibers[i].state == DONE;
        }
        if (done == L.nthreads) return;
        if (at_sync == L.nthreads) {
            for (int i = 0; i < L.nthreads; ++i) L.fibers[i].state = RUNNABLE;
            continue;
        }
        return describe_deadlock();
    }
}

// g: grid xyz, block xyz, dynamic shared bytes, thread order. Returns 0, or 1 with err set.
inline int launch(const char* kernel, const long long* g, char* err, int errlen, std::function<void()> body) {
    L.kernel = kernel;
    L.grid = dim3(unsigned(g[0]), unsigned(g[1]), unsigned(g[2]));
    L.block = dim3(unsigned(g[3]), unsigned(g[4]), unsigned(g[5]));
    L.dyn_bytes = size_t(g[6]);
    L.order = int(g[7]);
    L.err = err;
    L.errlen = errlen;
    L.failed = false;
    L.cur = nullptr;
    L.nthreads = int(L.block.x * L.block.y * L.block.z);
    if (L.nthreads < 1 || L.nthreads > kMaxThreads) { snprintf(err, errlen, "%s: bad block size", kernel); return 1; }
    if (!stack_pool) {
        // One region for all fiber stacks; a PROT_NONE page at the bottom of each catches overflow.
        const size_t total = kStack * kMaxThreads;
        void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) { snprintf(err, errlen, "%s: cannot map fiber stacks", kernel); return 1; }
        stack_pool = static_cast<char*>(m);
        for (int i = 0; i < kMaxThreads; ++i) mprotect(stack_pool + i * kStack, 4096, PROT_NONE);
    }
    for (int i = 0; i < L.nthreads; ++i) L.fibers[i].stack = stack_pool + i * kStack;
    std::vector<unsigned char> dyn(L.dyn_bytes + 16);
    L.dyn_smem = L.dyn_bytes ? dyn.data() : nullptr;
    L.body = std::move(body);
    for (unsigned z = 0; z < L.grid.z && !L.failed; ++z)
        for (unsigned y = 0; y < L.grid.y && !L.failed; ++y)
            for (unsigned x = 0; x < L.grid.x && !L.failed; ++x) {
                L.bid = make_uint3(x, y, z);
                run_block();
            }
    L.body = nullptr;
    L.dyn_smem = nullptr;
    return L.failed ? 1 : 0;
}

}  // namespace cudacpu

// ---- CUDA built-ins used by the kernels --------------------------------------------------------------
inline void __syncthreads() {
    ::cudacpu::L.cur->state = ::cudacpu::AT_SYNC;
    ::cudacpu::yield_to_scheduler();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cudacpu::warp_collective(::cudacpu::SYNCWARP, mask); }
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32) { return ::cudacpu::shfl(::cudacpu::SHFL_IDX, m, v, src, w); }
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) { return ::cudacpu::shfl(::cudacpu::SHFL_XOR, m, v, x, w); }
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) { return ::cudacpu::shfl(::cudacpu::SHFL_DOWN, m, v, int(d), w); }
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) { return ::cudacpu::shfl(::cudacpu::SHFL_UP, m, v, int(d), w); }
inline unsigned __ballot_sync(unsigned m, int p) {
    ::cudacpu::L.cur->slot.in[0] = p != 0;
    return unsigned(::cudacpu::warp_collective(::cudacpu::BALLOT, m).out[0]);
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, p) == (m & __ballot_sync(m, 1)); }

// Atomics: fibers never preempt each other, so a plain read-modify-write is atomic.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o > v ? o : v; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = o < v ? o : v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicCAS(T* p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }

inline size_t __cvta_generic_to_shared(const void* p) { return ::cudacpu::shared_address(p); }
template <class T> inline T __ldg(const T* p) { return *p; }
[[noreturn]] inline void __trap() { ::cudacpu::fail("__trap()"); }

inline float __int_as_float(int i) { return ::cudacpu::from_bits<float>(uint32_t(i)); }
inline float __uint_as_float(unsigned u) { return ::cudacpu::from_bits<float>(u); }
inline int __float_as_int(float f) { return int(uint32_t(::cudacpu::bits(f))); }
inline unsigned __float_as_uint(float f) { return unsigned(::cudacpu::bits(f)); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
// Fast intrinsics: CUDA's are approximations (a few ulp); the exact function is within them.
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __exp2f(float a) { return std::exp2(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.f / std::sqrt(a); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
