//! The Llama artifact parameters and where each comes from.

use super::config::LlamaParams;
use crate::model::{ModelConfig, ParamSpec, Transform};
use crate::quant::scheme::TensorRole;

/// Logical names of the artifact parameters (the lowering refers to them by these).
pub(crate) mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub fn layer(i: usize, what: &str) -> String {
        format!("model.layers.{i}.{what}")
    }
    pub const INPUT_NORM: &str = "input_layernorm.weight";
    pub const QKV: &str = "self_attn.qkv_proj.weight";
    pub const O_PROJ: &str = "self_attn.o_proj.weight";
    pub const POST_NORM: &str = "post_attention_layernorm.weight";
    pub const GATE_UP: &str = "mlp.gate_up_proj.weight";
    pub const DOWN: &str = "mlp.down_proj.weight";
}

fn spec(name: String, role: TensorRole, shape: Vec<usize>, sources: Vec<String>) -> ParamSpec {
    let transform = if sources.len() > 1 {
        Transform::ConcatRows
    } else {
        Transform::Identity
    };
    ParamSpec {
        name,
        role,
        shape,
        sources,
        transform,
    }
}

pub fn params(c: &ModelConfig, p: &LlamaParams) -> Vec<ParamSpec> {
    use names::*;
    let (v, h, i) = (c.vocab_size, c.hidden_size, p.intermediate_size);
    let q_rows = p.num_heads * p.head_dim;
    let kv_rows = p.num_kv_heads * p.head_dim;
    let mut out = vec![spec(
        EMBED.into(),
        TensorRole::Embedding,
        vec![v, h],
        vec![EMBED.into()],
    )];
    for l in 0..c.num_layers {
        let hf = |what: &str| layer(l, what);
        out.push(spec(
            hf(INPUT_NORM),
            TensorRole::Raw,
            vec![h],
            vec![hf(INPUT_NORM)],
        ));
        out.push(spec(
            hf(QKV),
            TensorRole::Linear,
            vec![q_rows + 2 * kv_rows, h],
            vec![
                hf("self_attn.q_proj.weight"),
                hf("self_attn.k_proj.weight"),
                hf("self_attn.v_proj.weight"),
            ],
        ));
        out.push(spec(
            hf(O_PROJ),
            TensorRole::Linear,
            vec![h, q_rows],
            vec![hf(O_PROJ)],
        ));
        out.push(spec(
            hf(POST_NORM),
            TensorRole::Raw,
            vec![h],
            vec![hf(POST_NORM)],
        ));
        out.push(spec(
            hf(GATE_UP),
            TensorRole::Linear,
            vec![2 * i, h],
            vec![hf("mlp.gate_proj.weight"), hf("mlp.up_proj.weight")],
        ));
        out.push(spec(
            hf(DOWN),
            TensorRole::Linear,
            vec![h, i],
            vec![hf(DOWN)],
        ));
    }
    out.push(spec(
        NORM.into(),
        TensorRole::Raw,
        vec![h],
        vec![NORM.into()],
    ));
    if !p.tie_word_embeddings {
        out.push(spec(
            LM_HEAD.into(),
            TensorRole::LmHead,
            vec![v, h],
            vec![LM_HEAD.into()],
        ));
    }
    out
}
