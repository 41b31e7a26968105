//! Architectures: a table of entries, each knowing how to read a Hugging Face `config.json`, which
//! artifact parameters it needs and how to build each from the source tensors, and how to lower the
//! forward pass into an execution plan. A new architecture is one entry in [`ARCHITECTURES`] plus
//! its folder.

mod config_fields;
mod definition;
pub mod gpt_neox;
pub mod llama;
mod param_build;
pub(crate) mod plan_builder;
pub mod rwkv;
#[cfg(test)]
pub(crate) mod testing;

pub use param_build::build_param;

use crate::formats::model_lib::plan::Plan;
use crate::quant::scheme::{QuantScheme, TensorRole};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A model configuration normalised from `config.json` (both the seed-era and the newer spellings).
/// It is part of cache keys, so it serialises deterministically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The architecture entry's name (`llama`, `gpt_neox`, `rwkv`).
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// The context window the model was trained for (default for `max_seq_len`).
    pub context_length: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Architecture-specific fields, normalised (e.g. heads, kv heads, rope theta, rotary fraction).
    pub arch_params: serde_json::Value,
}

/// How one artifact parameter is computed from source tensors. Data, not code, so the quantize
/// stage's cache key can include it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Transform {
    /// The single source tensor as is (reshaped to the param's shape, same element count).
    Identity,
    /// Concatenate the sources along axis 0 (rows), e.g. q/k/v → qkv, gate/up → gate_up.
    ConcatRows,
    /// GPT-NeoX fused `query_key_value` (weight `[3H, H]` or bias `[3H]`) whose rows are ordered
    /// `(head, {q,k,v}, head_dim)`: reorder the rows to `[q all heads | k all heads | v all heads]`.
    NeoxQkv { heads: usize, head_dim: usize },
    /// `-exp(x)` elementwise (RWKV `time_decay`).
    NegExp,
    /// `x * factor` elementwise (RWKV rescaling of output weights by `2^-(layer // rescale_every)`).
    Scale { factor: f32 },
}

/// One parameter of the artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Logical name, e.g. `model.layers.0.self_attn.qkv_proj.weight`. Record names derive from it.
    pub name: String,
    pub role: TensorRole,
    /// Logical shape: `[N, K]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    /// Source tensor names (Hugging Face names) read to build it. One entry may list alternative
    /// names separated by `|` (checkpoints that spell a tensor two ways); the first present is read.
    pub sources: Vec<String>,
    pub transform: Transform,
}

/// An architecture entry.
pub trait Architecture: Sync {
    /// The name used in recipes (`architecture = "llama"`) and reports.
    fn name(&self) -> &'static str;
    /// The `model_type` values of `config.json` it accepts.
    fn model_types(&self) -> &'static [&'static str];
    /// Normalise `config.json`. Missing or invalid fields are user errors naming the field.
    fn parse_config(&self, config: &serde_json::Value) -> Result<ModelConfig>;
    /// The artifact's parameters, in artifact order.
    fn params(&self, config: &ModelConfig) -> Result<Vec<ParamSpec>>;
    /// Lower the forward pass (prefill and decode) into an execution plan whose weights name the
    /// records the quantize stage writes for `params` under `scheme`.
    fn lower(&self, config: &ModelConfig, scheme: &QuantScheme, max_seq_len: usize)
        -> Result<Plan>;
    /// The conversation template used when the recipe names none.
    fn default_conv_template(&self) -> &'static str;
    /// Bumped whenever `params` or `lower` change what they produce (part of cache keys).
    fn version(&self) -> u32;
}

/// Every architecture mlcb knows.
pub static ARCHITECTURES: &[&dyn Architecture] = &[&llama::Llama, &gpt_neox::GptNeox, &rwkv::Rwkv];

/// Find an architecture by recipe name.
pub fn by_name(name: &str) -> Option<&'static dyn Architecture> {
    ARCHITECTURES.iter().copied().find(|a| a.name() == name)
}

/// Find the architecture for a `config.json` `model_type`.
pub fn by_model_type(model_type: &str) -> Option<&'static dyn Architecture> {
    ARCHITECTURES
        .iter()
        .copied()
        .find(|a| a.model_types().contains(&model_type))
}

/// Every accepted `model_type`, for error messages.
pub fn supported_model_types() -> Vec<&'static str> {
    ARCHITECTURES
        .iter()
        .flat_map(|a| a.model_types().iter().copied())
        .collect()
}

/// Record names of a parameter under a scheme: `[NAME]` raw, else `[STEM.q_weight, STEM.q_scale]`
/// (symmetric) or `[STEM.q_weight, STEM.q_scale_min]` (asymmetric), where STEM is NAME without
/// its `.weight` suffix.
pub fn record_names(param_name: &str, role: TensorRole, scheme: &QuantScheme) -> Vec<String> {
    use crate::quant::scheme::Encoding;
    if scheme.layout_for(role).is_none() {
        return vec![param_name.to_string()];
    }
    let stem = param_name.strip_suffix(".weight").unwrap_or(param_name);
    match scheme.encoding {
        Encoding::None => vec![param_name.to_string()],
        Encoding::Sym { .. } => vec![format!("{stem}.q_weight"), format!("{stem}.q_scale")],
        Encoding::AsymBf16x2 { .. } => {
            vec![format!("{stem}.q_weight"), format!("{stem}.q_scale_min")]
        }
    }
}
