//! The RWKV-4 forward pass as an execution plan (Hugging Face `RwkvForCausalLM` at inference).

use super::config::RwkvParams;
use super::params::names::*;
use crate::formats::model_lib::plan::{Op, Plan, ShiftSlot, StateDecl};
use crate::model::plan_builder::{check_max_seq_len, PlanBuilder};
use crate::model::{ModelConfig, ParamSpec};
use crate::quant::scheme::QuantScheme;
use anyhow::Result;

pub fn lower(
    c: &ModelConfig,
    p: &RwkvParams,
    params: &[ParamSpec],
    scheme: &QuantScheme,
    max_seq_len: usize,
) -> Result<Plan> {
    check_max_seq_len(max_seq_len, c)?;
    let mut b = PlanBuilder::new(params, scheme);
    let hs = c.hidden_size;
    let eps = p.layer_norm_epsilon as f32;
    let emb = b.buf("embedded", hs);
    let h = b.buf("hidden", hs);
    let x = b.buf("normed", hs);
    let xk = b.buf("mixed_key", hs);
    let xv = b.buf("mixed_value", hs);
    let xr = b.buf("mixed_receptance", hs);
    let k = b.buf("key", hs);
    let v = b.buf("value", hs);
    let r = b.buf("receptance", hs);
    let wkv = b.buf("wkv", hs);
    let proj = b.buf("proj", hs);
    let ffk = b.buf("ffn_key", p.intermediate_size);
    let logits = b.buf("logits", c.vocab_size);

    let embed = b.embedding(EMBED, emb)?;
    for l in 0..c.num_layers {
        let state = b.state(StateDecl::Rwkv {
            layer: l,
            hidden: hs,
        });
        let w = |what: &str| b.w(&block(l, what));
        let ln = |name: &str| -> Result<(usize, usize)> {
            Ok((w(&format!("{name}.weight"))?, w(&format!("{name}.bias"))?))
        };
        let pre_ln = if l == 0 { Some(ln(PRE_LN)?) } else { None };
        let (ln1, ln2) = (ln(LN1)?, ln(LN2)?);
        let (decay, first) = (w(TIME_DECAY)?, w(TIME_FIRST)?);
        let att_mixes = vec![w(ATT_MIX_K)?, w(ATT_MIX_V)?, w(ATT_MIX_R)?];
        let (att_k, att_v, att_r, att_out) = (w(ATT_K)?, w(ATT_V)?, w(ATT_R)?, w(ATT_OUT)?);
        let ffn_mixes = vec![w(FFN_MIX_K)?, w(FFN_MIX_R)?];
        let (ffn_k, ffn_r, ffn_v) = (w(FFN_K)?, w(FFN_R)?, w(FFN_V)?);

        if let Some((weight, bias)) = pre_ln {
            b.op(Op::LayerNorm {
                input: emb,
                weight,
                bias,
                eps,
                out: h,
            });
        }
        // Time mix: r = sigmoid(R·xr), out = O·(r * wkv(K·xk, V·xv)).
        b.op(Op::LayerNorm {
            input: h,
            weight: ln1.0,
            bias: ln1.1,
            eps,
            out: x,
        });
        b.op(Op::RwkvTokenShift {
            input: x,
            state,
            slot: ShiftSlot::Attention,
            mixes: att_mixes,
            outs: vec![xk, xv, xr],
        });
        b.op(Op::matmul(xk, att_k, None, k));
        b.op(Op::matmul(xv, att_v, None, v));
        b.op(Op::matmul(xr, att_r, None, r));
        b.op(Op::Sigmoid { buf: r });
        b.op(Op::RwkvWkv {
            k,
            v,
            state,
            time_decay: decay,
            time_first: first,
            out: wkv,
        });
        b.op(Op::Mul {
            a: r,
            b: wkv,
            out: r,
        });
        b.op(Op::matmul(r, att_out, None, proj));
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
        // Channel mix: out = sigmoid(R·xr) * V·relu(K·xk)².
        b.op(Op::LayerNorm {
            input: h,
            weight: ln2.0,
            bias: ln2.1,
            eps,
            out: x,
        });
        b.op(Op::RwkvTokenShift {
            input: x,
            state,
            slot: ShiftSlot::FeedForward,
            mixes: ffn_mixes,
            outs: vec![xk, xr],
        });
        b.op(Op::matmul(xk, ffn_k, None, ffk));
        b.op(Op::ReluSquare { buf: ffk });
        b.op(Op::matmul(ffk, ffn_v, None, proj));
        b.op(Op::matmul(xr, ffn_r, None, r));
        b.op(Op::Sigmoid { buf: r });
        b.op(Op::Mul {
            a: r,
            b: proj,
            out: proj,
        });
        b.op(Op::Add {
            a: h,
            b: proj,
            out: h,
        });
        if p.rescale_every > 0 && (l + 1) % p.rescale_every == 0 {
            b.op(Op::Scale {
                buf: h,
                factor: 0.5,
            });
        }
    }
    b.layer_norm(LN_OUT, h, eps, x)?;
    b.logits(x, p.tie_word_embeddings.then_some(embed), HEAD)?;
    let stop = if c.eos_token_ids.is_empty() {
        vec![0]
    } else {
        c.eos_token_ids.clone()
    };
    Ok(b.finish(c, scheme, max_seq_len, stop, logits))
}
