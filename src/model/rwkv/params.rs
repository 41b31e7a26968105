//! The RWKV-4 artifact parameters and where each comes from.

use super::config::RwkvParams;
use crate::model::{ModelConfig, ParamSpec, Transform};
use crate::quant::scheme::TensorRole;

pub(crate) mod names {
    pub const EMBED: &str = "rwkv.embeddings.weight";
    pub const LN_OUT: &str = "rwkv.ln_out";
    pub const HEAD: &str = "head.weight";
    pub fn block(i: usize, what: &str) -> String {
        format!("rwkv.blocks.{i}.{what}")
    }
    pub const PRE_LN: &str = "pre_ln";
    pub const LN1: &str = "ln1";
    pub const LN2: &str = "ln2";
    pub const TIME_DECAY: &str = "attention.time_decay";
    pub const TIME_FIRST: &str = "attention.time_first";
    pub const ATT_MIX_K: &str = "attention.time_mix_key";
    pub const ATT_MIX_V: &str = "attention.time_mix_value";
    pub const ATT_MIX_R: &str = "attention.time_mix_receptance";
    pub const ATT_K: &str = "attention.key.weight";
    pub const ATT_V: &str = "attention.value.weight";
    pub const ATT_R: &str = "attention.receptance.weight";
    pub const ATT_OUT: &str = "attention.output.weight";
    pub const FFN_MIX_K: &str = "feed_forward.time_mix_key";
    pub const FFN_MIX_R: &str = "feed_forward.time_mix_receptance";
    pub const FFN_K: &str = "feed_forward.key.weight";
    pub const FFN_R: &str = "feed_forward.receptance.weight";
    pub const FFN_V: &str = "feed_forward.value.weight";
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

/// Hugging Face divides the output weights of block `l` by `2^(l / rescale_every)` at inference
/// (and halves the residual after every `rescale_every`-th block to compensate).
pub(crate) fn rescale_factor(layer: usize, rescale_every: usize) -> Option<f32> {
    if rescale_every == 0 {
        return None;
    }
    let exp = (layer / rescale_every).min(126) as i32;
    Some(2f32.powi(-exp))
}

pub fn params(c: &ModelConfig, p: &RwkvParams) -> Vec<ParamSpec> {
    use names::*;
    use TensorRole::{Linear, Raw, RawF32};
    let (v, h, i) = (c.vocab_size, c.hidden_size, p.intermediate_size);
    let id = || Transform::Identity;
    let mut out = vec![spec(EMBED.into(), TensorRole::Embedding, vec![v, h], id())];
    for l in 0..c.num_layers {
        let n = |what: &str| block(l, what);
        let rescaled = || match rescale_factor(l, p.rescale_every) {
            Some(factor) => Transform::Scale { factor },
            None => Transform::Identity,
        };
        let norms: &[&str] = if l == 0 {
            &[PRE_LN, LN1, LN2]
        } else {
            &[LN1, LN2]
        };
        for ln in norms {
            out.push(spec(n(&format!("{ln}.weight")), Raw, vec![h], id()));
            out.push(spec(n(&format!("{ln}.bias")), Raw, vec![h], id()));
        }
        out.push(spec(n(TIME_DECAY), RawF32, vec![h], Transform::NegExp));
        out.push(spec(n(TIME_FIRST), RawF32, vec![h], id()));
        for mix in [ATT_MIX_K, ATT_MIX_V, ATT_MIX_R] {
            out.push(spec(n(mix), Raw, vec![h], id()));
        }
        out.push(spec(n(ATT_K), Linear, vec![h, h], id()));
        out.push(spec(n(ATT_V), Linear, vec![h, h], id()));
        out.push(spec(n(ATT_R), Linear, vec![h, h], id()));
        out.push(spec(n(ATT_OUT), Linear, vec![h, h], rescaled()));
        for mix in [FFN_MIX_K, FFN_MIX_R] {
            out.push(spec(n(mix), Raw, vec![h], id()));
        }
        out.push(spec(n(FFN_K), Linear, vec![i, h], id()));
        out.push(spec(n(FFN_R), Linear, vec![h, h], id()));
        out.push(spec(n(FFN_V), Linear, vec![h, i], rescaled()));
    }
    out.push(spec(format!("{LN_OUT}.weight"), Raw, vec![h], id()));
    out.push(spec(format!("{LN_OUT}.bias"), Raw, vec![h], id()));
    if !p.tie_word_embeddings {
        out.push(spec(HEAD.into(), TensorRole::LmHead, vec![v, h], id()));
    }
    out
}
