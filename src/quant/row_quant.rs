//! Quantization of one row `[K]` of a matrix into packed words and per-group scales. Rows are
//! independent, so the caller can run them in any order on any number of threads.

use crate::formats::dtype::DType;
use crate::quant::geometry::Geometry;
use crate::quant::rounding::{bf16_rne_bits, round_half_even, round_to};
use crate::quant::scale_rule::{code, group_scale, ScaleRule};

/// Put `code` at position `p` (along K) of a row's words: word `p / per_word`, bits
/// `[slot·bits, (slot+1)·bits)` with `slot = p % per_word` (LSB first). Positions are per group:
/// group `g` starts at word `g · words_per_group`.
pub(crate) fn put_code(geo: &Geometry, words: &mut [u32], g: usize, i: usize, code: u32) {
    let w = g * geo.words_per_group + i / geo.per_word;
    words[w] |= code << ((i % geo.per_word) as u32 * geo.bits);
}

/// Symmetric quantization of one row, every arithmetic step rounded to `dtype`: each group's
/// scale `s` comes from [`group_scale`] (`rule`), then `t = dtype(w / s)`, `u = dtype(t + maxq)`,
/// `q = clamp(round_half_even(u), 0, top)` with `top = rule.top_code(bits)`. `words` (zeroed,
/// `words_per_row` long) receives the codes, `scales` (`n_group` long) the scales as exact
/// `dtype` values. `row` holds finite values already rounded to `dtype`.
pub(crate) fn quantize_row_sym(
    geo: &Geometry,
    dtype: DType,
    rule: ScaleRule,
    row: &[f32],
    words: &mut [u32],
    scales: &mut [f32],
) {
    let maxq = ((1u32 << (geo.bits - 1)) - 1) as f32;
    let top = rule.top_code(geo.bits) as f32;
    let floor = round_to(dtype, 1e-4);
    for (g, scale) in scales.iter_mut().enumerate() {
        let vals = &row[g * geo.group..g * geo.group + geo.group_len(g)];
        let s = group_scale(rule, dtype, vals, geo.bits, floor);
        *scale = s;
        let mut codes = [0u32; MAX_GROUP];
        group_codes(dtype, vals, s, maxq, top, &mut codes);
        for (i, &q) in codes[..vals.len()].iter().enumerate() {
            put_code(geo, words, g, i, q);
        }
    }
}

/// The largest group of any scheme (q3's 40) fits.
pub(crate) const MAX_GROUP: usize = 64;

/// `codes[i] = code(dtype, vals[i], s, maxq, top)` for a group (at most [`MAX_GROUP`] values),
/// 8 at a time with AVX + F16C for f16 (bit-identical to the scalar formula).
pub(crate) fn group_codes(
    dtype: DType,
    vals: &[f32],
    s: f32,
    maxq: f32,
    top: f32,
    codes: &mut [u32; MAX_GROUP],
) {
    assert!(vals.len() <= MAX_GROUP, "group of {} values", vals.len());
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::F16 && f16_simd::available() {
        while done + 8 <= vals.len() {
            let chunk: &mut [u32; 8] = (&mut codes[done..done + 8]).try_into().expect("8 codes");
            // SAFETY: `available()` checked AVX and F16C; the slice has 8 values from `done`.
            unsafe { f16_simd::sym_codes8(&vals[done..done + 8], s, maxq, top, chunk) };
            done += 8;
        }
    }
    for (c, &w) in codes[done..vals.len()].iter_mut().zip(&vals[done..]) {
        *c = code(dtype, w, s, maxq, top);
    }
}

