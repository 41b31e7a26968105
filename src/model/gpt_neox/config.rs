//! GPT-NeoX `config.json` → [`ModelConfig`].

use crate::model::config_fields::ConfigFields;
use crate::model::ModelConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The GPT-NeoX-specific fields of [`ModelConfig::arch_params`], normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeoxParams {
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub head_dim: usize,
    /// Dims of each head that RoPE rotates (`head_dim × rotary_pct`).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    /// Whether `query_key_value` and `dense` have biases.
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub dtype: Option<String>,
}

pub fn parse(config: &serde_json::Value, model_types: &[&str]) -> Result<ModelConfig> {
    let f = ConfigFields::new(config, model_types)?;
    let common = f.common()?;
    let hidden_size = f.dim("hidden_size")?;
    let num_layers = f.dim("num_hidden_layers")?;
    let num_heads = f.dim("num_attention_heads")?;
    if hidden_size % num_heads != 0 {
        return Err(f.error(
            "num_attention_heads",
            format!("({num_heads}) must divide hidden_size ({hidden_size})"),
        ));
    }
    let head_dim = hidden_size / num_heads;
    // Seed era: rotary_pct / rotary_emb_base; newer: rope_parameters {partial_rotary_factor, rope_theta}.
    let (pct_field, pct) = match f.opt_positive("rope_parameters.partial_rotary_factor")? {
        Some(x) => ("rope_parameters.partial_rotary_factor", x),
        None => ("rotary_pct", f.opt_positive("rotary_pct")?.unwrap_or(0.25)),
    };
    let rotary_dim = (head_dim as f64 * pct) as usize;
    if pct > 1.0 || rotary_dim == 0 || rotary_dim % 2 != 0 {
        return Err(f.error(
            pct_field,
            format!(
                "({pct}) must give an even rotary width in 2..={head_dim} (head_dim {head_dim})"
            ),
        ));
    }
    f.require_default_rope()?;
    let rope_theta = match f.opt_positive("rope_parameters.rope_theta")? {
        Some(t) => t,
        None => match f.opt_positive("rotary_emb_base")? {
            Some(t) => t,
            None => f.opt_positive("rope_theta")?.unwrap_or(10000.0),
        },
    };
    let act = f.opt_str("hidden_act")?.unwrap_or("gelu");
    if act != "gelu" {
        return Err(f.error(
            "hidden_act",
            format!("is \"{act}\"; GPT-NeoX is supported with \"gelu\" only"),
        ));
    }
    let params = NeoxParams {
        intermediate_size: f.opt_dim("intermediate_size")?.unwrap_or(4 * hidden_size),
        num_heads,
        head_dim,
        rotary_dim,
        rope_theta,
        layer_norm_eps: f.opt_positive("layer_norm_eps")?.unwrap_or(1e-5),
        use_parallel_residual: f.opt_bool("use_parallel_residual")?.unwrap_or(true),
        attention_bias: f.opt_bool("attention_bias")?.unwrap_or(true),
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        dtype: common.dtype,
    };
    Ok(ModelConfig {
        arch: "gpt_neox".into(),
        vocab_size: common.vocab_size,
        hidden_size,
        num_layers,
        context_length: f.opt_dim("max_position_embeddings")?.unwrap_or(2048),
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        arch_params: serde_json::to_value(params)?,
    })
}
