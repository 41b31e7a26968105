//! A GGUF file seen as a Hugging Face checkpoint: HF tensor names and row-major shapes, f32 data,
//! and a `config.json` equivalent, so the rest of mlcb treats it like any other model folder.
//!
//! llama.cpp's converter reorders the rows of `attn_q`/`attn_k` (per head, it interleaves the two
//! rotary halves so its rope can rotate adjacent pairs); [`unpermute_rows`] restores HF's
//! rotate-half order.

use super::dequant::dequantize_tensor;
use super::reader::GgufFile;
use super::tokenizer;
use crate::error::user;
use crate::formats::dtype::DType;
use crate::formats::tensor::{Tensor, TensorInfo, TensorSource};
use anyhow::Result;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::path::Path;

/// The architectures `general.architecture` may name.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// How a GGUF tensor becomes its HF counterpart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reorder {
    None,
    /// Undo llama.cpp's q/k permutation with this many heads.
    UnpermuteHeads(usize),
}

#[derive(Debug)]
struct Entry {
    gguf_index: usize,
    reorder: Reorder,
}

/// A GGUF model file opened as a [`TensorSource`] with Hugging Face names.
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    infos: Vec<TensorInfo>,
    entries: Vec<Entry>,
    config: Value,
}

impl GgufModel {
    /// Open `path`, check its architecture is supported, and map every tensor to its HF name.
    /// Unknown architectures or tensors, and inconsistent head counts, are user errors.
    pub fn open(path: &Path) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        let arch = file.opt_str("general.architecture")?.unwrap_or("");
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(user(format!(
                "GGUF file {} has architecture `{arch}`; mlcb reads GGUF models of architecture {}",
                path.display(),
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let config = llama_config(&file)?;
        let heads = config["num_attention_heads"].as_u64().unwrap_or(0) as usize;
        let kv_heads = config["num_key_value_heads"].as_u64().unwrap_or(0) as usize;

        let mut infos = Vec::with_capacity(file.tensors().len());
        let mut entries = Vec::with_capacity(file.tensors().len());
        for (i, t) in file.tensors().iter().enumerate() {
            let Some((name, kind)) = hf_name(&t.name) else {
                return Err(user(format!(
                    "GGUF file {}: tensor `{}` has no Hugging Face llama counterpart; mlcb does \
                     not support this variant of the architecture",
                    path.display(),
                    t.name
                )));
            };
            let shape = t.row_major_shape();
            let reorder = match kind {
                Kind::Plain => Reorder::None,
                Kind::Q => Reorder::UnpermuteHeads(heads),
                Kind::K => Reorder::UnpermuteHeads(kv_heads),
            };
            if let Reorder::UnpermuteHeads(h) = reorder {
                if shape.len() != 2 || h == 0 || shape[0] % (2 * h) != 0 {
                    return Err(user(format!(
                        "GGUF file {}: tensor `{}` has shape {shape:?}, which does not split into \
                         {h} heads of even size",
                        path.display(),
                        t.name
                    )));
                }
            }
            infos.push(TensorInfo {
                name,
                dtype: DType::F32,
                shape,
            });
            entries.push(Entry {
                gguf_index: i,
                reorder,
            });
        }
        Ok(GgufModel {
            file,
            infos,
            entries,
            config,
        })
    }

    /// The underlying container (metadata, raw tensor table).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// A Hugging Face `config.json` equivalent (`model_type` "llama").
    pub fn hf_config(&self) -> Value {
        self.config.clone()
    }

    /// A Hugging Face `tokenizer.json` built from `tokenizer.ggml.*`.
    pub fn tokenizer_json(&self) -> Result<Value> {
        tokenizer::tokenizer_json(&self.file)
    }

    /// A Hugging Face `tokenizer_config.json` (special tokens, add_bos/eos, chat template).
    pub fn tokenizer_config_json(&self) -> Result<Value> {
        tokenizer::tokenizer_config_json(&self.file)
    }
}

impl TensorSource for GgufModel {
    fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The tensor as f32, row-major, HF layout. F32 tensors are borrowed from the map.
    fn read(&self, name: &str) -> Result<Tensor<'_>> {
        let Some(pos) = self.infos.iter().position(|i| i.name == name) else {
            return Err(user(format!(
                "GGUF file {} has no tensor that maps to `{name}`",
                self.file.path().display()
            )));
        };
        let info = &self.infos[pos];
        let entry = &self.entries[pos];
        let t = &self.file.tensors()[entry.gguf_index];
        if entry.reorder == Reorder::None && t.ggml_type == super::GgmlType::F32 {
            return Ok(Tensor {
                dtype: DType::F32,
                shape: info.shape.clone(),
                data: Cow::Borrowed(self.file.tensor_bytes(t)),
            });
        }
        let mut values = dequantize_tensor(&self.file, t)?;
        if let Reorder::UnpermuteHeads(heads) = entry.reorder {
            values = unpermute_rows(&values, info.shape[0], info.shape[1], heads);
        }
        Ok(Tensor::from_f32(info.shape.clone(), &values))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    Q,
    K,
}

/// The HF name of a llama GGUF tensor, and whether it needs the q/k un-permutation.
fn hf_name(gguf: &str) -> Option<(String, Kind)> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some((n.to_string(), Kind::Plain));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, kind) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", Kind::Plain),
        "attn_q.weight" => ("self_attn.q_proj.weight", Kind::Q),
        "attn_k.weight" => ("self_attn.k_proj.weight", Kind::K),
        "attn_v.weight" => ("self_attn.v_proj.weight", Kind::Plain),
        "attn_output.weight" => ("self_attn.o_proj.weight", Kind::Plain),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", Kind::Plain),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", Kind::Plain),
        "ffn_up.weight" => ("mlp.up_proj.weight", Kind::Plain),
        "ffn_down.weight" => ("mlp.down_proj.weight", Kind::Plain),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), kind))
}

