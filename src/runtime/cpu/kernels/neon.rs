//! NEON building blocks of the aarch64 kernels, for what `std::arch` has no stable intrinsic:
//! f16 → f32 conversion (`fcvtl`, base ARMv8: exact, subnormals included, as F16C's `vcvtph2ps`),
//! prefetch hints (`prfm`), and the int8 dot product of 4-byte lanes (`sdot`, the dot-product
//! extension of ARMv8.2+, which Apple's M-series and most phone cores have; `vdotq_s32` is still
//! unstable). Without `sdot`, widening multiplies give the same exact integers.

use std::arch::aarch64::*;
use std::arch::asm;

/// Whether the CPU has the dot-product extension (`sdot`); `MLCB_NO_SIMD` and the tests' portable
/// switch turn it off with the other SIMD kernels.
pub(super) fn has_dotprod() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    super::simd::has_neon()
        && *HAS.get_or_init(|| std::arch::is_aarch64_feature_detected!("dotprod"))
}

/// The 4 little-endian f16 at `p` as f32.
///
/// # Safety
/// `p` must point to 8 readable bytes (no alignment needed).
#[inline(always)]
pub(super) unsafe fn f16x4(p: *const u8) -> float32x4_t {
    let h = vreinterpret_u16_u8(vld1_u8(p));
    let out: float32x4_t;
    asm!(
        "fcvtl {o:v}.4s, {i:v}.4h",
        o = lateout(vreg) out,
        i = in(vreg) h,
        options(pure, nomem, nostack, preserves_flags)
    );
    out
}

/// Hints the CPU to fetch the cache line holding `p` (never faults, whatever `p` is).
#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    // SAFETY: a prefetch hint reads nothing back and cannot fault.
    unsafe {
        asm!(
            "prfm pldl1keep, [{0}]",
            in(reg) p,
            options(nostack, preserves_flags, readonly)
        )
    }
}

/// Lane `i`: `acc[i] + Σ_{b<4} a[4i+b]·c[4i+b]`, `sdot`'s definition. `DOT` executes `sdot` (only
/// where [`has_dotprod`] said so); otherwise widening multiplies, which need each pair of products
/// to fit in i16 — true for codes in `-127..=127` times `0..=15` or `-127..=127`, the kernels'
/// ranges (the i8 activations are clamped to ±127, never -128).
///
/// # Safety
/// With `DOT`, the CPU must have the dot-product extension.
#[inline(always)]
pub(super) unsafe fn dot4<const DOT: bool>(
    acc: int32x4_t,
    a: int8x16_t,
    c: int8x16_t,
) -> int32x4_t {
    if DOT {
        let mut acc = acc;
        // `.arch_extension` lets the assembler take `sdot` in this block only, so the kernels
        // need no target feature the build does not assume.
        asm!(
            ".arch_extension dotprod",
            "sdot {acc:v}.4s, {a:v}.16b, {c:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            c = in(vreg) c,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    } else {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(c));
        let hi = vmull_high_s8(a, c);
        vpadalq_s16(acc, vpaddq_s16(lo, hi))
    }
}

/// Sum of 8 lanes held as two registers (lanes 0–3, 4–7) in the order of the AVX2 horizontal
/// sum (`simd::hsum8`): `(l0+l4, l1+l5, l2+l6, l3+l7)`, then pairs, then the last two.
#[inline(always)]
pub(super) unsafe fn hsum8(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let q = vaddq_f32(lo, hi);
    let d = vadd_f32(vget_low_f32(q), vget_high_f32(q));
    vget_lane_f32::<0>(d) + vget_lane_f32::<1>(d)
}

/// 16 i8 codes as f32, by the AVX2 kernels' 8-lane registers: `[register][half]`, register `r`
/// holding codes `8r..8r+8`, half `h` its lanes `4h..4h+4`.
#[inline(always)]
pub(super) unsafe fn codes_f32(v: int8x16_t) -> [[float32x4_t; 2]; 2] {
    let wide = |h: int16x8_t| {
        [
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))),
            vcvtq_f32_s32(vmovl_high_s16(h)),
        ]
    };
    [wide(vmovl_s8(vget_low_s8(v))), wide(vmovl_high_s8(v))]
}

