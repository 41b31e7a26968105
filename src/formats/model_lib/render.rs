//! A readable rendering of an execution plan (for `--debug-dump`).

use super::plan::{Op, Plan, StateDecl};
use std::fmt::Write;

pub fn render_plan(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# plan v{} · {} · {} · vocab {} · hidden {} · max_seq_len {}",
        plan.format_version,
        plan.arch,
        plan.quantization,
        plan.vocab_size,
        plan.hidden_size,
        plan.max_seq_len
    );
    let _ = writeln!(s, "\n## weights");
    for (i, w) in plan.weights.iter().enumerate() {
        let _ = writeln!(
            s,
            "w{i:<4} {:<56} {:?} {:?} → {}",
            w.name,
            w.shape,
            w.storage,
            w.records.join(", ")
        );
    }
    let _ = writeln!(s, "\n## buffers ([T, cols] f32)");
    for (i, b) in plan.buffers.iter().enumerate() {
        let _ = writeln!(s, "b{i:<4} {:<24} cols {}", b.name, b.cols);
    }
    let _ = writeln!(s, "\n## states");
    for (i, st) in plan.states.iter().enumerate() {
        let d = match st {
            StateDecl::KvCache {
                layer,
                n_kv_heads,
                head_dim,
            } => format!("kv cache layer {layer}: {n_kv_heads} heads × {head_dim}"),
            StateDecl::Rwkv { layer, hidden } => format!("rwkv state layer {layer}: 5 × {hidden}"),
        };
        let _ = writeln!(s, "s{i:<4} {d}");
    }
    for (name, ops) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
        let _ = writeln!(s, "\n## {name}");
        for (i, op) in ops.iter().enumerate() {
            let _ = writeln!(s, "{i:>4}  {}", render_op(plan, op));
        }
    }
    s
}

fn render_op(plan: &Plan, op: &Op) -> String {
    // The plan may not have been validated (a library from elsewhere): ids out of range are
    // shown as such, never indexed.
    let b = |i: &usize| match plan.buffers.get(*i) {
        Some(x) => format!("%{}", x.name),
        None => format!("%<no buffer {i}>"),
    };
    let w = |i: &usize| match plan.weights.get(*i) {
        Some(x) => format!("@{}", x.name),
        None => format!("@<no weight {i}>"),
    };
    match op {
        Op::Embedding { weight, out } => format!("{} = embedding({})", b(out), w(weight)),
        Op::RmsNorm {
            input,
            weight,
            eps,
            out,
        } => format!(
            "{} = rms_norm({}, {}, eps={eps})",
            b(out),
            b(input),
            w(weight)
        ),
        Op::LayerNorm {
            input,
            weight,
            bias,
            eps,
            out,
        } => format!(
            "{} = layer_norm({}, {}, {}, eps={eps})",
            b(out),
            b(input),
            w(weight),
            w(bias)
        ),
        Op::Matmul {
            input,
            weight,
            bias,
            out,
            fusion,
        } => {
            let x = match fusion.rms_norm {
                Some(n) => format!("rms_norm({}, {}, eps={})", b(input), w(&n.weight), n.eps),
                None => b(input),
            };
            let mut product = format!(
                "matmul({x}, {}{})",
                w(weight),
                bias.as_ref()
                    .map(|x| format!(", bias={}", w(x)))
                    .unwrap_or_default()
            );
            if let Some(a) = fusion.activation {
                product = format!("{}({product})", a.name());
            }
            if fusion.silu_gate {
                product = format!("silu_gate({product})");
            }
            if let Some(r) = fusion.residual {
                product = format!("{} + {product}", b(&r));
            }
            format!("{} = {product}", b(out))
        }
        Op::Logits { input, weight } => format!("logits = matmul({}, {})", b(input), w(weight)),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_out_of_range_are_shown_not_indexed() {
        // An unvalidated plan whose embedding names a weight and a buffer it does not have:
        // found by tests/fuzz_smoke.rs (render_plan indexed them and panicked).
        let mut plan = crate::runtime::artifact::tests::tiny_plan();
        plan.prefill = vec![Op::Embedding { weight: 9, out: 38 }];
        let text = render_plan(&plan);
        assert!(
            text.contains("%<no buffer 38> = embedding(@<no weight 9>)"),
            "{text}"
        );
        // A valid plan renders its names.
        let plan = crate::runtime::artifact::tests::tiny_plan();
        let text = render_plan(&plan);
        let Op::Embedding { weight, out } = &plan.prefill[0] else {
            panic!("tiny plan starts with an embedding")
        };
        let line = format!(
            "%{} = embedding(@{})",
            plan.buffers[*out].name, plan.weights[*weight].name
        );
        assert!(text.contains(&line), "{text}");
    }

    #[test]
    fn a_fused_matmul_renders_its_steps_in_order() {
        use crate::formats::model_lib::plan::{Activation, FusedRmsNorm, MatmulFusion};
        let mut plan = crate::runtime::artifact::tests::tiny_plan();
        plan.decode = vec![Op::Matmul {
            input: 0,
            weight: 2,
            bias: None,
            out: 1,
            fusion: MatmulFusion {
                rms_norm: Some(FusedRmsNorm {
                    weight: 1,
                    eps: 1e-5,
                }),
                activation: Some(Activation::Gelu),
                silu_gate: false,
                residual: Some(0),
            },
        }];
        let text = render_plan(&plan);
        assert!(
            text.contains(
                "%h = %x + gelu(matmul(rms_norm(%x, @norm.weight, eps=0.00001), @lm_head.weight))"
            ),
            "{text}"
        );
    }
}
