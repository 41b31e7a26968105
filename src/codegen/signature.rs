//! Kernel signatures: op, dtypes, scheme, layout and static dimensions. Steps with the same
//! signature share one kernel and one tuning record (32 identical layers need a handful).

use crate::formats::model_lib::plan::{Op, Plan, WeightStorage};
use std::collections::BTreeSet;

fn weight_desc(plan: &Plan, w: usize) -> String {
    let d = &plan.weights[w];
    let dims = d
        .shape
        .iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join("x");
    match &d.storage {
        WeightStorage::Raw { dtype } => format!("{dtype}:{dims}"),
        WeightStorage::Quantized { scheme, layout } => format!("{scheme}:{layout:?}:{dims}"),
    }
}

/// The signature of one op.
pub fn op_signature(plan: &Plan, op: &Op) -> String {
    let cols = |b: usize| plan.buffers[b].cols;
    match op {
        Op::Embedding { weight, .. } => format!("embedding[{}]", weight_desc(plan, *weight)),
        Op::RmsNorm { input, .. } => format!("rms_norm[{}]", cols(*input)),
        Op::LayerNorm { input, .. } => format!("layer_norm[{}]", cols(*input)),
        Op::Matmul {
            weight,
            bias,
            fusion,
            ..
        } => format!(
            "matmul[{}{}{}{}{}{}]",
            fusion
                .rms_norm
                .map(|n| format!("rms_norm({})+", weight_desc(plan, n.weight)))
                .unwrap_or_default(),
            weight_desc(plan, *weight),
            if bias.is_some() { "+bias" } else { "" },
            fusion
                .activation
                .map(|a| format!("+{}", a.name()))
                .unwrap_or_default(),
            if fusion.silu_gate { "+silu_gate" } else { "" },
            if fusion.residual.is_some() {
                "+residual"
            } else {
                ""
            }
        ),
        Op::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
            ..
        } => format!("rotary[{n_q_heads},{n_kv_heads},{head_dim},{rotary_dim}]"),
        Op::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary,
            ..
        } => match rotary {
            None => format!("attention[{n_q_heads},{n_kv_heads},{head_dim}]"),
            Some(r) => format!(
                "attention[{n_q_heads},{n_kv_heads},{head_dim}+rotary{}]",
                r.rotary_dim
            ),
        },
        Op::SiluMul { out, .. } => format!("silu_mul[{}]", cols(*out)),
        Op::Gelu { buf } => format!("gelu[{}]", cols(*buf)),
        Op::ReluSquare { buf } => format!("relu_square[{}]", cols(*buf)),
        Op::Sigmoid { buf } => format!("sigmoid[{}]", cols(*buf)),
        Op::Add { out, .. } => format!("add[{}]", cols(*out)),
        Op::Mul { out, .. } => format!("mul[{}]", cols(*out)),
        Op::Scale { buf, .. } => format!("scale[{}]", cols(*buf)),
        Op::RwkvTokenShift { input, mixes, .. } => {
            format!("rwkv_token_shift[{}x{}]", cols(*input), mixes.len())
        }
        Op::RwkvWkv { out, .. } => format!("rwkv_wkv[{}]", cols(*out)),
        Op::Logits { weight, .. } => format!("logits[{}]", weight_desc(plan, *weight)),
    }
}

/// Every distinct signature of the plan, prefixed by entry point ("prefill:" / "decode:").
pub fn plan_signatures(plan: &Plan) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for op in &plan.prefill {
        out.insert(format!("prefill:{}", op_signature(plan, op)));
    }
    for op in &plan.decode {
        out.insert(format!("decode:{}", op_signature(plan, op)));
    }
    out
}
