//! The GPT-NeoX forward pass as an execution plan.

use super::config::NeoxParams;
use super::params::names::*;
use crate::formats::model_lib::plan::{Op, Plan, StateDecl};
use crate::model::plan_builder::{check_max_seq_len, PlanBuilder};
use crate::model::{ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;

pub fn lower(
    c: &ModelConfig,
    p: &NeoxParams,
    params: &[ParamSpec],
    scheme: &QuantScheme,
    max_seq_len: usize,
) -> Result<Plan> {
    check_max_seq_len(max_seq_len, c)?;
    let mut b = PlanBuilder::new(params, scheme);
    let (heads, hd, hs) = (p.num_heads, p.head_dim, c.hidden_size);
    let eps = p.layer_norm_eps as f32;
    let h = b.buf("hidden", hs);
    let x = b.buf("normed", hs);
    let x_mlp = b.buf("normed_mlp", hs);
    let qkv = b.buf("qkv", 3 * hs);
    let attn = b.buf("attn", hs);
    let proj = b.buf("proj", hs);
    let ff = b.buf("ff", p.intermediate_size);
    let logits = b.buf("logits", c.vocab_size);

    let embed = b.embedding(EMBED, h)?;
    for l in 0..c.num_layers {
        let state = b.state(StateDecl::KvCache {
            layer: l,
            n_kv_heads: heads,
            head_dim: hd,
        });
        let w = |what: &str, suffix: &str| b.w(&layer(l, &format!("{what}.{suffix}")));
        let bias = |what: &str| -> Result<Option<usize>> {
            if p.attention_bias {
                Ok(Some(w(what, "bias")?))
            } else {
                Ok(None)
            }
        };
        let (ln1_w, ln1_b) = (w(LN1, "weight")?, w(LN1, "bias")?);
        let (ln2_w, ln2_b) = (w(LN2, "weight")?, w(LN2, "bias")?);
        let (qkv_w, qkv_b) = (w(QKV, "weight")?, bias(QKV)?);
        let (dense_w, dense_b) = (w(DENSE, "weight")?, bias(DENSE)?);
        let (up_w, up_b) = (w(UP, "weight")?, w(UP, "bias")?);
        let (down_w, down_b) = (w(DOWN, "weight")?, w(DOWN, "bias")?);

        b.op(Op::LayerNorm {
            input: h,
            weight: ln1_w,
            bias: ln1_b,
            eps,
            out: x,
        });
        if p.use_parallel_residual {
            // h = h + attn(ln1(h)) + mlp(ln2(h)): both norms read the block's input.
            b.op(Op::LayerNorm {
                input: h,
                weight: ln2_w,
                bias: ln2_b,
                eps,
                out: x_mlp,
            });
        }
        b.op(Op::matmul(x, qkv_w, qkv_b, qkv));
        b.op(Op::Rotary {
            qkv,
            n_q_heads: heads,
            n_kv_heads: heads,
            head_dim: hd,
            rotary_dim: p.rotary_dim,
            theta: p.rope_theta as f32,
        });
        b.op(Op::Attention {
            qkv,
            state,
            n_q_heads: heads,
            n_kv_heads: heads,
            head_dim: hd,
            out: attn,
            rotary: None,
        });
        b.op(Op::matmul(attn, dense_w, dense_b, proj));
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
        if !p.use_parallel_residual {
            // h = h' + mlp(ln2(h')) with h' = h + attn(ln1(h)).
            b.op(Op::LayerNorm {
                input: h,
                weight: ln2_w,
                bias: ln2_b,
                eps,
                out: x_mlp,
            });
        }
        b.op(Op::matmul(x_mlp, up_w, Some(up_b), ff));
        b.op(Op::Gelu { buf: ff });
        b.op(Op::matmul(ff, down_w, Some(down_b), proj));
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
    }
    b.layer_norm(FINAL_NORM, h, eps, x)?;
    b.logits(x, p.tie_word_embeddings.then_some(embed), LM_HEAD)?;
    let stop = if c.eos_token_ids.is_empty() {
        vec![0]
    } else {
        c.eos_token_ids.clone()
    };
    Ok(b.finish(c, scheme, max_seq_len, stop, logits))
}
