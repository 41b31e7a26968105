//! Text ↔ token ids for an artifact, and streaming detokenisation.
//!
//! `tokenizer.json` (Hugging Face tokenizers) is preferred. A folder with only `vocab.json` +
//! `merges.txt` (GPT-2 style) gets a byte-level BPE tokenizer built from them, plus
//! `added_tokens.json` as special tokens when present. `tokenizer_config.json` supplies the BOS/EOS
//! token strings and the Jinja chat template.

use crate::user_bail;
use anyhow::{Context, Result};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// What the runtime uses from `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The Jinja chat template (the `default` one when the file holds a list of named templates).
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads `tokenizer_config.json`; token fields may be strings or `{"content": …}` objects.
    pub fn from_json(text: &str) -> Result<TokenizerConfig> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |want: Option<&str>| {
                    list.iter().find_map(|e| {
                        let name = e.get("name").and_then(|n| n.as_str());
                        let tpl = e.get("template").and_then(|t| t.as_str())?;
                        (want.is_none() || name == want).then(|| tpl.to_string())
                    })
                };
                named(Some("default")).or_else(|| named(None))
            }
            _ => None,
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            chat_template,
        })
    }
}

/// A tokenizer plus its config.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub config: TokenizerConfig,
}

fn tok_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

impl TextTokenizer {
    /// Loads the tokenizer files of an artifact folder.
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            TokenizerConfig::from_json(&text).map_err(|e| {
                crate::error::user(format!("{}: invalid JSON: {e}", config_path.display()))
            })?
        } else {
            TokenizerConfig::default()
        };
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let inner = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| {
                crate::error::user(format!(
                    "cannot load tokenizer {}: {e}; rebuild the artifact",
                    json.display()
                ))
            })?
        } else if vocab.is_file() && merges.is_file() {
            let added = dir.join("added_tokens.json");
            byte_level_bpe(&vocab, &merges, added.is_file().then_some(added.as_path()))?
        } else if dir.join("tokenizer.model").is_file() {
            user_bail!(
                "{} has only a SentencePiece tokenizer.model; mlcb runs tokenizer.json (or vocab.json + \
                 merges.txt). Convert it with Hugging Face transformers (`AutoTokenizer.from_pretrained(…, \
                 use_fast=True).save_pretrained(…)`) and rebuild",
                dir.display()
            )
        } else {
            user_bail!(
                "{} has no tokenizer: expected tokenizer.json, or vocab.json + merges.txt; rebuild the artifact",
                dir.display()
            )
        };
        Ok(TextTokenizer { inner, config })
    }

    pub fn from_tokenizer(inner: Tokenizer, config: TokenizerConfig) -> TextTokenizer {
        TextTokenizer { inner, config }
    }

    /// Token ids of `text`; `add_special_tokens` lets the tokenizer's post-processor add BOS etc.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)
            .context("tokenizing the prompt")?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(tok_err)
            .context("decoding tokens")
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of the EOS token named by `tokenizer_config.json`, if it is in the vocabulary.
    pub fn eos_id(&self) -> Option<u32> {
        self.config
            .eos_token
            .as_deref()
            .and_then(|t| self.token_id(t))
    }

    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// A GPT-2 style byte-level BPE tokenizer from `vocab.json` + `merges.txt`.
fn byte_level_bpe(vocab: &Path, merges: &Path, added: Option<&Path>) -> Result<Tokenizer> {
    let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let bpe = BPE::from_file(&v, &m).build().map_err(|e| {
        crate::error::user(format!(
            "cannot build a BPE tokenizer from {} and {}: {e}",
            vocab.display(),
            merges.display()
        ))
    })?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    if let Some(path) = added {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let map: std::collections::BTreeMap<String, u32> = serde_json::from_str(&text)
            .map_err(|e| crate::error::user(format!("{}: {e}", path.display())))?;
        let mut tokens: Vec<(u32, String)> = map.into_iter().map(|(k, v)| (v, k)).collect();
        tokens.sort();
        tok.add_special_tokens(tokens.into_iter().map(|(_, t)| AddedToken::from(t, true)))
            .map_err(tok_err)?;
    }
    Ok(tok)
}

