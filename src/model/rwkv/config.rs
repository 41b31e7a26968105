//! RWKV-4 `config.json` → [`ModelConfig`].

use crate::model::config_fields::ConfigFields;
use crate::model::ModelConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The RWKV-specific fields of [`ModelConfig::arch_params`], normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RwkvParams {
    /// Channel-mix width.
    pub intermediate_size: usize,
    pub layer_norm_epsilon: f64,
    /// Every this many blocks the residual is halved (0: never), as Hugging Face does at inference.
    pub rescale_every: usize,
    pub tie_word_embeddings: bool,
    pub dtype: Option<String>,
}

pub fn parse(config: &serde_json::Value, model_types: &[&str]) -> Result<ModelConfig> {
    let f = ConfigFields::new(config, model_types)?;
    let common = f.common()?;
    let hidden_size = f.dim("hidden_size")?;
    let num_layers = f.dim("num_hidden_layers")?;
    if let Some(a) = f.opt_dim("attention_hidden_size")? {
        if a != hidden_size {
            return Err(f.error(
                "attention_hidden_size",
                format!("({a}) must equal hidden_size ({hidden_size})"),
            ));
        }
    }
    let params = RwkvParams {
        intermediate_size: f.opt_dim("intermediate_size")?.unwrap_or(4 * hidden_size),
        layer_norm_epsilon: f.opt_positive("layer_norm_epsilon")?.unwrap_or(1e-5),
        rescale_every: f.opt_count("rescale_every")?.unwrap_or(6),
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        dtype: common.dtype,
    };
    Ok(ModelConfig {
        arch: "rwkv".into(),
        vocab_size: common.vocab_size,
        hidden_size,
        num_layers,
        context_length: f.opt_dim("context_length")?.unwrap_or(1024),
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        arch_params: serde_json::to_value(params)?,
    })
}
