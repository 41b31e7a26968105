//! Calibrated quantization (GPTQ, [`crate::quant::gptq`]) inside the quantize stage: the model
//! runs over the calibration text on the CPU runtime in float32, and every matrix is quantized,
//! in the order the forward pass reaches it, from the inputs it actually sees there. The layers
//! after it then run with its quantized values, so each layer also compensates for the error of
//! the ones before it (GPTQ's sequential mode).
//!
//! The CPU runtime's f32 kernels give the same bits with or without SIMD (one order of exact FMAs)
//! and the model runs with the `libm` crate's exponential ([`CpuModel::with_portable_math`];
//! rotary and GELU always use `libm`), so the inputs — and the codes — are bit-identical on every
//! machine and for any thread count.
//! Costs: the model is held in float32 in memory during calibration, and each matrix `[N, K]`
//! takes `O(N·K²)` for GPTQ plus `O(K³)` for its inverse Hessian.

use super::load::ModelDescription;
use super::StageOutput;
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;
use crate::formats::tensor::TensorSource;
use crate::model::ParamSpec;
use crate::quant::calibration::Calibration;
use crate::quant::gptq::Hessian;
use crate::quant::scheme::QuantScheme;
use crate::quant::{EncodedRecord, GptqFactor, ScaleRule};
use crate::runtime::cpu::kernels::{self, WeightView};
use crate::runtime::cpu::{forward_intercepting, CpuModel};
use crate::runtime::tokenizer::TextTokenizer;
use anyhow::Result;
use std::collections::BTreeMap;

/// Bumped whenever the codes calibration writes could change: the GPTQ code, or the numerics of
/// the CPU runtime's ops it runs (part of the quantize key).
pub const VERSION: u32 = 1;

/// Longest sequence the calibration text is cut into (also capped by the model's context).
const MAX_SEQUENCE: usize = 512;

/// The records of every param (by param index), quantized with GPTQ where the forward pass
/// multiplies the param as a matrix, and as [`crate::quant::quantize_param_with`] would otherwise.
#[allow(clippy::too_many_arguments)]
pub fn calibrated_records(
    ctx: &super::BuildContext,
    weights: &StageOutput,
    desc: &ModelDescription,
    source: &dyn TensorSource,
    scheme: &'static QuantScheme,
    rule: ScaleRule,
    (calibration, text): (&Calibration, &str),
    progress: &indicatif::ProgressBar,
) -> Result<Vec<Vec<EncodedRecord>>> {
    let tokens = calibration_tokens(ctx, weights, text)?;
    let chunks = split(&tokens, desc.config.context_length.min(MAX_SEQUENCE));
    if chunks.is_empty() {
        crate::user_bail!(
            "the calibration text gives {} token(s); it needs at least 2 — use a longer `text` \
             in [calibration]",
            tokens.len()
        );
    }
    let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(2);
    let f32_scheme = crate::quant::scheme::scheme("q0f32").expect("q0f32 is in the table");
    let plan = super::codegen::lower(desc, f32_scheme, longest)?;
    anyhow::ensure!(
        plan.weights.len() == desc.params.len(),
        "the plan declares one weight per param"
    );
    // The model in float32 (plan weights are the params, in order).
    let mut values: Vec<Vec<f32>> = Vec::with_capacity(desc.params.len());
    for p in &desc.params {
        values.push(crate::model::build_param(p, source)?);
        for name in p.sources.iter().flat_map(|s| s.split('|')) {
            source.release(name);
        }
    }
    let records: Vec<[&[u8]; 1]> = values
        .iter()
        .map(|v| [bytemuck::cast_slice::<f32, u8>(v)])
        .collect();
    let model = CpuModel::new(&plan, WeightView::for_plan(&plan, &records))?.with_portable_math();
    let mut quantized: BTreeMap<usize, Vec<EncodedRecord>> = BTreeMap::new();
    let params = &desc.params;
    let mut sessions: Vec<_> = chunks.iter().map(|_| model.session()).collect();
    forward_intercepting(&mut sessions, &chunks, &mut |id, pairs, needed| {
        let p = &params[id];
        let matrix = scheme.layout_for(p.role).is_some();
        let decoded = match quantized.get(&id) {
            Some(recs) if needed => Some(decode(scheme, p, recs)?),
            Some(_) => None,
            None if matrix => {
                let h = hessian(p.shape[1], pairs);
                let factor = GptqFactor::new(&h, calibration.column_order(), calibration.damp)?;
                let (recs, decoded) = crate::quant::quantize_param_gptq(
                    scheme,
                    rule,
                    p.role,
                    &p.name,
                    &p.shape,
                    &values[id],
                    &factor,
                )?;
                quantized.insert(id, recs);
                progress.inc(values[id].len() as u64 * 4);
                Some(decoded)
            }
            None => None,
        };
        if needed {
            let w = decoded.as_deref().unwrap_or(&values[id]);
            multiply(p, w, pairs);
        }
        Ok(())
    })?;
    drop(sessions);
    drop(model);
    // Everything the forward pass did not multiply: raw params, and matrices that are only looked
    // up (an untied embedding) — rounded to nearest.
    let mut out = Vec::with_capacity(params.len());
    for (id, p) in params.iter().enumerate() {
        let recs = match quantized.remove(&id) {
            Some(recs) => recs,
            None => {
                progress.inc(values[id].len() as u64 * 4);
                crate::quant::quantize_param_with(
                    scheme,
                    rule,
                    p.role,
                    &p.name,
                    &p.shape,
                    &values[id],
                )?
            }
        };
        values[id] = Vec::new();
        out.push(recs);
    }
    Ok(out)
}

