//! `quantize_param`: the source values of one parameter → the records the artifact stores.

use crate::formats::dtype::DType;
use crate::quant::geometry::{transpose, Geometry};
use crate::quant::gptq::{gptq_codes, GroupGrid};
use crate::quant::rounding::{float_bytes, round_to};
use crate::quant::row_quant::{put_code, quantize_row_asym, quantize_row_sym};
use crate::quant::scale_rule::ScaleRule;
use crate::quant::scheme::{Encoding, Layout, QuantScheme, TensorRole};
use anyhow::Result;
use rayon::prelude::*;

/// One record of the artifact: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRecord {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Encode parameter `param_name` (logical `shape`, row-major source `values` as exact f32) the way
/// `scheme` stores a tensor of `role`. Record names are [`crate::model::record_names`]'s.
///
/// Raw roles, and every tensor of an unquantized scheme, give one record in the model dtype
/// (`RawF32`: always float32), rounded to nearest even. Quantized roles take a `[N, K]` matrix and
/// give `[q_weight, q_scale]` (Sym) or `[q_weight, q_scale_min]` (AsymBf16x2), see
/// [`crate::quant::scheme::Encoding`]; symmetric schemes pick their scales with the default
/// [`ScaleRule`]. The output is identical for any number of threads.
pub fn quantize_param(
    scheme: &QuantScheme,
    role: TensorRole,
    param_name: &str,
    shape: &[usize],
    values: &[f32],
) -> Result<Vec<EncodedRecord>> {
    quantize_param_with(
        scheme,
        ScaleRule::default(),
        role,
        param_name,
        shape,
        values,
    )
}

/// [`quantize_param`] with an explicit scale rule for symmetric schemes.
pub fn quantize_param_with(
    scheme: &QuantScheme,
    rule: ScaleRule,
    role: TensorRole,
    param_name: &str,
    shape: &[usize],
    values: &[f32],
) -> Result<Vec<EncodedRecord>> {
    let names = crate::model::record_names(param_name, role, scheme);
    check_len(param_name, shape, values)?;
    let Some(layout) = scheme.layout_for(role) else {
        let dtype = if role == TensorRole::RawF32 {
            DType::F32
        } else {
            scheme.model_dtype
        };
        return Ok(vec![EncodedRecord {
            name: names[0].clone(),
            dtype,
            shape: shape.to_vec(),
            bytes: float_bytes(dtype, values),
        }]);
    };
    let geo = matrix_geometry(scheme, role, layout, param_name, shape)?;
    let (n, k) = (geo.n, geo.k);
    match scheme.encoding {
        Encoding::None => unreachable!("layout_for returns None for unquantized schemes"),
        Encoding::Sym { .. } => {
            let dtype = scheme.model_dtype;
            // The model-dtype values; anything that overflows it cannot be quantized.
            let rounded: Vec<f32> = values.par_iter().map(|&v| round_to(dtype, v)).collect();
            check_finite(param_name, shape, values, &rounded, dtype)?;
            let mut words = vec![0u32; n * geo.words_per_row];
            let mut scales = vec![0f32; n * geo.n_group];
            words
                .par_chunks_mut(geo.words_per_row)
                .zip(scales.par_chunks_mut(geo.n_group))
                .zip(rounded.par_chunks(k))
                .for_each(|((w, s), row)| quantize_row_sym(&geo, dtype, rule, row, w, s));
            Ok(matrix_records(
                scheme,
                &names,
                &geo,
                words,
                GroupRecord::Scales(scales),
            ))
        }
        Encoding::AsymBf16x2 { .. } => {
            check_finite(param_name, shape, values, values, DType::F32)?;
            let mut words = vec![0u32; n * geo.words_per_row];
            let mut scale_min = vec![0u32; n * geo.n_group];
            let results: Vec<Result<(), usize>> = words
                .par_chunks_mut(geo.words_per_row)
                .zip(scale_min.par_chunks_mut(geo.n_group))
                .zip(values.par_chunks(k))
                .map(|((w, s), row)| quantize_row_asym(&geo, row, w, s))
                .collect();
            if let Some((row, g)) = results
                .iter()
                .enumerate()
                .find_map(|(r, res)| res.err().map(|g| (r, g)))
            {
                crate::user_bail!(
                    "tensor {param_name} (shape {shape:?}): the range of row {row}, group {g} \
                     overflows float32, so it cannot be quantized with {}",
                    scheme.name
                );
            }
            Ok(matrix_records(
                scheme,
                &names,
                &geo,
                words,
                GroupRecord::ScaleMin(scale_min),
            ))
        }
    }
}

