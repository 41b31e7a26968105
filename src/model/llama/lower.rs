//! The Llama forward pass as an execution plan.

use super::config::LlamaParams;
use super::params::names::*;
use crate::formats::model_lib::plan::{Op, Plan, StateDecl};
use crate::model::plan_builder::{check_max_seq_len, PlanBuilder};
use crate::model::{ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;

pub fn lower(
    c: &ModelConfig,
    p: &LlamaParams,
    params: &[ParamSpec],
    scheme: &QuantScheme,
    max_seq_len: usize,
) -> Result<Plan> {
    check_max_seq_len(max_seq_len, c)?;
    let mut b = PlanBuilder::new(params, scheme);
    let (nq, nkv, hd) = (p.num_heads, p.num_kv_heads, p.head_dim);
    let eps = p.rms_norm_eps as f32;
    let h = b.buf("hidden", c.hidden_size);
    let x = b.buf("normed", c.hidden_size);
    let qkv = b.buf("qkv", (nq + 2 * nkv) * hd);
    let attn = b.buf("attn", nq * hd);
    let proj = b.buf("proj", c.hidden_size);
    let gate_up = b.buf("gate_up", 2 * p.intermediate_size);
    let act = b.buf("act", p.intermediate_size);
    let logits = b.buf("logits", c.vocab_size);

    let embed = b.embedding(EMBED, h)?;
    for l in 0..c.num_layers {
        let state = b.state(StateDecl::KvCache {
            layer: l,
            n_kv_heads: nkv,
            head_dim: hd,
        });
        let w = |what| b.w(&layer(l, what));
        let (ln1, wqkv, wo, ln2, wgu, wd) = (
            w(INPUT_NORM)?,
            w(QKV)?,
            w(O_PROJ)?,
            w(POST_NORM)?,
            w(GATE_UP)?,
            w(DOWN)?,
        );
        b.op(Op::RmsNorm {
            input: h,
            weight: ln1,
            eps,
            out: x,
        });
        b.op(Op::matmul(x, wqkv, None, qkv));
        b.op(Op::Rotary {
            qkv,
            n_q_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
            rotary_dim: p.rotary_dim,
            theta: p.rope_theta as f32,
        });
        b.op(Op::Attention {
            qkv,
            state,
            n_q_heads: nq,
            n_kv_heads: nkv,
            head_dim: hd,
            out: attn,
            rotary: None,
        });
        b.op(Op::matmul(attn, wo, None, proj));
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
        b.op(Op::RmsNorm {
            input: h,
            weight: ln2,
            eps,
            out: x,
        });
        b.op(Op::matmul(x, wgu, None, gate_up));
        b.op(Op::SiluMul {
            input: gate_up,
            out: act,
        });
        b.op(Op::matmul(act, wd, None, proj));
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
    }
    let norm = b.w(NORM)?;
    b.op(Op::RmsNorm {
        input: h,
        weight: norm,
        eps,
        out: x,
    });
    b.logits(x, p.tie_word_embeddings.then_some(embed), LM_HEAD)?;
    Ok(b.finish(c, scheme, max_seq_len, c.eos_token_ids.clone(), logits))
}
