//! Fast path for symmetric 3-bit codes, five to a little-endian u16 word (LSB first), groups of
//! 40 (8 words), f16 scales, row-major (NK) storage — `q3f16_1` linear weights and the `q3f16_*`
//! embeddings. A group's 8 words are one 16-byte load, one word to a lane, so the kernel takes
//! code `j` of every word (positions `5w + j`) at once; the activations are permuted once per
//! call to match (`xp[40g + 8j + w] = x[40g + 5w + j]`). Per group: `s · Σ (q - 3)·x`.

use super::matrix::{f16_scale as scale, Codec, QMatrix};
use super::row_dot::RowDotFns;
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

const GROUP: usize = 40;
const PER_WORD: usize = 5;
const WORDS: usize = 8;

/// Whether `m` is stored the way this module reads.
pub(super) fn applies(m: &QMatrix) -> bool {
    m.layout == Layout::NK
        && (m.bits, m.per_word, m.word_bytes, m.group) == (3, PER_WORD, 2, GROUP)
        && m.codec
            == Codec::Sym {
                maxq: 3.0,
                scale_dtype: DType::F16,
            }
}

const ROW_DOT: RowDotFns = RowDotFns {
    #[cfg(target_arch = "x86_64")]
    avx2: avx2::row_dot,
    #[cfg(target_arch = "aarch64")]
    neon: neon::row_dot,
    portable: portable_row_dot,
};

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`. Every group goes through the kernels, a ragged last one
/// too: its words are stored whole (`words_per_row` covers every group) and the permuted
/// activations are zero past K, so its padding codes (small integers) add nothing. (Decoding that
/// group one code at a time instead took a third of SmolLM2's q3f16_1 decode.)
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), m.k);
    let groups = m.n_group;
    let mut xp = vec![0f32; groups * GROUP];
    for (dst, src) in xp.chunks_exact_mut(GROUP).zip(x.chunks(GROUP)) {
        for (w, codes) in src.chunks(PER_WORD).enumerate() {
            for (j, v) in codes.iter().enumerate() {
                dst[WORDS * j + w] = *v;
            }
        }
    }
    super::row_dot::gemv_rows_over(m, &ROW_DOT, n0, &xp, groups, out);
}

/// The lanes of the SIMD kernel in plain code (the same operations in the same order, so the
/// same bits on every CPU): lane `w` sums code `j` of word `w` times `xp[8j + w]`, even and odd
/// `j` apart.
fn portable_row_dot(data: &[u8], scales: &[u8], xp: &[f32], groups: usize) -> f32 {
    let mut total = [[0f32; WORDS]; 2];
    for g in 0..groups {
        let xs = &xp[g * GROUP..(g + 1) * GROUP];
        let mut acc = [[0f32; WORDS]; 2];
        for w in 0..WORDS {
            let at = 2 * (g * WORDS + w);
            let word = u16::from_le_bytes([data[at], data[at + 1]]);
            for j in 0..PER_WORD {
                let q = (word >> (3 * j) & 7) as f32 - 3.0;
                acc[j & 1][w] = q.mul_add(xs[WORDS * j + w], acc[j & 1][w]);
            }
        }
        let s = scale(scales, g);
        for w in 0..WORDS {
            total[g & 1][w] = (acc[0][w] + acc[1][w]).mul_add(s, total[g & 1][w]);
        }
    }
    super::simd::hsum8_of_sum(&total[0], &total[1])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::hsum;
    use super::{GROUP, PER_WORD, WORDS};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 16·groups`, `scales.len() >= 2·groups`,
    /// `xp.len() >= 40·groups`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], xp: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups);
        assert!(xp.len() >= GROUP * groups);
        let (mask, three) = (_mm256_set1_epi32(7), _mm256_set1_ps(3.0));
        let mut total = [_mm256_setzero_ps(); 2];
        for g in 0..groups {
            let mut words =
                _mm256_cvtepu16_epi32(_mm_loadu_si128(data.as_ptr().add(16 * g) as *const __m128i));
            let xg = xp.as_ptr().add(g * GROUP);
            let mut acc = [_mm256_setzero_ps(); 2];
            for j in 0..PER_WORD {
                let q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(words, mask)), three);
                acc[j & 1] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xg.add(WORDS * j)), acc[j & 1]);
                words = _mm256_srli_epi32::<3>(words);
            }
            let s = _mm256_set1_ps(super::scale(scales, g));
            total[g & 1] = _mm256_fmadd_ps(_mm256_add_ps(acc[0], acc[1]), s, total[g & 1]);
        }
        hsum(_mm256_add_ps(total[0], total[1]))
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::hsum8;
    use super::{GROUP, PER_WORD, WORDS};
    use std::arch::aarch64::*;

    /// `avx2::row_dot` with each 8-lane register as two NEON registers (words 0–3, 4–7) and
    /// every lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available; `data.len() >= 16·groups`, `scales.len() >= 2·groups`,
    /// `xp.len() >= 40·groups`.
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], xp: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups);
        assert!(xp.len() >= GROUP * groups);
        let (mask, three, zero) = (vdupq_n_u32(7), vdupq_n_f32(3.0), vdupq_n_f32(0.0));
        // total[group parity][half]
        let mut total = [[zero; 2]; 2];
        for g in 0..groups {
            let h = vreinterpretq_u16_u8(vld1q_u8(data.as_ptr().add(16 * g)));
            let mut words = [vmovl_u16(vget_low_u16(h)), vmovl_high_u16(h)];
            let xg = xp.as_ptr().add(g * GROUP);
            // acc[code parity][half]
            let mut acc = [[zero; 2]; 2];
            for j in 0..PER_WORD {
                for (half, w) in words.iter_mut().enumerate() {
                    let q = vsubq_f32(vcvtq_f32_u32(vandq_u32(*w, mask)), three);
                    let xv = vld1q_f32(xg.add(WORDS * j + 4 * half));
                    acc[j & 1][half] = vfmaq_f32(acc[j & 1][half], q, xv);
                    *w = vshrq_n_u32::<3>(*w);
                }
            }
            let s = vdupq_n_f32(super::scale(scales, g));
            for half in 0..2 {
                let a = vaddq_f32(acc[0][half], acc[1][half]);
                total[g & 1][half] = vfmaq_f32(total[g & 1][half], a, s);
            }
        }
        hsum8(
            vaddq_f32(total[0][0], total[1][0]),
            vaddq_f32(total[0][1], total[1][1]),
        )
    }
}
