//! Fast path for asymmetric 4-bit, group 32, uint32 words, row-major (NK) storage with a bf16
//! scale and min per group packed in a u32 (scale in the low half, min in the high) — `q4f32_1`
//! linear weights and `q4f32_*` embeddings. The codes are laid out as `q4_nk`'s (byte `i` of a
//! group: position `2i` in its low nibble, `2i + 1` in its high). Decoded: `q·s + min` in f32,
//! a product then a sum as the generic decoder computes it, so every weight has the same value.

use super::matrix::{bf16x2_scale_min, QMatrix};
use super::q4_nk::unpack_group;
use super::row_dot::RowDotFns;
use crate::quant::scheme::Layout;

/// Whether `m` is stored the way this module reads.
pub(super) fn applies(m: &QMatrix) -> bool {
    m.is_asym_bf16x2_group32(4, Layout::NK)
}

const ROW_DOT: RowDotFns = RowDotFns {
    #[cfg(target_arch = "x86_64")]
    avx2: avx2::row_dot,
    // The portable kernel: NEON would gain as q4_nk's does, not written yet.
    #[cfg(target_arch = "aarch64")]
    neon: portable_row_dot,
    portable: portable_row_dot,
};

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &[f32], out: &mut [f32]) {
    super::row_dot::gemv_rows(m, &ROW_DOT, n0, x, out)
}

fn portable_row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
    let mut total = [0f32; 2];
    for g in 0..groups {
        let (s, mn) = bf16x2_scale_min(scales, g);
        let q = unpack_group(&data[g * 16..], 0.0);
        let xs = &x[g * 32..g * 32 + 32];
        let mut acc = [0f32; 8];
        for c in 0..4 {
            for l in 0..8 {
                let w = q[8 * c + l] * s + mn;
                acc[l] = w.mul_add(xs[8 * c + l], acc[l]);
            }
        }
        total[g & 1] += super::simd::hsum8(&acc);
    }
    total[0] + total[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::q4_nk::avx2::unpack;
    use super::super::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 16·groups`, `scales.len() >= 4·groups`,
    /// `x.len() >= 32·groups`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 4 * groups && x.len() >= 32 * groups);
        let mut total = [_mm256_setzero_ps(); 2];
        for g in 0..groups {
            let (s, mn) = super::bf16x2_scale_min(scales, g);
            let (s, mn) = (_mm256_set1_ps(s), _mm256_set1_ps(mn));
            let q = unpack(data.as_ptr().add(g * 16), 0);
            let xp = x.as_ptr().add(g * 32);
            for (j, qj) in q.iter().enumerate() {
                // q·s + min, rounded as the generic decoder rounds it (no fused product).
                let w = _mm256_add_ps(_mm256_mul_ps(*qj, s), mn);
                total[j & 1] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(8 * j)), total[j & 1]);
            }
        }
        hsum(_mm256_add_ps(total[0], total[1]))
    }
}
