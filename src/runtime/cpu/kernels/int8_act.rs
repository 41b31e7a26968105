//! GEMV for 4- and 8-bit symmetric NK weights (`q4f16_1`, `q8f16_1`) with the activation vector
//! quantized to int8 per block of 32 (`d = absmax/127`, `xq = round_half_even(x/d)`), so a
//! group's dot product is an exact integer sum (`maddubs` on AVX2) — the scheme llama.cpp uses for
//! its quantized dot products. It adds an error of up to `Σ|w|·d/2` from rounding `x`, see
//! `super::matmul_int8_activations`; the decode step uses it.
//!
//! q4: `Σ (q-7)·x ≈ s·d·Σ q·xq - 7·s·d·Σ xq`, the second term precomputed per block of `x`.
//! q8: `Σ (q-127)·x ≈ s·d·Σ (q-127)·xq` with `q - 127` in i8.

use super::matrix::f16_scale as scale;
use super::matrix::QMatrix;
use super::row_dot::{prefetch_row, rows_ahead};

/// Which weight codes a [`QuantizedX`] is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CodeOrder {
    /// The byte layout of a q4 group: the 16 low-nibble positions `0, 2, …, 30` first, then the
    /// high-nibble positions `1, 3, …, 31`.
    Nibbles,
    /// Position order (q8 groups store one code per byte).
    Positions,
}

/// `x` quantized per block of 32.
pub(super) struct QuantizedX {
    q: Vec<i8>,
    /// Block scales, zero-padded to a multiple of 8 blocks.
    d: Vec<f32>,
    /// `-7·d·Σ xq` per block (the q4 offset term), zero-padded like `d`.
    bias: Vec<f32>,
    order: CodeOrder,
}

/// `1.5·2^23`: adding and subtracting it rounds an f32 of magnitude below 2^22 to the nearest
/// integer, ties to even (the default rounding mode), without a libm call and vectorisably.
const ROUND_MAGIC: f32 = 12_582_912.0;

impl QuantizedX {
    /// `x.len()` must be a multiple of 32.
    pub fn new(x: &[f32], order: CodeOrder) -> QuantizedX {
        assert_eq!(x.len() % 32, 0);
        let blocks = x.len() / 32;
        let padded = blocks.div_ceil(8) * 8;
        let (mut q, mut d, mut bias) = (vec![0i8; x.len()], vec![0f32; padded], vec![0f32; padded]);
        for b in 0..blocks {
            let xs = &x[b * 32..b * 32 + 32];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let db = amax / 127.0;
            let mut codes = [0f32; 32];
            if db > 0.0 {
                // |v / db| <= 127 (up to rounding), far below 2^22.
                for (c, v) in codes.iter_mut().zip(xs) {
                    *c = ((v / db + ROUND_MAGIC) - ROUND_MAGIC).clamp(-127.0, 127.0);
                }
            }
            let mut sum = 0i32;
            let dst = &mut q[b * 32..b * 32 + 32];
            for (i, &c) in codes.iter().enumerate() {
                let c = c as i8;
                sum += c as i32;
                match order {
                    // Position i is nibble i % 2 of byte i / 2.
                    CodeOrder::Nibbles => dst[(i % 2) * 16 + i / 2] = c,
                    CodeOrder::Positions => dst[i] = c,
                }
            }
            d[b] = db;
            bias[b] = -7.0 * db * sum as f32;
        }
        QuantizedX { q, d, bias, order }
    }

    pub fn order(&self) -> CodeOrder {
        self.order
    }

    /// The codes, the block scales `d` and the q4 offset terms `bias` (both zero-padded to a
    /// multiple of 8 blocks).
    pub fn parts(&self) -> (&[i8], &[f32], &[f32]) {
        (&self.q, &self.d, &self.bias)
    }
}

/// Which kernel a row goes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bits {
    Four,
    Eight,
}

