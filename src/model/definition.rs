//! What one architecture folder provides, as plain functions over its typed parameters; the
//! blanket impl below turns any [`ArchDefinition`] into an [`Architecture`] table entry, so the
//! entries differ only in what is really theirs (names, config parsing, params, lowering).

use crate::formats::model_lib::plan::Plan;
use crate::model::plan_builder::arch_params;
use crate::model::{Architecture, ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;

pub(crate) trait ArchDefinition: Sync {
    /// The architecture-specific part of [`ModelConfig::arch_params`], typed.
    type Params: serde::de::DeserializeOwned;
    /// The name used in recipes and reports.
    const NAME: &'static str;
    /// The `config.json` `model_type` values it accepts.
    const MODEL_TYPES: &'static [&'static str];
    /// Bumped whenever `params` or `lower` change what they produce (part of cache keys).
    const VERSION: u32;
    /// The conversation template used when the recipe names none.
    const DEFAULT_CONV_TEMPLATE: &'static str = "LM";

    fn parse_config(config: &serde_json::Value) -> Result<ModelConfig>;
    fn params(config: &ModelConfig, p: &Self::Params) -> Vec<ParamSpec>;
    fn lower(
        config: &ModelConfig,
        p: &Self::Params,
        params: &[ParamSpec],
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan>;
}

impl<T: ArchDefinition> Architecture for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn model_types(&self) -> &'static [&'static str] {
        T::MODEL_TYPES
    }
    fn parse_config(&self, config: &serde_json::Value) -> Result<ModelConfig> {
        T::parse_config(config)
    }
    fn params(&self, config: &ModelConfig) -> Result<Vec<ParamSpec>> {
        let p: T::Params = arch_params(config, T::NAME)?;
        Ok(T::params(config, &p))
    }
    fn lower(
        &self,
        config: &ModelConfig,
        scheme: &QuantScheme,
        max_seq_len: usize,
    ) -> Result<Plan> {
        let p: T::Params = arch_params(config, T::NAME)?;
        let params = T::params(config, &p);
        T::lower(config, &p, &params, scheme, max_seq_len)
    }
    fn default_conv_template(&self) -> &'static str {
        T::DEFAULT_CONV_TEMPLATE
    }
    fn version(&self) -> u32 {
        T::VERSION
    }
}