/// Invert llama.cpp's `permute(w, n_head)`, which is
/// `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// GGUF row `h*head_dim + 2*i + j` holds HF row `h*head_dim + j*head_dim/2 + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf = h * head_dim + j * half + i;
                let gg = h * head_dim + 2 * i + j;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&w[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

/// config.json for a llama GGUF.
fn llama_config(f: &GgufFile) -> Result<Value> {
    let p = "llama";
    let path = f.path().display();
    let hidden = f.require_u64(&format!("{p}.embedding_length"))?;
    let heads = f.require_u64(&format!("{p}.attention.head_count"))?;
    let kv_heads = f
        .opt_u64(&format!("{p}.attention.head_count_kv"))?
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(user(format!(
            "GGUF file {path}: {heads} attention heads cannot be shared by {kv_heads} key/value heads"
        )));
    }
    let head_dim = f
        .opt_u64(&format!("{p}.attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(rot) = f.opt_u64(&format!("{p}.rope.dimension_count"))? {
        if rot != head_dim {
            return Err(user(format!(
                "GGUF file {path}: rope covers {rot} of {head_dim} head dimensions; mlcb's llama \
                 supports full rotary embeddings only"
            )));
        }
    }
    if let Some(s) = f.opt_str(&format!("{p}.rope.scaling.type"))? {
        if s != "none" {
            return Err(user(format!(
                "GGUF file {path}: rope scaling `{s}` is not supported by mlcb's llama"
            )));
        }
    }
    let vocab = match f.opt_u64(&format!("{p}.vocab_size"))? {
        Some(v) => v,
        None => match f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(a) => a.len() as u64,
            None => f
                .tensor("token_embd.weight")
                .and_then(|t| t.ne.get(1).copied())
                .ok_or_else(|| {
                    user(format!("GGUF file {path} does not say its vocabulary size"))
                })?,
        },
    };
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": f.require_u64(&format!("{p}.feed_forward_length"))?,
        "num_hidden_layers": f.require_u64(&format!("{p}.block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": f.opt_f64(&format!("{p}.attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        "rope_theta": f.opt_f64(&format!("{p}.rope.freq_base"))?.unwrap_or(10000.0),
        "max_position_embeddings": f.require_u64(&format!("{p}.context_length"))?,
        "tie_word_embeddings": f.tensor("output.weight").is_none(),
        "torch_dtype": "float16",
    });
    if head_dim * heads != hidden {
        c["head_dim"] = json!(head_dim);
    }
    let bos = f.opt_u64("tokenizer.ggml.bos_token_id")?;
    let eos = f.opt_u64("tokenizer.ggml.eos_token_id")?;
    c["bos_token_id"] = json!(bos);
    c["eos_token_id"] = json!(eos);
    if let Some(pad) = f.opt_u64("tokenizer.ggml.padding_token_id")? {
        c["pad_token_id"] = json!(pad);
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::test_writer::{GgufWriter, TensorSpec};
    use super::super::value::{GgufArray, GgufValue};
    use super::super::GgmlType;
    use super::*;
    use crate::error::{class_of, ErrorClass};

    #[test]
    fn unpermute_two_heads_by_hand() {
        // HF q_proj with 2 heads of head_dim 4, 2 input columns; row r holds [r, 10r].
        // llama.cpp's permute gives, per head, rows [0, 2, 1, 3] (pairs of the two halves).
        let gguf_rows = [0, 2, 1, 3, 4, 6, 5, 7];
        let w: Vec<f32> = gguf_rows
            .iter()
            .flat_map(|&r| [r as f32, 10.0 * r as f32])
            .collect();
        let hf = unpermute_rows(&w, 8, 2, 2);
        let expected: Vec<f32> = (0..8).flat_map(|r| [r as f32, 10.0 * r as f32]).collect();
        assert_eq!(hf, expected);

        // head_dim 6 (half 3), one head: GGUF order is [0, 3, 1, 4, 2, 5].
        let w: Vec<f32> = [0., 3., 1., 4., 2., 5.].to_vec();
        assert_eq!(unpermute_rows(&w, 6, 1, 1), vec![0., 1., 2., 3., 4., 5.]);
    }

    fn s(x: &str) -> GgufValue {
        GgufValue::String(x.into())
    }

    /// A 1-layer llama: hidden 8, 2 heads of 4, 1 kv head, ffn 3 (F32 so values are exact),
    /// vocab 5, tied embeddings.
    fn tiny_llama(arch: &str, with_output: bool) -> Vec<u8> {
        let mut w = GgufWriter::new(3);
        w.kv("general.architecture", s(arch));
        w.kv("llama.embedding_length", GgufValue::U32(8));
        w.kv("llama.feed_forward_length", GgufValue::U32(3));
        w.kv("llama.block_count", GgufValue::U32(1));
        w.kv("llama.attention.head_count", GgufValue::U32(2));
        w.kv("llama.attention.head_count_kv", GgufValue::U32(1));
        w.kv(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-6),
        );
        w.kv("llama.rope.freq_base", GgufValue::F32(500000.0));
        w.kv("llama.rope.dimension_count", GgufValue::U32(4));
        w.kv("llama.context_length", GgufValue::U32(128));
        w.kv("tokenizer.ggml.bos_token_id", GgufValue::U32(1));
        w.kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
        let toks = ["<unk>", "<s>", "</s>", "a", "b"];
        w.kv(
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::String(
                toks.iter().map(|t| t.to_string()).collect(),
            )),
        );
        let seq = |n: usize| (0..n).map(|i| i as f32).collect::<Vec<_>>();
        w.tensor(TensorSpec::f32("token_embd.weight", &[8, 5], &seq(40)));
        // Rows of q (8 rows) and k (4 rows), 8 columns; row r is all r, in GGUF (permuted) order.
        let rows =
            |order: &[usize]| -> Vec<f32> { order.iter().flat_map(|&r| [r as f32; 8]).collect() };
        w.tensor(TensorSpec::f32(
            "blk.0.attn_q.weight",
            &[8, 8],
            &rows(&[0, 2, 1, 3, 4, 6, 5, 7]),
        ));
        w.tensor(TensorSpec::f32(
            "blk.0.attn_k.weight",
            &[8, 4],
            &rows(&[0, 2, 1, 3]),
        ));
        w.tensor(TensorSpec::f32("blk.0.attn_v.weight", &[8, 4], &seq(32)));
        w.tensor(TensorSpec::f32(
            "blk.0.attn_output.weight",
            &[8, 8],
            &seq(64),
        ));
        w.tensor(TensorSpec::f32("blk.0.attn_norm.weight", &[8], &seq(8)));
        w.tensor(TensorSpec::f32("blk.0.ffn_norm.weight", &[8], &seq(8)));
        w.tensor(TensorSpec::f32("blk.0.ffn_gate.weight", &[8, 3], &seq(24)));
        w.tensor(TensorSpec::f32("blk.0.ffn_up.weight", &[8, 3], &seq(24)));
        w.tensor(TensorSpec::f32("blk.0.ffn_down.weight", &[3, 8], &seq(24)));
        w.tensor(TensorSpec::f32("output_norm.weight", &[8], &seq(8)));
        if with_output {
            w.tensor(TensorSpec::f32("output.weight", &[8, 5], &seq(40)));
        }
        w.to_bytes()
    }

    fn open(bytes: &[u8]) -> (tempfile::TempDir, Result<GgufModel>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        std::fs::write(&p, bytes).unwrap();
        let m = GgufModel::open(&p);
        (dir, m)
    }

    #[test]
    fn hf_names_shapes_and_unpermuted_q_k() {
        let (_d, m) = open(&tiny_llama("llama", false));
        let m = m.unwrap();
        let shape = |n: &str| m.info(n).unwrap_or_else(|| panic!("{n}")).shape.clone();
        assert_eq!(shape("model.embed_tokens.weight"), vec![5, 8]);
        assert_eq!(shape("model.layers.0.self_attn.q_proj.weight"), vec![8, 8]);
        assert_eq!(shape("model.layers.0.self_attn.k_proj.weight"), vec![4, 8]);
        assert_eq!(shape("model.layers.0.self_attn.v_proj.weight"), vec![4, 8]);
        assert_eq!(shape("model.layers.0.self_attn.o_proj.weight"), vec![8, 8]);
        assert_eq!(shape("model.layers.0.mlp.gate_proj.weight"), vec![3, 8]);
        assert_eq!(shape("model.layers.0.mlp.up_proj.weight"), vec![3, 8]);
        assert_eq!(shape("model.layers.0.mlp.down_proj.weight"), vec![8, 3]);
        assert_eq!(shape("model.layers.0.input_layernorm.weight"), vec![8]);
        assert_eq!(
            shape("model.layers.0.post_attention_layernorm.weight"),
            vec![8]
        );
        assert_eq!(shape("model.norm.weight"), vec![8]);
        assert!(m.info("lm_head.weight").is_none());
        assert_eq!(m.infos().len(), 11);
        assert!(m.infos().iter().all(|i| i.dtype == DType::F32));

        let q = m.read("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(q.shape, vec![8, 8]);
        let q = q.to_f32().unwrap();
        for r in 0..8 {
            assert!(
                q[r * 8..r * 8 + 8].iter().all(|&v| v == r as f32),
                "q row {r}"
            );
        }
        // k has 1 kv head of 4 rows: un-permuted with n_head_kv, not n_head.
        let k = m
            .read("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        for r in 0..4 {
            assert!(
                k[r * 8..r * 8 + 8].iter().all(|&v| v == r as f32),
                "k row {r}"
            );
        }
        // Plain tensors keep memory order: embed row 1 = elements 8..16.
        let e = m.read("model.embed_tokens.weight").unwrap();
        assert!(matches!(e.data, Cow::Borrowed(_)));
        assert_eq!(
            e.to_f32().unwrap()[8..16],
            (8..16).map(|i| i as f32).collect::<Vec<_>>()[..]
        );
        assert!(m.read("lm_head.weight").is_err());
    }

    #[test]
    fn config_json_equivalent() {
        let (_d, m) = open(&tiny_llama("llama", false));
        let c = m.unwrap().hf_config();
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["vocab_size"], 5);
        assert_eq!(c["hidden_size"], 8);
        assert_eq!(c["intermediate_size"], 3);
        assert_eq!(c["num_hidden_layers"], 1);
        assert_eq!(c["num_attention_heads"], 2);
        assert_eq!(c["num_key_value_heads"], 1);
        assert!(c.get("head_dim").is_none());
        assert_eq!(c["rms_norm_eps"], 1e-6);
        assert_eq!(c["rope_theta"], 500000.0);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["torch_dtype"], "float16");

        let (_d, m) = open(&tiny_llama("llama", true));
        let m = m.unwrap();
        assert_eq!(m.hf_config()["tie_word_embeddings"], false);
        assert_eq!(m.info("lm_head.weight").unwrap().shape, vec![5, 8]);
    }

    #[test]
    fn other_architectures_and_types_are_user_errors() {
        let (_d, m) = open(&tiny_llama("gpt2", false));
        let e = m.unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(msg.contains("`gpt2`") && msg.contains("llama"), "{msg}");

        // A Q2_K tensor opens (its layout is known) but reading it names tensor and type.
        let mut w = GgufWriter::new(3);
        w.kv("general.architecture", s("llama"));
        w.kv("llama.embedding_length", GgufValue::U32(256));
        w.kv("llama.feed_forward_length", GgufValue::U32(3));
        w.kv("llama.block_count", GgufValue::U32(1));
        w.kv("llama.attention.head_count", GgufValue::U32(2));
        w.kv("llama.context_length", GgufValue::U32(128));
        w.tensor(TensorSpec::raw(
            "token_embd.weight",
            &[256, 1],
            GgmlType(10),
            vec![0; 84],
        ));
        let (_d, m) = open(&w.to_bytes());
        let e = m.unwrap().read("model.embed_tokens.weight").unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(
            msg.contains("token_embd.weight") && msg.contains("Q2_K"),
            "{msg}"
        );

        // An unknown tensor name.
        w.tensor(TensorSpec::f32("rope_freqs.weight", &[2], &[1.0, 1.0]));
        let (_d, m) = open(&w.to_bytes());
        assert!(m.unwrap_err().to_string().contains("rope_freqs.weight"));
    }
}