/// The f16 symmetric code computation, 8 values at a time with AVX + F16C. Every step is the same
/// IEEE operation as the scalar path (f32 op, then round to f16 with round-to-nearest-even via
/// `vcvtps2ph`, round half to even via `vroundps`), so the codes are bit-identical to it.
#[cfg(target_arch = "x86_64")]
mod f16_simd {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx") && is_x86_feature_detected!("f16c")
    }

    #[target_feature(enable = "avx,f16c")]
    unsafe fn to_f16_and_back(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    /// `codes[k] = clamp(rne(f16(f16(w[k] / s) + maxq)), 0, top)` for 8 values.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn sym_codes8(w: &[f32], s: f32, maxq: f32, top: f32, codes: &mut [u32; 8]) {
        debug_assert!(w.len() >= 8);
        let x = _mm256_loadu_ps(w.as_ptr());
        let t = to_f16_and_back(_mm256_div_ps(x, _mm256_set1_ps(s)));
        let u = to_f16_and_back(_mm256_add_ps(t, _mm256_set1_ps(maxq)));
        let q = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(u);
        let q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), _mm256_set1_ps(top));
        let qi = _mm256_cvttps_epi32(q);
        _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, qi);
    }
}

/// Asymmetric quantization of one row, in f32: `s = (max - min) / (2^bits - 1)`,
/// `q = clamp(round_half_even((w - min) / s), 0, 2^bits - 1)`; a constant group (`s == 0`) gets
/// `q = 0`, which decodes to `min` exactly. `scale_min` receives `bf16(s) | bf16(min) << 16`.
/// Returns the index of the first group whose range overflows f32, if any.
pub(crate) fn quantize_row_asym(
    geo: &Geometry,
    row: &[f32],
    words: &mut [u32],
    scale_min: &mut [u32],
) -> Result<(), usize> {
    let qmax = ((1u32 << geo.bits) - 1) as f32;
    for (g, packed) in scale_min.iter_mut().enumerate() {
        let vals = &row[g * geo.group..g * geo.group + geo.group_len(g)];
        let mn = vals.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let mx = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s = (mx - mn) / qmax;
        if !s.is_finite() {
            return Err(g);
        }
        *packed = bf16_rne_bits(s) as u32 | (bf16_rne_bits(mn) as u32) << 16;
        if s == 0.0 {
            continue; // codes stay 0
        }
        for (i, &w) in vals.iter().enumerate() {
            let q = round_half_even((w - mn) / s).clamp(0.0, qmax) as u32;
            put_code(geo, words, g, i, q);
        }
    }
    Ok(())
}

#[cfg(test)]
mod simd_tests {
    use super::*;
    use crate::quant::scheme::{Encoding, Layout};

    /// The vectorised f16 path gives exactly the scalar formula's codes, ties and all.
    #[test]
    fn f16_codes_match_the_scalar_formula() {
        let enc = Encoding::Sym {
            bits: 4,
            group: 32,
            storage: DType::U32,
        };
        let k = 96;
        let geo = Geometry::new(&enc, Layout::NK, 1, k);
        let mut seed = 12345u64;
        for round in 0..200 {
            let row: Vec<f32> = (0..k)
                .map(|i| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let r = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                    // Some rounds use coarse values so that exact ties occur.
                    let v = if round % 2 == 0 {
                        (r * 16.0).round() / 8.0
                    } else {
                        r * 0.1
                    };
                    round_to(DType::F16, if i == 5 { 0.0 } else { v })
                })
                .collect();
            for rule in [ScaleRule::Absmax, ScaleRule::Mse] {
                let mut words = vec![0u32; geo.words_per_row];
                let mut scales = vec![0f32; geo.n_group];
                quantize_row_sym(&geo, DType::F16, rule, &row, &mut words, &mut scales);
                let top = rule.top_code(4) as f32;
                for (i, &w) in row.iter().enumerate() {
                    let g = i / 32;
                    let s = scales[g];
                    let t = round_to(DType::F16, w / s);
                    let u = round_to(DType::F16, t + 7.0);
                    let want = round_half_even(u).clamp(0.0, top) as u32;
                    let got = (words[g * 4 + (i % 32) / 8] >> ((i % 8) * 4)) & 0xF;
                    assert_eq!(got, want, "{rule:?} round {round}, value {i} = {w}");
                }
            }
        }
    }
}
