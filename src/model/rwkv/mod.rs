//! RWKV-4 (rwkv-raven): a recurrent model; time mix with the WKV recurrence, channel mix.

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
use config::RwkvParams;

pub struct Rwkv;

impl Architecture for Rwkv {
    fn name(&self) -> &'static str {
        "rwkv"
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["rwkv"]
    }
    fn parse_config(&self, config: &serde_json::Value) -> Result<ModelConfig> {
        config::parse(config, self.model_types())
    }
    fn params(&self, config: &ModelConfig) -> Result<Vec<ParamSpec>> {
        let p: RwkvParams = arch_params(config, self.name())?;
        Ok(params::params(config, &p))
    }
    fn lower(
        &self,
        config: &ModelConfig,
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        let p: RwkvParams = arch_params(config, self.name())?;
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
