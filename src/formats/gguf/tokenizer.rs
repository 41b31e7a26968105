//! Hugging Face `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF's
//! `tokenizer.ggml.*` metadata. Only byte-level BPE (`tokenizer.ggml.model = "gpt2"`) is supported;
//! the pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp interprets it.

use super::reader::GgufFile;
use crate::error::user;
use anyhow::Result;
use serde_json::{json, Map, Value};

/// The `tokenizer.ggml.model` values supported.
pub const SUPPORTED_MODELS: &[&str] = &["gpt2"];

/// `tokenizer.ggml.pre` values and their pre-tokenizer family.
const PRE_TOKENIZERS: &[(&str, Pre)] = &[
    ("default", Pre::Gpt2),
    ("gpt2", Pre::Gpt2),
    ("smollm", Pre::DigitsGpt2),
    ("starcoder", Pre::DigitsGpt2),
    ("llama-bpe", Pre::Llama3),
    ("llama3", Pre::Llama3),
];

#[derive(Debug, Clone, Copy)]
enum Pre {
    /// GPT-2's regex inside ByteLevel.
    Gpt2,
    /// Every digit its own piece, then GPT-2's regex (StarCoder, SmolLM).
    DigitsGpt2,
    /// Llama 3's split regex (letters with one leading non-letter, digits in threes), then
    /// ByteLevel without its own regex.
    Llama3,
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp token types.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn pre_tokenizer(pre: Pre) -> Value {
    match pre {
        Pre::Gpt2 => byte_level(true),
        Pre::DigitsGpt2 => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
        }),
        Pre::Llama3 => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
                 "invert": false},
                byte_level(false),
            ],
        }),
    }
}

/// Token strings, merges and types, checked for consistency.
struct Vocab<'a> {
    tokens: &'a [String],
    merges: &'a [String],
    types: Option<Vec<i64>>,
}

fn vocab(f: &GgufFile) -> Result<Vocab<'_>> {
    let path = f.path().display();
    let model = f.opt_str("tokenizer.ggml.model")?.ok_or_else(|| {
        user(format!(
            "GGUF file {path} has no tokenizer (no `tokenizer.ggml.model`); use a GGUF that embeds one"
        ))
    })?;
    if !SUPPORTED_MODELS.contains(&model) {
        let kind = match model {
            "llama" => " (SentencePiece)",
            "bert" => " (WordPiece)",
            _ => "",
        };
        return Err(user(format!(
            "GGUF file {path}: tokenizer model `{model}`{kind} is not supported; mlcb reads {} \
             (byte-level BPE)",
            SUPPORTED_MODELS.join(", ")
        )));
    }
    let strings = |key: &str| -> Result<&[String]> {
        f.require(key)?
            .as_array()
            .and_then(|a| a.as_strings())
            .ok_or_else(|| {
                user(format!(
                    "GGUF file {path}: `{key}` is not an array of strings"
                ))
            })
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types = match f.get("tokenizer.ggml.token_type") {
        None => None,
        Some(v) => {
            let t = v.as_array().and_then(|a| a.to_i64_vec()).ok_or_else(|| {
                user(format!(
                    "GGUF file {path}: `tokenizer.ggml.token_type` is not an integer array"
                ))
            })?;
            if t.len() != tokens.len() {
                return Err(user(format!(
                    "GGUF file {path}: {} token types for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            Some(t)
        }
    };
    Ok(Vocab {
        tokens,
        merges,
        types,
    })
}

/// The id stored under `tokenizer.ggml.<what>_token_id`, checked to be in the vocabulary.
fn special_id(f: &GgufFile, what: &str, n_tokens: usize) -> Result<Option<usize>> {
    let key = format!("tokenizer.ggml.{what}_token_id");
    match f.opt_u64(&key)? {
        None => Ok(None),
        Some(id) if (id as usize) < n_tokens => Ok(Some(id as usize)),
        Some(id) => Err(user(format!(
            "GGUF file {}: `{key}` = {id} is outside the vocabulary of {n_tokens} tokens",
            f.path().display()
        ))),
    }
}

/// A Hugging Face `tokenizer.json` (byte-level BPE) for `f`.
pub fn tokenizer_json(f: &GgufFile) -> Result<Value> {
    let path = f.path().display();
    let v = vocab(f)?;
    let pre_name = f.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let Some(&(_, pre)) = PRE_TOKENIZERS.iter().find(|(n, _)| *n == pre_name) else {
        let names: Vec<&str> = PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect();
        return Err(user(format!(
            "GGUF file {path}: pre-tokenizer `{pre_name}` (tokenizer.ggml.pre) is not supported; \
             mlcb knows {}",
            names.join(", ")
        )));
    };

    let mut vocab_map = Map::with_capacity(v.tokens.len());
    for (id, tok) in v.tokens.iter().enumerate() {
        if vocab_map.insert(tok.clone(), json!(id)).is_some() {
            return Err(user(format!(
                "GGUF file {path}: token {tok:?} appears twice in the vocabulary (again as id {id})"
            )));
        }
    }
    let mut merges = Vec::with_capacity(v.merges.len());
    for m in v.merges {
        match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => {
                merges.push(json!([a, b]))
            }
            _ => {
                return Err(user(format!(
                    "GGUF file {path}: merge {m:?} is not two tokens separated by one space"
                )))
            }
        }
    }

    let mut added = Vec::new();
    if let Some(types) = &v.types {
        for (id, &ty) in types.iter().enumerate() {
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                added.push(json!({
                    "id": id,
                    "content": v.tokens[id],
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": ty == TOKEN_TYPE_CONTROL,
                }));
            }
        }
    }

    let n = v.tokens.len();
    let bos = special_id(f, "bos", n)?.filter(|_| add_bos(f));
    let eos = special_id(f, "eos", n)?.filter(|_| add_eos(f));
    let post_processor = if bos.is_some() || eos.is_some() {
        template_processing(
            bos.map(|i| &v.tokens[i]),
            eos.map(|i| &v.tokens[i]),
            bos,
            eos,
        )
    } else {
        Value::Null
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab_map,
            "merges": merges,
        },
    }))
}