/// `out[j] ≈ Σ_k x[k]·w[n0 + j, k]` for a matrix accepted by `super::q4_nk::applies` (with `x`
/// in nibble order) or `super::q8_nk::applies` (position order), with `K % 32 == 0`.
pub(super) fn gemv_rows(m: &QMatrix, n0: usize, x: &QuantizedX, out: &mut [f32]) {
    assert_eq!(m.k % 32, 0);
    assert_eq!(x.q.len(), m.k);
    let bits = match (m.bits, x.order) {
        (4, CodeOrder::Nibbles) => Bits::Four,
        (8, CodeOrder::Positions) => Bits::Eight,
        other => panic!("int8-activation GEMV for {other:?}"),
    };
    let groups = m.k / 32;
    let rows_ahead = rows_ahead(m);
    #[cfg(target_arch = "x86_64")]
    let simd = super::simd::has_avx2();
    #[cfg(target_arch = "aarch64")]
    let neon = super::simd::has_neon().then(super::neon::has_dotprod);
    for (j, o) in out.iter_mut().enumerate() {
        let row = n0 + j;
        prefetch_row(m, row + rows_ahead);
        let (data, scales) = m.nk_row_bytes(row);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2/FMA/F16C present; `data` has 16 (q4) or 32 (q8) bytes, `scales` 2
            // bytes and `x.q` 32 codes per group; `x.d` and `x.bias` are padded to whole blocks
            // of 8 groups.
            *o = unsafe {
                match bits {
                    Bits::Four => avx2::row_dot_q4(data, scales, x, groups),
                    Bits::Eight => avx2::row_dot_q8(data, scales, x, groups),
                }
            };
            continue;
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(dot) = neon {
            // SAFETY: NEON present, and the dot-product extension where `dot`; the slices are
            // as for AVX2 above.
            *o = unsafe {
                match (bits, dot) {
                    (Bits::Four, true) => neon::row_dot_q4::<true>(data, scales, x, groups),
                    (Bits::Four, false) => neon::row_dot_q4::<false>(data, scales, x, groups),
                    (Bits::Eight, true) => neon::row_dot_q8::<true>(data, scales, x, groups),
                    (Bits::Eight, false) => neon::row_dot_q8::<false>(data, scales, x, groups),
                }
            };
            continue;
        }
        *o = match bits {
            Bits::Four => portable_row_dot_q4(data, scales, x, groups),
            Bits::Eight => portable_row_dot_q8(data, scales, x, groups),
        };
    }
}

/// The AVX2 kernels' lanes in plain code (the same operations in the same order, so the same
/// bits on every CPU): per group, lane `l < 4` sums the products of codes `4l..4l+4` with
/// `xq[4l..4l+4]`, lane `4 + l` those of codes `16+4l..` (q4: the high nibbles of bytes `4l..`)
/// with `xq[16+4l..]`; exact integers, then `acc[group parity][l] += sum·(s·d)`.
fn portable_lanes(
    scales: &[u8],
    x: &QuantizedX,
    groups: usize,
    lane_sums: impl Fn(usize) -> [i32; 8],
) -> [[f32; 8]; 2] {
    let mut acc = [[0f32; 8]; 2];
    for g in 0..groups {
        let c = scale(scales, g) * x.d[g];
        for (a, sum) in acc[g & 1].iter_mut().zip(lane_sums(g)) {
            *a = (sum as f32).mul_add(c, *a);
        }
    }
    acc
}

fn portable_row_dot_q4(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
    let acc = portable_lanes(scales, x, groups, |g| {
        let bytes: &[u8; 16] = data[g * 16..g * 16 + 16].try_into().expect("16 bytes");
        let xq: &[i8; 32] = x.q[g * 32..g * 32 + 32].try_into().expect("32 codes");
        let mut lanes = [0i32; 8];
        for (i, b) in bytes.iter().enumerate() {
            lanes[i / 4] += (b & 0x0F) as i32 * xq[i] as i32;
            lanes[4 + i / 4] += (b >> 4) as i32 * xq[16 + i] as i32;
        }
        lanes
    });
    // `Σ s·bias`, eight groups to a lane as the AVX2 kernel takes them (`x.bias` is zero-padded).
    let mut offset = [0f32; 8];
    for g in 0..groups {
        offset[g % 8] = scale(scales, g).mul_add(x.bias[g], offset[g % 8]);
    }
    super::simd::hsum8_of_sum(&acc[0], &acc[1]) + super::simd::hsum8(&offset)
}

