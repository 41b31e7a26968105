//! Tests without a GPU: the generated CUDA C, compiled by the host C++ compiler against a small
//! emulation of the CUDA execution model (one fiber per CUDA thread, all on the calling thread,
//! switched at barriers: `__syncthreads` and the warp-synchronous shuffles and `mma.sync`;
//! blocks run one after another), driven by the same step binding ([`super::bind`]) and launch
//! descriptions the GPU runtime uses, and compared with the CPU executor on fixture plans and on
//! quantized matrices of every scheme.
//!
//! What it checks: kernel indexing, dequantization, reductions, the attention/KV-cache logic,
//! argument order, grids derived from the launch JSON, the meta convention; the alignment the
//! GPU demands of vector accesses, `cp.async` and `ldmatrix` (a misaligned one stops the test);
//! some races: between barriers a block's threads run first to last, then last to first, so a
//! read of another thread's write with no barrier between sees it one way and misses it the
//! other, and `cp.async` copies land at their wait or, compiled with [`CopyLanding::AtIssue`],
//! at their issue. What it cannot check: the real hardware (the `mma` and `ldmatrix` fragment
//! layouts are emulated from the PTX ISA's description; the f16/tf32 conversions, f16x2
//! arithmetic, `lop3` and `prmt` are host code written from it), the memory model beyond that,
//! and performance. Tests skip when `g++` (C++20) is missing.

use super::bind::{bind_phase, ArgRef, Step};
use crate::codegen::cuda::launch::CudaLaunch;
use crate::codegen::cuda::{generate_plan, CudaKernel};
use crate::formats::model_lib::plan::{Plan, StateDecl};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;

