//! Fast path for symmetric 4-bit, group 32, uint32 words, f16 scales, row-major (NK) storage —
//! `q4f16_1` linear weights and every `q4f16_*` embedding. A group is 16 bytes: byte `i` holds
//! position `2i` in its low nibble and `2i + 1` in its high nibble (LSB-first words, little
//! endian). Decoded values are `(q - 7)·s` in f32.

use super::matrix::f16_scale as scale;
use super::matrix::QMatrix;
use super::row_dot::RowDotFns;
use crate::quant::scheme::Layout;

/// Whether `m` is stored the way this module reads.
pub(super) fn applies(m: &QMatrix) -> bool {
    m.is_sym_group32_f16(4, Layout::NK)
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

/// Row `row` decoded to f32 (`out.len() == K`).
pub(super) fn decode_row(m: &QMatrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m.k);
    let (data, scales) = m.nk_row_bytes(row);
    let full = m.k / 32;
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: as in `row_dot`; `out` has 32 values per full group.
        unsafe { avx2::decode_row(data, scales, out, full) };
    } else {
        portable_decode_row(data, scales, out, full);
    }
    #[cfg(not(target_arch = "x86_64"))]
    portable_decode_row(data, scales, out, full);
    if full < m.n_group {
        m.decode_group(row, full, &mut out[full * 32..]);
    }
}

/// The 32 codes of a group minus `off`, in position order (7 here; 0 for `q4_asym_nk`'s
/// unbiased codes, laid out the same).
#[inline]
pub(super) fn unpack_group(bytes: &[u8], off: f32) -> [f32; 32] {
    let mut v = [0f32; 32];
    for (i, b) in bytes[..16].iter().enumerate() {
        v[2 * i] = (b & 0x0F) as f32 - off;
        v[2 * i + 1] = (b >> 4) as f32 - off;
    }
    v
}

/// The AVX2 kernel's lanes in plain code: the same operations in the same order, so the same
/// bits on every CPU.
fn portable_row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
    let mut total = [[0f32; 8]; 2];
    for g in 0..groups {
        let q = unpack_group(&data[g * 16..], 7.0);
        super::simd::nk_group_lanes(&q, &x[g * 32..], scale(scales, g), &mut total[g & 1]);
    }
    super::simd::hsum8_of_sum(&total[0], &total[1])
}

fn portable_decode_row(data: &[u8], scales: &[u8], out: &mut [f32], groups: usize) {
    for g in 0..groups {
        let s = scale(scales, g);
        let q = unpack_group(&data[g * 16..], 7.0);
        for (o, q) in out[g * 32..g * 32 + 32].iter_mut().zip(q) {
            *o = q * s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// Eight f16 scales starting at group `g` (fewer at the end of the row, zero-padded).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales8(scales: &[u8], g: usize, groups: usize) -> [f32; 8] {
        let v = if g + 8 <= groups {
            _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(2 * g) as *const __m128i))
        } else {
            let mut buf = [0u8; 16];
            for (i, b) in buf.iter_mut().enumerate().take(2 * (groups - g)) {
                *b = scales[2 * g + i];
            }
            _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
        };
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    /// The 32 codes of the group at `p` minus `off` as four vectors of 8 f32 (positions 0-7, …):
    /// byte `i` holds position `2i` in its low nibble and `2i + 1` in its high (also
    /// `q4_asym_nk`'s groups, which take them unbiased).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn unpack(p: *const u8, off: i8) -> [__m256; 4] {
        let b = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        let off = _mm_set1_epi8(off);
        let v0 = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), off);
        let v1 = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), off);
        [
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8))),
        ]
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 16·groups`,
    /// `scales.len() >= 2·groups`, `x.len() >= 32·groups`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups && x.len() >= 32 * groups);
        let mut total = [_mm256_setzero_ps(); 2];
        let mut g = 0;
        while g < groups {
            let s = scales8(scales, g, groups);
            let nb = (groups - g).min(8);
            for (i, &si) in s.iter().enumerate().take(nb) {
                let q = unpack(data.as_ptr().add((g + i) * 16), 7);
                let xp = x.as_ptr().add((g + i) * 32);
                let a = _mm256_fmadd_ps(
                    q[1],
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_mul_ps(q[0], _mm256_loadu_ps(xp)),
                );
                let b = _mm256_fmadd_ps(
                    q[3],
                    _mm256_loadu_ps(xp.add(24)),
                    _mm256_mul_ps(q[2], _mm256_loadu_ps(xp.add(16))),
                );
                total[i & 1] =
                    _mm256_fmadd_ps(_mm256_add_ps(a, b), _mm256_set1_ps(si), total[i & 1]);
            }
            g += nb;
        }
        hsum(_mm256_add_ps(total[0], total[1]))
    }

    /// # Safety
    /// As [`row_dot`], with `out.len() >= 32·groups`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_row(data: &[u8], scales: &[u8], out: &mut [f32], groups: usize) {
        assert!(
            data.len() >= 16 * groups && scales.len() >= 2 * groups && out.len() >= 32 * groups
        );
        let mut g = 0;
        while g < groups {
            let s = scales8(scales, g, groups);
            let nb = (groups - g).min(8);
            for (i, &si) in s.iter().enumerate().take(nb) {
                let q = unpack(data.as_ptr().add((g + i) * 16), 7);
                let op = out.as_mut_ptr().add((g + i) * 32);
                let sv = _mm256_set1_ps(si);
                for (j, v) in q.iter().enumerate() {
                    _mm256_storeu_ps(op.add(8 * j), _mm256_mul_ps(*v, sv));
                }
            }
            g += nb;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::{nk_row_dot, q4_codes};

    /// `avx2::row_dot` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and
    /// every lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available; `data.len() >= 16·groups`, `scales.len() >= 2·groups`,
    /// `x.len() >= 32·groups`.
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups && x.len() >= 32 * groups);
        nk_row_dot(data, scales, x, groups, 16, |p| q4_codes(p, 7))
    }
}