/// Turns ids into text piece by piece as they are generated.
///
/// Decoding a single id is wrong for many tokenizers (byte-level BPE splits a character over
/// several tokens; SentencePiece drops the leading space of the first token of a sequence), so each
/// step decodes a small window: the ids from `prefix` up to the last emitted one, and the same
/// window with the new ids. The new text is the difference. A window ending in U+FFFD is an
/// incomplete UTF-8 character: it is held back until the next id completes it.
pub struct StreamDecoder<'a> {
    tokenizer: &'a TextTokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window.
    prefix: usize,
    /// Ids before this one have been emitted.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text that became complete (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let piece = text_after(&before, &after);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the very end shows as U+FFFD).
    pub fn flush(&mut self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(text_after(&before, &after))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The part of `after` that follows `before`: by bytes when `before` is a prefix (the usual case),
/// else by characters.
fn text_after(before: &str, after: &str) -> String {
    match after.strip_prefix(before) {
        Some(rest) => rest.to_string(),
        None => after.chars().skip(before.chars().count()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "tests/fixtures/tiny-llama";

    fn fixture() -> TextTokenizer {
        TextTokenizer::from_dir(Path::new(FIXTURE)).unwrap()
    }

    #[test]
    fn loads_fixture_and_config() {
        let t = fixture();
        assert_eq!(t.config.eos_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(t.eos_id(), Some(0));
        let ids = t.encode("Hello world", false).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids).unwrap(), "Hello world");
    }

    #[test]
    fn streaming_never_splits_a_character() {
        let t = fixture();
        let text = "Grüße, 世界! ok 😀 done";
        let ids = t.encode(text, false).unwrap();
        // The vocabulary has 490 byte-level tokens, so multi-byte characters span several ids.
        assert!(ids.len() > text.chars().count() / 2);
        let mut s = t.stream();
        let mut out = String::new();
        let mut held_back = 0;
        for &id in &ids {
            let piece = s.push(id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "half a character emitted: {piece:?}"
            );
            if piece.is_empty() {
                held_back += 1;
            }
            out.push_str(&piece);
        }
        out.push_str(&s.flush().unwrap());
        assert_eq!(out, text);
        assert!(
            held_back > 0,
            "the emoji's bytes should have been held back"
        );
    }

    #[test]
    fn flush_reports_an_incomplete_tail() {
        let t = fixture();
        let ids = t.encode("a😀", false).unwrap();
        let mut s = t.stream();
        let mut out = String::new();
        for &id in &ids[..ids.len() - 1] {
            out.push_str(&s.push(id).unwrap());
        }
        assert_eq!(out, "a");
        assert!(s.flush().unwrap().contains('\u{FFFD}'));
    }

    #[test]
    fn special_tokens_are_not_printed() {
        let t = fixture();
        let mut s = t.stream();
        let mut out = String::new();
        for id in t.encode("hi", false).unwrap().into_iter().chain([0]) {
            out.push_str(&s.push(id).unwrap());
        }
        out.push_str(&s.flush().unwrap());
        assert_eq!(out, "hi");
    }

    #[test]
    fn vocab_and_merges_give_the_same_ids() {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(Path::new(FIXTURE).join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let model = &json["model"];
        std::fs::write(
            tmp.path().join("vocab.json"),
            serde_json::to_string(&model["vocab"]).unwrap(),
        )
        .unwrap();
        let mut merges = String::from("#version: 0.2\n");
        for m in model["merges"].as_array().unwrap() {
            let line = match m {
                serde_json::Value::String(s) => s.clone(),
                pair => format!(
                    "{} {}",
                    pair[0].as_str().unwrap(),
                    pair[1].as_str().unwrap()
                ),
            };
            merges.push_str(&line);
            merges.push('\n');
        }
        std::fs::write(tmp.path().join("merges.txt"), merges).unwrap();
        std::fs::write(
            tmp.path().join("added_tokens.json"),
            r#"{"<|endoftext|>": 0}"#,
        )
        .unwrap();
        let from_merges = TextTokenizer::from_dir(tmp.path()).unwrap();
        let reference = fixture();
        for text in [
            "Hello world, the cat sat.",
            "  spaced\nlines",
            "ünï <|endoftext|> x",
        ] {
            assert_eq!(
                from_merges.encode(text, false).unwrap(),
                reference.encode(text, false).unwrap(),
                "{text:?}"
            );
        }
        assert_eq!(from_merges.token_id("<|endoftext|>"), Some(0));
    }

    #[test]
    fn config_accepts_object_tokens_and_template_lists() {
        let c = TokenizerConfig::from_json(
            r#"{"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.chat_template.as_deref(), Some("D"));
    }

    #[test]
    fn missing_tokenizer_is_a_user_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(tmp.path()).err().unwrap();
        assert_eq!(crate::error::class_of(&err), crate::error::ErrorClass::User);
    }
}
