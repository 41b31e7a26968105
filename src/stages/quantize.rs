//! quantize: build every artifact parameter from the source tensors (the architecture's
//! [`ParamSpec`] transforms), encode it with the scheme (bit-exact, `quant::quantize_param`) and
//! stream the records into `params/ndarray-cache.json` + `params_shard_N.bin`.
//!
//! With a `[calibration]` table the codes of every multiplied matrix come from GPTQ
//! ([`super::calibration`]) instead of rounding to nearest; the format is the same.
//!
//! The key holds the weights' content digest, the parameter list, the scheme, the scale rule, the
//! calibration (text digest, damp, calibration code version) and the quantizer's code version —
//! not the target: changing only the target never requantizes.

use super::load::ModelDescription;
use super::weights::ModelSource;
use super::{cached_or_run, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::ndarray_cache::NdArrayCacheWriter;
use crate::formats::tensor::TensorSource;
use crate::quant::calibration::Calibration;
use crate::quant::scheme::{Encoding, QuantScheme};
use crate::quant::{EncodedRecord, ScaleRule};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;

pub fn run(
    ctx: &BuildContext,
    weights: &StageOutput,
    desc: &ModelDescription,
    scheme: &'static QuantScheme,
    rule: ScaleRule,
    calibration: Option<&Calibration>,
    scope: &[String],
) -> Result<StageOutput> {
    // Unquantized schemes have nothing to calibrate. The text is read once: the key's digest is
    // of the very text the model runs over.
    let calibration = match calibration.filter(|_| scheme.encoding != Encoding::None) {
        Some(c) => Some((c, c.text()?)),
        None => None,
    };
    let calibration_key = match &calibration {
        None => "none".to_string(),
        Some((c, text)) => format!(
            "gptq v{} text {} damp {} act_order {}",
            super::calibration::VERSION,
            blake3::hash(text.as_bytes()).to_hex(),
            c.damp,
            c.act_order
        ),
    };
    let calibration = calibration.as_ref().map(|(c, t)| (*c, t.as_str()));
    let params_json = serde_json::to_vec(&desc.params)?;
    // Only symmetric schemes have a scale rule: others do not rebuild when it changes.
    let scales = match scheme.encoding {
        Encoding::Sym { .. } => rule.name(),
        _ => "none",
    };
    let inputs = KeyInputs::new("quantize", VERSION)
        .with("weights", weights.digest())
        .with("params", blake3::hash(&params_json).to_hex())
        .with("scheme", scheme.name)
        .with("scales", scales)
        .with("calibration", calibration_key)
        .with("quantizer", crate::quant::CODE_VERSION)
        .with(
            "ndarray_cache_format",
            crate::formats::ndarray_cache::FORMAT_VERSION,
        );
    let label = format!("quantize {}", scheme.name);
    cached_or_run(ctx, inputs, scope, || {
        let source = ModelSource::from_local(&weights.local)?.open_weights()?;
        let dir = ctx.cache.blobs.temp_path("params")?;
        std::fs::create_dir_all(&dir)?;
        let result = write_params(
            ctx,
            weights,
            desc,
            source.as_ref(),
            scheme,
            rule,
            calibration,
            &dir,
            &label,
        );
        if result.is_err() {
            std::fs::remove_dir_all(&dir).ok();
        }
        result
    })
}

/// Quantize all parameters into `dir`; returns output name → file.
#[allow(clippy::too_many_arguments)]
fn write_params(
    ctx: &BuildContext,
    weights: &StageOutput,
    desc: &ModelDescription,
    source: &dyn TensorSource,
    scheme: &'static QuantScheme,
    rule: ScaleRule,
    calibration: Option<(&Calibration, &str)>,
    dir: &Path,
    label: &str,
) -> Result<BTreeMap<String, PathBuf>> {
    let params = &desc.params;
    let total: u64 = params
        .iter()
        .map(|p| p.shape.iter().product::<usize>() as u64 * 4)
        .sum();
    let bar = ctx.progress.add(indicatif::ProgressBar::new(total));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    let mut writer = NdArrayCacheWriter::new(dir)?;
    match calibration {
        // Calibration needs the whole model at once; the records are written afterwards.
        Some(c) => {
            let all = super::calibration::calibrated_records(
                ctx, weights, desc, source, scheme, rule, c, &bar,
            )?;
            for (p, recs) in params.iter().zip(all) {
                add_records(&mut writer, p, recs)?;
            }
        }
        // One param in memory at a time.
        None => {
            for p in params {
                let values = crate::model::build_param(p, source)?;
                for name in p.sources.iter().flat_map(|s| s.split('|')) {
                    source.release(name);
                }
                let recs = crate::quant::quantize_param_with(
                    scheme, rule, p.role, &p.name, &p.shape, &values,
                )?;
                add_records(&mut writer, p, recs)?;
                bar.inc(values.len() as u64 * 4);
            }
        }
    }
    let cache = writer.finish()?;
    bar.finish_and_clear();
    let mut files = BTreeMap::new();
    files.insert(
        "params/ndarray-cache.json".to_string(),
        dir.join("ndarray-cache.json"),
    );
    for shard in &cache.records {
        files.insert(
            format!("params/{}", shard.data_path),
            dir.join(&shard.data_path),
        );
    }
    Ok(files)
}

fn add_records(
    writer: &mut NdArrayCacheWriter,
    p: &crate::model::ParamSpec,
    recs: Vec<EncodedRecord>,
) -> Result<()> {
    let logical = p.shape.iter().product::<usize>() as u64;
    for rec in recs {
        // BitsPerParam counts each weight once: on its data record, not on its scales.
        let is_scale = rec.name.ends_with(".q_scale") || rec.name.ends_with(".q_scale_min");
        writer.add_with_logical_elems(
            &rec.name,
            rec.dtype,
            &rec.shape,
            &rec.bytes,
            if is_scale { 0 } else { logical },
        )?;
    }
    Ok(())
}
