//! Tests on the real SmolLM2-135M-Instruct.Q4_1.gguf, run only when `MLCB_SMOLLM2_GGUF` points at
//! it (scripts/fetch-smollm2.sh downloads it). Expected values come from gguf-py 0.19.0 and
//! candle (see /work/shared/reference/build-stack.md §3), and from what the model is known to say.

use super::dequant::dequantize_tensor;
use super::{GgmlType, GgufModel};
use crate::formats::tensor::TensorSource;
use rayon::prelude::*;
use std::path::PathBuf;
use std::str::FromStr;

fn model_path() -> Option<PathBuf> {
    match std::env::var_os("MLCB_SMOLLM2_GGUF") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("skipped: set MLCB_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf to run");
            None
        }
    }
}

fn sum(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum()
}

#[test]
fn smollm2_container_and_dequantized_sums() {
    let Some(path) = model_path() else { return };
    let m = GgufModel::open(&path).unwrap();
    let f = m.file();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset(), 1785664);
    assert_eq!(f.metadata().len(), 33);
    assert_eq!(f.tensors().len(), 272);
    let count = |t: GgmlType| f.tensors().iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );

    let embd = f.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ne, vec![576, 49152]);
    let s = sum(&dequantize_tensor(f, embd).unwrap());
    assert!((s - -15353.0445).abs() < 1e-2, "token_embd sum {s}");
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    let s = sum(&dequantize_tensor(f, q).unwrap());
    assert!((s - 59.2232).abs() < 1e-3, "attn_q sum {s}");
    let d = f.tensor("blk.0.ffn_down.weight").unwrap();
    let s = sum(&dequantize_tensor(f, d).unwrap());
    assert!((s - 150.6358).abs() < 1e-3, "ffn_down sum {s}");

    // HF view: 272 tensors (no lm_head: tied), row-major [out, in] shapes.
    assert_eq!(m.infos().len(), 272);
    assert!(m.info("lm_head.weight").is_none());
    let shape = |n: &str| m.info(n).unwrap().shape.clone();
    assert_eq!(shape("model.embed_tokens.weight"), vec![49152, 576]);
    assert_eq!(
        shape("model.layers.29.self_attn.q_proj.weight"),
        vec![576, 576]
    );
    assert_eq!(
        shape("model.layers.0.self_attn.k_proj.weight"),
        vec![192, 576]
    );
    assert_eq!(
        shape("model.layers.0.self_attn.v_proj.weight"),
        vec![192, 576]
    );
    assert_eq!(
        shape("model.layers.0.mlp.gate_proj.weight"),
        vec![1536, 576]
    );
    assert_eq!(
        shape("model.layers.0.mlp.down_proj.weight"),
        vec![576, 1536]
    );
    assert_eq!(shape("model.norm.weight"), vec![576]);
    // The un-permutation moves rows, it does not change the sum.
    let hq = m.read("model.layers.0.self_attn.q_proj.weight").unwrap();
    let s = sum(&hq.to_f32().unwrap());
    assert!((s - 59.2232).abs() < 1e-3, "q_proj sum {s}");

    let c = m.hf_config();
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert!(c.get("head_dim").is_none());
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(
        (c["bos_token_id"].clone(), c["eos_token_id"].clone()),
        (1.into(), 2.into())
    );
}

