//! What the f16 tensor-core kernels share (the prefill GEMM, `gemm_f16`, the decode GEMV of f16
//! schemes, `gemv_mma`, and the prefill attention, `attention_mma`): f16 packing,
//! `mma.sync.m16n8k16`, `ldmatrix`, f16x2 arithmetic, and the decoders of sym 4/8-bit codes into
//! f16 pairs.
//!
//! Why decode in f16 pairs: one value at a time in f32 costs shift, mask, integer-to-float
//! conversion (a quarter-rate instruction), multiply and an f16 pack, and made both kernels
//! issue-bound. A 4- or 8-bit code OR-ed into the mantissa of 1024.0 is the f16 `1024 + q`;
//! subtracting `1024 + maxq` is exact, and the one multiply by the f16 scale rounds once, so each
//! value is bit-identical to `(q − maxq)·s` computed in f32 (where it is exact) and rounded to
//! f16: the artifact's f16 value (`quant::dequantize_param`).

use crate::codegen::wgsl::spec::QuantSpec;

/// Device helpers (the emulator supplies its own under `MLCB_EMULATE`).
pub const F16_OPS: &str = r#"#ifndef MLCB_EMULATE
// {lo, hi} rounded to f16 (round to nearest even) in one register, lo in the low half.
__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {
    unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
// The same, saturating at ±65504 instead of overflowing to infinity (NaN stays NaN).
__device__ __forceinline__ unsigned pack_h2_sat(float lo, float hi) {
    unsigned r; asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ void mma_f16(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// The shared-memory window address of a `__shared__` object: ldmatrix takes 32-bit addresses,
// so a kernel converts its base once and adds constant offsets (immediates of the
// instruction) instead of forming 64-bit generic pointers per load.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 g; cvta.to.shared.u64 g, %1; cvt.u32.u64 %0, g; }" : "=r"(a) : "l"(p));
    return a;
}
// ldmatrix.x4 at shared address a: lane l gives the address of row l % 8 of 8×8 matrix l / 8
// (16 bytes of f16); register i receives matrix i's row lane / 4, columns 2(lane % 4) and +1.
__device__ __forceinline__ void ldsm_x4(unsigned* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// The same with `.trans`: register i receives matrix i's column lane / 4, rows 2(lane % 4) and
// +1 (an operand stored K-major becomes an mma B fragment).
__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
// 16 bytes from global memory to shared address `dst` by cp.async (L2 only, `.cg`): zeros when
// `full` is false (the source is then not read). Then: close the thread's group of copies, and
// wait until at most N of its groups are in flight (the copies of the others have landed; other
// threads see them after a barrier).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(full ? 16u : 0u) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
// f16x2 arithmetic, each half rounded once (`.rn`: never contracted into an fma).
__device__ __forceinline__ unsigned hsub2(unsigned a, unsigned b) {
    unsigned r; asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ unsigned hmul2(unsigned a, unsigned b) {
    unsigned r; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b)); return r;
}
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
    unsigned r; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c)); return r;
}
// Any function of three words, bit by bit: bit i of the result is bit (4a_i + 2b_i + c_i) of
// LUT. One instruction for `(a & b) | c`, which C compiles to two when b and c are constants.
template <unsigned LUT>
__device__ __forceinline__ unsigned lop3(unsigned a, unsigned b, unsigned c) {
    unsigned r; asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(LUT)); return r;
}
#endif
// One f16 (its bits) as `pack_h2_sat` rounds it: how kernels store f16 activations.
__device__ __forceinline__ unsigned short f2h_sat(float v) { return (unsigned short)(pack_h2_sat(v, 0.0f) & 0xFFFFu); }
// The 8 f16 values of 4 pairs summed in f32, in a fixed order.
__device__ __forceinline__ float pair_sum(uint4 p) {
    const unsigned u[4] = {p.x, p.y, p.z, p.w};
    float s = 0.0f;
    #pragma unroll
    for (unsigned i = 0; i < 4u; ++i) s += h2f((unsigned short)(u[i] & 0xFFFFu)) + h2f((unsigned short)(u[i] >> 16));
    return s;
}
// (a & b) | c: LUT (0xF0 & 0xCC) | 0xAA.
__device__ __forceinline__ unsigned and_or(unsigned a, unsigned b, unsigned c) { return lop3<0xEAu>(a, b, c); }
"#;

/// The f16 bits of `v` in both halves of a word, as a C literal.
pub(super) fn h2_lit(v: f32) -> String {
    let h = half::f16::from_f32(v);
    assert_eq!(h.to_f32(), v, "{v} is not exact in f16");
    let b = h.to_bits() as u32;
    format!("0x{:08X}u", b | (b << 16))
}