/// [`quantize_param_with`] for a quantized role, with the codes chosen by GPTQ from the layer's
/// inverse-Hessian factor ([`crate::quant::gptq::inverse_factor`]) instead of rounding to
/// nearest. Same records, same format; also returns the decoded values (row-major `[N, K]`), which
/// calibration feeds to the next layers.
pub fn quantize_param_gptq(
    scheme: &QuantScheme,
    rule: ScaleRule,
    role: TensorRole,
    param_name: &str,
    shape: &[usize],
    values: &[f32],
    factor: &GptqFactor,
) -> Result<(Vec<EncodedRecord>, Vec<f32>)> {
    let names = crate::model::record_names(param_name, role, scheme);
    check_len(param_name, shape, values)?;
    let Some(layout) = scheme.layout_for(role) else {
        crate::user_bail!(
            "tensor {param_name}: GPTQ applies to quantized matrices, and {} stores a {role:?} \
             tensor unquantized",
            scheme.name
        );
    };
    let geo = matrix_geometry(scheme, role, layout, param_name, shape)?;
    if factor.dead.len() != geo.k {
        crate::user_bail!(
            "tensor {param_name} (shape {shape:?}): the calibration inputs have {} columns, \
             expected {}",
            factor.dead.len(),
            geo.k
        );
    }
    let dtype = match scheme.encoding {
        Encoding::Sym { .. } => scheme.model_dtype,
        _ => DType::F32,
    };
    let rounded: Vec<f32> = values.par_iter().map(|&v| round_to(dtype, v)).collect();
    check_finite(param_name, shape, values, &rounded, dtype)?;
    let grid = GroupGrid::for_encoding(&scheme.encoding, scheme.model_dtype, rule);
    let (codes, params, decoded) = gptq_codes(
        &grid,
        geo.group,
        &rounded,
        geo.k,
        &factor.perm,
        &factor.u,
        &factor.dead,
    )
    .map_err(|(row, g)| {
        crate::error::user(format!(
            "tensor {param_name} (shape {shape:?}): GPTQ's updates made row {row}, group \
                     {g} overflow; raise `damp` in the recipe's [calibration] table"
        ))
    })?;
    let mut words = vec![0u32; geo.n * geo.words_per_row];
    words
        .par_chunks_mut(geo.words_per_row)
        .zip(codes.par_chunks(geo.k))
        .for_each(|(w, row)| {
            for (p, &q) in row.iter().enumerate() {
                put_code(&geo, w, p / geo.group, p % geo.group, q as u32);
            }
        });
    let groups = match scheme.encoding {
        Encoding::Sym { .. } => GroupRecord::Scales(params.iter().map(|p| p.stored).collect()),
        _ => GroupRecord::ScaleMin(params.iter().map(|p| p.packed).collect()),
    };
    let records = matrix_records(scheme, &names, &geo, words, groups);
    Ok((records, decoded))
}

/// The per-layer input of [`quantize_param_gptq`]: the column visiting order `perm`, and for the
/// Hessian permuted by it, `(H + λI)⁻¹ = Uᵀ U` and the dead columns.
pub struct GptqFactor {
    pub perm: Vec<usize>,
    pub u: Vec<f32>,
    pub dead: Vec<bool>,
}

impl GptqFactor {
    /// Orders the columns, permutes `h` and factors it.
    pub fn new(
        h: &crate::quant::gptq::Hessian,
        order: crate::quant::gptq::ColumnOrder,
        damp: f64,
    ) -> Result<GptqFactor> {
        let perm = crate::quant::gptq::column_order(h, order);
        let (u, dead_p) = crate::quant::gptq::inverse_factor(&h.permuted(&perm), damp)?;
        let mut dead = vec![false; perm.len()];
        for (j, &c) in perm.iter().enumerate() {
            dead[c] = dead_p[j];
        }
        Ok(GptqFactor { perm, u, dead })
    }
}