#[test]
fn smollm2_tokenizer_roundtrips() {
    let Some(path) = model_path() else { return };
    let m = GgufModel::open(&path).unwrap();
    let t = tokenizers::Tokenizer::from_str(&m.tokenizer_json().unwrap().to_string()).unwrap();
    for text in [
        "The capital of France is",
        "<|im_start|>user\nHi<|im_end|>",
        "Rust 2024: 12345!",
    ] {
        let enc = t.encode(text, true).unwrap();
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), text);
    }
    let ids = t
        .encode("<|im_start|>user\nHi<|im_end|>", true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    // No BOS is added: the prompt's first token is its own.
    let ids = t.encode("The capital", true).unwrap().get_ids().to_vec();
    assert_ne!(ids[0], 1);
    // Digits split one by one (pre-tokenizer `smollm`).
    assert_eq!(t.encode("123", false).unwrap().get_ids().len(), 3);

    let c = m.tokenizer_config_json().unwrap();
    assert_eq!(c["bos_token"], "<|im_start|>");
    assert_eq!(c["eos_token"], "<|im_end|>");
    assert_eq!(c["add_bos_token"], false);
    assert!(c["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

/// HF Llama forward in plain f32 over the HF view (test-only reference): if names, shapes,
/// dequantization or the tokenizer were wrong, the model would not continue "The capital of
/// France is" with " Paris". A short prompt is robust to a wrong q/k row order, so the logits
/// are also compared with llama.cpp's own semantics: the raw GGUF q/k rows with interleaved
/// rope (pairs 2i, 2i+1) must give the same logits as HF rows with rotate-half rope.
#[test]
fn smollm2_greedy_says_paris_and_unpermutation_matches_llama_cpp_rope() {
    let Some(path) = model_path() else { return };
    let m = GgufModel::open(&path).unwrap();
    let t = tokenizers::Tokenizer::from_str(&m.tokenizer_json().unwrap().to_string()).unwrap();
    let ids = t
        .encode("The capital of France is", false)
        .unwrap()
        .get_ids()
        .to_vec();
    let logits = forward(&m, &ids, Rope::HfRotateHalf);
    let best = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    let word = t.decode(&[best as u32], false).unwrap();
    assert!(word.starts_with(" Paris"), "greedy token {best} = {word:?}");

    let native = forward(&m, &ids, Rope::GgufInterleaved);
    let diff = logits
        .iter()
        .zip(&native)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max abs difference of HF-layout and GGUF-layout logits: {diff}");
    assert!(
        diff < 1e-3,
        "HF-layout and GGUF-layout logits differ by {diff}"
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Rope {
    /// HF q/k rows (un-permuted by GgufModel), rotate-half rope.
    HfRotateHalf,
    /// The GGUF's own q/k rows, llama.cpp's interleaved rope.
    GgufInterleaved,
}

fn w(m: &GgufModel, name: &str) -> Vec<f32> {
    m.read(name).unwrap().to_f32().unwrap()
}

/// x [n, k] times w [out, k]ᵀ → [n, out].
fn linear(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let out = w.len() / k;
    let n = x.len() / k;
    let mut y = vec![0f32; n * out];
    y.par_chunks_mut(out).enumerate().for_each(|(i, row)| {
        let xi = &x[i * k..(i + 1) * k];
        for (o, r) in row.iter_mut().enumerate() {
            *r = xi
                .iter()
                .zip(&w[o * k..(o + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
        }
    });
    y
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|r| {
            let s = (r.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
            r.iter().zip(w).map(move |(v, g)| v / s * g)
        })
        .collect()
}

/// Rope on [n, heads*hd] in place. Frequency i rotates dims (i, i + hd/2) in HF's layout and
/// dims (2i, 2i+1) in llama.cpp's.
fn rope(x: &mut [f32], heads: usize, hd: usize, theta: f32, style: Rope) {
    let half = hd / 2;
    for (pos, row) in x.chunks_mut(heads * hd).enumerate() {
        for h in row.chunks_mut(hd) {
            for i in 0..half {
                let a = pos as f32 / theta.powf((2 * i) as f32 / hd as f32);
                let (s, c) = a.sin_cos();
                let (i1, i2) = match style {
                    Rope::HfRotateHalf => (i, i + half),
                    Rope::GgufInterleaved => (2 * i, 2 * i + 1),
                };
                let (x1, x2) = (h[i1], h[i2]);
                h[i1] = x1 * c - x2 * s;
                h[i2] = x2 * c + x1 * s;
            }
        }
    }
}

/// q/k weights of layer `l` in the layout `style` expects.
fn qk(m: &GgufModel, l: usize, which: &str, style: Rope) -> Vec<f32> {
    match style {
        Rope::HfRotateHalf => w(
            m,
            &format!("model.layers.{l}.self_attn.{which}_proj.weight"),
        ),
        Rope::GgufInterleaved => {
            let t = m
                .file()
                .tensor(&format!("blk.{l}.attn_{which}.weight"))
                .unwrap();
            dequantize_tensor(m.file(), t).unwrap()
        }
    }
}

fn forward(m: &GgufModel, ids: &[u32], style: Rope) -> Vec<f32> {
    let c = m.hf_config();
    let dim = c["hidden_size"].as_u64().unwrap() as usize;
    let heads = c["num_attention_heads"].as_u64().unwrap() as usize;
    let kv = c["num_key_value_heads"].as_u64().unwrap() as usize;
    let layers = c["num_hidden_layers"].as_u64().unwrap() as usize;
    let theta = c["rope_theta"].as_f64().unwrap() as f32;
    let eps = c["rms_norm_eps"].as_f64().unwrap() as f32;
    let hd = dim / heads;
    let n = ids.len();
    let embed = w(m, "model.embed_tokens.weight");
    let mut x: Vec<f32> = ids
        .iter()
        .flat_map(|&i| embed[i as usize * dim..(i as usize + 1) * dim].to_vec())
        .collect();
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        let h = rms_norm(&x, &w(m, &p("input_layernorm")), eps);
        let mut q = linear(&h, &qk(m, l, "q", style), dim);
        let mut k = linear(&h, &qk(m, l, "k", style), dim);
        let v = linear(&h, &w(m, &p("self_attn.v_proj")), dim);
        rope(&mut q, heads, hd, theta, style);
        rope(&mut k, kv, hd, theta, style);
        let mut att = vec![0f32; n * dim];
        for i in 0..n {
            for hh in 0..heads {
                let g = hh / (heads / kv);
                let qi = &q[i * dim + hh * hd..][..hd];
                let mut s: Vec<f32> = (0..=i)
                    .map(|j| {
                        let kj = &k[j * kv * hd + g * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f32::MIN, f32::max);
                s.iter_mut().for_each(|v| *v = (*v - mx).exp());
                let z: f32 = s.iter().sum();
                for (j, sj) in s.iter().enumerate() {
                    let vj = &v[j * kv * hd + g * hd..][..hd];
                    for d in 0..hd {
                        att[i * dim + hh * hd + d] += sj / z * vj[d];
                    }
                }
            }
        }
        let o = linear(&att, &w(m, &p("self_attn.o_proj")), dim);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let h = rms_norm(&x, &w(m, &p("post_attention_layernorm")), eps);
        let gate = linear(&h, &w(m, &p("mlp.gate_proj")), dim);
        let up = linear(&h, &w(m, &p("mlp.up_proj")), dim);
        let act: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let ffn = up.len() / n;
        let down = linear(&act, &w(m, &p("mlp.down_proj")), ffn);
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
    let x = rms_norm(&x[(n - 1) * dim..], &w(m, "model.norm.weight"), eps);
    linear(&x, &embed, dim)
}
