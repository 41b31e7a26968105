//! Fast path for raw float16 matrices (`q0f16`, and f16 embeddings / heads of other schemes).

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
    // Convert a block at a time (half uses F16C / NEON where it can), then an f32 dot.
    let mut buf = [0f32; 256];
    let mut s = 0.0;
    for (c, xs) in r.chunks(512).zip(x.chunks(256)) {
        let b = &mut buf[..xs.len()];
        super::matrix::read_floats(DType::F16, c, b);
        s += super::simd::dot_portable(b, xs);
    }
    s
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
