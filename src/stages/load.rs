//! load: read the model's configuration and weight index, pick the architecture, and check that
//! every tensor the artifact needs is present — before any heavy work. Outputs `model.json`
//! ([`ModelDescription`]) and the tokenizer files (copied from the folder, or built from a GGUF).

use super::{cached_or_run, temp_output, weights, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::tensor::TensorInfo;
use crate::model::{ModelConfig, ParamSpec};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

pub const VERSION: u32 = 1;

/// Tokenizer files copied into the artifact and listed in `tokenizer_files` (MLC's set).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];
/// Copied too, but not listed (as MLC does).
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// What the load stage learned about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDescription {
    pub config: ModelConfig,
    pub params: Vec<ParamSpec>,
    /// "safetensors", "pytorch", "gguf" or "merged".
    pub weights_format: String,
    pub tensors: Vec<TensorInfoRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorInfoRecord {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl From<&TensorInfo> for TensorInfoRecord {
    fn from(i: &TensorInfo) -> Self {
        TensorInfoRecord {
            name: i.name.clone(),
            dtype: i.dtype.name().to_string(),
            shape: i.shape.clone(),
        }
    }
}

/// Versions of every architecture: a change to any lowering or weight mapping reloads.
pub fn architecture_versions() -> String {
    crate::model::ARCHITECTURES
        .iter()
        .map(|a| format!("{}={}", a.name(), a.version()))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn run(
    ctx: &BuildContext,
    fetch: &StageOutput,
    architecture: Option<&str>,
    scope: &[String],
) -> Result<StageOutput> {
    let inputs = KeyInputs::new("load", VERSION)
        .with("source", fetch.digest())
        .with("architecture_override", architecture.unwrap_or("-"))
        .with("architectures", architecture_versions());
    let mut out = cached_or_run(ctx, inputs, scope, || {
        let source = weights::ModelSource::from_local(&fetch.local)?;
        let config_json = source.config_json()?;
        let (config, params) = describe(&config_json, architecture, &source.origin())?;
        let tensors = source.open_weights()?;
        check_params_present(&params, tensors.as_ref(), &source.origin())?;
        let desc = ModelDescription {
            config,
            params,
            weights_format: source.format_name().to_string(),
            tensors: tensors.infos().iter().map(TensorInfoRecord::from).collect(),
        };
        let mut files = BTreeMap::new();
        files.insert(
            "model.json".to_string(),
            temp_output(ctx, "model", &serde_json::to_vec_pretty(&desc)?)?,
        );
        for (name, bytes) in source.tokenizer_files()? {
            files.insert(
                format!("tokenizer/{name}"),
                temp_output(ctx, &name, &bytes)?,
            );
        }
        Ok(files)
    })?;
    out.local = fetch.local.clone();
    Ok(out)
}

/// Parse `config.json`, choose the architecture, list the artifact's parameters.
pub fn describe(
    config_json: &serde_json::Value,
    architecture: Option<&str>,
    origin: &str,
) -> Result<(ModelConfig, Vec<ParamSpec>)> {
    let arch = match architecture {
        Some(a) => crate::model::by_name(a)
            .ok_or_else(|| crate::error::user(format!("unknown architecture `{a}`")))?,
        None => {
            let mt = config_json.get("model_type").and_then(|v| v.as_str()).ok_or_else(|| {
                crate::error::user(format!("{origin}: config.json has no `model_type`; set `architecture` in the recipe"))
            })?;
            crate::model::by_model_type(mt).ok_or_else(|| {
                crate::error::user(format!(
                    "{origin}: model_type `{mt}` is not supported; supported: {}",
                    crate::model::supported_model_types().join(", ")
                ))
            })?
        }
    };
    let config = arch
        .parse_config(config_json)
        .with_context(|| format!("reading {origin}/config.json"))?;
    let params = arch.params(&config)?;
    Ok((config, params))
}

/// Every source tensor a parameter reads must exist.
fn check_params_present(
    params: &[ParamSpec],
    tensors: &dyn crate::formats::tensor::TensorSource,
    origin: &str,
) -> Result<()> {
    for p in params {
        for s in &p.sources {
            // `a|b` names alternatives (e.g. GPT-NeoX `embed_out.weight` or `lm_head.weight`).
            if !s.split('|').any(|n| tensors.info(n).is_some()) {
                crate::user_bail!(
                    "{origin}: tensor `{}` (needed for {}) is missing from the weights",
                    s.replace('|', "` or `"),
                    p.name
                );
            }
        }
    }
    Ok(())
}

/// Read a tokenizer/config file of a folder, if present.
pub fn read_optional(dir: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let p = dir.join(name);
    if !p.is_file() {
        return Ok(None);
    }
    crate::formats::lfs::check_not_lfs_pointer(&p)?;
    Ok(Some(
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
    ))
}

/// Read `model.json` back from a load (or delta-merge) output.
pub fn read_description(ctx: &BuildContext, out: &StageOutput) -> Result<ModelDescription> {
    let bytes = ctx
        .cache
        .blobs
        .read_verified(&out.output("model.json")?.digest)?;
    Ok(serde_json::from_slice(&bytes)?)
}
