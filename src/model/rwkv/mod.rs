//! RWKV-4 (rwkv-raven): a recurrent model; time mix with the WKV recurrence, channel mix.

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
use config::RwkvParams;

pub struct Rwkv;

impl ArchDefinition for Rwkv {
    type Params = RwkvParams;
    const NAME: &'static str = "rwkv";
    const MODEL_TYPES: &'static [&'static str] = &["rwkv"];
    const VERSION: u32 = 1;

    fn parse_config(config: &serde_json::Value) -> Result<ModelConfig> {
        config::parse(config, Self::MODEL_TYPES)
    }
    fn params(config: &ModelConfig, p: &RwkvParams) -> Vec<ParamSpec> {
        params::params(config, p)
    }
    fn lower(
        config: &ModelConfig,
        p: &RwkvParams,
        params: &[ParamSpec],
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        lower::lower(config, p, params, scheme, max_seq_len)
    }
}