fn check_len(param_name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            crate::error::user(format!("tensor {param_name}: shape {shape:?} is too large"))
        })?;
    if numel != values.len() {
        crate::user_bail!(
            "tensor {param_name}: shape {shape:?} has {numel} elements but {} values were given; \
             check the model's config.json against its weight files",
            values.len()
        );
    }
    Ok(())
}

/// The geometry of a non-empty `[N, K]` matrix of a quantized role.
fn matrix_geometry(
    scheme: &QuantScheme,
    role: TensorRole,
    layout: Layout,
    param_name: &str,
    shape: &[usize],
) -> Result<Geometry> {
    let &[n, k] = shape else {
        crate::user_bail!(
            "tensor {param_name}: a {role:?} weight must be a 2-D matrix [N, K] to be quantized \
             with {}, but its shape is {shape:?}",
            scheme.name
        );
    };
    if n == 0 || k == 0 {
        crate::user_bail!(
            "tensor {param_name}: cannot quantize an empty matrix of shape {shape:?}"
        );
    }
    Ok(Geometry::new(&scheme.encoding, layout, n, k))
}

/// The per-group parameters of a quantized matrix, row-major `[N, n_group]`.
enum GroupRecord {
    /// Model-dtype scales (symmetric schemes): the `q_scale` record.
    Scales(Vec<f32>),
    /// bf16 scale | bf16 min << 16 (asymmetric schemes): the `q_scale_min` record.
    ScaleMin(Vec<u32>),
}

/// `[q_weight, q_scale | q_scale_min]` from row-major words and group parameters, in the
/// geometry's layout.
fn matrix_records(
    scheme: &QuantScheme,
    names: &[String],
    geo: &Geometry,
    words: Vec<u32>,
    groups: GroupRecord,
) -> Vec<EncodedRecord> {
    let storage = scheme.encoding.storage().expect("a quantized encoding");
    let (dtype, bytes) = match groups {
        GroupRecord::Scales(s) => (
            scheme.model_dtype,
            float_bytes(scheme.model_dtype, &arrange(geo, s, geo.n_group)),
        ),
        GroupRecord::ScaleMin(p) => (
            DType::U32,
            arrange(geo, p, geo.n_group)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    };
    let words = arrange(geo, words, geo.words_per_row);
    vec![
        weight_record(&names[0], geo, storage, &words),
        EncodedRecord {
            name: names[1].clone(),
            dtype,
            shape: geo.scale_shape(),
            bytes,
        },
    ]
}

/// Quantized inputs must be finite in the dtype the arithmetic runs in.
fn check_finite(
    name: &str,
    shape: &[usize],
    source: &[f32],
    converted: &[f32],
    dtype: DType,
) -> Result<()> {
    if let Some(i) = converted.iter().position(|v| !v.is_finite()) {
        crate::user_bail!(
            "tensor {name} (shape {shape:?}): element {i} is {} which is not a finite {dtype} \
             value, so the tensor cannot be quantized; check the source weights or pick a \
             scheme with a wider model dtype",
            source[i]
        );
    }
    Ok(())
}

/// Row-major `[N, cols]` data (words or group parameters) in the geometry's layout: NK keeps it,
/// KN transposes it.
fn arrange<S: Copy + Default>(geo: &Geometry, data: Vec<S>, cols: usize) -> Vec<S> {
    match geo.layout {
        Layout::NK => data,
        Layout::KN => transpose(&data, geo.n, cols),
    }
}

fn weight_record(name: &str, geo: &Geometry, storage: DType, words: &[u32]) -> EncodedRecord {
    let bytes = match storage {
        DType::U16 => words
            .iter()
            .flat_map(|&w| (w as u16).to_le_bytes())
            .collect(),
        DType::U32 => words.iter().flat_map(|&w| w.to_le_bytes()).collect(),
        other => unreachable!("storage dtype {other} is not a word type"),
    };
    EncodedRecord {
        name: name.to_string(),
        dtype: storage,
        shape: geo.weight_shape(),
        bytes,
    }
}
