//! Fast path for symmetric 8-bit, group 32, uint32 words, f16 scales, row-major (NK) storage —
//! `q8f16_1` linear weights and `q8f16_*` embeddings. With four codes per little-endian word,
//! LSB first, the bytes of a group are its codes in position order. Decoded: `(q - 127)·s`.

use super::matrix::f16_scale as scale;
use super::matrix::QMatrix;
use super::row_dot::RowDotFns;
use crate::quant::scheme::Layout;

pub(super) fn applies(m: &QMatrix) -> bool {
    m.is_sym_group32_f16(8, Layout::NK)
}

/// The row kernels of this format.
const ROW_DOT: RowDotFns = RowDotFns {
    #[cfg(target_arch = "x86_64")]
    avx2: avx2::row_dot,
    #[cfg(target_arch = "aarch64")]
    neon: neon::row_dot,
    portable: portable_row_dot,
};

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &[f32], out: &mut [f32]) {
    super::row_dot::gemv_rows(m, &ROW_DOT, n0, x, out)
}

/// Row `row` decoded to f32.
pub(super) fn decode_row(m: &QMatrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m.k);
    let (data, scales) = m.nk_row_bytes(row);
    let full = m.k / 32;
    for g in 0..full {
        let s = scale(scales, g);
        for (o, &q) in out[g * 32..g * 32 + 32]
            .iter_mut()
            .zip(&data[g * 32..g * 32 + 32])
        {
            *o = (q as f32 - 127.0) * s;
        }
    }
    if full < m.n_group {
        m.decode_group(row, full, &mut out[full * 32..]);
    }
}

/// The AVX2 kernel's lanes in plain code: the same operations in the same order, so the same
/// bits on every CPU.
fn portable_row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
    let mut total = [[0f32; 8]; 2];
    for g in 0..groups {
        let q: [f32; 32] = std::array::from_fn(|i| data[g * 32 + i] as f32 - 127.0);
        super::simd::nk_group_lanes(&q, &x[g * 32..], scale(scales, g), &mut total[g & 1]);
    }
    super::simd::hsum8_of_sum(&total[0], &total[1])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be available; `data.len() >= 32·groups`, `scales.len() >= 2·groups`,
    /// `x.len() >= 32·groups`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 32 * groups && scales.len() >= 2 * groups && x.len() >= 32 * groups);
        let off = _mm_set1_epi8(127);
        let mut total = [_mm256_setzero_ps(); 2];
        for g in 0..groups {
            let p = data.as_ptr().add(g * 32);
            // Codes 0..=254 minus 127 fit in i8 (wrapping subtraction gives the right bits).
            let a = _mm_sub_epi8(_mm_loadu_si128(p as *const __m128i), off);
            let b = _mm_sub_epi8(_mm_loadu_si128(p.add(16) as *const __m128i), off);
            let q = [
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))),
            ];
            let xp = x.as_ptr().add(g * 32);
            let s0 = _mm256_fmadd_ps(
                q[1],
                _mm256_loadu_ps(xp.add(8)),
                _mm256_mul_ps(q[0], _mm256_loadu_ps(xp)),
            );
            let s1 = _mm256_fmadd_ps(
                q[3],
                _mm256_loadu_ps(xp.add(24)),
                _mm256_mul_ps(q[2], _mm256_loadu_ps(xp.add(16))),
            );
            let s = super::scale(scales, g);
            total[g & 1] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), _mm256_set1_ps(s), total[g & 1]);
        }
        hsum(_mm256_add_ps(total[0], total[1]))
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::{codes_f32, nk_row_dot};
    use std::arch::aarch64::*;

    /// `avx2::row_dot` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and
    /// every lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available; `data.len() >= 32·groups`, `scales.len() >= 2·groups`,
    /// `x.len() >= 32·groups`.
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 32 * groups && scales.len() >= 2 * groups && x.len() >= 32 * groups);
        let off = vdupq_n_u8(127);
        nk_row_dot(data, scales, x, groups, 32, |p| {
            // Codes 0..=254 minus 127 fit in i8 (wrapping subtraction gives the right bits).
            let a = codes_f32(vreinterpretq_s8_u8(vsubq_u8(vld1q_u8(p), off)));
            let b = codes_f32(vreinterpretq_s8_u8(vsubq_u8(vld1q_u8(p.add(16)), off)));
            [a[0], a[1], b[0], b[1]]
        })
    }
}
