//! The recipe file as written: serde structs that reject unknown keys and keep spans, so every
//! error can point at `file:line:col`. Fields with several accepted forms (`source`, `target`) stay
//! TOML values here and are checked by hand in `recipe::parse`, with their spans.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub model: ModelSection,
    /// `target = "cuda"` or `[target] preset = "cuda"` plus `cuda_arch`, `llvm_mingw`.
    pub target: Spanned<toml::Value>,
    pub quantization: Spanned<String>,
    /// Scale rule of symmetric schemes: "mse" (default) or "absmax" (build.py's, bit-identical).
    pub quantization_scales: Option<Spanned<String>>,
    pub max_seq_len: Option<Spanned<i64>>,
    #[serde(default)]
    pub chat: ChatSection,
    /// A pinned tuning-records file (JSON), relative to the recipe.
    pub tuning_file: Option<Spanned<String>>,
    /// GPTQ calibration of quantized schemes.
    pub calibration: Option<CalibrationSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSection {
    pub method: Spanned<String>,
    /// A text file, relative to the recipe (default: the built-in text).
    pub text: Option<Spanned<String>>,
    pub damp: Option<Spanned<f64>>,
    pub act_order: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub name: Spanned<String>,
    pub source: Spanned<toml::Value>,
    pub delta: Option<Spanned<toml::Value>>,
    pub architecture: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSection {
    pub conv_template: Option<Spanned<String>>,
    pub temperature: Option<Spanned<f64>>,
    pub top_p: Option<Spanned<f64>>,
    pub repetition_penalty: Option<Spanned<f64>>,
    pub mean_gen_len: Option<Spanned<i64>>,
    pub max_gen_len: Option<Spanned<i64>>,
}
