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
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // Four blocks of 8 rows at a time where the rows are there, then one.
        while done + 8 <= out.len() {
            let whole = done + 32 <= out.len();
            let kernel = match (four, whole) {
                (true, true) => avx2::lanes::<true, 4>,
                (true, false) => avx2::lanes::<true, 1>,
                (false, true) => avx2::lanes::<false, 4>,
                (false, false) => avx2::lanes::<false, 1>,
            };
            // SAFETY: AVX2/FMA/F16C present; the kernel asserts its index bounds.
            unsafe { kernel(m.data, m.scales, m.n, n0 + done, x, &mut out[done..]) };
            done += if whole { 32 } else { 8 };
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        *o = portable_row(m, n0 + j, x, four);
    }
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
    use super::super::kn::avx2::prefetch_ahead;
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
        let wpg = if FOUR { 4 } else { 8 };
        let groups = q.len() / 32;
        assert!(n + 8 * B <= n_rows && d.len() >= groups && bias.len() >= groups);
        assert!(out.len() >= 8 * B);
        assert!(data.len() >= 4 * wpg * groups * n_rows && scales.len() >= 2 * groups * n_rows);
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