/// The calibration text through the model's own tokenizer (from the load stage's outputs).
fn calibration_tokens(
    ctx: &super::BuildContext,
    weights: &StageOutput,
    text: &str,
) -> Result<Vec<u32>> {
    let dir = ctx.cache.blobs.temp_path("calibration-tokenizer")?;
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        for (name, o) in &weights.outputs {
            if let Some(file) = name.strip_prefix("tokenizer/") {
                crate::safe_path::check_file_name(file, "tokenizer file name")?;
                ctx.cache.blobs.copy_verified(&o.digest, &dir.join(file))?;
            }
        }
        TextTokenizer::from_dir(&dir)?.encode(text, true)
    })();
    std::fs::remove_dir_all(&dir).ok();
    result
}

/// `tokens` cut into the fewest sequences of at most `max` tokens, of near-equal lengths (a
/// prefill needs at least 2 tokens, so 0 or 1 token gives no sequence).
fn split(tokens: &[u32], max: usize) -> Vec<&[u32]> {
    if tokens.len() < 2 || max < 2 {
        return Vec::new();
    }
    let n = tokens.len().div_ceil(max);
    let (base, extra) = (tokens.len() / n, tokens.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(&tokens[at..at + len]);
        at += len;
    }
    out
}

/// `H = XᵀX` over every session's input `X`, with the runtime's f32 matrix product on `Xᵀ`.
fn hessian(k: usize, pairs: &[(&[f32], &mut [f32])]) -> Hessian {
    let t: usize = pairs.iter().map(|(x, _)| x.len() / k).sum();
    let mut xt = vec![0f32; k * t];
    let mut at = 0;
    for (x, _) in pairs.iter() {
        for (r, row) in x.chunks_exact(k).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                xt[c * t + at + r] = v;
            }
        }
        at += x.len() / k;
    }
    let storage = WeightStorage::Raw { dtype: DType::F32 };
    let shape = [k, t];
    let records = [bytemuck::cast_slice::<f32, u8>(&xt)];
    let view = WeightView {
        storage: &storage,
        shape: &shape,
        records: &records,
        model_dtype: DType::F32,
    };
    let mut gram = vec![0f32; k * k];
    kernels::matmul(&view, &xt, k, &mut gram);
    Hessian::from_gram(k, gram)
}

/// The values a reader decodes from `recs` (a matrix multiplied a second time).
fn decode(scheme: &QuantScheme, p: &ParamSpec, recs: &[EncodedRecord]) -> Result<Vec<f32>> {
    let bytes: Vec<&[u8]> = recs.iter().map(|r| r.bytes.as_slice()).collect();
    crate::quant::dequantize_param(scheme, p.role, &p.shape, &bytes)
}

/// `out = x · wᵀ` for every session, with the runtime's (portable) f32 kernel.
fn multiply(p: &ParamSpec, w: &[f32], pairs: crate::runtime::cpu::InterceptedMatmul) {
    let storage = WeightStorage::Raw { dtype: DType::F32 };
    let records = [bytemuck::cast_slice::<f32, u8>(w)];
    let view = WeightView {
        storage: &storage,
        shape: &p.shape,
        records: &records,
        model_dtype: DType::F32,
    };
    let k = p.shape[1];
    for (x, o) in pairs.iter_mut() {
        kernels::matmul(&view, x, x.len() / k, o);
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn calibration_text_is_cut_into_near_equal_prefills() {
        let t: Vec<u32> = (0..1025).collect();
        let lens: Vec<usize> = split(&t, 512).iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![342, 342, 341]);
        assert_eq!(split(&t, 512).concat(), t);
        assert_eq!(split(&t[..1], 512).len(), 0);
        assert_eq!(split(&t[..2], 512).len(), 1);
    }
}
