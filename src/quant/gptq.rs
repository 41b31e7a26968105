//! GPTQ (Frantar et al., 2022, "Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers"): choose each weight's code so that the *layer output* on calibration inputs is
//! preserved, not the weight itself. Columns (along K) are quantized in order; the error a column
//! makes is spread over the columns not yet quantized through the inverse Hessian `H⁻¹`, where
//! `H = Σ xᵀx` over the calibration rows `x` the layer sees.
//!
//! The stored format does not change: the result is ordinary codes and group parameters of the
//! scheme, which any reader of the scheme decodes. Group parameters (scales, min) are fitted when
//! the algorithm reaches a group's first column, from the group's *updated* values, with the same
//! rule as round-to-nearest quantization ([`ScaleRule`] for symmetric schemes).
//!
//! Determinism: every sum runs in a fixed order (rows and columns are split across threads, never
//! a reduction), multiplications and subtractions are separate IEEE operations (Rust never fuses
//! them), so the codes depend only on the weights and `H`, not on the machine or thread count.

use crate::formats::dtype::DType;
use crate::quant::rounding::{bf16_rne_bits, round_half_even, round_to};
use crate::quant::row_quant::MAX_GROUP;
use crate::quant::scale_rule::{code, group_scale, ScaleRule};
use crate::quant::scheme::Encoding;
use anyhow::Result;
use rayon::prelude::*;

/// The default dampening: `λ = 0.01 · mean(diag H)` is added to the diagonal (GPTQ's default).
pub const DEFAULT_DAMP: f64 = 0.01;

/// `H = Σ xᵀx` over the calibration rows one weight multiplies (its input activations), f32,
/// symmetric `[k, k]`.
#[derive(Debug, Clone)]
pub struct Hessian {
    k: usize,
    h: Vec<f32>,
}

impl Hessian {
    /// From the Gram matrix `XᵀX` of the calibration inputs `X` (`[k, k]`, row-major; the caller
    /// computes it with a fast matrix product).
    pub fn from_gram(k: usize, gram: Vec<f32>) -> Hessian {
        assert_eq!(gram.len(), k * k, "the Gram matrix is [k, k]");
        Hessian { k, h: gram }
    }

    /// From the rows of `x` (`[t, k]`), directly (the tests' small inputs).
    #[cfg(test)]
    pub fn from_rows(k: usize, x: &[f32]) -> Hessian {
        let mut h = vec![0f32; k * k];
        for row in x.chunks_exact(k) {
            for (i, &xi) in row.iter().enumerate() {
                for (hij, &xj) in h[i * k..(i + 1) * k].iter_mut().zip(row) {
                    *hij += xi * xj;
                }
            }
        }
        Hessian { k, h }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.h[i * self.k + j]
    }
}

/// `Σ a[i]·b[i]` with eight independent lanes of separate multiplies and adds: vectorisable,
/// and the same bits on every CPU.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// The upper-triangular `U` with `(H + λI)⁻¹ = Uᵀ U`, row-major `[k, k]`, and which columns never
/// saw a non-zero input ("dead": their weights do not matter and are set to 0). f32 throughout,
/// as GPTQ's reference implementation.
///
/// With `J` the order-reversing permutation, the lower Cholesky factor `L` of `J H J` gives
/// `H = V Vᵀ` with `V = J L J` upper-triangular, so `H⁻¹ = (V⁻¹)ᵀ V⁻¹` and `U = V⁻¹`: one
/// factorisation and one triangular inverse.
pub fn inverse_factor(h: &Hessian, damp: f64) -> Result<(Vec<f32>, Vec<bool>)> {
    let k = h.k;
    let dead: Vec<bool> = (0..k).map(|i| h.at(i, i) == 0.0).collect();
    let live_diag: f64 = (0..k)
        .filter(|&i| !dead[i])
        .map(|i| h.at(i, i) as f64)
        .sum();
    let mean_diag = if dead.iter().all(|&d| d) {
        1.0
    } else {
        live_diag / k as f64
    };
    let lambda = (damp * mean_diag) as f32;
    // a[i][j] = (H + λI)[k-1-i][k-1-j], dead diagonals set to 1 (their rows/columns are 0).
    let rev = |i: usize| k - 1 - i;
    let mut l = vec![0f32; k * k];
    l.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate().take(i + 1) {
            let (oi, oj) = (rev(i), rev(j));
            *v = if oi == oj {
                if dead[oi] {
                    1.0
                } else {
                    h.at(oi, oi) + lambda
                }
            } else if dead[oi] || dead[oj] {
                0.0
            } else {
                h.at(oi, oj)
            };
        }
    });
    cholesky_lower_in_place(&mut l, k)?;
    // V[i][j] = L[k-1-i][k-1-j] (upper), stored row-major so that the solves read rows.
    let mut v = vec![0f32; k * k];
    v.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (j, x) in row.iter_mut().enumerate().skip(i) {
            *x = l[rev(i) * k + rev(j)];
        }
    });
    drop(l);
    // U = V⁻¹, column by column (columns are independent): solve V u = e_j, u[i] = 0 for i > j.
    let cols: Vec<Vec<f32>> = (0..k)
        .into_par_iter()
        .map(|j| {
            let mut u = vec![0f32; j + 1];
            u[j] = 1.0 / v[j * k + j];
            for i in (0..j).rev() {
                let s = dot8(&v[i * k + i + 1..i * k + j + 1], &u[i + 1..]);
                u[i] = -s / v[i * k + i];
            }
            u
        })
        .collect();
    let mut out = vec![0f32; k * k];
    for (j, col) in cols.iter().enumerate() {
        for (i, &x) in col.iter().enumerate() {
            out[i * k + j] = x;
        }
    }
    Ok((out, dead))
}

