//! How a symmetric scheme picks each group's scale.
//!
//! MLC's build.py uses `s = absmax / maxq` and codes `0..=2·maxq`. That never uses the top code
//! `2^bits − 1` (which decodes to `(maxq + 1)·s`) and, when one value dominates a group, spends
//! most levels on a range nobody uses. [`ScaleRule::Mse`] keeps the stored format and the decode
//! formula `(q − maxq)·s` unchanged (any reader of MLC's layout decodes it) and chooses, per
//! group, the scale with the smallest squared error among a few candidates:
//! - the absmax scale (so it is never worse than build.py),
//! - scales that put the group's largest-magnitude value `m` on the top code side:
//!   `s = m / (top − maxq + δ)` for a few `δ` (a negative `m` gives a negative scale, so the top
//!   code serves whichever sign is largest),
//! - two least-squares refinements `s = Σ w·L / Σ L²` of the best so far (`L = q − maxq`).
//!
//! On SmolLM2-135M's Q4_1 weights this takes q4f16_1's relative weight error from 0.102 to 0.078.
//! Every candidate is rounded to the model dtype and scored with the exact codes the artifact will
//! store, in a fixed order with ties going to the earlier one: the result depends only on the
//! group's values, never on threads or machine.

use crate::formats::dtype::DType;
use crate::quant::rounding::{round_half_even, round_to};
use crate::quant::row_quant::{group_codes, MAX_GROUP};
use serde::Serialize;

/// The per-group scale choice of symmetric schemes (asymmetric schemes always use min/max).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRule {
    /// build.py's rule: `absmax / maxq`, codes `0..=2·maxq`. Bit-identical to MLC's output
    /// (except ties, which round to even).
    Absmax,
    /// The smallest squared error over the candidates above (the default).
    #[default]
    Mse,
}

impl ScaleRule {
    pub const NAMES: [&'static str; 2] = ["mse", "absmax"];

    pub fn name(self) -> &'static str {
        match self {
            ScaleRule::Absmax => "absmax",
            ScaleRule::Mse => "mse",
        }
    }

    pub fn from_name(name: &str) -> Option<ScaleRule> {
        match name {
            "absmax" => Some(ScaleRule::Absmax),
            "mse" => Some(ScaleRule::Mse),
            _ => None,
        }
    }

    /// The largest code this rule writes for `bits`. The top code `2^bits − 1` is used by Mse
    /// except at 8 bits, where the CPU runtime holds `q − maxq` in an i8 and 128 would not fit.
    pub fn top_code(self, bits: u32) -> u32 {
        let maxq = (1u32 << (bits - 1)) - 1;
        match self {
            ScaleRule::Mse if bits < 8 => 2 * maxq + 1,
            _ => 2 * maxq,
        }
    }
}

/// The offsets `δ` tried after the absmax candidate (chosen on SmolLM2's weights: a finer grid
/// gained under 0.2% relative error).
const DELTAS: [f32; 6] = [-0.6, -0.3, 0.0, 0.3, 0.6, 0.9];

/// The code of `w` for scale `s`: `clamp(rne(dtype(dtype(w / s) + maxq)), 0, top)` — every step
/// rounded to `dtype`, as the artifact's format documents.
pub(crate) fn code(dtype: DType, w: f32, s: f32, maxq: f32, top: f32) -> u32 {
    let t = round_to(dtype, w / s);
    let u = round_to(dtype, t + maxq);
    round_half_even(u).clamp(0.0, top) as u32
}

/// Squared reconstruction error of `vals` with scale `s` (f64, summed in order).
fn sq_error(dtype: DType, vals: &[f32], s: f32, maxq: f32, top: f32) -> f64 {
    let mut codes = [0u32; MAX_GROUP];
    group_codes(dtype, vals, s, maxq, top, &mut codes);
    vals.iter()
        .zip(&codes)
        .map(|(&w, &q)| {
            let d = ((q as f32 - maxq) * s) as f64 - w as f64;
            d * d
        })
        .sum()
}

