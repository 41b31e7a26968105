//! `mlc-chat-config.json`: MLC's chat configuration plus mlcb's additions.
//!
//! Every field has a default (MLC's 2023 defaults where it had one), so a config written by an
//! older tool still loads; unknown fields are ignored.

use serde::{Deserialize, Serialize};

/// The file name inside a dist folder.
pub const CHAT_CONFIG_FILE: &str = "mlc-chat-config.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ChatConfig {
    /// `<model>-<quant>`; MLC's runtime appends `-<device>.<ext>` to find the library.
    pub model_lib: String,
    pub local_id: String,
    /// A built-in template name (vicuna_v1.1, redpajama_chat, rwkv, llama-2, chatml, LM) or
    /// anything else (then the tokenizer's Jinja chat template, if any, else LM).
    pub conv_template: String,
    pub temperature: f32,
    pub repetition_penalty: f32,
    pub top_p: f32,
    pub mean_gen_len: usize,
    pub max_gen_len: usize,
    pub shift_fill_factor: f32,
    pub tokenizer_files: Vec<String>,
    pub model_category: String,
    pub model_name: String,
    pub vocab_size: Option<usize>,
    /// Context size in tokens; -1 (RWKV) means unbounded by the model.
    pub max_window_size: Option<i64>,
    /// mlcb: file name of the model library in the dist folder.
    pub model_lib_file: Option<String>,
    /// mlcb: token ids that end generation.
    pub stop_token_ids: Vec<u32>,
    /// mlcb: the target preset the library was built for.
    pub target: Option<String>,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            model_lib: String::new(),
            local_id: String::new(),
            conv_template: "LM".into(),
            temperature: 0.7,
            repetition_penalty: 1.0,
            top_p: 0.95,
            mean_gen_len: 128,
            max_gen_len: 512,
            shift_fill_factor: 0.3,
            tokenizer_files: Vec::new(),
            model_category: String::new(),
            model_name: String::new(),
            vocab_size: None,
            max_window_size: None,
            model_lib_file: None,
            stop_token_ids: Vec::new(),
            target: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_config_takes_mlc_defaults() {
        let c: ChatConfig =
            serde_json::from_str(r#"{"model_lib": "m-q4f16_1", "max_window_size": -1, "x": 1}"#)
                .unwrap();
        assert_eq!(c.model_lib, "m-q4f16_1");
        assert_eq!(c.max_window_size, Some(-1));
        assert_eq!(c.temperature, 0.7);
        assert_eq!(c.top_p, 0.95);
        assert_eq!(c.max_gen_len, 512);
        assert!(c.stop_token_ids.is_empty());
    }
}