fn add_bos(f: &GgufFile) -> bool {
    matches!(f.opt_bool("tokenizer.ggml.add_bos_token"), Ok(Some(true)))
}

fn add_eos(f: &GgufFile) -> bool {
    matches!(f.opt_bool("tokenizer.ggml.add_eos_token"), Ok(Some(true)))
}

/// A post-processor that adds BOS before and/or EOS after each sequence.
fn template_processing(
    bos: Option<&String>,
    eos: Option<&String>,
    bos_id: Option<usize>,
    eos_id: Option<usize>,
) -> Value {
    let special = |t: &String, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let wrap = |name: &str, type_id: u32| -> Vec<Value> {
        let mut v = Vec::new();
        if let Some(b) = bos {
            v.push(special(b, type_id));
        }
        v.push(seq(name, type_id));
        if let Some(e) = eos {
            v.push(special(e, type_id));
        }
        v
    };
    let single = wrap("A", 0);
    let mut pair = wrap("A", 0);
    pair.extend(wrap("B", 1));
    let mut specials = Map::new();
    for (t, id) in [(bos, bos_id), (eos, eos_id)] {
        if let (Some(t), Some(id)) = (t, id) {
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair,
           "special_tokens": specials})
}

/// A Hugging Face `tokenizer_config.json`: special token strings, whether BOS/EOS are added when
/// encoding, the chat template (`tokenizer.chat_template`) and the context length.
pub fn tokenizer_config_json(f: &GgufFile) -> Result<Value> {
    let v = vocab(f)?;
    let n = v.tokens.len();
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": f.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        "add_eos_token": f.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        "clean_up_tokenization_spaces": false,
    });
    for what in ["bos", "eos", "unk", "pad"] {
        let key = match what {
            "pad" => "padding",
            "unk" => "unknown",
            other => other,
        };
        if let Some(id) = special_id(f, key, n)? {
            c[format!("{what}_token")] = json!(v.tokens[id]);
        }
    }
    if let Some(t) = f.opt_str("tokenizer.chat_template")? {
        c["chat_template"] = json!(t);
    }
    if let Some(arch) = f.opt_str("general.architecture")? {
        if let Some(ctx) = f.opt_u64(&format!("{arch}.context_length"))? {
            c["model_max_length"] = json!(ctx);
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::test_writer::GgufWriter;
    use super::super::value::{GgufArray, GgufValue};
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn strs(v: &[&str]) -> GgufValue {
        GgufValue::Array(GgufArray::String(v.iter().map(|s| s.to_string()).collect()))
    }

    /// A tiny byte-level vocabulary; `Ġ` is the byte-level spelling of a space.
    const TOKENS: &[&str] = &[
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "a",
        "b",
        "Ġ",
        "ab",
        "Ġab",
        "1",
        "2",
        "12",
        ",",
        ",a",
        "3",
        "4",
        "123",
    ];

    fn tiny(pre: &str, model: &str, add_bos: bool) -> (tempfile::TempDir, GgufFile) {
        let mut w = GgufWriter::new(3);
        w.kv("general.architecture", GgufValue::String("llama".into()));
        w.kv("llama.context_length", GgufValue::U32(2048));
        w.kv("tokenizer.ggml.model", GgufValue::String(model.into()));
        w.kv("tokenizer.ggml.pre", GgufValue::String(pre.into()));
        w.kv("tokenizer.ggml.tokens", strs(TOKENS));
        w.kv(
            "tokenizer.ggml.merges",
            strs(&["a b", "Ġ ab", "1 2", "12 3", ", a"]),
        );
        let mut types = vec![1i32; TOKENS.len()];
        types[..3].fill(3);
        w.kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(GgufArray::I32(types)),
        );
        w.kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
        w.kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
        w.kv("tokenizer.ggml.unknown_token_id", GgufValue::U32(0));
        w.kv("tokenizer.ggml.padding_token_id", GgufValue::U32(2));
        w.kv("tokenizer.ggml.add_bos_token", GgufValue::Bool(add_bos));
        w.kv(
            "tokenizer.chat_template",
            GgufValue::String("{{ x }}".into()),
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok.gguf");
        std::fs::write(&p, w.to_bytes()).unwrap();
        let f = GgufFile::open(&p).unwrap();
        (dir, f)
    }

    fn load(f: &GgufFile) -> Tokenizer {
        Tokenizer::from_str(&tokenizer_json(f).unwrap().to_string()).unwrap()
    }

    fn ids(t: &Tokenizer, text: &str, add_special: bool) -> Vec<u32> {
        t.encode(text, add_special).unwrap().get_ids().to_vec()
    }

    #[test]
    fn pre_tokenizer_families_split_as_their_regexes_say() {
        // smollm: every digit alone, so "12" cannot merge.
        let (_d, f) = tiny("smollm", "gpt2", false);
        let t = load(&f);
        assert_eq!(ids(&t, "ab ab12", false), vec![6, 7, 8, 9]);
        assert_eq!(ids(&t, ",a", false), vec![11, 3]);
        // gpt2: " ?\p{N}+" keeps "123" whole; punctuation is its own piece.
        let (_d, f) = tiny("gpt2", "gpt2", false);
        let t = load(&f);
        assert_eq!(ids(&t, "ab ab12", false), vec![6, 7, 10]);
        assert_eq!(ids(&t, "1234", false), vec![15, 14]);
        assert_eq!(ids(&t, ",a", false), vec![11, 3]);
        // llama-bpe: one leading non-letter joins the letters; digits in threes.
        let (_d, f) = tiny("llama-bpe", "gpt2", false);
        let t = load(&f);
        assert_eq!(ids(&t, ",a", false), vec![12]);
        assert_eq!(ids(&t, "1234", false), vec![15, 14]);
    }

    #[test]
    fn control_tokens_are_single_special_ids_and_roundtrip() {
        let (_d, f) = tiny("smollm", "gpt2", false);
        let t = load(&f);
        let text = "<|im_start|>ab<|im_end|>";
        let got = ids(&t, text, true);
        assert_eq!(got, vec![1, 6, 2]);
        assert_eq!(t.decode(&got, false).unwrap(), text);
        assert_eq!(t.decode(&got, true).unwrap(), "ab");
        assert_eq!(t.decode(&[6, 7, 8], false).unwrap(), "ab ab1");
    }

    #[test]
    fn add_bos_token_adds_bos_when_encoding() {
        let (_d, f) = tiny("smollm", "gpt2", true);
        let t = load(&f);
        assert_eq!(ids(&t, "ab", true), vec![1, 6]);
        assert_eq!(ids(&t, "ab", false), vec![6]);
    }

    #[test]
    fn tokenizer_config() {
        let (_d, f) = tiny("smollm", "gpt2", false);
        let c = tokenizer_config_json(&f).unwrap();
        assert_eq!(c["bos_token"], "<|im_start|>");
        assert_eq!(c["eos_token"], "<|im_end|>");
        assert_eq!(c["unk_token"], "<|endoftext|>");
        assert_eq!(c["pad_token"], "<|im_end|>");
        assert_eq!(c["add_bos_token"], false);
        assert_eq!(c["chat_template"], "{{ x }}");
        assert_eq!(c["model_max_length"], 2048);
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_user_errors() {
        let (_d, f) = tiny("smollm", "llama", false);
        let e = tokenizer_json(&f).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("`llama` (SentencePiece)"), "{e}");
        assert!(e.to_string().contains("gpt2"), "{e}");
        let (_d, f) = tiny("qwen2", "gpt2", false);
        let e = tokenizer_json(&f).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("`qwen2`"), "{e}");
    }
}