/// Whether [`sym_f16_decoder`] covers `q`: sym codes with f16 scales, 4 or 8 bits filling u32
/// words.
pub fn f16_decodable(q: &QuantSpec) -> bool {
    matches!(
        q.codec,
        crate::codegen::wgsl::spec::Codec::Sym {
            scale: crate::formats::dtype::DType::F16,
            ..
        }
    ) && !q.word16
        && (q.bits == 4 || q.bits == 8)
        && q.per_word * q.bits as usize == 32
}

/// Device functions decoding one storage word of sym codes (`s2`: the f16 scale in both
/// halves) into f16 pairs ([`f16_decodable`] storage only):
///
/// - `dq_pairs(w, s2, h)`: the word's values in pairs of the order the decoder finds them — for
///   4 bits `(v0, v4) (v1, v5) (v2, v6) (v3, v7)`, for 8 bits `(v0, v1) (v2, v3)`; a kernel
///   that orders its other operand the same way (`gemv_mma`) needs nothing more;
/// - `dq_word(w, s2, h)`: the pairs in K order, `h[0] = (v0, v1)`, `h[1] = (v2, v3)`, …
pub fn sym_f16_decoder(q: &QuantSpec, maxq: u32) -> String {
    match q.bits {
        // Codes i at bits 4i. Masking 0x000F000F picks codes 0 and 4 (one per half), 0x00F000F0
        // codes 1 and 5 times 16; the same of the word shifted by 8 gives codes 2, 6 and 3, 7.
        // `(1024 + 16q)/16 − (64 + maxq)` is exact too. K order regroups the pairs by bytes.
        4 => format!(
            "__device__ __forceinline__ void dq_pairs(unsigned w, unsigned s2, unsigned* h) {{
    const unsigned w8 = w >> 8;
    h[0] = hmul2(hsub2(and_or(w, 0x000F000Fu, 0x64006400u), {lo_bias}), s2);
    h[1] = hmul2(hfma2(and_or(w, 0x00F000F0u, 0x64006400u), {sixteenth}, {hi_bias}), s2);
    h[2] = hmul2(hsub2(and_or(w8, 0x000F000Fu, 0x64006400u), {lo_bias}), s2);
    h[3] = hmul2(hfma2(and_or(w8, 0x00F000F0u, 0x64006400u), {sixteenth}, {hi_bias}), s2);
}}
// The same pairs, biased and unscaled: `1024 + 16q` (each code under the mantissa's top nibble,
// one LOP3 a pair: no subtraction, no scale; the decode GEMV's order, see `gemv_mma`).
__device__ __forceinline__ void dq_biased(unsigned w, unsigned* h) {{
    h[0] = and_or(w << 4, 0x00F000F0u, 0x64006400u);
    h[1] = and_or(w, 0x00F000F0u, 0x64006400u);
    h[2] = and_or(w >> 4, 0x00F000F0u, 0x64006400u);
    h[3] = and_or(w >> 8, 0x00F000F0u, 0x64006400u);
}}
__device__ __forceinline__ void dq_word(unsigned w, unsigned s2, unsigned* h) {{
    unsigned p[4];
    dq_pairs(w, s2, p);
    h[0] = __byte_perm(p[0], p[1], 0x5410u);
    h[1] = __byte_perm(p[2], p[3], 0x5410u);
    h[2] = __byte_perm(p[0], p[1], 0x7632u);
    h[3] = __byte_perm(p[2], p[3], 0x7632u);
}}
",
            lo_bias = h2_lit(1024.0 + maxq as f32),
            sixteenth = h2_lit(1.0 / 16.0),
            hi_bias = h2_lit(-(64.0 + maxq as f32)),
        ),
        // Codes i at bits 8i: byte i under the f16 exponent byte 0x64 is `1024 + q`.
        8 => format!(
            "__device__ __forceinline__ void dq_pairs(unsigned w, unsigned s2, unsigned* h) {{
    h[0] = hmul2(hsub2(__byte_perm(w, 0x64646464u, 0x4140u), {bias}), s2);
    h[1] = hmul2(hsub2(__byte_perm(w, 0x64646464u, 0x4342u), {bias}), s2);
}}
__device__ __forceinline__ void dq_word(unsigned w, unsigned s2, unsigned* h) {{ dq_pairs(w, s2, h); }}
",
            bias = h2_lit(1024.0 + maxq as f32),
        ),
        b => unreachable!("no f16 decoder for {b}-bit codes"),
    }
}
