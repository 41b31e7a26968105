// The CUDA execution model for the emulator (emulate/mod.rs), prepended to the generated
// kernels and compiled by the host C++ compiler.
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
// A wgmma.mma_async of one thread: its accumulators and the operands' descriptors, with the
// shared arrays they point into (see wgmma_n128).
struct wg_op { float (*d)[4]; unsigned long long da, db; const void* a_tile; const void* b_tile; };
constexpr unsigned WG_OPS = 16;
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
    // wgmma products issued and not yet waited for (see wgmma_n128): `wg_n` issued, the first
    // `wg_committed` of them in committed groups; `wg_fenced`: a wgmma.fence since the last wait.
    wg_op wg_ops[WG_OPS];
    unsigned wg_n = 0, wg_committed = 0, wg_parity = 0;
    bool wg_fenced = false;
};
// The last fiber to arrive opens the barrier and goes on; the others yield until it has.
struct fiber_barrier { unsigned n = 0, count = 0, generation = 0; };
static cuda_thread* cur = nullptr;
static emu_dim3 bid, bdim, gdim;
static fiber_barrier block_bar;
static fiber_barrier warp_bars[32];
// Per warpgroup (4 warps): its threads' descriptors of a wgmma, which must agree.
static fiber_barrier wg_bars[8];
static unsigned long long wg_pub[2][8][128][2];
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
// A barrier of the calling thread's warp (every lane takes part: the generated kernels call it
// converged).
inline void __syncwarp(unsigned = 0xffffffffu) { emu::arrive_and_wait(emu::warp_bars[emu::cur->tid.x >> 5]); }
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
    for (unsigned w = 0; w < bx / 128; ++w) wg_bars[w] = fiber_barrier{128};
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
                    else if (ts[i].wg_n != 0)
                        fail("a thread ended with wgmma products it never waited for");
            }
    cur = nullptr;
    delete[] ts;
    munmap(region, slot * bx);
}
}
// wgmma (sm_90a warpgroup MMA), as the PTX ISA describes it: the 4 warps of a warpgroup
// (warps 4i…4i+3) multiply a 64×16 A by a 16×N B, both read from shared memory through matrix
// descriptors, into the accumulators of `mma.sync`'s C layout per warp (warp w % 4 holds rows
// 16(w % 4)…, its 16×8 tile j in d[j]). The product is asynchronous: it reads the operands at
// any time until the wait_group that covers it; the emulator reads them at that wait, so a
// store into an operand before the wait changes the result. Checked: a wgmma.fence since the
// last wait, the warpgroup's threads giving the same descriptors, no swizzle (the only layout
// emulated), a wait_group covering only committed products, none left at the thread's end.
// Not checked: fence.proxy.async before the products read what generic stores wrote.
inline void wg_fence() { emu::cur->wg_fenced = true; }
inline void async_proxy_fence() {}
inline void wg_commit() { emu::cur->wg_committed = emu::cur->wg_n; }
namespace emu {
// An operand in the no-swizzle K-major layout a descriptor gives: core matrix (row / 8, k / 8)
// at start + (row / 8)·SBO + (k / 8)·LBO, 8 rows of 16 bytes. `tile` is the shared array the
// descriptor points into: its 14-bit start field holds bits 4–17 of the address, which the
// emulator's addresses (offsets from an anchor) exceed.
struct wg_matrix {
    unsigned start, lbo, sbo;
    wg_matrix(unsigned long long desc, const void* tile) {
        if ((desc >> 62) != 0) fail("a wgmma descriptor with a swizzle mode (the emulator knows none)");
        if (((desc >> 49) & 7u) != 0) fail("a wgmma descriptor with a base offset");
        lbo = (unsigned)((desc >> 16) & 0x3FFFu) << 4;
        sbo = (unsigned)((desc >> 32) & 0x3FFFu) << 4;
        const unsigned hint = smem_u32(tile), delta = (((unsigned)(desc & 0x3FFFu) << 4) - hint) & 0x3FFFFu;
        if (delta >= 48u * 1024u) fail("a wgmma descriptor's address is not inside the shared array named with it");
        start = hint + delta;
    }
    float at(unsigned row, unsigned k) const {
        return h2f(*emu_smem(start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16u + (k % 8) * 2u));
    }
};
}
// wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16, scale-d 1, no negation or transpose.
inline void wgmma_n128(float (&d)[16][4], unsigned long long da, unsigned long long db, const void* a_tile, const void* b_tile) {
    emu::cuda_thread& t = *emu::cur;
    if (emu::bdim.x % 128u != 0) emu::fail("wgmma in a block that is not whole warpgroups");
    if (!t.wg_fenced) emu::fail("wgmma without a wgmma.fence since the last wait");
    if (t.wg_n == emu::WG_OPS) emu::fail("more wgmma products in flight than the emulator holds");
    const unsigned g = t.tid.x / 128u, l = t.tid.x % 128u, p = t.wg_parity;
    t.wg_parity ^= 1u;
    emu::wg_pub[p][g][l][0] = da;
    emu::wg_pub[p][g][l][1] = db;
    emu::arrive_and_wait(emu::wg_bars[g]);
    if (emu::wg_pub[p][g][0][0] != da || emu::wg_pub[p][g][0][1] != db)
        emu::fail("the threads of a warpgroup gave one wgmma different descriptors");
    t.wg_ops[t.wg_n++] = emu::wg_op{d, da, db, a_tile, b_tile};
}
// wgmma.wait_group 0: every committed product completes (k in order, as mma_f16 sums).
inline void wg_wait_all() {
    emu::cuda_thread& t = *emu::cur;
    if (t.wg_committed != t.wg_n) emu::fail("a wgmma.wait_group with products issued after the last commit");
    const unsigned l = t.tid.x & 31u, rows = 16u * ((t.tid.x >> 5) & 3u);
    for (unsigned o = 0; o < t.wg_n; ++o) {
        const emu::wg_op& op = t.wg_ops[o];
        const emu::wg_matrix a(op.da, op.a_tile), b(op.db, op.b_tile);
        for (unsigned j = 0; j < 16u; ++j)
            for (unsigned i = 0; i < 4u; ++i) {
                const unsigned row = rows + l / 4 + 8 * (i / 2), col = 8 * j + 2 * (l % 4) + i % 2;
                float acc = op.d[j][i];
                for (unsigned k = 0; k < 16u; ++k)
                    acc += a.at(row, k) * b.at(col, k);
                op.d[j][i] = acc;
            }
    }
    t.wg_n = t.wg_committed = 0;
    t.wg_fenced = false;
}
