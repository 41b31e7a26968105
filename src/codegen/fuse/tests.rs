use super::*;
use crate::model::testing::{build, open_weights, read_config, Built};
use crate::runtime::cpu::kernels::WeightView;
use crate::runtime::cpu::CpuModel;

fn fixture(fx: &str, arch: &str, scheme: &str) -> Built {
    let a = crate::model::by_name(arch).unwrap();
    let config = a.parse_config(&read_config(fx)).unwrap();
    build(a, &config, &[open_weights(fx).as_ref()], scheme, 40)
}

/// How many decode ops of each kind, by the plan's rendering of the op name.
fn count(ops: &[Op], pred: impl Fn(&Op) -> bool) -> usize {
    ops.iter().filter(|op| pred(op)).count()
}

#[test]
fn a_llama_layer_decodes_in_five_kernels() {
    let built = fixture("tiny-llama", "llama", "q4f16_1");
    let layers = built
        .plan
        .states
        .iter()
        .filter(|s| {
            matches!(
                s,
                crate::formats::model_lib::plan::StateDecl::KvCache { .. }
            )
        })
        .count();
    assert!(layers >= 2);
    let before = built.plan.decode.len();
    let fused = fuse_for_cuda(built.plan.clone());
    // Prefill: SiLU·up and the two residual adds of each layer go into the GEMMs before them
    // (gate/up; o, down).
    assert_eq!(
        built.plan.prefill.len() - fused.prefill.len(),
        3 * layers,
        "prefill"
    );
    assert_eq!(
        count(&fused.prefill, |op| matches!(
            op,
            Op::Add { .. } | Op::SiluMul { .. }
        )),
        0
    );
    assert_eq!(
        count(
            &fused.prefill,
            |op| matches!(op, Op::Matmul { fusion, .. } if fusion.residual.is_some())
        ),
        2 * layers
    );
    assert_eq!(fused.format_version, PLAN_FORMAT_VERSION);
    assert_eq!(
        built.plan.format_version,
        crate::formats::model_lib::plan::PLAN_FORMAT_BASE
    );
    // 11 ops per layer before (norm, qkv, rotary, attention, o, add, norm, gate_up, silu, down,
    // add), 5 after (qkv, attention, o, gate_up, down).
    assert_eq!(before - fused.decode.len(), 6 * layers);
    let d = &fused.decode;
    // Only the final norm stays (the logits are not a matmul op).
    assert_eq!(count(d, |op| matches!(op, Op::RmsNorm { .. })), 1);
    assert_eq!(
        count(
            d,
            |op| matches!(op, Op::Matmul { fusion, .. } if fusion.rms_norm.is_some())
        ),
        2 * layers
    );
    assert_eq!(
        count(d, |op| matches!(
            op,
            Op::Rotary { .. } | Op::SiluMul { .. } | Op::Add { .. }
        )),
        0
    );
    assert_eq!(
        count(d, |op| matches!(
            op,
            Op::Attention {
                rotary: Some(_),
                ..
            }
        )),
        layers
    );
    assert_eq!(
        count(
            d,
            |op| matches!(op, Op::Matmul { fusion, .. } if fusion.silu_gate && fusion.residual.is_none() && fusion.rms_norm.is_some())
        ),
        layers
    );
    assert_eq!(
        count(
            d,
            |op| matches!(op, Op::Matmul { fusion, .. } if fusion.residual.is_some())
        ),
        2 * layers
    );
    // The residual adds write the hidden state in place, as the Adds did.
    for op in d {
        if let Op::Matmul {
            out,
            fusion: MatmulFusion {
                residual: Some(r), ..
            },
            ..
        } = op
        {
            assert_eq!(out, r);
        }
    }
    // Fusing is idempotent, and a plan without fused steps keeps format version 1.
    assert_eq!(fuse_for_cuda(fused.clone()), fused);
    let plain = with_decode(&built.plan, vec![]);
    assert_eq!(fuse_for_cuda(plain.clone()), plain);
}