/// The 32 codes of the q4 group at `p` minus `off`, in position order, as [`codes_f32`]'s
/// registers: byte `i` holds position `2i` in its low nibble and `2i + 1` in its high (`q4_nk`'s
/// groups, `off` 7, and `q4_asym_nk`'s, `off` 0: `q4_nk::avx2::unpack` on NEON).
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline(always)]
pub(super) unsafe fn q4_codes(p: *const u8, off: i8) -> [[float32x4_t; 2]; 4] {
    let b = vld1q_u8(p);
    let (lo, hi) = (vandq_u8(b, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(b));
    let off = vdupq_n_s8(off);
    let v0 = codes_f32(vsubq_s8(vreinterpretq_s8_u8(vzip1q_u8(lo, hi)), off));
    let v1 = codes_f32(vsubq_s8(vreinterpretq_s8_u8(vzip2q_u8(lo, hi)), off));
    [v0[0], v0[1], v1[0], v1[1]]
}

/// The AVX2 NK row kernels' loop (`q4_nk`, `q8_nk`): group `g`'s 32 codes as `unpack` gives them
/// from its `group_bytes` bytes, through [`group_step`] with its f16 scale, even and odd groups
/// apart, then the AVX2 horizontal sum.
///
/// # Safety
/// `data` holds `groups · group_bytes` bytes, `scales` `2·groups`, `x` `32·groups` floats.
#[inline(always)]
pub(super) unsafe fn nk_row_dot(
    data: &[u8],
    scales: &[u8],
    x: &[f32],
    groups: usize,
    group_bytes: usize,
    unpack: impl Fn(*const u8) -> [[float32x4_t; 2]; 4],
) -> f32 {
    // total[group parity][half]
    let mut total = [[vdupq_n_f32(0.0); 2]; 2];
    for g in 0..groups {
        let q = unpack(data.as_ptr().add(group_bytes * g));
        let s = super::matrix::f16_scale(scales, g);
        group_step(q, x.as_ptr().add(32 * g), s, &mut total[g & 1]);
    }
    hsum8(
        vaddq_f32(total[0][0], total[1][0]),
        vaddq_f32(total[0][1], total[1][1]),
    )
}

/// The AVX2 NK row kernels' step for one group of 32 codes `q` (four 8-lane registers, as
/// [`codes_f32`] gives them) against `x[..32]` at `xp`, scale `s`:
/// `total += ((q0·x0 + q1·x1) + (q2·x2 + q3·x3))·s`, lane by lane in that order (products fused
/// where the AVX2 kernel fuses them).
#[inline(always)]
pub(super) unsafe fn group_step(
    q: [[float32x4_t; 2]; 4],
    xp: *const f32,
    s: f32,
    total: &mut [float32x4_t; 2],
) {
    for (h, t) in total.iter_mut().enumerate() {
        let x = |r: usize| vld1q_f32(xp.add(8 * r + 4 * h));
        let a = vfmaq_f32(vmulq_f32(q[0][h], x(0)), q[1][h], x(1));
        let b = vfmaq_f32(vmulq_f32(q[2][h], x(2)), q[3][h], x(3));
        *t = vfmaq_f32(*t, vaddq_f32(a, b), vdupq_n_f32(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact() {
        let bits: Vec<u16> = (0..=u16::MAX).step_by(7).collect();
        for chunk in bits.chunks_exact(4) {
            let mut out = [0f32; 4];
            // SAFETY: the chunk holds 4 u16 (8 bytes).
            unsafe { vst1q_f32(out.as_mut_ptr(), f16x4(chunk.as_ptr() as *const u8)) };
            for (o, &b) in out.iter().zip(chunk) {
                let want = half::f16::from_bits(b).to_f32();
                assert!(
                    o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()),
                    "{b:#x}"
                );
            }
        }
    }

    #[test]
    fn both_dot_products_give_the_exact_sums() {
        let mut seed = 5u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((seed >> 16) % 255) as i32 - 127
        };
        for _ in 0..200 {
            let a: [i8; 16] = std::array::from_fn(|_| next() as i8);
            let c: [i8; 16] = std::array::from_fn(|_| next() as i8);
            let mut want = [3i32, -4, 5, 6];
            for i in 0..16 {
                want[i / 4] += a[i] as i32 * c[i] as i32;
            }
            let run = |dot: bool| {
                let mut out = [0i32; 4];
                // SAFETY: `dot` only where the CPU has `sdot`; the arrays hold 16 bytes.
                unsafe {
                    let (acc, va, vc) = (
                        vld1q_s32([3, -4, 5, 6].as_ptr()),
                        vld1q_s8(a.as_ptr()),
                        vld1q_s8(c.as_ptr()),
                    );
                    let r = if dot {
                        dot4::<true>(acc, va, vc)
                    } else {
                        dot4::<false>(acc, va, vc)
                    };
                    vst1q_s32(out.as_mut_ptr(), r);
                }
                out
            };
            assert_eq!(run(false), want);
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                assert_eq!(run(true), want);
            }
        }
    }
}
