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
    #[cfg(target_arch = "aarch64")]
    neon: neon::row_dot,
    portable: portable_row_dot,
};

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &[f32], out: &mut [f32]) {
    super::row_dot::gemv_rows(m, &ROW_DOT, n0, x, out)
}

/// The AVX2 kernel's lanes in plain code: the same operations in the same order, so the same
/// bits on every CPU.
fn portable_row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
    let mut total = [[0f32; 8]; 2];
    for g in 0..groups {
        let (s, mn) = bf16x2_scale_min(scales, g);
        let q = unpack_group(&data[g * 16..], 0.0);
        let xs = &x[g * 32..g * 32 + 32];
        for j in 0..4 {
            for l in 0..8 {
                // q·s + min, a product then a sum as the generic decoder computes it.
                let w = q[8 * j + l] * s + mn;
                total[j & 1][l] = w.mul_add(xs[8 * j + l], total[j & 1][l]);
            }
        }
    }
    super::simd::hsum8_of_sum(&total[0], &total[1])
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

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::{hsum8, q4_codes};
    use std::arch::aarch64::*;

    /// `avx2::row_dot` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and
    /// every lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available; `data.len() >= 16·groups`, `scales.len() >= 4·groups`,
    /// `x.len() >= 32·groups`.
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 4 * groups && x.len() >= 32 * groups);
        let zero = vdupq_n_f32(0.0);
        // total[register parity][half]
        let mut total = [[zero; 2]; 2];
        for g in 0..groups {
            let (s, mn) = super::bf16x2_scale_min(scales, g);
            let (s, mn) = (vdupq_n_f32(s), vdupq_n_f32(mn));
            let q = q4_codes(data.as_ptr().add(16 * g), 0);
            let xp = x.as_ptr().add(32 * g);
            for (j, qj) in q.iter().enumerate() {
                for (half, qh) in qj.iter().enumerate() {
                    // q·s + min, rounded as the generic decoder rounds it (no fused product).
                    let w = vaddq_f32(vmulq_f32(*qh, s), mn);
                    let xv = vld1q_f32(xp.add(8 * j + 4 * half));
                    total[j & 1][half] = vfmaq_f32(total[j & 1][half], w, xv);
                }
            }
        }
        hsum8(
            vaddq_f32(total[0][0], total[1][0]),
            vaddq_f32(total[0][1], total[1][1]),
        )
    }
}