fn portable_row_dot_q8(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
    let acc = portable_lanes(scales, x, groups, |g| {
        let codes: &[u8; 32] = data[g * 32..g * 32 + 32].try_into().expect("32 bytes");
        let xq: &[i8; 32] = x.q[g * 32..g * 32 + 32].try_into().expect("32 codes");
        let mut lanes = [0i32; 8];
        for (i, (&c, &v)) in codes.iter().zip(xq).enumerate() {
            lanes[i / 4] += (c as i32 - 127) * v as i32;
        }
        lanes
    });
    super::simd::hsum8_of_sum(&acc[0], &acc[1])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::simd::avx2::hsum;
    use super::QuantizedX;
    use std::arch::x86_64::*;

    /// `s·d` for the (up to) 8 groups from `g`, and the scales themselves.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_scales(
        scales: &[u8],
        x: &QuantizedX,
        g: usize,
        nb: usize,
    ) -> (__m256, [f32; 8]) {
        let sv = if nb == 8 {
            _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr().add(2 * g) as *const __m128i))
        } else {
            let mut buf = [0u8; 16];
            buf[..2 * nb].copy_from_slice(&scales[2 * g..2 * g + 2 * nb]);
            _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr() as *const __m128i))
        };
        let mut comb = [0f32; 8];
        _mm256_storeu_ps(
            comb.as_mut_ptr(),
            _mm256_mul_ps(sv, _mm256_loadu_ps(x.d.as_ptr().add(g))),
        );
        (sv, comb)
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 16·groups`,
    /// `scales.len() >= 2·groups`, `x.q.len() >= 32·groups`, `x.d`/`x.bias` padded to 8 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot_q4(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
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
            let (sv, comb) = block_scales(scales, x, g, nb);
            offset = _mm256_fmadd_ps(sv, _mm256_loadu_ps(x.bias.as_ptr().add(g)), offset);
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

    /// # Safety
    /// AVX2, FMA and F16C must be available; `data.len() >= 32·groups`,
    /// `scales.len() >= 2·groups`, `x.q.len() >= 32·groups`, `x.d` padded to 8 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn row_dot_q8(data: &[u8], scales: &[u8], x: &QuantizedX, groups: usize) -> f32 {
        assert!(data.len() >= 32 * groups && scales.len() >= 2 * groups);
        assert!(x.q.len() >= 32 * groups && x.d.len() >= groups.div_ceil(8) * 8);
        let off = _mm256_set1_epi8(127);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut g = 0;
        while g < groups {
            let nb = (groups - g).min(8);
            let (_, comb) = block_scales(scales, x, g, nb);
            for (i, &c) in comb.iter().enumerate().take(nb) {
                // Codes 0..=254 minus 127 fit in i8 (wrapping subtraction gives the right bits).
                let w = _mm256_sub_epi8(
                    _mm256_loadu_si256(data.as_ptr().add(32 * (g + i)) as *const __m256i),
                    off,
                );
                let xv = _mm256_loadu_si256(x.q.as_ptr().add(32 * (g + i)) as *const __m256i);
                // |w| (u8, at most 127) × (x with w's sign): pairs at most 2·127·127, no i16
                // saturation.
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
                let p = _mm256_madd_epi16(p, ones);
                acc[i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(c), acc[i & 1]);
            }
            g += nb;
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::{dot4, f16x4, hsum8};
    use super::QuantizedX;
    use std::arch::aarch64::*;

    /// The scales of the (up to) 8 groups from `g` as two halves (zero-padded), and `s·d` for
    /// each: the AVX2 kernel's `block_scales`.
    ///
    /// # Safety
    /// `scales` holds groups `g..g+nb`; `x.d` is padded to whole blocks of 8 groups.
    #[inline(always)]
    unsafe fn block_scales(
        scales: &[u8],
        x: &QuantizedX,
        g: usize,
        nb: usize,
    ) -> ([float32x4_t; 2], [f32; 8]) {
        let mut buf = [0u8; 16];
        let p = if nb == 8 {
            scales.as_ptr().add(2 * g)
        } else {
            buf[..2 * nb].copy_from_slice(&scales[2 * g..2 * g + 2 * nb]);
            buf.as_ptr()
        };
        let sv = [f16x4(p), f16x4(p.add(8))];
        let mut comb = [0f32; 8];
        for (h, s) in sv.iter().enumerate() {
            let d = vld1q_f32(x.d.as_ptr().add(g + 4 * h));
            vst1q_f32(comb.as_mut_ptr().add(4 * h), vmulq_f32(*s, d));
        }
        (sv, comb)
    }

    /// `acc += Σ code·xq · c` for one group, as the AVX2 kernel's 8 lanes: lanes 0–3 sum the
    /// 4-byte blocks of `w0` against `xq[..16]`, lanes 4–7 those of `w1` against `xq[16..]`.
    #[inline(always)]
    unsafe fn group<const DOT: bool>(
        w0: int8x16_t,
        w1: int8x16_t,
        xq: *const i8,
        c: f32,
        acc: &mut [float32x4_t; 2],
    ) {
        let zero = vdupq_n_s32(0);
        let sums = [
            dot4::<DOT>(zero, w0, vld1q_s8(xq)),
            dot4::<DOT>(zero, w1, vld1q_s8(xq.add(16))),
        ];
        for (a, p) in acc.iter_mut().zip(sums) {
            *a = vfmaq_f32(*a, vcvtq_f32_s32(p), vdupq_n_f32(c));
        }
    }

    /// `avx2::row_dot_q4` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and
    /// every lane's operations the same (the integer sums are exact), so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available, and with `DOT` the dot-product extension; `data.len() >=
    /// 16·groups`, `scales.len() >= 2·groups`, `x.q.len() >= 32·groups`, `x.d`/`x.bias` padded to
    /// 8 blocks.
    pub unsafe fn row_dot_q4<const DOT: bool>(
        data: &[u8],
        scales: &[u8],
        x: &QuantizedX,
        groups: usize,
    ) -> f32 {
        assert!(data.len() >= 16 * groups && scales.len() >= 2 * groups);
        assert!(x.q.len() >= 32 * groups && x.d.len() >= groups.div_ceil(8) * 8);
        assert!(x.bias.len() == x.d.len());
        let mask = vdupq_n_u8(0x0F);
        let zero = vdupq_n_f32(0.0);
        // acc[group parity][half]
        let mut acc = [[zero; 2]; 2];
        let mut offset = [zero; 2];
        let mut g = 0;
        while g < groups {
            let nb = (groups - g).min(8);
            let (sv, comb) = block_scales(scales, x, g, nb);
            for (h, o) in offset.iter_mut().enumerate() {
                *o = vfmaq_f32(*o, sv[h], vld1q_f32(x.bias.as_ptr().add(g + 4 * h)));
            }
            for (i, &c) in comb.iter().enumerate().take(nb) {
                let b = vld1q_u8(data.as_ptr().add(16 * (g + i)));
                // Low nibbles meet x's first 16 codes, high nibbles the next 16 (nibble order).
                let lo = vreinterpretq_s8_u8(vandq_u8(b, mask));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(b));
                group::<DOT>(lo, hi, x.q.as_ptr().add(32 * (g + i)), c, &mut acc[i & 1]);
            }
            g += nb;
        }
        let sum = hsum8(
            vaddq_f32(acc[0][0], acc[1][0]),
            vaddq_f32(acc[0][1], acc[1][1]),
        );
        sum + hsum8(offset[0], offset[1])
    }

    /// `avx2::row_dot_q8`, lane for lane as [`row_dot_q4`].
    ///
    /// # Safety
    /// NEON must be available, and with `DOT` the dot-product extension; `data.len() >=
    /// 32·groups`, `scales.len() >= 2·groups`, `x.q.len() >= 32·groups`, `x.d` padded to 8 blocks.
    pub unsafe fn row_dot_q8<const DOT: bool>(
        data: &[u8],
        scales: &[u8],
        x: &QuantizedX,
        groups: usize,
    ) -> f32 {
        assert!(data.len() >= 32 * groups && scales.len() >= 2 * groups);
        assert!(x.q.len() >= 32 * groups && x.d.len() >= groups.div_ceil(8) * 8);
        let off = vdupq_n_u8(127);
        let zero = vdupq_n_f32(0.0);
        let mut acc = [[zero; 2]; 2];
        let mut g = 0;
        while g < groups {
            let nb = (groups - g).min(8);
            let (_, comb) = block_scales(scales, x, g, nb);
            for (i, &c) in comb.iter().enumerate().take(nb) {
                let p = data.as_ptr().add(32 * (g + i));
                // Codes 0..=254 minus 127 fit in i8 (wrapping subtraction gives the right bits).
                let w0 = vreinterpretq_s8_u8(vsubq_u8(vld1q_u8(p), off));
                let w1 = vreinterpretq_s8_u8(vsubq_u8(vld1q_u8(p.add(16)), off));
                group::<DOT>(w0, w1, x.q.as_ptr().add(32 * (g + i)), c, &mut acc[i & 1]);
            }
            g += nb;
        }
        hsum8(
            vaddq_f32(acc[0][0], acc[1][0]),
            vaddq_f32(acc[0][1], acc[1][1]),
        )
    }
}