/// In-place lower Cholesky factorisation of the lower triangle of `a` (`[k, k]` row-major).
fn cholesky_lower_in_place(a: &mut [f32], k: usize) -> Result<()> {
    for j in 0..k {
        let (head, tail) = a.split_at_mut((j + 1) * k);
        let row_j = &mut head[j * k..];
        let d = row_j[j] - dot8(&row_j[..j], &row_j[..j]);
        if d.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            crate::user_bail!(
                "GPTQ: the calibration Hessian is not positive definite at column {j} (pivot {d}); \
                 raise `damp` in the recipe's [calibration] table or use more calibration text"
            );
        }
        let d = d.sqrt();
        row_j[j] = d;
        let row_j: &[f32] = row_j;
        tail.par_chunks_mut(k).for_each(|row_i| {
            row_i[j] = (row_i[j] - dot8(&row_i[..j], &row_j[..j])) / d;
        });
    }
    Ok(())
}

/// How one group of a row is fitted, coded and decoded, for each scheme encoding.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GroupGrid {
    /// Symmetric: scale in the model dtype from [`group_scale`], codes by [`code`].
    Sym {
        dtype: DType,
        rule: ScaleRule,
        bits: u32,
    },
    /// Asymmetric: `s = (max − min)/(2^bits − 1)` and `min`, both stored as bf16.
    Asym { bits: u32 },
}

/// A fitted group: what to store (`stored`: the f32 scale, or the packed bf16×2 word as bits)
/// and the decoding constants.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GroupParams {
    pub stored: f32,
    pub packed: u32,
    scale: f32,
    min: f32,
}

impl GroupGrid {
    pub fn for_encoding(encoding: &Encoding, dtype: DType, rule: ScaleRule) -> GroupGrid {
        match *encoding {
            Encoding::Sym { bits, .. } => GroupGrid::Sym { dtype, rule, bits },
            Encoding::AsymBf16x2 { bits, .. } => GroupGrid::Asym { bits },
            Encoding::None => unreachable!("unquantized schemes have no grid"),
        }
    }

    fn maxq(bits: u32) -> f32 {
        ((1u32 << (bits - 1)) - 1) as f32
    }

    /// Fits a group; None when its range is not finite (the weights diverged).
    pub fn fit(&self, vals: &[f32]) -> Option<GroupParams> {
        match *self {
            GroupGrid::Sym { dtype, rule, bits } => {
                let mut rounded = [0f32; MAX_GROUP];
                for (r, &v) in rounded.iter_mut().zip(vals) {
                    *r = round_to(dtype, v);
                }
                let rounded = &rounded[..vals.len()];
                if rounded.iter().any(|v| !v.is_finite()) {
                    return None;
                }
                let s = group_scale(rule, dtype, rounded, bits, round_to(dtype, 1e-4));
                Some(GroupParams {
                    stored: s,
                    packed: 0,
                    scale: s,
                    min: 0.0,
                })
            }
            GroupGrid::Asym { bits } => {
                let mn = vals.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let mx = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let s = (mx - mn) / ((1u32 << bits) - 1) as f32;
                if !s.is_finite() {
                    return None;
                }
                let packed = bf16_rne_bits(s) as u32 | (bf16_rne_bits(mn) as u32) << 16;
                let (scale, min) = crate::quant::decode::unpack_scale_min(packed);
                Some(GroupParams {
                    stored: 0.0,
                    packed,
                    scale,
                    min,
                })
            }
        }
    }

