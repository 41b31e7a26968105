//! Llama (and Vicuna, which is Llama weights): RMSNorm, GQA attention with RoPE, SwiGLU MLP.

pub mod config;
mod lower;
pub mod params;

#[cfg(test)]
mod tests;

use crate::formats::model_lib::plan::Plan;
use crate::model::plan_builder::arch_params;
use crate::model::{Architecture, ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;
use config::LlamaParams;

pub struct Llama;

impl Architecture for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn parse_config(&self, config: &serde_json::Value) -> Result<ModelConfig> {
        config::parse(config, self.model_types())
    }
    fn params(&self, config: &ModelConfig) -> Result<Vec<ParamSpec>> {
        let p: LlamaParams = arch_params(config, self.name())?;
        Ok(params::params(config, &p))
    }
    fn lower(
        &self,
        config: &ModelConfig,
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        let p: LlamaParams = arch_params(config, self.name())?;
        let params = params::params(config, &p);
        lower::lower(config, &p, &params, scheme, max_seq_len)
    }
    fn default_conv_template(&self) -> &'static str {
        "LM"
    }
    fn version(&self) -> u32 {
        1
    }
}