const EMU_HEADER: &str = r#"
#define MLCB_EMULATE 1
// Only light C headers: every test compiles this header again with its kernels, and the C++
// library's containers and <functional> took half of that time.
#include <cmath>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <sys/mman.h>
#include <unistd.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
// CUDA's vector types with CUDA's alignment: compiled with `-fsanitize=alignment`, a vector
// load or store at an address the GPU would fault on stops the test.
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
// cp.async of 16 bytes and ldmatrix's row addresses need 16-byte alignment on the GPU (a
// misaligned address is a fault there); the emulator's memcpy would not mind, so it checks.
inline void emu_need_aligned16(const void* p, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16u != 0) {
        std::fprintf(stderr, "emulated CUDA: %s at %p is not 16-byte aligned (the GPU would fault)\n", what, p);
        std::abort();
    }
}
// Internal linkage: `inline` variables would be GNU-unique symbols, shared by every emulator
// library loaded into the process.
namespace emu {
[[noreturn]] inline void fail(const char* what);
// Fibers: a saved context, a switch from one to another, a start on a fresh stack.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
// On x86-64 a switch is a few instructions: the callee-saved registers and the SSE/x87 control
// words pushed on the stack left, the stack pointers swapped. (swapcontext also sets the signal
// mask, a system call per switch: a third of the emulated tests' time.)
struct fiber_ctx { void* sp = nullptr; };
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl emu_fiber_switch
    .hidden emu_fiber_switch
    .type emu_fiber_switch, @function
emu_fiber_switch:
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
    .size emu_fiber_switch, .-emu_fiber_switch
)");
inline void switch_to(fiber_ctx& from, fiber_ctx& to) { emu_fiber_switch(&from.sp, to.sp); }
// The frame emu_fiber_switch pops: default control words, zeroed registers, then a return into
// `entry` with the stack as a call leaves it (16-byte aligned below a return address).
inline void start_on(fiber_ctx& c, char* stack, unsigned long size, void (*entry)()) {
    void** sp = reinterpret_cast<void**>(reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15));
    *--sp = nullptr;
    *--sp = reinterpret_cast<void*>(entry);
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    *--sp = reinterpret_cast<void*>((std::uintptr_t(0x037F) << 32) | 0x1F80u);
    c.sp = sp;
}
#else
}
#include <ucontext.h>
namespace emu {
struct fiber_ctx { ucontext_t uc; };
inline void switch_to(fiber_ctx& from, fiber_ctx& to) { swapcontext(&from.uc, &to.uc); }
inline void start_on(fiber_ctx& c, char* stack, unsigned long size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif
// A cp.async copy not yet landed (see cp_async16), and a thread's group of them.
struct pending_copy { unsigned short* dst; const void* src; bool full; };
constexpr unsigned CP_GROUP_COPIES = 32, CP_GROUPS = 8;
struct cp_group {
    unsigned n = 0;
    pending_copy c[CP_GROUP_COPIES];
};
// One CUDA thread: a fiber (its own stack and saved context) and its per-thread state. Fibers
// instead of host threads: a barrier is a context switch on one host thread, not a wake-up of
// hundreds of threads on a few cores (the emulated tests ran several times slower so).
struct cuda_thread {
    fiber_ctx ctx;
    emu_dim3 tid;
    unsigned parity = 0;
    bool done = false;
    cp_group cp_open;
    cp_group cp_groups[CP_GROUPS];
    unsigned cp_committed = 0;
};
// The last fiber to arrive opens the barrier and goes on; the others yield until it has.
struct fiber_barrier { unsigned n = 0, count = 0, generation = 0; };
static cuda_thread* cur = nullptr;
static emu_dim3 bid, bdim, gdim;
static fiber_barrier block_bar;
static fiber_barrier warp_bars[32];
static fiber_ctx scheduler;
// Barrier arrivals and finished threads: a pass over the block's fibers without any is a deadlock.
static unsigned long long progress = 0;
inline void yield() { switch_to(cur->ctx, scheduler); }
inline void arrive_and_wait(fiber_barrier& b) {
    ++progress;
    const unsigned g = b.generation;
    if (++b.count == b.n) {
        b.count = 0;
        ++b.generation;
        return;
    }
    while (b.generation == g) yield();
}
// Per warp, the lanes' values of a warp-collective operation (shuffle, reduction, mma), in two
// buffers used alternately: a lane writes buffer `p` of collective i only after every lane has
// passed collective i-1's barrier, i.e. finished reading collective i-2's buffer `p`, so one
// barrier per collective is enough (every lane of a warp runs the same collectives).
static float shfl[2][32][32];
static unsigned mma_a[2][32][32][4], mma_b[2][32][32][2];
static const void* ldsm_row[2][32][32];
// This lane's buffer for its next collective.
inline unsigned next_buffer() { const unsigned p = cur->parity; cur->parity ^= 1u; return p; }
}
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::bid)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
inline void __syncthreads() { emu::arrive_and_wait(emu::block_bar); }
// A cache hint: nothing to emulate.
inline void prefetch_l2(const void*) {}
// Blocks run one after another on one host thread, so device-wide ordering holds by
// construction.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// Every lane of the warp publishes `v`, then reads lane `src`'s.
inline float emu_shfl(float v, unsigned src) {
    const unsigned t = emu::cur->tid.x, w = t >> 5, l = t & 31u, p = emu::next_buffer();
    emu::shfl[p][w][l] = v;
    emu::arrive_and_wait(emu::warp_bars[w]);
    return emu::shfl[p][w][src & 31u];
}
inline float __shfl_xor_sync(unsigned, float v, int o) { return emu_shfl(v, (emu::cur->tid.x & 31u) ^ (unsigned)o); }
// The prelude's xor-butterfly reductions, in one exchange instead of five: every lane reads the
// warp's 32 values and folds them in the butterfly's own pairing, so each lane ends with the
// bits the five shuffles give (a + b == b + a exactly: all lanes hold the same value per step).
template <typename F>
inline float emu_warp_reduce(float v, F op) {
    const unsigned t = emu::cur->tid.x, w = t >> 5, l = t & 31u, p = emu::next_buffer();
    emu::shfl[p][w][l] = v;
    emu::arrive_and_wait(emu::warp_bars[w]);
    float x[32];
    for (unsigned i = 0; i < 32u; ++i) x[i] = emu::shfl[p][w][i];
    for (unsigned o = 16; o > 0; o >>= 1) {
        float y[32];
        for (unsigned i = 0; i < 32u; ++i) y[i] = op(x[i], x[i ^ o]);
        std::memcpy(x, y, sizeof x);
    }
    return x[l];
}
inline float warp_sum(float v) { return emu_warp_reduce(v, [](float a, float b) { return a + b; }); }
inline float warp_max(float v) { return emu_warp_reduce(v, [](float a, float b) { return fmaxf(a, b); }); }
inline float __shfl_sync(unsigned, float v, unsigned src) { return emu_shfl(v, src); }
inline float h2f(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline float f16_round(float v) { return (float)(_Float16)v; }
inline unsigned short f2h(float v) { _Float16 x = (_Float16)v; unsigned short h; std::memcpy(&h, &x, 2); return h; }
// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline unsigned to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;
    return (u + 0x1000u) & 0xffffe000u;
}
// mma.sync.m16n8kK: the warp's fragments meet in emu::mma_a / mma_b, then each lane sums its
// four C elements, c_i at (g + 8(i/2), 2c + i%2) with g = lane/4, c = lane%4 (the same for both
// shapes); `a_at(A, row, k)` and `b_at(B, k, n)` read an operand from the warp's lanes'
// registers A[lane][i], B[lane][i] by the shape's fragment layout.
typedef const unsigned (*emu_frag_a)[4];
typedef const unsigned (*emu_frag_b)[2];
template <unsigned KDIM, class FA, class FB>
inline void mma_emulated(float* c, const unsigned* a, const unsigned* b, FA a_at, FB b_at) {
    const unsigned t = emu::cur->tid.x, w = t >> 5, l = t & 31u, p = emu::next_buffer();
    for (int i = 0; i < 4; ++i) emu::mma_a[p][w][l][i] = a[i];
    emu::mma_b[p][w][l][0] = b[0]; emu::mma_b[p][w][l][1] = b[1];
    emu::arrive_and_wait(emu::warp_bars[w]);
    const emu_frag_a A = emu::mma_a[p][w];
    const emu_frag_b B = emu::mma_b[p][w];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = l / 4 + 8 * (i / 2), col = 2 * (l % 4) + i % 2;
        float acc = c[i];
        for (unsigned k = 0; k < KDIM; ++k) acc += a_at(A, row, k) * b_at(B, k, col);
        c[i] = acc;
    }
}
// .tf32, m16n8k8 (PTX ISA layout): A a_i at (g + 8(i%2), c + 4(i/2)); B b_i at (k = c + 4i, n = g).
inline void mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    mma_emulated<8>(c, a, b,
        [](emu_frag_a A, unsigned row, unsigned k) { return __uint_as_float(A[(row % 8) * 4 + k % 4][row / 8 + 2 * (k / 4)]); },
        [](emu_frag_b B, unsigned k, unsigned n) { return __uint_as_float(B[n * 4 + k % 4][k / 4]); });
}
// cvt.rn.f16x2.f32: lo in the low half, hi in the high half, round to nearest even.
inline unsigned pack_h2(float lo, float hi) {
    _Float16 l = (_Float16)lo, h = (_Float16)hi;
    unsigned short a, b;
    std::memcpy(&a, &l, 2); std::memcpy(&b, &h, 2);
    return (unsigned)a | ((unsigned)b << 16);
}
inline float half_of(unsigned r, unsigned k) { return h2f((unsigned short)((r >> (16 * (k & 1u))) & 0xFFFFu)); }
// cvt.rn.satfinite.f16x2.f32: a value past ±65504 saturates there, NaN stays NaN.
inline unsigned pack_h2_sat(float lo, float hi) {
    auto sat = [](float v) { return std::isnan(v) ? v : fminf(fmaxf(v, -65504.0f), 65504.0f); };
    return pack_h2(sat(lo), sat(hi));
}
// Shared-window addresses: offsets from an anchor in the same image (a kernel's `__shared__`
// arrays are statics beside it, well within ±2 GiB).
namespace emu { static char smem_anchor; }
inline unsigned smem_u32(const void* p) {
    return (unsigned)(std::intptr_t)(static_cast<const char*>(p) - &emu::smem_anchor);
}
inline const unsigned short* emu_smem(unsigned a) {
    return reinterpret_cast<const unsigned short*>(&emu::smem_anchor + (std::intptr_t)(int)a);
}
// ldmatrix.sync.m8n8.x4.b16: every lane publishes its row address; register i of lane l is
// 32 bits at column 2(l % 4) of row l / 4 of matrix i, i.e. the row lane 8i + l / 4 gave.
// The warp's 32 row addresses of an ldmatrix, once every lane has published its own.
inline const void* const* emu_ldsm_rows(unsigned a) {
    const unsigned t = emu::cur->tid.x, w = t >> 5, l = t & 31u, q = emu::next_buffer();
    emu_need_aligned16(emu_smem(a), "an ldmatrix row address");
    emu::ldsm_row[q][w][l] = emu_smem(a);
    emu::arrive_and_wait(emu::warp_bars[w]);
    return emu::ldsm_row[q][w];
}
inline void ldsm_x4(unsigned* r, unsigned a) {
    const void* const* rows = emu_ldsm_rows(a);
    const unsigned l = emu::cur->tid.x & 31u;
    for (unsigned i = 0; i < 4u; ++i)
        std::memcpy(&r[i], static_cast<const unsigned short*>(rows[8 * i + l / 4]) + 2 * (l % 4), 4);
}
// .trans: register i of lane l is rows 2(l % 4) and +1 of column l / 4 of matrix i (lower row
// in the low half).
inline void ldsm_x4_trans(unsigned* r, unsigned a) {
    const void* const* rows = emu_ldsm_rows(a);
    const unsigned l = emu::cur->tid.x & 31u;
    for (unsigned i = 0; i < 4u; ++i) {
        const unsigned short lo = static_cast<const unsigned short*>(rows[8 * i + 2 * (l % 4)])[l / 4];
        const unsigned short hi = static_cast<const unsigned short*>(rows[8 * i + 2 * (l % 4) + 1])[l / 4];
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
}
// cp.async: a copy lands on the GPU at any time between its issue and the wait_group that
// covers it; the emulator takes one end or the other ([`CopyLanding`]). By default a thread's
// copies wait in its groups until a wait_group lets them land, so a read of the destination
// before that wait (or, for another thread's copies, before the barrier after it) sees stale
// bytes.
namespace emu {
// A copy's 16 bytes in place: the source's, or zeros (`full` false: past the data).
inline void land(const pending_copy& c) {
    if (c.full) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
}
}
inline void cp_async16(unsigned dst, const void* src, bool full) {
    const emu::pending_copy c{const_cast<unsigned short*>(emu_smem(dst)), src, full};
    emu_need_aligned16(c.dst, "a cp.async destination");
    emu_need_aligned16(src, "a cp.async source");
#ifdef EMU_CP_LAND_AT_ISSUE
    // The other end of the window: landed at once, so a copy into a buffer that other threads
    // still read (no barrier between their reads and this issue) changes what they read.
    emu::land(c);
#else
    emu::cp_group& g = emu::cur->cp_open;
    if (g.n == emu::CP_GROUP_COPIES) emu::fail("more cp.async copies in one group than the emulator holds");
    g.c[g.n++] = c;
#endif
}
inline void cp_async_commit() {
    emu::cuda_thread& t = *emu::cur;
    if (t.cp_committed == emu::CP_GROUPS) emu::fail("more cp.async groups in flight than the emulator holds");
    t.cp_groups[t.cp_committed++] = t.cp_open;
    t.cp_open.n = 0;
}
template <int N> inline void cp_async_wait() {
    emu::cuda_thread& t = *emu::cur;
    while (t.cp_committed > (unsigned)N) {
        const emu::cp_group& g = t.cp_groups[0];
        for (unsigned i = 0; i < g.n; ++i) emu::land(g.c[i]);
        for (unsigned i = 1; i < t.cp_committed; ++i) t.cp_groups[i - 1] = t.cp_groups[i];
        --t.cp_committed;
    }
}
// A value the compiler must materialise: GCC folds (double)(float)(_Float16)h into one
// libgcc call, where F16C converts to float in one instruction.
template <class T> inline T emu_opaque(T v) { asm("" : "+m"(v)); return v; }
// double → f16 rounded to nearest even, without libgcc's software conversion: via float
// rounded to odd (exact, or the truncation with its last bit set), which a second rounding to
// f16 cannot get wrong (Boldo & Melquiond: an intermediate of p + 2 bits; float has 24 ≥ 13).
// Checked against the direct conversion on 80 M sums, products, fmas and near-ties.
inline _Float16 emu_to_f16(double x) {
    float f = (float)x;
    if ((double)f != x) {
        unsigned u;
        std::memcpy(&u, &f, 4);
        if (std::fabs((double)f) > std::fabs(x)) u -= 1u;
        u |= 1u;
        std::memcpy(&f, &u, 4);
    }
    return (_Float16)f;
}
// f16x2 arithmetic rounded once per half: sums and products of f16 values are exact in double
// (an fma too unless its product and addend lie some 30 binades apart — never in these
// kernels), so one rounding of the double result is IEEE's f16 operation.
template <class F>
inline unsigned emu_h2_op(unsigned a, unsigned b, unsigned c, F f) {
    unsigned r = 0;
    for (unsigned i = 0; i < 2u; ++i) {
        const double x = emu_opaque(half_of(a, i)), y = emu_opaque(half_of(b, i)), z = emu_opaque(half_of(c, i));
        const _Float16 v = emu_to_f16(f(x, y, z));
        unsigned short bits;
        std::memcpy(&bits, &v, 2);
        r |= (unsigned)bits << (16 * i);
    }
    return r;
}
inline unsigned hsub2(unsigned a, unsigned b) { return emu_h2_op(a, b, 0u, [](double x, double y, double) { return x - y; }); }
inline unsigned hmul2(unsigned a, unsigned b) { return emu_h2_op(a, b, 0u, [](double x, double y, double) { return x * y; }); }
inline unsigned hfma2(unsigned a, unsigned b, unsigned c) { return emu_h2_op(a, b, c, [](double x, double y, double z) { return x * y + z; }); }
// lop3.b32: bit i of the result is bit (4a_i + 2b_i + c_i) of LUT.
template <unsigned LUT>
inline unsigned lop3(unsigned a, unsigned b, unsigned c) {
    unsigned r = 0;
    for (unsigned i = 0; i < 32u; ++i) {
        const unsigned idx = (((a >> i) & 1u) << 2) | (((b >> i) & 1u) << 1) | ((c >> i) & 1u);
        r |= ((LUT >> idx) & 1u) << i;
    }
    return r;
}
// __byte_perm: byte i of the result is byte (selector nibble i) & 7 of {y:x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (unsigned i = 0; i < 4u; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
    return r;
}
// .f16 → f32, m16n8k16 (PTX ISA layout; two halves per register, the lower index in the low
// half): A reg i at rows g + 8(i%2), cols 2c + 8(i/2) (+0, +1); B reg i at k = 2c + 8i (+0, +1), n = g.
inline void mma_f16(float* c, const unsigned* a, const unsigned* b) {
    mma_emulated<16>(c, a, b,
        [](emu_frag_a A, unsigned row, unsigned k) { return half_of(A[(row % 8) * 4 + (k % 8) / 2][row / 8 + 2 * (k / 8)], k); },
        [](emu_frag_b B, unsigned k, unsigned n) { return half_of(B[n * 4 + (k % 8) / 2][k / 8], k); });
}
namespace emu {
static void (*kernel)(void*) = nullptr;
static void* kernel_args = nullptr;
// A fiber's body: the kernel, then back to the scheduler for good.
static void thread_main() {
    kernel(kernel_args);
    cur->done = true;
    ++progress;
    switch_to(cur->ctx, scheduler);
    __builtin_unreachable();
}
[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emulated CUDA: block (%u, %u, %u): %s\n", bid.x, bid.y, bid.z, what);
    std::abort();
}
// Each block's threads run in turn on this host thread, each until it waits at a barrier or
// ends, in alternating order (first to last, then last to first), so that a read of another
// thread's write with no barrier between them sees it in one order and misses it in the other.
static void run(unsigned gx, unsigned gy, unsigned gz, unsigned bx, void (*k)(void*), void* args) {
    constexpr unsigned long STACK = 256 * 1024;
    if (bx == 0 || bx > 1024 || bx % 32 != 0) fail("a block size the emulator does not run (1024 threads at most, whole warps)");
    // Freed at the end: the libraries stay loaded for the whole test process. Untouched stack
    // pages cost no memory. Each stack has a guard page below it: an overflow faults instead
    // of overwriting the next thread's stack.
    cuda_thread* ts = new cuda_thread[bx];
    const unsigned long guard = static_cast<unsigned long>(sysconf(_SC_PAGESIZE)), slot = guard + STACK;
    void* region = mmap(nullptr, slot * bx, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) fail("no memory for the threads' stacks");
    char* stacks = static_cast<char*>(region);
    for (unsigned i = 0; i < bx; ++i)
        if (mprotect(stacks + slot * i, guard, PROT_NONE) != 0) fail("cannot protect a stack's guard page");
    bdim = {bx, 1, 1};
    gdim = {gx, gy, gz};
    kernel = k;
    kernel_args = args;
    block_bar = fiber_barrier{bx};
    for (unsigned w = 0; w < bx / 32; ++w) warp_bars[w] = fiber_barrier{32};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                bid = {x, y, z};
                for (unsigned i = 0; i < bx; ++i) {
                    cuda_thread& t = ts[i];
                    t.tid = {i, 0, 0};
                    t.done = false;
                    start_on(t.ctx, stacks + slot * i + guard, STACK, thread_main);
                }
                unsigned left = bx;
                for (bool reverse = false; left > 0; reverse = !reverse) {
                    const unsigned long long before = progress;
                    for (unsigned j = 0; j < bx; ++j) {
                        cuda_thread& t = ts[reverse ? bx - 1 - j : j];
                        if (t.done) continue;
                        cur = &t;
                        switch_to(scheduler, t.ctx);
                        if (t.done) --left;
                    }
                    if (left > 0 && progress == before)
                        fail("every unfinished thread waits at a barrier the others never reach (deadlock)");
                }
                for (unsigned i = 0; i < bx; ++i)
                    if (ts[i].cp_open.n != 0 || ts[i].cp_committed != 0)
                        fail("a thread ended with cp.async copies it never waited for");
            }
    cur = nullptr;
    delete[] ts;
    munmap(region, slot * bx);
}
}
"#;

