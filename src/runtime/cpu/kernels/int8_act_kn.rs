//! [`super::int8_act`]'s GEMV for the transposed (KN) layout of the same 4- and 8-bit symmetric
//! group-32 schemes (`q4f16_0`, `q8f16_0`): the activations quantized to int8 per block of 32 as
//! there, each lane one output row as in [`super::kn`]. Word `w` of a q4 group holds positions
//! `8w..8w+8` in its nibbles (byte `b`: `8w+2b` low, `8w+2b+1` high), so with `x` in nibble order
//! its low nibbles meet the four int8 codes at `4w` and its high nibbles those at `16+4w`: one
//! broadcast i32 each. A q8 word holds positions `4w..4w+4`, one byte each, in position order.
//! Per group and row: `s·(d·Σ q·xq + bias)` (q4, `bias = -7·d·Σ xq`) or `s·d·Σ (q-127)·xq` (q8).

use super::int8_act::{CodeOrder, QuantizedX};
use super::matrix::QMatrix;
use crate::quant::scheme::Layout;

/// The int8 code order `m` needs, if this module reads `m` (K a multiple of 32).
pub(super) fn order_for(m: &QMatrix) -> Option<CodeOrder> {
    if m.k % 32 != 0 {
        None
    } else if m.is_sym_group32_f16(4, Layout::KN) {
        Some(CodeOrder::Nibbles)
    } else if m.is_sym_group32_f16(8, Layout::KN) {
        Some(CodeOrder::Positions)
    } else {
        None
    }
}

/// `out[j] ≈ Σ_k x[k]·w[n0 + j, k]` for a matrix [`order_for`] accepts, with `x` in that order.
/// Blocks of 8 rows from `n0` (a multiple of 8) take the SIMD path, the rest the portable one.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &QuantizedX, out: &mut [f32]) {
    assert_eq!(
        order_for(m),
        Some(x.order()),
        "int8-activation KN GEMV of another matrix"
    );
    assert!(n0 + out.len() <= m.n);
    let four = m.bits == 4;
    let mut done = 0;
    if let Some((four_blocks, one_block)) = simd_kernels(four) {
        // Four blocks of 8 rows at a time where the rows are there, then one.
        while done + 8 <= out.len() {
            let whole = done + 32 <= out.len();
            let kernel = if whole { four_blocks } else { one_block };
            // SAFETY: `simd_kernels` checked the CPU's features; the kernel asserts its index
            // bounds.
            unsafe { kernel(m.data, m.scales, m.n, n0 + done, x, &mut out[done..]) };
            done += if whole { 32 } else { 8 };
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        *o = portable_row(m, n0 + j, x, four);
    }
}

/// A SIMD kernel over blocks of 8 rows: `(data, scales, n_rows, n, x, out)`, see `avx2::lanes`.
type Lanes = unsafe fn(&[u8], &[u8], usize, usize, &QuantizedX, &mut [f32]);

/// The SIMD kernels for q4 (`four`) or q8 codes that this CPU runs, taking 4 blocks and 1 block
/// of 8 rows.
fn simd_kernels(four: bool) -> Option<(Lanes, Lanes)> {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        return Some(if four {
            (
                avx2::lanes::<true, 4> as Lanes,
                avx2::lanes::<true, 1> as Lanes,
            )
        } else {
            (avx2::lanes::<false, 4>, avx2::lanes::<false, 1>)
        });
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd::has_neon() {
        let dot = super::neon::has_dotprod();
        return Some(match (four, dot) {
            (true, true) => (
                neon::lanes::<true, 4, true> as Lanes,
                neon::lanes::<true, 1, true> as Lanes,
            ),
            (true, false) => (neon::lanes::<true, 4, false>, neon::lanes::<true, 1, false>),
            (false, true) => (neon::lanes::<false, 4, true>, neon::lanes::<false, 1, true>),
            (false, false) => (
                neon::lanes::<false, 4, false>,
                neon::lanes::<false, 1, false>,
            ),
        });
    }
    let _ = four;
    None
}

