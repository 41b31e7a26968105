//! Fast path for symmetric 4-bit, group 32, uint32 words, f16 scales in the transposed (KN)
//! layout — `q4f16_0` linear weights and heads. Word `w` of rows `n..n+8` is 8 consecutive u32,
//! and so are their 8 scales, so the kernel vectorises across output rows: each lane is one row.
//! Per group it computes `Σ q·x - 7·Σ x` (the sum of `x` is shared by every row), times `s`.

use super::matrix::QMatrix;
use crate::quant::scheme::Layout;

pub(super) fn applies(m: &QMatrix) -> bool {
    m.is_sym_group32_f16(4, Layout::KN)
}

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`. Blocks of 8 rows starting at `n0` take the SIMD path, the
/// rest the generic decoder; callers pass `n0` that are multiples of 8 so the split, and hence
/// every result, is the same whatever the threading.
pub(super) fn gemv_block(
    m: &QMatrix,
    n0: usize,
    x: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    assert_eq!(x.len(), m.k);
    assert!(n0 + out.len() <= m.n);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        let full = m.k / 32;
        let xsum: Vec<f32> = (0..full)
            .map(|g| x[g * 32..g * 32 + 32].iter().sum())
            .collect();
        while done + 8 <= out.len() {
            let n = n0 + done;
            // SAFETY: AVX2/FMA/F16C present; rows n..n+8 exist (asserted above), so every word
            // (g·4 + w)·N + n + 7 and scale g·N + n + 7 of a full group is inside the records,
            // whose lengths were checked when the matrix view was built.
            let lanes = unsafe { avx2::lanes8(m.data, m.scales, m.n, n, x, &xsum) };
            for (l, o) in out[done..done + 8].iter_mut().enumerate() {
                *o = lanes[l] + m.ragged_tail_dot(n + l, x);
            }
            done += 8;
        }
    }
    scratch.resize(m.k, 0.0);
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        m.decode_row_generic(n0 + j, scratch);
        *o = super::simd::dot(scratch, x);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `Σ_k x[k]·w[n + l, k]` over the full groups, for the 8 lanes `l`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `data` holds `4·groups·n_rows` u32 words and `scales`
    /// `groups·n_rows` f16 (KN), with `groups = xsum.len()` and `n + 8 <= n_rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lanes8(
        data: &[u8],
        scales: &[u8],
        n_rows: usize,
        n: usize,
        x: &[f32],
        xsum: &[f32],
    ) -> [f32; 8] {
        let groups = xsum.len();
        assert!(n + 8 <= n_rows && x.len() >= 32 * groups);
        assert!(data.len() >= 16 * groups * n_rows && scales.len() >= 2 * groups * n_rows);
        let mask = _mm256_set1_epi32(0x0F);
        let mut total = _mm256_setzero_ps();
        for (g, &xs) in xsum.iter().enumerate() {
            let mut acc = [_mm256_setzero_ps(); 2];
            for w in 0..4 {
                let idx = (g * 4 + w) * n_rows + n;
                let mut words = _mm256_loadu_si256(data.as_ptr().add(4 * idx) as *const __m256i);
                let xp = x.as_ptr().add(g * 32 + w * 8);
                for j in 0..8 {
                    let c = _mm256_cvtepi32_ps(_mm256_and_si256(words, mask));
                    acc[j & 1] = _mm256_fmadd_ps(c, _mm256_broadcast_ss(&*xp.add(j)), acc[j & 1]);
                    words = _mm256_srli_epi32(words, 4);
                }
            }
            let s = _mm256_cvtph_ps(_mm_loadu_si128(
                scales.as_ptr().add(2 * (g * n_rows + n)) as *const __m128i
            ));
            let gs = _mm256_sub_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_set1_ps(7.0 * xs));
            total = _mm256_fmadd_ps(gs, s, total);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), total);
        out
    }
}