type LaunchFn = unsafe extern "C" fn(*mut *mut c_void, f32, u32, u32, u32, u32, u32);

/// A plan's kernels compiled for the host.
pub struct EmuKernels {
    _dir: tempfile::TempDir,
    launches: Vec<LaunchFn>,
    pub kernels: Vec<CudaKernel>,
    /// One launch at a time: the library's statics (`__shared__` arrays, the collectives'
    /// buffers, the fiber scheduler) are one set per library. Other libraries run meanwhile.
    running: std::sync::Mutex<()>,
}

fn c_type(elem: &str, write: bool) -> String {
    let t = match elem {
        "f32" => "float",
        "u32" => "unsigned",
        _ => "unsigned short",
    };
    format!("{}{t}*", if write { "" } else { "const " })
}

/// Whether a C++20 host compiler is available.
pub fn have_cxx() -> bool {
    std::process::Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// When an emulated `cp.async` copy lands: on the GPU any time between its issue and the wait
/// that covers it; the emulator takes one end, so a test run at each end catches both a read
/// too early and an overwrite too early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyLanding {
    /// At the wait: reading the destination before it (or before the barrier after another
    /// thread's wait) sees stale bytes.
    AtWait,
    /// At the issue: a copy into a buffer another thread still reads changes what it reads.
    AtIssue,
}

impl EmuKernels {
    pub fn compile(kernels: Vec<CudaKernel>) -> EmuKernels {
        EmuKernels::compile_with(kernels, CopyLanding::AtWait)
    }

