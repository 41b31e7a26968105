//! quantize: build every artifact parameter from the source tensors (the architecture's
//! [`ParamSpec`] transforms), encode it with the scheme (bit-exact, `quant::quantize_param`) and
//! stream the records into `params/ndarray-cache.json` + `params_shard_N.bin`.
//!
//! The key holds the weights' content digest, the parameter list, the scheme and the quantizer's
//! code version — not the target: changing only the target never requantizes.

use super::load::ModelDescription;
use super::weights::ModelSource;
use super::{cached_or_run, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::ndarray_cache::NdArrayCacheWriter;
use crate::formats::tensor::TensorSource;
use crate::model::ParamSpec;
use crate::quant::scheme::{Encoding, QuantScheme};
use crate::quant::ScaleRule;
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
    scope: &[String],
) -> Result<StageOutput> {
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
            source.as_ref(),
            &desc.params,
            scheme,
            rule,
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
pub fn write_params(
    ctx: &BuildContext,
    source: &dyn TensorSource,
    params: &[ParamSpec],
    scheme: &'static QuantScheme,
    rule: ScaleRule,
    dir: &Path,
    label: &str,
) -> Result<BTreeMap<String, PathBuf>> {
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
    for p in params {
        let values = crate::model::build_param(p, source)?;
        for name in p.sources.iter().flat_map(|s| s.split('|')) {
            source.release(name);
        }
        let logical = p.shape.iter().product::<usize>() as u64;
        for rec in
            crate::quant::quantize_param_with(scheme, rule, p.role, &p.name, &p.shape, &values)?
        {
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
        bar.inc(values.len() as u64 * 4);
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
