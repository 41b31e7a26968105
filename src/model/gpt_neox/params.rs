//! The GPT-NeoX artifact parameters and where each comes from.

use super::config::NeoxParams;
use crate::model::{ModelConfig, ParamSpec, Transform};
use crate::quant::scheme::TensorRole;

pub(crate) mod names {
    pub const EMBED: &str = "gpt_neox.embed_in.weight";
    pub const FINAL_NORM: &str = "gpt_neox.final_layer_norm";
    /// Seed-era checkpoints call the output projection `embed_out`; some newer ones `lm_head`.
    pub const LM_HEAD: &str = "embed_out.weight";
    pub const LM_HEAD_SOURCES: &str = "embed_out.weight|lm_head.weight";
    pub fn layer(i: usize, what: &str) -> String {
        format!("gpt_neox.layers.{i}.{what}")
    }
    pub const LN1: &str = "input_layernorm";
    pub const LN2: &str = "post_attention_layernorm";
    pub const QKV: &str = "attention.query_key_value";
    pub const DENSE: &str = "attention.dense";
    pub const UP: &str = "mlp.dense_h_to_4h";
    pub const DOWN: &str = "mlp.dense_4h_to_h";
}

fn spec(name: String, role: TensorRole, shape: Vec<usize>, transform: Transform) -> ParamSpec {
    ParamSpec {
        sources: vec![name.clone()],
        name,
        role,
        shape,
        transform,
    }
}

fn plain(name: String, role: TensorRole, shape: Vec<usize>) -> ParamSpec {
    spec(name, role, shape, Transform::Identity)
}

pub fn params(c: &ModelConfig, p: &NeoxParams) -> Vec<ParamSpec> {
    use names::*;
    let (v, h, i) = (c.vocab_size, c.hidden_size, p.intermediate_size);
    let raw = TensorRole::Raw;
    let mut out = vec![plain(EMBED.into(), TensorRole::Embedding, vec![v, h])];
    let qkv = Transform::NeoxQkv {
        heads: p.num_heads,
        head_dim: p.head_dim,
    };
    for l in 0..c.num_layers {
        let n = |what: &str, suffix: &str| layer(l, &format!("{what}.{suffix}"));
        out.push(plain(n(LN1, "weight"), raw, vec![h]));
        out.push(plain(n(LN1, "bias"), raw, vec![h]));
        out.push(spec(
            n(QKV, "weight"),
            TensorRole::Linear,
            vec![3 * h, h],
            qkv.clone(),
        ));
        if p.attention_bias {
            out.push(spec(n(QKV, "bias"), raw, vec![3 * h], qkv.clone()));
        }
        out.push(plain(n(DENSE, "weight"), TensorRole::Linear, vec![h, h]));
        if p.attention_bias {
            out.push(plain(n(DENSE, "bias"), raw, vec![h]));
        }
        out.push(plain(n(LN2, "weight"), raw, vec![h]));
        out.push(plain(n(LN2, "bias"), raw, vec![h]));
        out.push(plain(n(UP, "weight"), TensorRole::Linear, vec![i, h]));
        out.push(plain(n(UP, "bias"), raw, vec![i]));
        out.push(plain(n(DOWN, "weight"), TensorRole::Linear, vec![h, i]));
        out.push(plain(n(DOWN, "bias"), raw, vec![h]));
    }
    out.push(plain(format!("{FINAL_NORM}.weight"), raw, vec![h]));
    out.push(plain(format!("{FINAL_NORM}.bias"), raw, vec![h]));
    if !p.tie_word_embeddings {
        let mut head = plain(LM_HEAD.into(), TensorRole::LmHead, vec![v, h]);
        head.sources = vec![LM_HEAD_SOURCES.into()];
        out.push(head);
    }
    out
}
