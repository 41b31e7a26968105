//! Experimental: GEMV for q4 NK weights (`q4f16_1`) with the activation vector quantized to int8
//! per block of 32 (`d = absmax/127`, `xq = round_half_even(x/d)`), so a group's dot product is
//! an exact integer sum (`maddubs` on AVX2). Not the default: it adds an error of up to
//! `Σ|w|·d/2` from rounding `x`, see `super::matmul_int8_activations`.
//!
//! `Σ (q-7)·x ≈ s·d·Σ q·xq - 7·s·d·Σ xq`: the second term is precomputed per block of `x`.

use super::matrix::QMatrix;

/// `x` quantized per block of 32, codes reordered to the byte layout of a q4 group: the 16
/// low-nibble positions `0, 2, …, 30` first, then the high-nibble positions `1, 3, …, 31`.
pub(super) struct QuantizedX {
    q: Vec<i8>,
    /// Block scales, zero-padded to a multiple of 8 blocks.
    d: Vec<f32>,
    /// `-7·d·Σ xq` per block (the offset term), zero-padded like `d`.
    bias: Vec<f32>,
}

impl QuantizedX {
    /// `x.len()` must be a multiple of 32.
    pub fn new(x: &[f32]) -> QuantizedX {
        assert_eq!(x.len() % 32, 0);
        let blocks = x.len() / 32;
        let padded = blocks.div_ceil(8) * 8;
        let (mut q, mut d, mut bias) = (vec![0i8; x.len()], vec![0f32; padded], vec![0f32; padded]);
        for b in 0..blocks {
            let xs = &x[b * 32..b * 32 + 32];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let db = amax / 127.0;
            let mut sum = 0i32;
            if db > 0.0 {
                for (i, v) in xs.iter().enumerate() {
                    let c = (v / db).round_ties_even().clamp(-127.0, 127.0) as i8;
                    sum += c as i32;
                    // Position i is nibble i % 2 of byte i / 2.
                    q[b * 32 + (i % 2) * 16 + i / 2] = c;
                }
            }
            d[b] = db;
            bias[b] = -7.0 * db * sum as f32;
        }
        QuantizedX { q, d, bias }
    }
}

fn row_bytes<'a>(m: &QMatrix<'a>, row: usize) -> (&'a [u8], &'a [u8]) {
    let wb = m.words_per_row * 4;
    (
        &m.data[row * wb..(row + 1) * wb],
        &m.scales[row * m.n_group * 2..(row + 1) * m.n_group * 2],
    )
}

/// `out[j] ≈ Σ_k x[k]·w[n0 + j, k]` for a matrix accepted by `super::q4_nk::applies` with
/// `K % 32 == 0`.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &QuantizedX, out: &mut [f32]) {
    assert_eq!(m.k % 32, 0);
    assert_eq!(x.q.len(), m.k);
    let groups = m.k / 32;
    #[cfg(target_arch = "x86_64")]
    let simd = super::simd::has_avx2();
    for (j, o) in out.iter_mut().enumerate() {
        let (data, scales) = row_bytes(m, n0 + j);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2/FMA/F16C present; `data` has 16 bytes, `scales` 2 bytes and `x.q` 32
            // codes per group; `x.d` and `x.bias` are padded to whole blocks of 8 groups.
            *o = unsafe { avx2::row_dot(data, scales, x, groups) };
            continue;
        }
        *o = portable_row_dot(data, scales, x, groups);
    }
}

fn portable_row_dot(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
    let (mut total, mut offset) = (0f32, 0f32);
    for g in 0..groups {
        let s =
            half::f16::from_bits(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]])).to_f32();
        let xq = &x.q[g * 32..g * 32 + 32];
        let mut isum = 0i32;
        for (i, b) in data[g * 16..g * 16 + 16].iter().enumerate() {
            isum += (b & 0x0F) as i32 * xq[i] as i32 + (b >> 4) as i32 * xq[16 + i] as i32;
        }
        total = (isum as f32).mul_add(s * x.d[g], total);
        offset = s.mul_add(x.bias[g], offset);
    }
    total + offset
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::hsum;
    use super::QuantizedX;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 16·groups`,
    /// `scales.len() >= 2·groups`, `x.q.len() >= 32·groups`, `x.d`/`x.bias` padded to 8 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups);
        assert!(x.q.len() >= 32 * groups && x.d.len() >= groups.div_ceil(8) * 8);
        assert!(x.bias.len() == x.d.len());
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut offset = _mm256_setzero_ps();
        let mut g = 0;
        while g < groups {
            let nb = (groups - g).min(8);
            let sv = if nb == 8 {
                _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(2 * g) as *const __m128i))
            } else {
                let mut buf = [0u8; 16];
                for (i, b) in buf.iter_mut().enumerate().take(2 * nb) {
                    *b = scales[2 * g + i];
                }
                _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
            };
            offset = _mm256_fmadd_ps(sv, _mm256_loadu_ps(x.bias.as_ptr().add(g)), offset);
            let mut comb = [0f32; 8];
            _mm256_storeu_ps(
                comb.as_mut_ptr(),
                _mm256_mul_ps(sv, _mm256_loadu_ps(x.d.as_ptr().add(g))),
            );
            for (i, &c) in comb.iter().enumerate().take(nb) {
                let b = _mm_loadu_si128(data.as_ptr().add(16 * (g + i)) as *const __m128i);
                let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), mask);
                let xv = _mm256_loadu_si256(x.q.as_ptr().add(32 * (g + i)) as *const __m256i);
                // u8 (0..15) × i8 pairs: at most 2·15·127, no i16 saturation.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
                acc[i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(c), acc[i & 1]);
            }
            g += nb;
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(offset)
    }
}