/// What a `lanes` kernel over rows `n..n+rows` of a q4 (`four`) or q8 KN matrix of `n_rows`
/// rows reads, checked against the slices it is given: returns `(groups, words per group)`.
#[allow(clippy::too_many_arguments)]
fn lanes_geometry(
    four: bool,
    data: &[u8],
    scales: &[u8],
    n_rows: usize,
    n: usize,
    rows: usize,
    x: &QuantizedX,
    out: &[f32],
) -> (usize, usize) {
    let (q, d, bias) = x.parts();
    let wpg = if four { 4 } else { 8 };
    let groups = q.len() / 32;
    assert!(n + rows <= n_rows && d.len() >= groups && bias.len() >= groups);
    assert!(out.len() >= rows);
    assert!(data.len() >= 4 * wpg * groups * n_rows && scales.len() >= 2 * groups * n_rows);
    (groups, wpg)
}

/// One row, lane by lane as the SIMD kernel computes each.
fn portable_row(m: &QMatrix, row: usize, x: &QuantizedX, four: bool) -> f32 {
    let (q, d, bias) = x.parts();
    let wpg = if four { 4 } else { 8 };
    let mut total = 0f32;
    for g in 0..m.k / 32 {
        let mut isum = 0i32;
        for w in 0..wpg {
            let bytes = m.word(m.word_index(row, g * wpg + w)).to_le_bytes();
            for (b, &v) in bytes.iter().enumerate() {
                isum += if four {
                    (v & 0x0F) as i32 * q[g * 32 + 4 * w + b] as i32
                        + (v >> 4) as i32 * q[g * 32 + 16 + 4 * w + b] as i32
                } else {
                    (v as i32 - 127) * q[g * 32 + 4 * w + b] as i32
                };
            }
        }
        let (s, _) = m.group_params(row, g);
        let inner = if four {
            (isum as f32).mul_add(d[g], bias[g])
        } else {
            isum as f32 * d[g]
        };
        total = s.mul_add(inner, total);
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::kn::prefetch_ahead;
    use super::QuantizedX;
    use std::arch::x86_64::*;

    /// Codes `i..i+4` of `q` as one i32, broadcast to every lane.
    ///
    /// # Safety
    /// AVX2 must be available; `i + 4 <= q.len()`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn x4(q: &[i8], i: usize) -> __m256i {
        debug_assert!(i + 4 <= q.len());
        _mm256_set1_epi32((q.as_ptr().add(i) as *const i32).read_unaligned())
    }

    /// `out[..8·B]`: rows `n..n+8·B` (one to a lane, `B` registers of 8) of a q4 (`FOUR`) or q8
    /// KN matrix of `n_rows` rows. Several blocks at once read `32·B` contiguous bytes of each
    /// word row instead of 32 (KN's word rows lie `4·N` bytes apart); every lane's operations
    /// are the same for any `B`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available (every index bound is asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lanes<const FOUR: bool, const B: usize>(
        data: &[u8],
        scales: &[u8],
        n_rows: usize,
        n: usize,
        x: &QuantizedX,
        out: &mut [f32],
    ) {
        let (q, d, bias) = x.parts();
        let (groups, wpg) = super::lanes_geometry(FOUR, data, scales, n_rows, n, 8 * B, x, out);
        let ones = _mm256_set1_epi16(1);
        let nibble = _mm256_set1_epi8(0x0F);
        let off = _mm256_set1_epi8(127);
        let mut total = [_mm256_setzero_ps(); B];
        for g in 0..groups {
            let mut isum = [_mm256_setzero_si256(); B];
            for w in 0..wpg {
                let r = g * wpg + w;
                let row = data.as_ptr().add(4 * (r * n_rows + n));
                prefetch_ahead(row, 4 * n_rows, r, groups * wpg, 32 * B);
                let (xa, xb) = if FOUR {
                    (x4(q, g * 32 + 4 * w), x4(q, g * 32 + 16 + 4 * w))
                } else {
                    (x4(q, g * 32 + 4 * w), _mm256_setzero_si256())
                };
                for (b, acc) in isum.iter_mut().enumerate() {
                    let words = _mm256_loadu_si256(row.add(32 * b) as *const __m256i);
                    let p = if FOUR {
                        let lo = _mm256_and_si256(words, nibble);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(words), nibble);
                        // u8 (0..15) × i8: four products per lane at most 4·15·127, no i16
                        // overflow.
                        _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb))
                    } else {
                        // q - 127 in i8 (wrapping subtraction gives the right bits); |w| × (x
                        // with w's sign): pairs at most 2·127·127, no i16 saturation.
                        let c = _mm256_sub_epi8(words, off);
                        _mm256_maddubs_epi16(_mm256_sign_epi8(c, c), _mm256_sign_epi8(xa, c))
                    };
                    *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(p, ones));
                }
            }
            let sp = scales.as_ptr().add(2 * (g * n_rows + n));
            for (b, (acc, tot)) in isum.iter().zip(total.iter_mut()).enumerate() {
                let s = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(16 * b) as *const __m128i));
                let sum = _mm256_cvtepi32_ps(*acc);
                let inner = if FOUR {
                    _mm256_fmadd_ps(sum, _mm256_set1_ps(d[g]), _mm256_set1_ps(bias[g]))
                } else {
                    _mm256_mul_ps(sum, _mm256_set1_ps(d[g]))
                };
                *tot = _mm256_fmadd_ps(s, inner, *tot);
            }
        }
        for (b, tot) in total.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * b), *tot);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::kn::prefetch_ahead;
    use super::super::neon::{dot4, f16x4};
    use super::QuantizedX;
    use std::arch::aarch64::*;

    /// Codes `i..i+4` of `q` in every 4-byte lane.
    ///
    /// # Safety
    /// `i + 4 <= q.len()`.
    #[inline(always)]
    unsafe fn x4(q: &[i8], i: usize) -> int8x16_t {
        debug_assert!(i + 4 <= q.len());
        vreinterpretq_s8_s32(vdupq_n_s32(
            (q.as_ptr().add(i) as *const i32).read_unaligned(),
        ))
    }

    /// `avx2::lanes` with each 8-lane register as two NEON registers (lanes 0–3, 4–7): a lane's
    /// four bytes meet the four codes of `x` in one `dot4` (`sdot` where the CPU has it, `DOT`),
    /// the integer sums are exact and the float steps are the AVX2 kernel's, so both give the
    /// same bits.
    ///
    /// # Safety
    /// NEON must be available, and with `DOT` the dot-product extension (every index bound is
    /// asserted).
    pub unsafe fn lanes<const FOUR: bool, const B: usize, const DOT: bool>(
        data: &[u8],
        scales: &[u8],
        n_rows: usize,
        n: usize,
        x: &QuantizedX,
        out: &mut [f32],
    ) {
        let (q, d, bias) = x.parts();
        let (groups, wpg) = super::lanes_geometry(FOUR, data, scales, n_rows, n, 8 * B, x, out);
        let nibble = vdupq_n_u8(0x0F);
        let off = vdupq_n_u8(127);
        let mut total = [[vdupq_n_f32(0.0); 2]; B];
        for g in 0..groups {
            let mut isum = [[vdupq_n_s32(0); 2]; B];
            for w in 0..wpg {
                let r = g * wpg + w;
                let row = data.as_ptr().add(4 * (r * n_rows + n));
                prefetch_ahead(row, 4 * n_rows, r, groups * wpg, 32 * B);
                let xa = x4(q, g * 32 + 4 * w);
                let xb = if FOUR {
                    x4(q, g * 32 + 16 + 4 * w)
                } else {
                    vdupq_n_s8(0)
                };
                for (b, acc) in isum.iter_mut().enumerate() {
                    for (h, a) in acc.iter_mut().enumerate() {
                        let words = vld1q_u8(row.add(32 * b + 16 * h));
                        *a = if FOUR {
                            let lo = vreinterpretq_s8_u8(vandq_u8(words, nibble));
                            let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(words));
                            dot4::<DOT>(dot4::<DOT>(*a, lo, xa), hi, xb)
                        } else {
                            // q - 127 in i8 (wrapping subtraction gives the right bits).
                            dot4::<DOT>(*a, vreinterpretq_s8_u8(vsubq_u8(words, off)), xa)
                        };
                    }
                }
            }
            let sp = scales.as_ptr().add(2 * (g * n_rows + n));
            for (b, (acc, tot)) in isum.iter().zip(total.iter_mut()).enumerate() {
                for h in 0..2 {
                    let s = f16x4(sp.add(16 * b + 8 * h));
                    let sum = vcvtq_f32_s32(acc[h]);
                    let inner = if FOUR {
                        vfmaq_f32(vdupq_n_f32(bias[g]), sum, vdupq_n_f32(d[g]))
                    } else {
                        vmulq_f32(sum, vdupq_n_f32(d[g]))
                    };
                    tot[h] = vfmaq_f32(tot[h], s, inner);
                }
            }
        }
        for (b, tot) in total.iter().enumerate() {
            vst1q_f32(out.as_mut_ptr().add(8 * b), tot[0]);
            vst1q_f32(out.as_mut_ptr().add(8 * b + 4), tot[1]);
        }
    }
}
