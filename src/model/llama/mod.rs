//! Llama (and Vicuna, which is Llama weights): RMSNorm, GQA attention with RoPE, SwiGLU MLP.

pub mod config;
mod lower;
pub mod params;

#[cfg(test)]
mod tests;

use crate::formats::model_lib::plan::Plan;
use crate::model::definition::ArchDefinition;
use crate::model::{ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;
use config::LlamaParams;

pub struct Llama;

impl ArchDefinition for Llama {
    type Params = LlamaParams;
    const NAME: &'static str = "llama";
    const MODEL_TYPES: &'static [&'static str] = &["llama"];
    const VERSION: u32 = 1;

    fn parse_config(config: &serde_json::Value) -> Result<ModelConfig> {
        config::parse(config, Self::MODEL_TYPES)
    }
    fn params(config: &ModelConfig, p: &LlamaParams) -> Vec<ParamSpec> {
        params::params(config, p)
    }
    fn lower(
        config: &ModelConfig,
        p: &LlamaParams,
        params: &[ParamSpec],
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        lower::lower(config, p, params, scheme, max_seq_len)
    }
}
