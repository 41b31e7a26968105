//! Quantization of one row `[K]` of a matrix into packed words and per-group scales. Rows are
//! independent, so the caller can run them in any order on any number of threads.

use crate::formats::dtype::DType;
use crate::quant::geometry::Geometry;
use crate::quant::rounding::{bf16_rne_bits, round_half_even, round_to};

/// Put `code` at position `p` (along K) of a row's words: word `p / per_word`, bits
/// `[slot·bits, (slot+1)·bits)` with `slot = p % per_word` (LSB first). Positions are per group:
/// group `g` starts at word `g · words_per_group`.
fn put_code(geo: &Geometry, words: &mut [u32], g: usize, i: usize, code: u32) {
    let w = g * geo.words_per_group + i / geo.per_word;
    words[w] |= code << ((i % geo.per_word) as u32 * geo.bits);
}

/// Symmetric quantization of one row, every arithmetic step rounded to `dtype`:
/// `s = dtype(max(absmax, dtype(1e-4)) / maxq)`, `t = dtype(w / s)`, `u = dtype(t + maxq)`,
/// `q = clamp(round_half_even(u), 0, 2·maxq)`. `words` (zeroed, `words_per_row` long) receives
/// the codes, `scales` (`n_group` long) the scales as exact `dtype` values.
/// `row` holds finite values already rounded to `dtype`.
pub(crate) fn quantize_row_sym(
    geo: &Geometry,
    dtype: DType,
    row: &[f32],
    words: &mut [u32],
    scales: &mut [f32],
) {
    let maxq = ((1u32 << (geo.bits - 1)) - 1) as f32;
    let floor = round_to(dtype, 1e-4);
    for (g, scale) in scales.iter_mut().enumerate() {
        let vals = &row[g * geo.group..g * geo.group + geo.group_len(g)];
        // Absmax of values exactly representable in `dtype` is itself exact: no rounding.
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
        let s = round_to(dtype, amax / maxq);
        *scale = s;
        for (i, &w) in vals.iter().enumerate() {
            let t = round_to(dtype, w / s);
            let u = round_to(dtype, t + maxq);
            let q = round_half_even(u).clamp(0.0, 2.0 * maxq) as u32;
            put_code(geo, words, g, i, q);
        }
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