/// The least-squares scale for the codes `s` gives, rounded to `dtype`; None when degenerate.
fn refine(dtype: DType, vals: &[f32], s: f32, maxq: f32, top: f32) -> Option<f32> {
    let mut codes = [0u32; MAX_GROUP];
    group_codes(dtype, vals, s, maxq, top, &mut codes);
    let (mut num, mut den) = (0f64, 0f64);
    for (&w, &q) in vals.iter().zip(&codes) {
        let l = (q as f32 - maxq) as f64;
        num += w as f64 * l;
        den += l * l;
    }
    let r = round_to(dtype, (num / den) as f32);
    (den > 0.0 && r.is_finite() && r != 0.0).then_some(r)
}

/// The scale of one group of finite `dtype` values under `rule`. `floor` is the smallest absmax
/// used (a zero group would otherwise divide by zero).
pub(crate) fn group_scale(
    rule: ScaleRule,
    dtype: DType,
    vals: &[f32],
    bits: u32,
    floor: f32,
) -> f32 {
    let maxq = ((1u32 << (bits - 1)) - 1) as f32;
    // Absmax of values exactly representable in `dtype` is itself exact: no rounding.
    let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
    let absmax_scale = round_to(dtype, amax.max(floor) / maxq);
    if rule == ScaleRule::Absmax || amax < floor {
        return absmax_scale;
    }
    let top = rule.top_code(bits) as f32;
    // The first value of largest magnitude, with its sign.
    let m = vals
        .iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let mut best = absmax_scale;
    let mut best_err = sq_error(dtype, vals, best, maxq, top);
    let consider = |s: f32, best: &mut f32, best_err: &mut f64| {
        if s.is_finite() && s != 0.0 {
            let e = sq_error(dtype, vals, s, maxq, top);
            if e < *best_err {
                (*best, *best_err) = (s, e);
            }
        }
    };
    for d in DELTAS {
        consider(
            round_to(dtype, m / (top - maxq + d)),
            &mut best,
            &mut best_err,
        );
    }
    for _ in 0..2 {
        if let Some(s) = refine(dtype, vals, best, maxq, top) {
            consider(s, &mut best, &mut best_err);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(rule: ScaleRule, vals: &[f32], bits: u32) -> f64 {
        let maxq = ((1u32 << (bits - 1)) - 1) as f32;
        let s = group_scale(rule, DType::F32, vals, bits, 1e-4);
        sq_error(DType::F32, vals, s, maxq, rule.top_code(bits) as f32)
    }

    #[test]
    fn mse_is_never_worse_than_absmax_and_usually_better() {
        let mut seed = 7u64;
        let mut better = 0;
        for _ in 0..500 {
            let vals: Vec<f32> = (0..32)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                })
                .collect();
            for bits in [3, 4, 8] {
                let (a, m) = (
                    err(ScaleRule::Absmax, &vals, bits),
                    err(ScaleRule::Mse, &vals, bits),
                );
                assert!(m <= a, "bits {bits}: mse {m} > absmax {a}");
                better += (m < a * 0.95) as usize;
            }
        }
        assert!(
            better > 1000,
            "mse clearly better in only {better} of 1500 groups"
        );
    }

    #[test]
    fn a_dominant_negative_value_takes_the_top_code_with_a_negative_scale() {
        let mut vals = vec![0.1f32; 31];
        vals.push(-1.0);
        let s = group_scale(ScaleRule::Mse, DType::F32, &vals, 4, 1e-4);
        assert!(s < 0.0, "scale {s}");
        assert_eq!(code(DType::F32, -1.0, s, 7.0, 15.0), 15);
        let absmax = group_scale(ScaleRule::Absmax, DType::F32, &vals, 4, 1e-4);
        assert_eq!(absmax, 1.0 / 7.0);
    }

    #[test]
    fn zero_groups_and_eight_bits_keep_their_limits() {
        let zeros = [0f32; 32];
        let s = group_scale(
            ScaleRule::Mse,
            DType::F16,
            &zeros,
            4,
            round_to(DType::F16, 1e-4),
        );
        assert_eq!(s, round_to(DType::F16, round_to(DType::F16, 1e-4) / 7.0));
        assert_eq!(ScaleRule::Mse.top_code(8), 254);
        assert_eq!(ScaleRule::Mse.top_code(4), 15);
        assert_eq!(ScaleRule::Mse.top_code(3), 7);
        assert_eq!(ScaleRule::Absmax.top_code(4), 14);
    }
}