    pub fn compile_with(kernels: Vec<CudaKernel>, landing: CopyLanding) -> EmuKernels {
        let mut src = String::from(EMU_HEADER);
        for (i, k) in kernels.iter().enumerate() {
            src.push_str(&format!(
                "namespace k{i} {{\n{}\n}}\n",
                k.source.replace("extern \"C\" __global__", "__global__")
            ));
            let n = k.launch.args.len();
            let args: Vec<String> = k
                .launch
                .args
                .iter()
                .enumerate()
                .map(|(j, a)| format!("({})p[{j}]", c_type(&a.elem, a.write)))
                .collect();
            src.push_str(&format!(
                "extern \"C\" void emu_launch_{i}(void** p, float scalar, unsigned index, unsigned gx, unsigned gy, unsigned gz, unsigned bx) {{\n    auto body = [&] {{ k{i}::{}({}, (const unsigned*)p[{n}], scalar, index); }};\n    emu::run(gx, gy, gz, bx, [](void* b) {{ (*static_cast<decltype(body)*>(b))(); }}, &body);\n}}\n",
                k.entry_point,
                args.join(", ")
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let cpp = dir.path().join("kernels.cpp");
        let so = dir.path().join("kernels.so");
        std::fs::write(&cpp, &src).unwrap();
        let out = std::process::Command::new("g++")
            .args([
                "-std=c++20",
                "-O1",
                // The library runs where it is compiled: the host's f16 conversions (F16C)
                // instead of libgcc's; no contraction into FMAs, which would change results.
                "-march=native",
                "-ffp-contract=off",
                "-shared",
                "-fPIC",
                "-fno-strict-aliasing",
                "-w",
            ])
            .args(alignment_check_flags())
            .args((landing == CopyLanding::AtIssue).then_some("-DEMU_CP_LAND_AT_ISSUE"))
            .arg("-o")
            .arg(&so)
            .arg(&cpp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "g++ failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let launches = load(&so, kernels.len());
        EmuKernels {
            _dir: dir,
            launches,
            kernels,
            running: std::sync::Mutex::new(()),
        }
    }
}

/// g++'s alignment sanitizer for the emulated kernels, with its runtime (a message naming the
/// line) where the compiler has it, else as a trap; either way a misaligned vector access ends
/// the test instead of passing on the host as it would not on the GPU.
fn alignment_check_flags() -> &'static [&'static str] {
    static FLAGS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    const WITH_RUNTIME: &[&str] = &["-fsanitize=alignment", "-fno-sanitize-recover=alignment"];
    const TRAP: &[&str] = &["-fsanitize=alignment", "-fsanitize-trap=alignment"];
    FLAGS.get_or_init(|| {
        let Ok(dir) = tempfile::tempdir() else {
            return TRAP;
        };
        let cpp = dir.path().join("probe.cpp");
        let links = std::fs::write(&cpp, "extern \"C\" int probe(int* p) { return *p; }\n").is_ok()
            && std::process::Command::new("g++")
                .args(["-shared", "-fPIC"])
                .args(WITH_RUNTIME)
                .arg("-o")
                .arg(dir.path().join("probe.so"))
                .arg(&cpp)
                .output()
                .is_ok_and(|o| o.status.success());
        if links {
            WITH_RUNTIME
        } else {
            TRAP
        }
    })
}

fn load(so: &Path, n: usize) -> Vec<LaunchFn> {
    let c = std::ffi::CString::new(so.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a shared library this test just compiled; the handle is leaked on purpose.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen of the emulated kernels failed");
    (0..n)
        .map(|i| {
            let name = std::ffi::CString::new(format!("emu_launch_{i}")).unwrap();
            // SAFETY: the symbol has the LaunchFn signature (generated above).
            unsafe {
                let s = libc::dlsym(h, name.as_ptr());
                assert!(!s.is_null());
                std::mem::transmute::<*mut c_void, LaunchFn>(s)
            }
        })
        .collect()
}

/// Host memory with 16-byte alignment (the kernels' vector loads need it, as on the GPU).
struct Mem(Vec<u128>);

impl Mem {
    fn zeroed(bytes: usize) -> Mem {
        Mem(vec![0u128; bytes.div_ceil(16).max(1)])
    }
    fn from_bytes(b: &[u8]) -> Mem {
        let mut m = Mem::zeroed(b.len());
        bytemuck::cast_slice_mut::<u128, u8>(&mut m.0)[..b.len()].copy_from_slice(b);
        m
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr() as *mut c_void
    }
    fn f32s(&self, n: usize) -> Vec<f32> {
        bytemuck::cast_slice::<u128, f32>(&self.0)[..n].to_vec()
    }
}

/// The GPU runtime's session logic on emulated kernels.
pub struct EmuSession<'k> {
    plan: Plan,
    k: &'k EmuKernels,
    prefill: Vec<Step>,
    decode: Vec<Step>,
    weights: Vec<Vec<Mem>>,
    kv: Vec<(Mem, Mem)>,
    rwkv: Vec<Mem>,
    /// Per kernel, its scratch (zeroed once, as the runtime does).
    scratch: Vec<Option<Mem>>,
    pos: usize,
}

impl<'k> EmuSession<'k> {
    pub fn new(plan: &Plan, k: &'k EmuKernels, records: &[Vec<Vec<u8>>]) -> EmuSession<'k> {
        let table: HashMap<String, (usize, CudaLaunch)> = k
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| (k.signature.clone(), (i, k.launch.clone())))
            .collect();
        let steps = |ops: &[crate::formats::model_lib::plan::Op], phase: &str| {
            bind_phase(plan, ops, phase, &table, "cuda").unwrap()
        };
        let s = plan.max_seq_len;
        let kv_elem = super::bind::kv_elem_bytes(k.kernels.iter().map(|k| &k.launch)).unwrap();
        let mut kv = Vec::new();
        let mut rwkv = Vec::new();
        for st in &plan.states {
            match *st {
                StateDecl::KvCache {
                    n_kv_heads,
                    head_dim,
                    ..
                } => {
                    kv.push((
                        Mem::zeroed(s * n_kv_heads * head_dim * kv_elem),
                        Mem::zeroed(s * n_kv_heads * head_dim * kv_elem),
                    ));
                    rwkv.push(Mem::zeroed(16));
                }
                StateDecl::Rwkv { hidden, .. } => {
                    let mut init = vec![0f32; 5 * hidden];
                    init[3 * hidden..4 * hidden].fill(-1e38);
                    rwkv.push(Mem::from_bytes(bytemuck::cast_slice(&init)));
                    kv.push((Mem::zeroed(16), Mem::zeroed(16)));
                }
            }
        }
        let (prefill, decode) = (
            steps(&plan.prefill, "prefill"),
            steps(&plan.decode, "decode"),
        );
        let launches: Vec<&CudaLaunch> = k.kernels.iter().map(|k| &k.launch).collect();
        let sizes: Vec<Vec<usize>> = records
            .iter()
            .map(|w| w.iter().map(|r| r.len()).collect())
            .collect();
        let layouts =
            super::bind::weight_layouts(plan, &[&prefill, &decode], &launches, &sizes).unwrap();
        let weights = records
            .iter()
            .zip(&layouts)
            .map(|(w, l)| {
                w.iter()
                    .zip(l)
                    .map(|(r, l)| Mem::from_bytes(&super::bind::device_bytes(r, *l, "").unwrap()))
                    .collect()
            })
            .collect();
        EmuSession {
            plan: plan.clone(),
            k,
            prefill,
            decode,
            weights,
            kv,
            rwkv,
            scratch: k
                .kernels
                .iter()
                .map(|k| Some(Mem::zeroed(k.launch.scratch_bytes()? as usize)))
                .collect(),
            pos: 0,
        }
    }

    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Vec<f32> {
        let _one = self.k.running.lock().unwrap_or_else(|e| e.into_inner());
        let t = tokens.len();
        let rows = if all_logits { t } else { 1 };
        let mut bufs: Vec<Mem> = self
            .plan
            .buffers
            .iter()
            .map(|d| Mem::zeroed(t * d.cols * 4))
            .collect();
        let mut toks = Mem::from_bytes(bytemuck::cast_slice(tokens));
        let meta = crate::codegen::cuda::launch::call_meta(t, self.pos, rows);
        let mut meta = Mem::from_bytes(bytemuck::cast_slice(&meta));
        let steps = if t > 1 { &self.prefill } else { &self.decode };
        for step in steps {
            let k = &self.k.kernels[step.kernel];
            let r = if step.logits { rows } else { t } as u64;
            let g: Vec<u64> = k
                .launch
                .grid
                .iter()
                .map(|d| d.workgroups(t as u64, r))
                .collect();
            let mut ptrs: Vec<*mut c_void> = step
                .args
                .iter()
                .map(|a| match *a {
                    ArgRef::Buffer(b) => bufs[b].ptr(),
                    ArgRef::Weight(w, i) => self.weights[w][i].ptr(),
                    ArgRef::Tokens => toks.ptr(),
                    ArgRef::KvK(s) => self.kv[s].0.ptr(),
                    ArgRef::KvV(s) => self.kv[s].1.ptr(),
                    ArgRef::Rwkv(s) => self.rwkv[s].ptr(),
                    ArgRef::Scratch(k) => self.scratch[k].as_mut().expect("bound").ptr(),
                })
                .collect();
            // SAFETY: meta holds 8 u32; the logits half starts at 16 bytes.
            ptrs.push(
                unsafe { (meta.ptr() as *mut u8).add(if step.logits { 16 } else { 0 }) }
                    as *mut c_void,
            );
            if g.contains(&0) {
                continue;
            }
            // SAFETY: the generated wrapper casts each pointer to the kernel's parameter type;
            // every buffer has the size the plan declares for `t` rows.
            unsafe {
                (self.k.launches[step.kernel])(
                    ptrs.as_mut_ptr(),
                    step.scalar,
                    step.index,
                    g[0] as u32,
                    g[1] as u32,
                    g[2] as u32,
                    k.launch.block[0],
                )
            };
        }
        self.pos += t;
        bufs[self.plan.logits].f32s(rows * self.plan.vocab_size)
    }
}

/// One tuning record for every signature of a plan (knobs a kernel ignores, it ignores).
fn tuning_records(
    plan: &Plan,
    (threads_per_block, rows_per_block, kv_splits): (u32, u32, u32),
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let t = crate::codegen::cuda::launch::CudaTuning {
        threads_per_block,
        rows_per_block,
        kv_splits,
    };
    let v = serde_json::to_value(t).expect("a tuning serialises");
    crate::codegen::signature::plan_signatures(plan)
        .into_iter()
        .map(|s| (s, v.clone()))
        .collect()
}

/// [`tuning_records`] at `base`, but `t` for the signatures `pick` selects (the kernels a test
/// is about; the others at a cheap-to-emulate shape).
#[cfg(test)]
fn tuning_records_where(
    plan: &Plan,
    base: (u32, u32, u32),
    pick: impl Fn(&str) -> bool,
    t: (u32, u32, u32),
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let picked = tuning_records(plan, t);
    let mut records = tuning_records(plan, base);
    for (sig, v) in records.iter_mut() {
        if pick(sig) {
            *v = picked[sig].clone();
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dtype::DType;
    use crate::formats::model_lib::plan::{
        BufferDecl, Op, WeightDecl, WeightStorage, PLAN_FORMAT_BASE,
    };
    use crate::model::testing::{build, open_weights, read_config, rel_err};
    use crate::runtime::cpu::kernels::WeightView;
    use crate::runtime::cpu::CpuModel;

    fn cxx_or_skip(test: &str) -> bool {
        if have_cxx() {
            return true;
        }
        eprintln!("SKIP {test}: no g++ to compile the emulated CUDA kernels");
        false
    }

    /// CPU logits: one prefill with every position (the exact kernels).
    fn cpu_logits(plan: &Plan, records: &[Vec<Vec<u8>>], ids: &[u32]) -> Vec<f32> {
        let recs: Vec<Vec<&[u8]>> = records
            .iter()
            .map(|w| w.iter().map(|r| r.as_slice()).collect())
            .collect();
        let views = WeightView::for_plan(plan, &recs);
        let model = CpuModel::new(plan, views).unwrap();
        let mut s = model.session();
        s.forward(ids, true).unwrap()
    }

    /// The bound on logits (relative to the CPU's) of kernels that multiply on f16 tensor cores:
    /// prefill of f16 schemes, and their decode over q4 and row-major q8 weights (`f16_decode`); other
    /// decode steps are f32 and keep the caller's bound.
    const F16_TOL: f64 = 5e-3;

    /// Emulated GPU: one prefill with every logit, then the first `n_decode` ids one per call
    /// (decode), each against the CPU's prefill logits. Prefill of f16 plans, and decode where
    /// it runs on tensor cores, are held to [`F16_TOL`] and must show f16 rounding (above 1e-5:
    /// else the f16 kernels silently stopped being used); the rest to `tol`.
    fn check_plan(
        plan: &Plan,
        records: &[Vec<Vec<u8>>],
        ids: &[u32],
        n_decode: usize,
        tunings: &[(u32, u32, u32)],
        tol: f64,
        what: &str,
    ) {
        let want = cpu_logits(plan, records, ids);
        let v = plan.vocab_size;
        let f16_decode = crate::codegen::cuda::f16_decode(plan).unwrap();
        let tol_prefill = if crate::codegen::cuda::f16_prefill(plan) {
            F16_TOL
        } else {
            tol
        };
        let tol_decode = if f16_decode { F16_TOL } else { tol };
        for &tuning in tunings {
            let (tpb, rpb, splits) = tuning;
            let k = EmuKernels::compile(
                generate_plan(plan, &tuning_records(plan, tuning), "sm_80").unwrap(),
            );
            let mut s = EmuSession::new(plan, &k, records);
            let pre = s.forward(ids, true);
            let e = rel_err(&pre, &want);
            assert!(
                e < tol_prefill,
                "{what} ({tpb}/{rpb}/{splits}) prefill: rel err {e:e}"
            );
            let mut s = EmuSession::new(plan, &k, records);
            let mut dec = Vec::new();
            for id in &ids[..n_decode] {
                dec.extend(s.forward(&[*id], false));
            }
            let e2 = rel_err(&dec, &want[..n_decode * v]);
            assert!(
                e2 < tol_decode && (!f16_decode || e2 > 1e-5),
                "{what} ({tpb}/{rpb}/{splits}) decode: rel err {e2:e}"
            );
            // A prefill continuing a session, last position only.
            let last = s.forward(&ids[n_decode..], false);
            let e3 = rel_err(&last, &want[(ids.len() - 1) * v..]);
            assert!(
                e3 < tol_prefill,
                "{what} ({tpb}/{rpb}/{splits}) prefill after decode: rel err {e3:e}"
            );
            eprintln!("{what} ({tpb}/{rpb}/{splits}): rel err prefill {e:.2e}, decode {e2:.2e}, continued prefill {e3:.2e}");
        }
    }

    #[test]
    fn fixture_plans_match_the_cpu() {
        if !cxx_or_skip("fixture_plans_match_the_cpu") {
            return;
        }
        // The preset default (128 threads, 4 rows, decode attention over 8 blocks per head) on
        // Llama; the others with 64 threads and 16 rows, which emulate faster (fewer threads
        // switching at each barrier for the same work) and are as valid a tuning (the matrices
        // test covers every scheme with the default); NeoX's decode attention in one block per
        // head. The decode steps see 1–4 keys: most of Llama's 8 key splits are empty.
        for (fx, arch, tuning) in [
            ("tiny-llama", "llama", (128, 4, 8)),
            ("tiny-neox", "gpt_neox", (64, 16, 1)),
            ("tiny-rwkv", "rwkv", (64, 16, 1)),
        ] {
            let (plan, records, ids) = fixture_plan(fx, arch, "q0f32");
            check_plan(&plan, &records, &ids, 4, &[tuning], 1e-4, fx);
        }
    }

    fn fixture_plan(fx: &str, arch: &str, scheme: &str) -> (Plan, Vec<Vec<Vec<u8>>>, Vec<u32>) {
        let a = crate::model::by_name(arch).unwrap_or_else(|| panic!("architecture {arch}"));
        let config = a.parse_config(&read_config(fx)).unwrap();
        let w = open_weights(fx);
        let built = build(a, &config, &[w.as_ref()], scheme, 80);
        // Decode steps fused as the cuda target fuses them.
        let plan = crate::codegen::fuse::fuse_for_cuda(built.plan);
        let ids: Vec<u32> = (0..20u32)
            .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
            .collect();
        (plan, built.records, ids)
    }

    /// Prefill of whole fixture models in two calls (30 rows, then 15 more at position 30), then
    /// 4 decode steps (46–49 keys in the decode attention's cache, split over 8 blocks per
    /// head): the query-tiled attention over several query and key tiles, reading the KV cache
    /// the first call wrote (head_dim 64 and 80; f16 for the f16 schemes); and the f16
    /// tensor-core GEMM staging 16-byte chunks of quantized NK rows (q4f16_1), raw f16 rows with
    /// biases (q0f16) and words of KN matrices (q4f16_0);
    /// `quantized_matrices_of_every_scheme_match_the_cpu` covers decoded elements (q3, or
    /// K = 70). f16 errors must stay inside the f16 bound and above f32 accuracy (so the test
    /// fails if the f16 kernel silently stops being used).
    #[test]
    fn prefill_of_fixture_plans_matches_the_cpu() {
        if !cxx_or_skip("prefill_of_fixture_plans_matches_the_cpu") {
            return;
        }
        for (fx, arch, scheme) in [
            ("tiny-llama", "llama", "q0f32"),
            ("tiny-llama", "llama", "q4f16_1"),
            ("tiny-neox", "gpt_neox", "q0f16"),
            ("tiny-rwkv", "rwkv", "q4f16_0"),
        ] {
            let (plan, records, _) = fixture_plan(fx, arch, scheme);
            let ids: Vec<u32> = (0..49u32)
                .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
                .collect();
            let want = cpu_logits(&plan, &records, &ids);
            // 64 threads and 16 rows per block: the prefill kernels have fixed blocks, and the
            // decode steps emulate faster than with the default (see above). Decode
            // attention over 8 blocks per head: 6–7 keys each. For sm_90: the decode kernels
            // carry the programmatic-dependent-launch preamble (compiled out here).
            let k = EmuKernels::compile(
                generate_plan(&plan, &tuning_records(&plan, (64, 16, 8)), "sm_90").unwrap(),
            );
            let f16 = crate::codegen::cuda::f16_prefill(&plan);
            // f16 schemes keep an f16 KV cache (RWKV has none).
            let kv_elem = super::super::bind::kv_elem_bytes(k.kernels.iter().map(|k| &k.launch));
            let f16_kv = f16 && arch != "rwkv";
            assert_eq!(
                kv_elem.unwrap(),
                if f16_kv { 2 } else { 4 },
                "{fx} {scheme}"
            );
            let mut s = EmuSession::new(&plan, &k, &records);
            let mut got = s.forward(&ids[..30], true);
            got.extend(s.forward(&ids[30..45], true));
            let v = plan.vocab_size;
            let e = rel_err(&got, &want[..45 * v]);
            if f16_kv && arch == "llama" {
                // This call's keys count as the cache keeps them (rounded to f16), so the split
                // into calls changes nothing: one 45-row prefill gives the same bits (Llama
                // only: each emulated prefill costs seconds).
                let one = EmuSession::new(&plan, &k, &records).forward(&ids[..45], true);
                assert!(
                    one.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{fx} {scheme}: prefill in one call and in two differ"
                );
            }
            // Then 4 decode steps over the cache the prefills wrote: 46..49 keys, so every warp
            // of the decode attention has keys, over several steps with a ragged last one.
            let mut dec = Vec::new();
            for id in &ids[45..] {
                dec.extend(s.forward(&[*id], false));
            }
            let e_dec = rel_err(&dec, &want[45 * v..]);
            eprintln!(
                "{fx} {scheme}: prefill in two calls, rel err {e:.2e}; then decode {e_dec:.2e}"
            );
            if f16 {
                assert!(e < F16_TOL && e > 1e-5, "{fx} {scheme}: rel err {e:e}");
                // The cache holds f16 keys and values the f16 prefill computed.
                assert!(e_dec < F16_TOL, "{fx} {scheme}: decode rel err {e_dec:e}");
            } else {
                assert!(e < 1e-4, "{fx} {scheme}: rel err {e:e}");
                assert!(e_dec < 1e-4, "{fx} {scheme}: decode rel err {e_dec:e}");
            }
        }
    }

    /// f16 activations between prefill kernels (`codegen::cuda::half_activations`) are rounded
    /// exactly where the f16 GEMM used to round its f32 activations, so they change no bit of
    /// any logit: Llama q4f16_1 (its normed, attention and silu·mul outputs), GPT-NeoX q0f16
    /// (its two norms', its attention's, and its up projection's with the GELU in the GEMM's
    /// epilogue) and the matrix plan (K = 70 and 19: rows that are not 16-byte aligned, read
    /// half by half; GELU with a bias), each with and without them, in one 45-row prefill; and
    /// the last row's logits alone, as a generating call asks for them. (RWKV's relu² key takes
    /// the same epilogue path: `prefill_of_fixture_plans_matches_the_cpu` runs it, q4f16_0.)
    #[test]
    fn f16_activations_change_no_bit_of_the_logits() {
        if !cxx_or_skip("f16_activations_change_no_bit_of_the_logits") {
            return;
        }
        let fixture = |fx, arch, scheme| {
            let (plan, records, _) = fixture_plan(fx, arch, scheme);
            (format!("{fx} {scheme}"), plan, records)
        };
        let (plan, records) = quant_plan("q4f16_1", (40, 70, 19));
        for (name, plan, records) in [
            fixture("tiny-llama", "llama", "q4f16_1"),
            fixture("tiny-neox", "gpt_neox", "q0f16"),
            ("matrices q4f16_1".to_string(), plan, records),
        ] {
            let ids: Vec<u32> = (0..45u32)
                .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
                .collect();
            let recs = tuning_records(&plan, (64, 16, 8));
            let with = EmuKernels::compile(generate_plan(&plan, &recs, "sm_90").unwrap());
            let f16_args = |k: &EmuKernels| {
                k.kernels
                    .iter()
                    .flat_map(|k| &k.launch.args)
                    .filter(|a| a.role == "activation" && a.elem == "f16")
                    .count()
            };
            // A writer and a reader of an f16 buffer at least.
            assert!(f16_args(&with) >= 2, "{name}: {}", f16_args(&with));
            let without = EmuKernels::compile(
                crate::codegen::cuda::generate_plan_with(
                    &plan,
                    &recs,
                    "sm_90",
                    &Default::default(),
                )
                .unwrap(),
            );
            assert_eq!(f16_args(&without), 0);
            let a = EmuSession::new(&plan, &with, &records).forward(&ids, true);
            let b = EmuSession::new(&plan, &without, &records).forward(&ids, true);
            assert_eq!(a.len(), b.len());
            if let Some(i) = first_differing_bits(&a, &b) {
                panic!(
                    "{name}: logit {i} is {} with f16 activations, {} without",
                    a[i], b[i]
                );
            }
            // A generating call's prefill computes the last row's logits alone (the GEMM reads
            // that one row of the f16 buffer).
            let last = EmuSession::new(&plan, &with, &records).forward(&ids, false);
            let v = plan.vocab_size;
            assert_eq!(
                first_differing_bits(&last, &a[a.len() - v..]),
                None,
                "{name}: the last row's logits alone differ"
            );
        }
    }

    /// The prefill GEMM's activation ring (`gemm_f16::x_ring`: the f16 activation tile copied
    /// by cp.async two K steps ahead into swizzled buffers) stages the same values as the
    /// register path, so every logit keeps its bits, with both warp tilings: the matrix plan
    /// (norm → SiLU-gated gate/up GEMM → down GEMM, both reading f16 activations) with q4 codes
    /// at K = 72 and 40 (16-byte chunks past K zero-filled) and raw f16 weights, which take a
    /// ring of their own, at K = 64 and 96 (whole steps, 2 and 3 of them). 150 rows: a full row
    /// tile and a short one (the copy of the loop for short tiles; rows past the call
    /// zero-filled). The ring runs twice: with the emulated copies landing at their wait (a read
    /// before it, or before the barrier after another thread's, sees stale bytes) and at their
    /// issue (a buffer refilled while a warp still reads it changes what that warp reads).
    #[test]
    fn the_activation_ring_changes_no_bit_of_the_logits() {
        if !cxx_or_skip("the_activation_ring_changes_no_bit_of_the_logits") {
            return;
        }
        use crate::codegen::cuda::gemm_f16::X_RING_AHEAD;
        let gemm =
            |sig: &str| sig.starts_with("prefill:matmul") || sig.starts_with("prefill:logits");
        for (scheme, shape) in [("q4f16_1", (40, 72, 40)), ("q0f16", (40, 64, 96))] {
            let (plan, records) = quant_plan_of(scheme, shape, 160);
            let name = format!("{scheme} {shape:?}");
            let ids: Vec<u32> = (0..150u32)
                .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
                .collect();
            for threads in [256, 128] {
                let compile = |rows| {
                    let recs = tuning_records_where(&plan, (64, 16, 8), gemm, (threads, rows, 1));
                    EmuKernels::compile(generate_plan(&plan, &recs, "sm_80").unwrap())
                };
                let (regs, ring) = (compile(1), compile(X_RING_AHEAD));
                // And with every copy landing at its issue: no buffer is refilled while a warp
                // still reads it.
                let early = EmuKernels::compile_with(ring.kernels.clone(), CopyLanding::AtIssue);
                let ringed = |k: &EmuKernels, what: &str| {
                    k.kernels
                        .iter()
                        .filter(|k| k.source.contains(&format!("cp_async16({what}")))
                        .count()
                };
                assert_eq!(ringed(&regs, "xs_dst"), 0, "{name}");
                assert!(ringed(&ring, "xs_dst") >= 2, "{name}");
                // Raw f16 weights ring too.
                let w = ringed(&ring, "ws_dst");
                assert_eq!(w >= 2, scheme == "q0f16", "{name}: {w} weight rings");
                let a = EmuSession::new(&plan, &regs, &records).forward(&ids, true);
                for (k, landing) in [(&ring, "at the wait"), (&early, "at the issue")] {
                    let b = EmuSession::new(&plan, k, &records).forward(&ids, true);
                    assert_eq!(a.len(), b.len());
                    if let Some(i) = first_differing_bits(&a, &b) {
                        panic!(
                            "{name} ({threads} threads, copies landing {landing}): logit {i} is {} with the ring, {} without",
                            b[i], a[i]
                        );
                    }
                }
            }
        }
    }

    /// The first index (of the shorter's) where `a` and `b` differ in any bit, or `None`.
    fn first_differing_bits(a: &[f32], b: &[f32]) -> Option<usize> {
        a.iter()
            .zip(b)
            .position(|(x, y)| x.to_bits() != y.to_bits())
    }

    /// `len` values in [-1, 1) from an xorshift seeded by `seed`.
    fn random_values(len: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Weight `name` of `shape` quantized by `scheme` for `role`: its declaration and records.
    fn quantized_weight(
        scheme: &str,
        role: crate::quant::scheme::TensorRole,
        name: &str,
        shape: Vec<usize>,
        values: &[f32],
    ) -> (WeightDecl, Vec<Vec<u8>>) {
        let s = crate::quant::scheme::scheme(scheme).unwrap();
        let enc = crate::quant::quantize_param(s, role, name, &shape, values).unwrap();
        let storage = match s.layout_for(role) {
            Some(layout) => WeightStorage::Quantized {
                scheme: scheme.into(),
                layout,
            },
            None => WeightStorage::Raw {
                dtype: enc[0].dtype,
            },
        };
        let decl = WeightDecl {
            name: name.into(),
            shape,
            storage,
            records: enc.iter().map(|r| r.name.clone()).collect(),
        };
        (decl, enc.into_iter().map(|r| r.bytes).collect())
    }

    /// [`quantized_weight`] of each `(name, role, shape, values)`: declarations and records.
    fn quantized_weights(
        scheme: &str,
        weights: Vec<(&str, crate::quant::scheme::TensorRole, Vec<usize>, Vec<f32>)>,
    ) -> (Vec<WeightDecl>, Vec<Vec<Vec<u8>>>) {
        weights
            .into_iter()
            .map(|(name, role, shape, values)| quantized_weight(scheme, role, name, shape, &values))
            .unzip()
    }

    /// A plan of `scheme` running `ops` in prefill and decode over `buffers` (name, columns;
    /// the first is the hidden state, `logits` the logits, whose columns are the vocabulary).
    fn test_plan(
        scheme: &str,
        weights: Vec<WeightDecl>,
        buffers: &[(&str, usize)],
        states: Vec<StateDecl>,
        ops: Vec<Op>,
        logits: usize,
        max_seq_len: usize,
    ) -> Plan {
        Plan {
            format_version: PLAN_FORMAT_BASE,
            arch: "test".into(),
            quantization: scheme.into(),
            model_dtype: crate::quant::scheme::scheme(scheme).unwrap().model_dtype,
            vocab_size: buffers[logits].1,
            hidden_size: buffers[0].1,
            max_seq_len,
            stop_tokens: vec![0],
            weights,
            buffers: buffers
                .iter()
                .map(|(name, cols)| BufferDecl {
                    name: (*name).into(),
                    cols: *cols,
                })
                .collect(),
            states,
            prefill: ops.clone(),
            decode: ops,
            logits,
        }
    }

    /// embedding → a gated MLP with a residual (rms_norm, gate/up matmul with bias, silu_mul, down
    /// matmul, gelu, add) → logits, every matrix quantized with `scheme`; decode fused as the cuda
    /// target fuses it (gate/up with the norm and the silu gate, down with the gelu and the
    /// residual), prefill not.
    fn quant_plan(scheme: &str, shape: (usize, usize, usize)) -> (Plan, Vec<Vec<Vec<u8>>>) {
        quant_plan_of(scheme, shape, 80)
    }

    /// [`quant_plan`] for prompts of up to `max_seq_len` tokens.
    fn quant_plan_of(
        scheme: &str,
        (v, h, f): (usize, usize, usize),
        max_seq_len: usize,
    ) -> (Plan, Vec<Vec<Vec<u8>>>) {
        use crate::quant::scheme::TensorRole;
        let (weights, records) = quantized_weights(
            scheme,
            [
                ("embed.weight", vec![v, h], TensorRole::Embedding, 1),
                ("gate_up.weight", vec![2 * f, h], TensorRole::Linear, 2),
                ("gate_up.bias", vec![2 * f], TensorRole::Raw, 3),
                ("down.weight", vec![h, f], TensorRole::Linear, 5),
                ("head.weight", vec![v, h], TensorRole::LmHead, 4),
                ("norm.weight", vec![h], TensorRole::Raw, 6),
            ]
            .into_iter()
            .map(|(name, shape, role, seed)| {
                let values = random_values(shape.iter().product(), seed);
                (name, role, shape, values)
            })
            .collect(),
        );
        let ops = vec![
            Op::Embedding { weight: 0, out: 0 },
            Op::RmsNorm {
                input: 0,
                weight: 5,
                eps: 1e-5,
                out: 5,
            },
            Op::matmul(5, 1, Some(2), 1),
            Op::SiluMul { input: 1, out: 2 },
            Op::matmul(2, 3, None, 3),
            Op::Gelu { buf: 3 },
            Op::Add { a: 0, b: 3, out: 0 },
            Op::Logits {
                input: 0,
                weight: 4,
            },
        ];
        let buffers = [
            ("h", h),
            ("gate_up", 2 * f),
            ("act", f),
            ("proj", h),
            ("logits", v),
            ("normed", h),
        ];
        let plan = test_plan(scheme, weights, &buffers, vec![], ops, 4, max_seq_len);
        let plan = crate::codegen::fuse::fuse_for_cuda(plan);
        assert_eq!(
            plan.decode.len(),
            4,
            "norm and silu gate, gelu and residual fused"
        );
        (plan, records)
    }

    /// embedding (`[n, k]`: row t is `e_t`, the identity's row t quantized, for t < k) → logits
    /// (`[n, k]` random, `scheme`'s lm_head storage). In the prefill of tokens 0..k, logit
    /// `[t, c]` is one product, `x[t]·W[c, t]`, with `x[t]` the gathered (f16) embedding value.
    fn one_hot_plan(scheme: &str, n: usize, k: usize) -> (Plan, Vec<Vec<Vec<u8>>>) {
        use crate::quant::scheme::TensorRole;
        let embed: Vec<f32> = (0..n * k)
            .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
            .collect();
        let (weights, records) = quantized_weights(
            scheme,
            vec![
                ("embed.weight", TensorRole::Embedding, vec![n, k], embed),
                (
                    "head.weight",
                    TensorRole::LmHead,
                    vec![n, k],
                    random_values(n * k, 7),
                ),
            ],
        );
        let ops = vec![
            Op::Embedding { weight: 0, out: 0 },
            Op::Logits {
                input: 0,
                weight: 1,
            },
        ];
        let plan = test_plan(
            scheme,
            weights,
            &[("h", k), ("logits", n)],
            vec![],
            ops,
            1,
            k,
        );
        (plan, records)
    }

    /// The artifact's values (f16-rounded decodes) of [`one_hot_plan`]'s embedding and head.
    fn one_hot_values(
        scheme: &str,
        records: &[Vec<Vec<u8>>],
        n: usize,
        k: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        use crate::quant::scheme::TensorRole;
        let s = crate::quant::scheme::scheme(scheme).unwrap();
        let values = |i: usize, role| {
            let recs: Vec<&[u8]> = records[i].iter().map(|r| r.as_slice()).collect();
            crate::quant::dequantize_param(s, role, &[n, k], &recs).unwrap()
        };
        (
            values(0, TensorRole::Embedding),
            values(1, TensorRole::LmHead),
        )
    }

    /// The f16 tensor-core GEMM, exactly (see [`one_hot_plan`]): its operands are f16, so logit
    /// `[t, c]` must be `x[t] · W[c, t]` with the artifact's f16 values of both (the CPU's
    /// `dequantize_param`), a product exact in f32. Covers both warp tilings, every weight
    /// staging path (sym 4/8-bit codes decoded in f16 pairs,
    /// NK and KN; raw f16 stored as is; 3-bit codes value by value), the ldmatrix fragments and
    /// 128-row tiles (tokens 0..k span two; where k is not a multiple of 128 the second is
    /// partial, and its warps multiply only their mma tiles that hold tokens), with tile-multiple
    /// shapes (no bounds checks
    /// generated) and ragged ones (N and K past a tile; K not a multiple of 16 for the
    /// value-by-value paths).
    #[test]
    fn f16_gemm_of_one_hot_rows_is_exact() {
        if !cxx_or_skip("f16_gemm_of_one_hot_rows_is_exact") {
            return;
        }
        for (scheme, n, k) in [
            ("q4f16_1", 256, 256),
            ("q4f16_1", 264, 208),
            ("q4f16_1", 272, 224),
            ("q4f16_0", 256, 256),
            ("q4f16_0", 264, 200),
            ("q8f16_1", 256, 256),
            ("q8f16_1", 272, 224),
            ("q8f16_0", 264, 200),
            ("q0f16", 256, 256),
            ("q0f16", 264, 204),
            ("q3f16_1", 264, 200),
            ("q3f16_0", 264, 200),
        ] {
            let (plan, records) = one_hot_plan(scheme, n, k);
            assert!(crate::codegen::cuda::f16_prefill(&plan), "{scheme}");
            let (e, w) = one_hot_values(scheme, &records, n, k);
            let mut want = Vec::with_capacity(n * k);
            for t in 0..k {
                let x = &e[t * k..(t + 1) * k];
                assert!(x.iter().enumerate().all(|(i, v)| (i == t) == (*v != 0.0)));
                want.extend((0..n).map(|c| x[t] * w[c * k + t]));
            }
            // Both warp tilings (`gemm_f16::WarpTiles`): 256 threads (64×32 warp tiles), 128
            // (64×64); their weight staging differs too (units of 8 or 4 words per thread).
            for threads in [256, 128] {
                let kernels = EmuKernels::compile(
                    generate_plan(&plan, &tuning_records(&plan, (threads, 4, 1)), "sm_80").unwrap(),
                );
                let gemm = kernels
                    .kernels
                    .iter()
                    .find(|k| k.signature.starts_with("prefill:logits"))
                    .expect("a prefill GEMM");
                assert_eq!(gemm.launch.block[0], threads, "{scheme}");
                let ids: Vec<u32> = (0..k as u32).collect();
                let got = EmuSession::new(&plan, &kernels, &records).forward(&ids, true);
                assert_eq!(got.len(), want.len());
                let bad = got.iter().zip(&want).position(|(a, b)| a != b);
                if let Some(i) = bad {
                    panic!(
                        "{scheme} [{n}, {k}] ({threads} threads): row {}, column {}: {} on the GPU, {} expected",
                        i / n,
                        i % n,
                        got[i],
                        want[i]
                    );
                }
            }
            assert!(want.iter().filter(|v| **v != 0.0).count() > n * k / 2);
        }
    }

    /// The tensor-core decode GEMV (q4 weights of f16 schemes, row-major and K-major; q8
    /// row-major), exactly, as
    /// [`f16_gemm_of_one_hot_rows_is_exact`] checks prefill: decoding token t gives logit
    /// `[c] = x[t] · W[c, t]`. Shapes: several batches of load steps that divide K exactly
    /// (2048: 64 chunks, 2 warps), K past the last step (200 at 128 threads: 7 chunks for 16
    /// lanes per step), N past the last block (2064 at 4 tiles a block, 264); row-major
    /// matrices whose rows fill 16-row tiles (2064, 272) in row blocks
    /// (`codegen::cuda::row_blocks`), 272 × 200 with a ragged last run of groups; the logits
    /// GEMV only (fusions share the f32 GEMV's epilogue, covered by the fixture and matrix
    /// tests).
    #[test]
    fn f16_gemv_of_one_hot_rows_is_exact() {
        if !cxx_or_skip("f16_gemv_of_one_hot_rows_is_exact") {
            return;
        }
        for (scheme, n, k, threads, tokens) in [
            ("q4f16_1", 2064, 2048, 64, &[0u32, 37, 1000, 2047][..]),
            ("q4f16_1", 264, 200, 128, &[0, 5, 199][..]),
            ("q4f16_1", 272, 200, 128, &[0, 5, 199][..]),
            ("q4f16_0", 2056, 2048, 64, &[0, 37, 1000, 2047][..]),
            ("q4f16_0", 264, 200, 128, &[0, 5, 199][..]),
            ("q8f16_1", 2064, 2048, 64, &[0, 37, 1000, 2047][..]),
            ("q8f16_1", 264, 200, 128, &[0, 5, 199][..]),
            ("q8f16_1", 272, 200, 128, &[0, 5, 199][..]),
        ] {
            let (plan, records) = one_hot_plan(scheme, n, k);
            assert!(crate::codegen::cuda::f16_decode(&plan).unwrap());
            let (e, mut w) = one_hot_values(scheme, &records, n, k);
            // 4-bit codes: the GEMV scales each group's sum in f32, so a weight counts as
            // `(q − maxq)·s` exactly (not rounded to f16), and the one product with the token's
            // activation is rounded once.
            if scheme.starts_with("q4") {
                let s = crate::quant::scheme::scheme(scheme).unwrap();
                let recs: Vec<&[u8]> = records[1].iter().map(|r| r.as_slice()).collect();
                w = crate::quant::sym_values_unrounded(
                    s,
                    crate::quant::scheme::TensorRole::LmHead,
                    &[n, k],
                    &recs,
                )
                .unwrap();
            }
            let kernels = EmuKernels::compile(
                generate_plan(&plan, &tuning_records(&plan, (threads, 4, 1)), "sm_80").unwrap(),
            );
            let mut session = EmuSession::new(&plan, &kernels, &records);
            for &t in tokens {
                let t = t as usize;
                let got = session.forward(&[t as u32], false);
                let want: Vec<f32> = (0..n).map(|c| e[t * k + t] * w[c * k + t]).collect();
                if let Some(c) = got.iter().zip(&want).position(|(a, b)| a != b) {
                    panic!(
                        "{scheme} [{n}, {k}] token {t}: column {c}: {} on the GPU, {} expected",
                        got[c], want[c]
                    );
                }
                assert!(want.iter().filter(|v| **v != 0.0).count() > n / 2);
            }
        }
    }

    /// embedding (`[256, cols]`: a token's row is its q, k and v, random in ±3 so the softmax is
    /// far from uniform) → attention (`n_q` heads over `n_kv` key/value heads of `head_dim`,
    /// no rotary) → logits (`[v, n_q·head_dim]` random), `scheme`'s storage.
    /// embedding (a token's row is its qkv) → (rotary over `rotary_dim`) → attention → logits,
    /// every weight `scheme`'s; with rotary, decode fused as the cuda target fuses it (the
    /// attention rotates q and the new key itself).
    fn attention_plan(
        scheme: &str,
        n_q: usize,
        n_kv: usize,
        head_dim: usize,
        rotary_dim: Option<usize>,
    ) -> (Plan, Vec<Vec<Vec<u8>>>) {
        use crate::quant::scheme::TensorRole;
        let (v, qc) = (256usize, n_q * head_dim);
        let cols = qc + 2 * n_kv * head_dim;
        let embed: Vec<f32> = random_values(v * cols, 11)
            .iter()
            .map(|x| 3.0 * x)
            .collect();
        let (weights, records) = quantized_weights(
            scheme,
            vec![
                ("embed.weight", TensorRole::Embedding, vec![v, cols], embed),
                (
                    "head.weight",
                    TensorRole::LmHead,
                    vec![v, qc],
                    random_values(v * qc, 12),
                ),
            ],
        );
        let mut ops = vec![Op::Embedding { weight: 0, out: 0 }];
        if let Some(rotary_dim) = rotary_dim {
            ops.push(Op::Rotary {
                qkv: 0,
                n_q_heads: n_q,
                n_kv_heads: n_kv,
                head_dim,
                rotary_dim,
                theta: 10000.0,
            });
        }
        ops.extend([
            Op::Attention {
                qkv: 0,
                state: 0,
                n_q_heads: n_q,
                n_kv_heads: n_kv,
                head_dim,
                out: 1,
                rotary: None,
            },
            Op::Logits {
                input: 1,
                weight: 1,
            },
        ]);
        let kv_cache = StateDecl::KvCache {
            layer: 0,
            n_kv_heads: n_kv,
            head_dim,
        };
        let buffers = [("qkv", cols), ("y", qc), ("logits", v)];
        let plan = test_plan(scheme, weights, &buffers, vec![kv_cache], ops, 2, 256);
        (crate::codegen::fuse::fuse_for_cuda(plan), records)
    }

    /// Prefill attention of f16 schemes on tensor cores (`codegen::cuda::attention_mma`) against
    /// the CPU: 150 rows (three 64-query tiles, the last ragged; keys over three 64-key tiles),
    /// then 70 more at position 150 (earlier keys from the f16 cache the first call wrote), then
    /// two decode steps over that cache; grouped (4 query heads over 2, head_dim 64; 2 over 1,
    /// head_dim 128 as Llama-2-7B's) and not (head_dim 80: an odd number of 16-dim steps). f16
    /// error, inside the f16 bound.
    #[test]
    fn prefill_attention_on_tensor_cores_matches_the_cpu() {
        if !cxx_or_skip("prefill_attention_on_tensor_cores_matches_the_cpu") {
            return;
        }
        for (n_q, n_kv, head_dim) in [(4, 2, 64), (2, 2, 80), (2, 1, 128)] {
            let (plan, records) = attention_plan("q0f16", n_q, n_kv, head_dim, None);
            // Distinct tokens: a later key tile holds new maxima (the online softmax rescales).
            let ids: Vec<u32> = (0..222u32).map(|i| (i * 29 + 7) % 256).collect();
            let want = cpu_logits(&plan, &records, &ids);
            let kernels = EmuKernels::compile(
                generate_plan(&plan, &tuning_records(&plan, (128, 4, 2)), "sm_80").unwrap(),
            );
            assert!(
                kernels
                    .kernels
                    .iter()
                    .any(|k| k.signature.starts_with("prefill:attention")
                        && k.source.contains("ldsm_x4_trans(")),
                "prefill attention on tensor cores"
            );
            let mut s = EmuSession::new(&plan, &kernels, &records);
            let mut got = s.forward(&ids[..150], true);
            got.extend(s.forward(&ids[150..220], true));
            for id in &ids[220..] {
                got.extend(s.forward(&[*id], false));
            }
            let e = rel_err(&got, &want);
            eprintln!("attention {n_q}/{n_kv} heads of {head_dim}: rel err {e:.2e}");
            assert!(
                e < F16_TOL && e > 1e-5,
                "{n_q}/{n_kv}×{head_dim}: rel err {e:e}"
            );
        }
    }

    /// Decode attention against the CPU, after a 100-row prefill: 8 decode steps over 101–108
    /// keys, rotary fused, in one block per head (8 warps: several steps of keys per warp, a
    /// ragged last one) and split over 4 blocks per head (64 threads, sm_90: with the L2 prefetch of
    /// the cached keys before the PDL wait). Shapes for both scans:
    /// whole 16-byte chunks per key (`attention::ChunkedKeys`) with every lane busy (f16 64 and
    /// 128: 8 and 16 lanes a key; f32 32: 8), with idle lanes (f16 80: 10 chunks on 16 lanes;
    /// f32 24: 6 on 8), and one lane per dimension (f32 34: 136-byte rows); grouped heads.
    #[test]
    fn decode_attention_matches_the_cpu() {
        if !cxx_or_skip("decode_attention_matches_the_cpu") {
            return;
        }
        use crate::codegen::cuda::attention::ChunkedKeys;
        for (scheme, n_q, n_kv, head_dim, chunked) in [
            ("q0f16", 4, 2, 64, true),
            ("q0f16", 2, 1, 128, true),
            ("q0f16", 2, 2, 80, true),
            ("q0f32", 4, 1, 32, true),
            ("q0f32", 2, 2, 24, true),
            ("q0f32", 3, 1, 34, false),
        ] {
            let f16 = scheme == "q0f16";
            assert_eq!(
                ChunkedKeys::fits(head_dim, f16).is_some(),
                chunked,
                "{scheme} head_dim {head_dim}"
            );
            let (plan, records) = attention_plan(scheme, n_q, n_kv, head_dim, Some(head_dim));
            let ids: Vec<u32> = (0..108u32).map(|i| (i * 29 + 7) % 256).collect();
            let want = cpu_logits(&plan, &records, &ids);
            let v = plan.vocab_size;
            // sm_90: the split kernel also prefetches its cached keys before its PDL wait.
            for (tpb, splits, arch) in [(256, 1, "sm_80"), (64, 4, "sm_90")] {
                // Only decode attention takes the configuration under test; every other kernel
                // runs at 64 threads (256-thread norms and GEMVs cost more thread switches for
                // nothing this test checks).
                let tuning = tuning_records_where(
                    &plan,
                    (64, 1, 1),
                    |sig| sig.starts_with("decode:attention"),
                    (tpb, 1, splits),
                );
                let kernels = EmuKernels::compile(generate_plan(&plan, &tuning, arch).unwrap());
                let decode = kernels
                    .kernels
                    .iter()
                    .find(|k| k.signature.starts_with("decode:attention"))
                    .expect("a decode attention");
                assert_eq!(decode.launch.block[0], tpb, "{scheme} head_dim {head_dim}");
                assert_eq!(
                    decode.source.contains("attend_chunked("),
                    chunked,
                    "{scheme} head_dim {head_dim}"
                );
                assert_eq!(
                    decode.source.contains("cached keys and values into L2"),
                    arch == "sm_90"
                );
                let mut s = EmuSession::new(&plan, &kernels, &records);
                s.forward(&ids[..100], false);
                let mut got = Vec::new();
                for id in &ids[100..] {
                    got.extend(s.forward(&[*id], false));
                }
                let e = rel_err(&got, &want[100 * v..]);
                eprintln!("decode attention {scheme} {n_q}/{n_kv}×{head_dim}, {tpb} threads, {splits} splits: rel err {e:.2e}");
                let tol = if f16 { F16_TOL } else { 1e-4 };
                assert!(
                    e < tol,
                    "{scheme} {n_q}/{n_kv}×{head_dim} ({tpb}/{splits}): rel err {e:e}"
                );
            }
        }
    }

    #[test]
    fn quantized_matrices_of_every_scheme_match_the_cpu() {
        if !cxx_or_skip("quantized_matrices_of_every_scheme_match_the_cpu") {
            return;
        }
        // Shapes: vocabulary, hidden, intermediate. The second gives the q4 and row-major q8
        // matrices of f16 schemes rows in whole 16-row tiles, so they go to the device in row
        // blocks (codegen::cuda::row_blocks): the embedding, the silu-gated matrix (8 gate and
        // 8 up rows a tile) and the head over 7 groups (the last run of each row block
        // ragged), the down projection over one.
        // The third: 65 groups per row, more than 64 threads' chunks, so the fused norm reads
        // the row twice there (sum of squares, then staging) and once at 128 and 512 threads.
        let blocked = [
            ("q4f16_1", (48, 224, 24)),
            ("q8f16_1", (48, 224, 24)),
            ("q4f16_1", (48, 2080, 24)),
        ];
        let plans = crate::quant::scheme::SCHEMES
            .iter()
            .map(|s| (s.name, (40, 70, 19)))
            .chain(blocked);
        for (name, shape) in plans {
            let (plan, records) = quant_plan(name, shape);
            // 67 rows: two 64-row tiles of the f32 schemes' GEMM, the second ragged (the f16
            // GEMM's 128-row tiles: `f16_gemm_of_one_hot_rows_is_exact`).
            let ids: Vec<u32> = (0..67u32).map(|i| (i * 7 + 3) % shape.0 as u32).collect();
            // The default, and tune-space corners (codegen::cuda::tune_space): the fewest
            // threads with the most rows, and the most threads with few rows.
            // (No attention here: key splits do not apply.)
            let tunings: &[(u32, u32, u32)] = match name {
                "q4f16_1" => &[(128, 4, 1), (64, 8, 1), (512, 2, 1)],
                n if n.ends_with("_1") => &[(128, 4, 1), (64, 8, 1)],
                _ => &[(128, 4, 1)],
            };
            let what = format!("{name} {shape:?}");
            let in_blocks = generate_plan(&plan, &tuning_records(&plan, (128, 4, 1)), "sm_80")
                .unwrap()
                .iter()
                .flat_map(|k| k.launch.args.iter())
                .filter(|a| a.row_blocks.is_some())
                .count();
            // Embedding, gate/up, down and head: two records each, read by prefill and decode.
            let expected = if blocked.contains(&(name, shape)) {
                16
            } else {
                0
            };
            assert_eq!(
                in_blocks, expected,
                "{what}: weight arguments in row blocks"
            );
            check_plan(&plan, &records, &ids, 3, tunings, 1e-5, &what);
        }
        let _ = DType::F32;
    }

    /// SmolLM2-135M-Instruct, the real model (skipped without its GGUF, which `.ci/run`
    /// fetches; `MLCB_SMOLLM2_GGUF` overrides the path), through the generated CUDA kernels at
    /// the preset's default tuning for sm_90: q8f16_1 continues "The capital of France is"
    /// with " Paris", and RTN q4f16_1 (biased 4-bit codes on f16 tensor cores in the decode
    /// GEMVs and prefill GEMMs) makes the CPU's greedy choices, its logits within the f16
    /// bound of the CPU's.
    #[test]
    fn smollm2_through_the_cuda_kernels_says_paris_and_matches_the_cpu() {
        let test = "smollm2_through_the_cuda_kernels_says_paris_and_matches_the_cpu";
        if !cxx_or_skip(test) {
            return;
        }
        let path = std::env::var_os("MLCB_SMOLLM2_GGUF")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("dist/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        if !path.is_file() {
            eprintln!("SKIP {test}: no SmolLM2 GGUF (scripts/fetch-smollm2.sh fetches it)");
            return;
        }
        let m = crate::formats::gguf::GgufModel::open(&path).unwrap();
        let a = crate::model::by_name("llama").unwrap();
        let config = a.parse_config(&m.hf_config()).unwrap();
        let tok = crate::runtime::tokenizer::TextTokenizer::from_tokenizer(
            m.tokenizer_json().unwrap().to_string().parse().unwrap(),
            Default::default(),
        );
        let prompt = tok.encode("The capital of France is", false).unwrap();
        let argmax = |row: &[f32]| {
            (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u32
        };
        const STEPS: usize = 2;
        for scheme in ["q8f16_1", "q4f16_1"] {
            let built = build(a, &config, &[&m], scheme, 32);
            let plan = crate::codegen::fuse::fuse_for_cuda(built.plan);
            let v = plan.vocab_size;
            let k = EmuKernels::compile(
                generate_plan(&plan, &tuning_records(&plan, (128, 4, 8)), "sm_90").unwrap(),
            );
            // Greedy on the emulated kernels: one prefill, then a decode step per token.
            let mut s = EmuSession::new(&plan, &k, &built.records);
            let mut ids = prompt.clone();
            let mut got = s.forward(&prompt, false);
            for step in 0..STEPS {
                let next = argmax(&got[got.len() - v..]);
                ids.push(next);
                if step + 1 < STEPS {
                    got.extend(s.forward(&[next], false));
                }
            }
            // The CPU's logits at the same positions (the prompt's last, then each token fed).
            let all = cpu_logits(&plan, &built.records, &ids[..ids.len() - 1]);
            let want = &all[(prompt.len() - 1) * v..];
            let text = tok.decode(&ids[prompt.len()..]).unwrap();
            let e = rel_err(&got, want);
            eprintln!("{scheme}: {text:?}, rel err vs the CPU {e:.2e}");
            assert!(e < F16_TOL, "{scheme}: rel err {e:e} vs the CPU");
            for (i, row) in want.chunks(v).enumerate() {
                assert_eq!(
                    argmax(row),
                    ids[prompt.len() + i],
                    "{scheme}: the CPU's token {i} differs (cuda continued with {text:?})"
                );
            }
            if scheme == "q8f16_1" {
                assert!(text.starts_with(" Paris"), "{scheme}: {text:?}");
            }
        }
    }
}