/// Kernels fused away per decode layer: GPT-NeoX (parallel residual: 2 LayerNorms, qkv, rotary,
/// attention, dense, add, up, gelu, down, add) 4 of 11: rotary, gelu and both adds; RWKV-4
/// 4 of 19: both sigmoids and the relu² fold into the matmuls before them, the time-mix
/// residual into its output matmul (the channel-mix residual adds a product, not a matmul).
/// Prefill: only the activations fold into the matmuls before them.
#[test]
fn neox_and_rwkv_layers_fuse_their_activations_and_residuals() {
    for (fx, arch) in [("tiny-neox", "gpt_neox"), ("tiny-rwkv", "rwkv")] {
        let built = fixture(fx, arch, "q4f16_1");
        let layers = built.plan.states.len();
        let fused = fuse_for_cuda(built.plan.clone());
        assert_eq!(
            built.plan.decode.len() - fused.decode.len(),
            4 * layers,
            "{fx}"
        );
        let d = &fused.decode;
        let left = |pred: fn(&Op) -> bool| count(d, pred);
        assert_eq!(
            left(|op| matches!(
                op,
                Op::Gelu { .. } | Op::Sigmoid { .. } | Op::ReluSquare { .. } | Op::Rotary { .. }
            )),
            0,
            "{fx}"
        );
        let adds = left(|op| matches!(op, Op::Add { .. }));
        assert_eq!(adds, if arch == "rwkv" { layers } else { 0 }, "{fx}");
        // Prefill fuses the activations (GELU; RWKV's two sigmoids and relu²) and the residual
        // adds after a matmul: the same adds are left as in decode.
        let prefill_adds = count(&fused.prefill, |op| matches!(op, Op::Add { .. }));
        assert_eq!(prefill_adds, adds, "{fx}");
        let fused_adds = count(&built.plan.prefill, |op| matches!(op, Op::Add { .. })) - adds;
        assert!(fused_adds >= layers, "{fx}");
        let activations = |ops: &[Op]| {
            count(ops, |op| {
                matches!(
                    op,
                    Op::Gelu { .. } | Op::Sigmoid { .. } | Op::ReluSquare { .. }
                )
            })
        };
        let per_layer = if arch == "rwkv" { 3 } else { 1 };
        assert_eq!(activations(&built.plan.prefill), per_layer * layers, "{fx}");
        assert_eq!(activations(&fused.prefill), 0, "{fx}");
        assert_eq!(
            built.plan.prefill.len() - fused.prefill.len(),
            per_layer * layers + fused_adds,
            "{fx}"
        );
    }
}

/// Hand-made decode steps around one matmul `p = x·Wᵀ` of the tiny plan (its prefill cut to the
/// embedding and the logits, so only these steps can fuse).
fn with_decode(plan: &Plan, ops: Vec<Op>) -> Plan {
    let mut p = plan.clone();
    p.decode = ops;
    p.prefill
        .retain(|op| matches!(op, Op::Embedding { .. } | Op::Logits { .. }));
    p
}

#[test]
fn live_intermediates_are_not_fused() {
    let built = fixture("tiny-llama", "llama", "q0f32");
    let plan = &built.plan;
    let buf = |name: &str| plan.buffers.iter().position(|b| b.name == name).unwrap();
    let (h, x, proj, attn) = (buf("hidden"), buf("normed"), buf("proj"), buf("attn"));
    let wo = plan
        .weights
        .iter()
        .position(|w| w.name.contains("o_proj"))
        .unwrap();
    let mm = Op::matmul(attn, wo, None, proj);
    let add = Op::Add {
        a: h,
        b: proj,
        out: h,
    };
    // proj is read again by a later op: the add stays.
    let read_later = with_decode(
        plan,
        vec![
            mm.clone(),
            add.clone(),
            Op::Add {
                a: x,
                b: proj,
                out: x,
            },
        ],
    );
    assert_eq!(fuse_for_cuda(read_later.clone()), read_later);
    // Overwritten without being read: fused.
    let overwritten = with_decode(
        plan,
        vec![mm.clone(), add.clone(), Op::matmul(attn, wo, None, proj)],
    );
    assert_eq!(fuse_for_cuda(overwritten).decode.len(), 2);
    // proj added to itself: nothing to fuse (the product is both operands).
    let doubled = with_decode(
        plan,
        vec![
            mm.clone(),
            Op::Add {
                a: proj,
                b: proj,
                out: h,
            },
        ],
    );
    assert_eq!(fuse_for_cuda(doubled.clone()), doubled);
    // The add writing the matmul's input: a matmul may not write its input.
    let into_input = with_decode(
        plan,
        vec![
            mm,
            Op::Add {
                a: attn,
                b: proj,
                out: attn,
            },
        ],
    );
    assert_eq!(fuse_for_cuda(into_input.clone()), into_input);
}

/// CPU logits of a prefill of 5 tokens then 4 decode steps.
fn cpu_run(plan: &Plan, records: &[Vec<Vec<u8>>]) -> Vec<u32> {
    let recs: Vec<Vec<&[u8]>> = records
        .iter()
        .map(|w| w.iter().map(|r| r.as_slice()).collect())
        .collect();
    let model = CpuModel::new(plan, WeightView::for_plan(plan, &recs)).unwrap();
    let mut s = model.session();
    let ids: Vec<u32> = (0..9u32)
        .map(|i| (i * 37 + 5) % plan.vocab_size as u32)
        .collect();
    let mut out = s.forward(&ids[..5], true).unwrap();
    for id in &ids[5..] {
        out.extend(s.forward(&[*id], false).unwrap());
    }
    out.iter().map(|x| x.to_bits()).collect()
}

/// The fused ops mean exactly what the ops they replace meant: on the CPU (which runs a fused op
/// as the unfused kernels in order) every logit is bit for bit the same, for every architecture.
#[test]
fn fused_plans_compute_what_the_unfused_ones_do() {
    for (fx, arch) in [
        ("tiny-llama", "llama"),
        ("tiny-neox", "gpt_neox"),
        ("tiny-rwkv", "rwkv"),
    ] {
        let built = fixture(fx, arch, "q4f16_1");
        let fused = fuse_for_cuda(built.plan.clone());
        assert!(
            fused.decode.len() < built.plan.decode.len(),
            "{fx}: nothing fused"
        );
        assert_eq!(
            cpu_run(&fused, &built.records),
            cpu_run(&built.plan, &built.records),
            "{fx}"
        );
    }
}
