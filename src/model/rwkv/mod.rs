//! (being written)

use crate::formats::model_lib::plan::Plan;
use crate::model::{Architecture, ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;

pub struct Rwkv;

impl Architecture for Rwkv {
    fn name(&self) -> &'static str {
        "rwkv"
    }
    fn model_types(&self) -> &'static [&'static str] {
        &["rwkv"]
    }
    fn parse_config(&self, _config: &serde_json::Value) -> Result<ModelConfig> {
        anyhow::bail!("rwkv is not implemented yet")
    }
    fn params(&self, _config: &ModelConfig) -> Result<Vec<ParamSpec>> {
        anyhow::bail!("rwkv is not implemented yet")
    }
    fn lower(
        &self,
        _config: &ModelConfig,
        _scheme: &QuantScheme,
        _max_seq_len: usize,
    ) -> Result<Plan> {
        anyhow::bail!("rwkv is not implemented yet")
    }
    fn default_conv_template(&self) -> &'static str {
        "LM"
    }
    fn version(&self) -> u32 {
        1
    }
}
