//! GPT-NeoX (RedPajama-INCITE, Pythia, Dolly v2): LayerNorm, fused qkv with partial RoPE, GELU MLP,
//! parallel or sequential residual.

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
use config::NeoxParams;

pub struct GptNeox;

impl ArchDefinition for GptNeox {
    type Params = NeoxParams;
    const NAME: &'static str = "gpt_neox";
    const MODEL_TYPES: &'static [&'static str] = &["gpt_neox"];
    const VERSION: u32 = 1;

    fn parse_config(config: &serde_json::Value) -> Result<ModelConfig> {
        config::parse(config, Self::MODEL_TYPES)
    }
    fn params(config: &ModelConfig, p: &NeoxParams) -> Vec<ParamSpec> {
        params::params(config, p)
    }
    fn lower(
        config: &ModelConfig,
        p: &NeoxParams,
        params: &[ParamSpec],
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        lower::lower(config, p, params, scheme, max_seq_len)
    }
}
