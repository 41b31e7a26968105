//! Fast path for raw float16 matrices (`q0f16`, and f16 embeddings / heads of other schemes).

use super::matrix::read_floats;
use crate::formats::dtype::DType;

/// `Σ_k x[k]·w[row, k]` for a raw f16 `[N, K]` matrix in `bytes`.
pub(super) fn row_dot(bytes: &[u8], k: usize, row: usize, x: &[f32]) -> f32 {
    assert_eq!(x.len(), k);
    let r = &bytes[row * k * 2..(row + 1) * k * 2];
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: AVX2/FMA/F16C present; `r` holds exactly `k` halves and `x` `k` floats.
        return unsafe { avx2::row_dot(r, x) };
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd::has_neon() {
        // SAFETY: NEON present; `r` holds exactly `k` halves and `x` `k` floats.
        return unsafe { neon::row_dot(r, x) };
    }
    portable_row_dot(r, x)
}

/// The AVX2 kernel's lanes in plain code ([`super::simd::dot_portable`]'s order over the
/// converted weights), so the same bits on every CPU. The weights convert a chunk at a time
/// (`half` uses F16C / NEON where it can); chunks are whole blocks of 32 but the last.
fn portable_row_dot(r: &[u8], x: &[f32]) -> f32 {
    const CHUNK: usize = 256;
    let mut buf = [0f32; CHUNK];
    let mut lanes = super::simd::DotLanes::default();
    let whole = x.len() / 32 * 32;
    for (c, xs) in x[..whole].chunks(CHUNK).enumerate() {
        let w = &mut buf[..xs.len()];
        read_floats(DType::F16, &r[2 * CHUNK * c..2 * (CHUNK * c + xs.len())], w);
        lanes.blocks(w, xs);
    }
    let w = &mut buf[..x.len() - whole];
    read_floats(DType::F16, &r[2 * whole..], w);
    lanes.finish(w, &x[whole..])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::hsum;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `r.len() == 2·x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(r: &[u8], x: &[f32]) -> f32 {
        let k = x.len();
        assert_eq!(r.len(), 2 * k);
        let (pr, px) = (r.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= k {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                let w = _mm256_cvtph_ps(_mm_loadu_si128(pr.add(2 * o) as *const __m128i));
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(px.add(o)), *a);
            }
            i += 32;
        }
        while i + 8 <= k {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(pr.add(2 * i) as *const __m128i));
            acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(px.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < k {
            let h = u16::from_le_bytes([r[2 * i], r[2 * i + 1]]);
            s = half::f16::from_bits(h).to_f32().mul_add(x[i], s);
            i += 1;
        }
        s
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::{f16x4, hsum8};
    use std::arch::aarch64::*;

    /// `avx2::row_dot` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and
    /// every lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available; `r.len() == 2·x.len()`.
    pub unsafe fn row_dot(r: &[u8], x: &[f32]) -> f32 {
        let k = x.len();
        assert_eq!(r.len(), 2 * k);
        let (pr, px) = (r.as_ptr(), x.as_ptr());
        // Lanes `o..o+8` into accumulator `a`.
        let fma8 = |a: &mut [float32x4_t; 2], o: usize| {
            for (half, ah) in a.iter_mut().enumerate() {
                let at = o + 4 * half;
                *ah = vfmaq_f32(*ah, f16x4(pr.add(2 * at)), vld1q_f32(px.add(at)));
            }
        };
        let mut acc = [[vdupq_n_f32(0.0); 2]; 4];
        let mut i = 0;
        while i + 32 <= k {
            for (j, a) in acc.iter_mut().enumerate() {
                fma8(a, i + 8 * j);
            }
            i += 32;
        }
        while i + 8 <= k {
            fma8(&mut acc[0], i);
            i += 8;
        }
        let sum_half = |h: usize| {
            vaddq_f32(
                vaddq_f32(acc[0][h], acc[1][h]),
                vaddq_f32(acc[2][h], acc[3][h]),
            )
        };
        let mut s = hsum8(sum_half(0), sum_half(1));
        while i < k {
            let h = u16::from_le_bytes([r[2 * i], r[2 * i + 1]]);
            s = half::f16::from_bits(h).to_f32().mul_add(x[i], s);
            i += 1;
        }
        s
    }
}
