//! Llama `config.json` → [`ModelConfig`].

use crate::model::config_fields::ConfigFields;
use crate::model::ModelConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// The Llama-specific fields of [`ModelConfig::arch_params`], normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaParams {
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Dims of each head that RoPE rotates (`head_dim × partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// The weights' dtype as `config.json` names it, for reports.
    pub dtype: Option<String>,
}

pub fn parse(config: &serde_json::Value, model_types: &[&str]) -> Result<ModelConfig> {
    let f = ConfigFields::new(config, model_types)?;
    let common = f.common()?;
    let hidden_size = f.dim("hidden_size")?;
    let num_layers = f.dim("num_hidden_layers")?;
    let num_heads = f.dim("num_attention_heads")?;
    let num_kv_heads = f.opt_dim("num_key_value_heads")?.unwrap_or(num_heads);
    if num_heads % num_kv_heads != 0 {
        return Err(f.error(
            "num_key_value_heads",
            format!("({num_kv_heads}) must divide num_attention_heads ({num_heads})"),
        ));
    }
    let head_dim = match f.opt_dim("head_dim")? {
        Some(d) => d,
        None => {
            if hidden_size % num_heads != 0 {
                return Err(f.error(
                    "num_attention_heads",
                    format!("({num_heads}) must divide hidden_size ({hidden_size}) when head_dim is absent"),
                ));
            }
            hidden_size / num_heads
        }
    };
    let factor = match f.opt_positive("rope_parameters.partial_rotary_factor")? {
        Some(x) => x,
        None => f.opt_positive("partial_rotary_factor")?.unwrap_or(1.0),
    };
    let rotary_dim = (head_dim as f64 * factor) as usize;
    if factor > 1.0 || rotary_dim == 0 || rotary_dim % 2 != 0 {
        return Err(f.error(
            "partial_rotary_factor",
            format!("({factor}) must give an even rotary width in 2..={head_dim}"),
        ));
    }
    if let Some(act) = f.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(f.error(
                "hidden_act",
                format!("is \"{act}\"; Llama supports only \"silu\""),
            ));
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if f.opt_bool(field)? == Some(true) {
            return Err(f.error(field, "is true; Llama with biases is not supported"));
        }
    }
    f.require_default_rope()?;
    let rope_theta = match f.opt_positive("rope_parameters.rope_theta")? {
        Some(t) => t,
        None => f.opt_positive("rope_theta")?.unwrap_or(10000.0),
    };
    let context_length = match f.opt_dim("max_position_embeddings")? {
        Some(n) => n,
        None => f.opt_dim("max_sequence_length")?.unwrap_or(2048),
    };
    let params = LlamaParams {
        intermediate_size: f.dim("intermediate_size")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rms_norm_eps: f.opt_positive("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        dtype: common.dtype,
    };
    Ok(ModelConfig {
        arch: "llama".into(),
        vocab_size: common.vocab_size,
        hidden_size,
        num_layers,
        context_length,
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids,
        arch_params: serde_json::to_value(params)?,
    })
}