    pub fn code(&self, w: f32, p: &GroupParams) -> u32 {
        match *self {
            GroupGrid::Sym { dtype, rule, bits } => code(
                dtype,
                w,
                p.scale,
                Self::maxq(bits),
                rule.top_code(bits) as f32,
            ),
            GroupGrid::Asym { bits } => {
                if p.scale == 0.0 {
                    return 0;
                }
                let qmax = ((1u32 << bits) - 1) as f32;
                round_half_even((w - p.min) / p.scale).clamp(0.0, qmax) as u32
            }
        }
    }

    /// The value a reader decodes (exactly `dequantize_param`'s formula).
    pub fn value(&self, q: u32, p: &GroupParams) -> f32 {
        match *self {
            GroupGrid::Sym { dtype, bits, .. } => {
                round_to(dtype, (q as f32 - Self::maxq(bits)) * p.scale)
            }
            GroupGrid::Asym { .. } => q as f32 * p.scale + p.min,
        }
    }
}

/// Rows handled together: each row of `U` is loaded once per block.
const ROW_BLOCK: usize = 16;

/// The column order GPTQ visits: natural (each group fitted from its updated values when the
/// algorithm reaches it), or by decreasing `diag(H)` ("act-order": the columns whose inputs are
/// largest go first, while most columns are left to absorb their error), with every group fitted
/// up front from the original values ("static groups"), so the stored groups stay contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnOrder {
    Natural,
    ActOrder,
}

/// The permutation [`ColumnOrder`] gives for `h` (`perm[j]` = the column visited j-th); ties keep
/// the natural order.
pub fn column_order(h: &Hessian, order: ColumnOrder) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..h.k).collect();
    if order == ColumnOrder::ActOrder {
        perm.sort_by(|&a, &b| h.at(b, b).total_cmp(&h.at(a, a)));
    }
    perm
}

impl Hessian {
    /// `P H Pᵀ` for the visiting order `perm`.
    pub fn permuted(&self, perm: &[usize]) -> Hessian {
        let k = self.k;
        let mut h = vec![0f32; k * k];
        h.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = self.at(perm[i], perm[j]);
            }
        });
        Hessian { k, h }
    }
}

/// GPTQ on the rows of a `[n, k]` matrix with groups of `group` along K, visiting the columns in
/// the order `perm` (natural order: groups fitted as they are reached; any other order: static
/// groups). `u` and `dead` come from [`inverse_factor`] of the Hessian permuted by `perm`.
/// Returns, row-major in the original column order, each weight's code, each group's parameters
/// (`[n, n_group]`) and each weight's decoded value; `Err((row, group))` names a group whose
/// values overflowed.
#[allow(clippy::type_complexity)]
pub(crate) fn gptq_codes(
    grid: &GroupGrid,
    group: usize,
    values: &[f32],
    k: usize,
    perm: &[usize],
    u: &[f32],
    dead: &[bool],
) -> Result<(Vec<u8>, Vec<GroupParams>, Vec<f32>), (usize, usize)> {
    let n = values.len() / k;
    let n_group = k.div_ceil(group);
    let mut codes = vec![0u8; n * k];
    let mut params = vec![GroupParams::default(); n * n_group];
    let mut decoded = vec![0f32; n * k];
    let natural = perm.iter().enumerate().all(|(j, &c)| j == c);
    let results: Vec<Result<(), (usize, usize)>> = codes
        .par_chunks_mut(ROW_BLOCK * k)
        .zip(params.par_chunks_mut(ROW_BLOCK * n_group))
        .zip(decoded.par_chunks_mut(ROW_BLOCK * k))
        .zip(values.par_chunks(ROW_BLOCK * k))
        .enumerate()
        .map(|(b, (((codes, params), decoded), rows))| {
            let block = Block {
                grid,
                group,
                k,
                perm,
                natural,
                u,
                dead,
            };
            block
                .run(rows, codes, params, decoded)
                .map_err(|(r, g)| (b * ROW_BLOCK + r, g))
        })
        .collect();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok((codes, params, decoded))
}

