//! Where a stage finds the model: a Hugging Face folder, a GGUF file, or a merged-weights blob.
//! Stages pass these locations along in `StageOutput::local` (paths valid for this process only).

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::formats::tensor::TensorSource;

pub enum ModelSource {
    Folder(PathBuf),
    Gguf(PathBuf),
    /// A merged safetensors file plus the folder whose config and tokenizer apply.
    Merged {
        weights: PathBuf,
        folder: PathBuf,
    },
}

impl ModelSource {
    pub fn from_local(local: &BTreeMap<String, PathBuf>) -> Result<ModelSource> {
        if let Some(w) = local.get("merged") {
            let folder = local
                .get("source_dir")
                .cloned()
                .context("merged weights without a source folder")?;
            return Ok(ModelSource::Merged {
                weights: w.clone(),
                folder,
            });
        }
        if let Some(g) = local.get("gguf") {
            return Ok(ModelSource::Gguf(g.clone()));
        }
        let dir = local
            .get("source_dir")
            .cloned()
            .context("no source folder from fetch")?;
        Ok(ModelSource::Folder(dir))
    }

    pub fn origin(&self) -> String {
        match self {
            ModelSource::Folder(d) | ModelSource::Merged { folder: d, .. } => {
                d.display().to_string()
            }
            ModelSource::Gguf(f) => f.display().to_string(),
        }
    }

    pub fn format_name(&self) -> &'static str {
        match self {
            ModelSource::Folder(d) => {
                if d.join("model.safetensors").is_file()
                    || d.join("model.safetensors.index.json").is_file()
                {
                    "safetensors"
                } else {
                    "pytorch"
                }
            }
            ModelSource::Gguf(_) => "gguf",
            ModelSource::Merged { .. } => "merged",
        }
    }

    pub fn config_json(&self) -> Result<serde_json::Value> {
        match self {
            ModelSource::Folder(d) | ModelSource::Merged { folder: d, .. } => {
                let p = d.join("config.json");
                let bytes = std::fs::read(&p)
                    .map_err(|e| crate::error::user(format!("cannot read {}: {e}", p.display())))?;
                serde_json::from_slice(&bytes).map_err(|e| {
                    crate::error::user(format!("{} is not valid JSON: {e}", p.display()))
                })
            }
            ModelSource::Gguf(f) => Ok(crate::formats::gguf::GgufModel::open(f)?.hf_config()),
        }
    }

    pub fn open_weights(&self) -> Result<Box<dyn TensorSource>> {
        match self {
            ModelSource::Folder(d) => crate::formats::open_model_weights(d),
            ModelSource::Gguf(f) => Ok(Box::new(crate::formats::gguf::GgufModel::open(f)?)),
            ModelSource::Merged { weights, .. } => Ok(Box::new(
                crate::formats::safetensors::SafetensorsFile::open(weights)?,
            )),
        }
    }

    /// Tokenizer files (name, bytes): those present in the folder, or built from the GGUF.
    pub fn tokenizer_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        match self {
            ModelSource::Folder(d) | ModelSource::Merged { folder: d, .. } => {
                for name in super::load::TOKENIZER_FILES
                    .iter()
                    .chain([&super::load::TOKENIZER_CONFIG])
                {
                    if let Some(b) = super::load::read_optional(d, name)? {
                        out.push((name.to_string(), b));
                    }
                }
            }
            ModelSource::Gguf(f) => {
                let g = crate::formats::gguf::GgufModel::open(f)?;
                out.push((
                    "tokenizer.json".into(),
                    serde_json::to_vec(&g.tokenizer_json()?)?,
                ));
                out.push((
                    super::load::TOKENIZER_CONFIG.into(),
                    serde_json::to_vec_pretty(&g.tokenizer_config_json()?)?,
                ));
            }
        }
        Ok(out)
    }
}