/// What every row block shares.
struct Block<'a> {
    grid: &'a GroupGrid,
    group: usize,
    k: usize,
    perm: &'a [usize],
    natural: bool,
    u: &'a [f32],
    dead: &'a [bool],
}

impl Block<'_> {
    /// GPTQ on up to [`ROW_BLOCK`] rows. The block is held column-major in visiting order
    /// (`w[j·rn + r]` is column `perm[j]` of row `r`) so that the update of one column touches
    /// contiguous memory.
    fn run(
        &self,
        rows: &[f32],
        codes: &mut [u8],
        params: &mut [GroupParams],
        decoded: &mut [f32],
    ) -> Result<(), (usize, usize)> {
        let (k, group, perm) = (self.k, self.group, self.perm);
        let rn = rows.len() / k;
        let n_group = k.div_ceil(group);
        let mut vals = [0f32; MAX_GROUP];
        if !self.natural {
            // Static groups: fitted from the original values of each contiguous group.
            for r in 0..rn {
                for g in 0..n_group {
                    let (start, len) = (g * group, group.min(k - g * group));
                    for (i, v) in vals[..len].iter_mut().enumerate() {
                        let c = start + i;
                        *v = if self.dead[c] { 0.0 } else { rows[r * k + c] };
                    }
                    params[r * n_group + g] = self.grid.fit(&vals[..len]).ok_or((r, g))?;
                }
            }
        }
        let mut w = vec![0f32; k * rn];
        for r in 0..rn {
            for (j, &c) in perm.iter().enumerate() {
                w[j * rn + r] = if self.dead[c] { 0.0 } else { rows[r * k + c] };
            }
        }
        let mut err = [0f32; ROW_BLOCK];
        for (j, &c) in perm.iter().enumerate() {
            let g = c / group;
            if self.natural && j % group == 0 {
                let len = group.min(k - j);
                for r in 0..rn {
                    for (i, v) in vals[..len].iter_mut().enumerate() {
                        *v = w[(j + i) * rn + r];
                    }
                    params[r * n_group + g] = self.grid.fit(&vals[..len]).ok_or((r, g))?;
                }
            }
            let d = self.u[j * k + j];
            for r in 0..rn {
                let p = &params[r * n_group + g];
                let x = w[j * rn + r];
                let q = self.grid.code(x, p);
                let deq = self.grid.value(q, p);
                codes[r * k + c] = q as u8;
                decoded[r * k + c] = deq;
                err[r] = (x - deq) / d;
            }
            let (_, rest) = w.split_at_mut((j + 1) * rn);
            let u_row = &self.u[j * k + j + 1..(j + 1) * k];
            for (col, &h) in rest.chunks_exact_mut(rn).zip(u_row) {
                for (x, &e) in col.iter_mut().zip(&err[..rn]) {
                    *x -= e * h;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn ident(k: usize) -> Vec<usize> {
        (0..k).collect()
    }

    fn matmul_t(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
        let (t, n) = (x.len() / k, w.len() / k);
        let mut y = vec![0f64; t * n];
        for a in 0..t {
            for b in 0..n {
                y[a * n + b] = (0..k)
                    .map(|c| x[a * k + c] as f64 * w[b * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn the_inverse_factor_reconstructs_the_inverse() {
        let k = 7;
        let mut seed = 3;
        let x: Vec<f32> = (0..20 * k).map(|_| lcg(&mut seed)).collect();
        let h = Hessian::from_rows(k, &x);
        let (u, dead) = inverse_factor(&h, 0.0).unwrap();
        assert!(dead.iter().all(|d| !d));
        // (Uᵀ U) · H = I
        for i in 0..k {
            for j in 0..k {
                let mut s = 0f64;
                for m in 0..k {
                    let inv_im: f64 = (0..k)
                        .map(|p| u[p * k + i] as f64 * u[p * k + m] as f64)
                        .sum();
                    s += inv_im * h.at(m, j) as f64;
                }
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((s - want).abs() < 1e-3, "({i},{j}) = {s}");
            }
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0, "U is upper-triangular");
            }
        }
    }

    /// With uncorrelated inputs (H diagonal) no error can be compensated: GPTQ gives exactly the
    /// round-to-nearest codes.
    #[test]
    fn a_diagonal_hessian_gives_round_to_nearest() {
        let (n, k) = (5, 64);
        let mut seed = 11;
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.1).collect();
        let mut eye = vec![0f32; k * k];
        for i in 0..k {
            eye[i * k + i] = 1.0 + i as f32;
        }
        let h = Hessian::from_rows(k, &eye);
        let (u, dead) = inverse_factor(&h, 0.0).unwrap();
        let grid = GroupGrid::Sym {
            dtype: DType::F32,
            rule: ScaleRule::Mse,
            bits: 4,
        };
        let (codes, params, _) = gptq_codes(&grid, 32, &w, k, &ident(k), &u, &dead).unwrap();
        for r in 0..n {
            for g in 0..2 {
                let vals = &w[r * k + g * 32..r * k + g * 32 + 32];
                let p = grid.fit(vals).unwrap();
                assert_eq!(params[r * 2 + g].stored, p.stored);
                for (i, &v) in vals.iter().enumerate() {
                    assert_eq!(codes[r * k + g * 32 + i] as u32, grid.code(v, &p));
                }
            }
        }
    }

    /// On correlated inputs GPTQ's output error is well below round-to-nearest's, for every
    /// encoding, and the result does not depend on the number of threads.
    #[test]
    fn correlated_inputs_lower_the_output_error() {
        let (n, k, t) = (24, 96, 256);
        let mut seed = 5;
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 0.05).collect();
        // Inputs that share a few strong directions, as activations do.
        let basis: Vec<f32> = (0..4 * k).map(|_| lcg(&mut seed)).collect();
        let x: Vec<f32> = (0..t)
            .flat_map(|_| {
                let c: Vec<f32> = (0..4).map(|_| lcg(&mut seed) * 3.0).collect();
                let noise: Vec<f32> = (0..k).map(|_| lcg(&mut seed) * 0.1).collect();
                (0..k)
                    .map(|i| (0..4).map(|b| c[b] * basis[b * k + i]).sum::<f32>() + noise[i])
                    .collect::<Vec<f32>>()
            })
            .collect();
        let h = Hessian::from_rows(k, &x);
        let (u, dead) = inverse_factor(&h, DEFAULT_DAMP).unwrap();
        let y = matmul_t(&x, &w, k);
        let err = |deq: &[f32]| -> f64 {
            let yq = matmul_t(&x, deq, k);
            let num: f64 = y.iter().zip(&yq).map(|(a, b)| (a - b) * (a - b)).sum();
            let den: f64 = y.iter().map(|a| a * a).sum();
            (num / den).sqrt()
        };
        for grid in [
            GroupGrid::Sym {
                dtype: DType::F16,
                rule: ScaleRule::Mse,
                bits: 4,
            },
            GroupGrid::Sym {
                dtype: DType::F16,
                rule: ScaleRule::Absmax,
                bits: 3,
            },
            GroupGrid::Asym { bits: 4 },
        ] {
            let (codes, _, deq) = gptq_codes(&grid, 32, &w, k, &ident(k), &u, &dead).unwrap();
            let rtn: Vec<f32> = w
                .chunks(32)
                .flat_map(|g| {
                    let p = grid.fit(g).unwrap();
                    g.iter()
                        .map(|&v| grid.value(grid.code(v, &p), &p))
                        .collect::<Vec<_>>()
                })
                .collect();
            let (e_gptq, e_rtn) = (err(&deq), err(&rtn));
            assert!(
                e_gptq < 0.7 * e_rtn,
                "{grid:?}: GPTQ output error {e_gptq} vs round-to-nearest {e_rtn}"
            );
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let (codes1, _, deq1) = one
                .install(|| gptq_codes(&grid, 32, &w, k, &ident(k), &u, &dead))
                .unwrap();
            assert_eq!(codes, codes1);
            assert_eq!(deq, deq1);
        }
    }

    #[test]
    fn dead_columns_are_zeroed_and_a_singular_hessian_is_refused_without_damping() {
        let k = 4;
        let h = Hessian::from_rows(k, &[1.0, 0.0, 1.0, 0.0]);
        // Columns 1 and 3 never saw input; 0 and 2 are collinear.
        assert!(inverse_factor(&h, 0.0).is_err());
        let (u, dead) = inverse_factor(&h, DEFAULT_DAMP).unwrap();
        assert_eq!(dead, vec![false, true, false, true]);
        let grid = GroupGrid::Asym { bits: 4 };
        let (_, _, deq) =
            gptq_codes(&grid, 4, &[0.5, 9.0, -0.5, 9.0], k, &ident(k), &u, &dead).unwrap();
        assert_eq!(deq[1], deq[3]);
        assert!(deq[1].abs() < 0.1, "{deq:?}");
    }
}
