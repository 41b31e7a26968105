//! Binding a plan's steps to the library's CUDA kernels: each op finds the kernel of its
//! phase-prefixed signature and every kernel argument (as the launch JSON lists it) resolves to a
//! buffer, a weight record or a state part. Everything is checked here, once, so running a step
//! only looks up pointers.

use crate::codegen::cuda::launch::CudaLaunch;
use crate::codegen::cuda::row_blocks::RowBlocks;
use crate::codegen::signature::op_signature;
use crate::formats::model_lib::plan::{BufId, Op, Plan, ShiftSlot, StateDecl, StateId, WeightId};
use anyhow::Result;
use std::collections::HashMap;

/// What one kernel argument points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgRef {
    Buffer(BufId),
    Weight(WeightId, usize),
    KvK(StateId),
    KvV(StateId),
    Rwkv(StateId),
    Tokens,
    /// The scratch of kernel `.0` (index into the model's kernel table): one per session and
    /// kernel, shared by every step that launches it (they run one after another).
    Scratch(usize),
}

/// One op, ready to launch.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Index into the model's kernel table.
    pub kernel: usize,
    pub args: Vec<ArgRef>,
    pub scalar: f32,
    pub index: u32,
    /// Logits ops take the logits row range (`rows`, `row0`) from the second half of meta.
    pub logits: bool,
}

/// An op field.
#[derive(Debug, Clone, Copy)]
enum Field {
    Buf(BufId),
    Weight(WeightId),
    State(StateId),
}

fn field(op: &Op, name: &str) -> Option<Field> {
    use Field::*;
    let indexed = |prefix: &str| -> Option<usize> {
        name.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok()
    };
    Some(match (op, name) {
        (Op::Embedding { weight, .. }, "weight") => Weight(*weight),
        (Op::Embedding { out, .. }, "out") => Buf(*out),
        (Op::RmsNorm { input, .. }, "input") => Buf(*input),
        (Op::RmsNorm { weight, .. }, "weight") => Weight(*weight),
        (Op::RmsNorm { out, .. }, "out") => Buf(*out),
        (Op::LayerNorm { input, .. }, "input") => Buf(*input),
        (Op::LayerNorm { weight, .. }, "weight") => Weight(*weight),
        (Op::LayerNorm { bias, .. }, "bias") => Weight(*bias),
        (Op::LayerNorm { out, .. }, "out") => Buf(*out),
        (Op::Matmul { input, .. }, "input") => Buf(*input),
        (Op::Matmul { weight, .. }, "weight") => Weight(*weight),
        (Op::Matmul { bias: Some(b), .. }, "bias") => Weight(*b),
        (Op::Matmul { out, .. }, "out") => Buf(*out),
        (Op::Matmul { fusion, .. }, "residual") => Buf(fusion.residual?),
        (Op::Matmul { fusion, .. }, "norm") => Weight(fusion.rms_norm?.weight),
        (Op::Rotary { qkv, .. }, "qkv") => Buf(*qkv),
        (Op::Attention { qkv, .. }, "qkv") => Buf(*qkv),
        (Op::Attention { state, .. }, "state") => State(*state),
        (Op::Attention { out, .. }, "out") => Buf(*out),
        (Op::SiluMul { input, .. }, "input") => Buf(*input),
        (Op::SiluMul { out, .. }, "out") => Buf(*out),
        (
            Op::Gelu { buf } | Op::ReluSquare { buf } | Op::Sigmoid { buf } | Op::Scale { buf, .. },
            "buf",
        ) => Buf(*buf),
        (Op::Add { a, .. } | Op::Mul { a, .. }, "a") => Buf(*a),
        (Op::Add { b, .. } | Op::Mul { b, .. }, "b") => Buf(*b),
        (Op::Add { out, .. } | Op::Mul { out, .. }, "out") => Buf(*out),
        (Op::RwkvTokenShift { input, .. }, "input") => Buf(*input),
        (Op::RwkvTokenShift { state, .. }, "state") => State(*state),
        (Op::RwkvTokenShift { mixes, .. }, _) if indexed("mixes[").is_some() => {
            Weight(*mixes.get(indexed("mixes[")?)?)
        }
        (Op::RwkvTokenShift { outs, .. }, _) if indexed("outs[").is_some() => {
            Buf(*outs.get(indexed("outs[")?)?)
        }
        (Op::RwkvWkv { k, .. }, "k") => Buf(*k),
        (Op::RwkvWkv { v, .. }, "v") => Buf(*v),
        (Op::RwkvWkv { state, .. }, "state") => State(*state),
        (Op::RwkvWkv { time_decay, .. }, "time_decay") => Weight(*time_decay),
        (Op::RwkvWkv { time_first, .. }, "time_first") => Weight(*time_first),
        (Op::RwkvWkv { out, .. }, "out") => Buf(*out),
        (Op::Logits { input, .. }, "input") => Buf(*input),
        (Op::Logits { weight, .. }, "weight") => Weight(*weight),
        _ => return None,
    })
}

fn scalar(op: &Op, name: &str) -> Option<f32> {
    match (op, name) {
        (Op::RmsNorm { eps, .. } | Op::LayerNorm { eps, .. }, "eps") => Some(*eps),
        (Op::Matmul { fusion, .. }, "eps") => Some(fusion.rms_norm?.eps),
        (Op::Rotary { theta, .. }, "theta") => Some(*theta),
        (
            Op::Attention {
                rotary: Some(r), ..
            },
            "theta",
        ) => Some(r.theta),
        (Op::Scale { factor, .. }, "factor") => Some(*factor),
        _ => None,
    }
}

/// Bytes per KV-cache element the library's kernels were generated for (f16 for f16 schemes).
pub fn kv_elem_bytes<'a>(launches: impl Iterator<Item = &'a CudaLaunch>) -> Result<usize> {
    crate::runtime::kv_cache_elem_bytes(launches.flat_map(|l| {
        l.args
            .iter()
            .map(|a| (a.role.as_str(), a.part.as_deref(), a.elem.as_str()))
    }))
}

/// Bind a phase's ops to their kernels ([`bind`]), checking that the kernels agree on how each
/// activation buffer is held: a library of f16 schemes keeps some prefill buffers in f16
/// (`"elem": "f16"` in the launch JSON: `codegen::cuda::half_activations`), and every kernel
/// of the phase that touches such a buffer must say so. A library that disagrees was not made
/// by this mlcb's codegen.
pub fn bind_phase(
    plan: &Plan,
    ops: &[Op],
    phase: &str,
    kernels: &HashMap<String, (usize, CudaLaunch)>,
    target: &str,
) -> Result<Vec<Step>> {
    let mut held: HashMap<BufId, (&str, String)> = HashMap::new();
    let mut steps = Vec::with_capacity(ops.len());
    for op in ops {
        let step = bind(plan, op, phase, kernels, target)?;
        let sig = format!("{phase}:{}", op_signature(plan, op));
        let launch = &kernels[&sig].1;
        for (a, r) in launch.args.iter().zip(&step.args) {
            let (ArgRef::Buffer(b), "activation") = (r, a.role.as_str()) else {
                continue;
            };
            let elem = a.elem.as_str();
            if !matches!(elem, "f32" | "f16") {
                return Err(crate::error::user(format!(
                    "kernel {sig}: activation {} is {elem}, not f32 or f16; the library is corrupt, rebuild it",
                    a.name
                )));
            }
            match held.get(b) {
                Some((e, first)) if *e != elem => {
                    return Err(crate::error::user(format!(
                        "the library's {phase} kernels disagree on buffer '{}': {first} holds it as {e}, {sig} as {elem}; the library is corrupt or from another mlcb, rebuild it",
                        plan.buffers[*b].name
                    )));
                }
                Some(_) => {}
                None => {
                    held.insert(*b, (elem, sig.clone()));
                }
            }
        }
        steps.push(step);
    }
    Ok(steps)
}

/// Bind one op to its kernel (`kernels`: signature → (index, launch)).
pub fn bind(
    plan: &Plan,
    op: &Op,
    phase: &str,
    kernels: &HashMap<String, (usize, CudaLaunch)>,
    target: &str,
) -> Result<Step> {
    let sig = format!("{phase}:{}", op_signature(plan, op));
    let (kernel, launch) = kernels.get(&sig).ok_or_else(|| {
        crate::error::user(format!(
            "the model library (target {target}) has no CUDA kernel for {sig}; rebuild it with `--target cuda`"
        ))
    })?;
    let bad = |what: String| {
        crate::error::user(format!(
            "kernel {sig}: {what}; the library is corrupt, rebuild it"
        ))
    };
    let mut args = Vec::with_capacity(launch.args.len());
    for a in &launch.args {
        let r = match a.role.as_str() {
            "tokens" => ArgRef::Tokens,
            "logits" => ArgRef::Buffer(plan.logits),
            "scratch" => match a.bytes {
                Some(b) if b > 0 => ArgRef::Scratch(*kernel),
                _ => return Err(bad(format!("scratch {} has no size", a.name))),
            },
            "activation" => match field(op, &a.op_field) {
                Some(Field::Buf(b)) if b < plan.buffers.len() => ArgRef::Buffer(b),
                _ => {
                    return Err(bad(format!(
                        "argument {} names no buffer of the op",
                        a.name
                    )))
                }
            },
            "weight" => match (field(op, &a.op_field), a.record) {
                (Some(Field::Weight(w)), Some(r))
                    if w < plan.weights.len() && r < plan.weights[w].records.len() =>
                {
                    ArgRef::Weight(w, r)
                }
                _ => {
                    return Err(bad(format!(
                        "argument {} names no weight record of the op",
                        a.name
                    )))
                }
            },
            "state" => {
                let Some(Field::State(s)) = field(op, &a.op_field) else {
                    return Err(bad(format!("argument {} names no state of the op", a.name)));
                };
                match (plan.states.get(s), a.part.as_deref()) {
                    (Some(StateDecl::KvCache { .. }), Some("k")) => ArgRef::KvK(s),
                    (Some(StateDecl::KvCache { .. }), Some("v")) => ArgRef::KvV(s),
                    (Some(StateDecl::Rwkv { .. }), Some("rwkv")) => ArgRef::Rwkv(s),
                    _ => return Err(bad(format!("argument {} does not match state {s}", a.name))),
                }
            }
            other => return Err(bad(format!("unknown argument role {other}"))),
        };
        args.push(r);
    }
    let scalar = match &launch.params.scalar {
        Some(name) => {
            scalar(op, name).ok_or_else(|| bad(format!("the op has no scalar {name}")))?
        }
        None => 0.0,
    };
    let index = match (&launch.params.index, op) {
        (Some(_), Op::RwkvTokenShift { slot, .. }) => match slot {
            ShiftSlot::Attention => 0,
            ShiftSlot::FeedForward => 4,
        },
        (Some(_), _) => return Err(bad("an index parameter on an op without one".into())),
        (None, _) => 0,
    };
    Ok(Step {
        kernel: *kernel,
        args,
        scalar,
        index,
        logits: matches!(op, Op::Logits { .. }),
    })
}

/// How each weight record (`[weight][record]`) goes to the device: as stored (`None`) or in
/// row blocks, as every kernel argument reading it declares (`Arg::row_blocks`); kernels that
/// disagree, or a record whose size is not its layout's, make the library corrupt.
pub fn weight_layouts(
    plan: &Plan,
    phases: &[&[Step]],
    launches: &[&CudaLaunch],
    records: &[Vec<usize>],
) -> Result<Vec<Vec<Option<RowBlocks>>>> {
    // Per record: unseen (None), or the layout its first reader declared.
    let mut layouts: Vec<Vec<Option<Option<RowBlocks>>>> =
        records.iter().map(|w| vec![None; w.len()]).collect();
    for step in phases.iter().flat_map(|p| p.iter()) {
        let launch = launches[step.kernel];
        for (a, r) in launch.args.iter().zip(&step.args) {
            let ArgRef::Weight(w, i) = *r else { continue };
            let name = &plan.weights[w].records[i];
            match &layouts[w][i] {
                Some(l) if *l == a.row_blocks => {}
                Some(_) => {
                    return Err(crate::error::user(format!(
                        "the library's kernels disagree on the device layout of weight record {name}; the library is corrupt or from another mlcb, rebuild it"
                    )))
                }
                None => {
                    if let Some(l) = a.row_blocks {
                        if l.bytes() != records[w][i] {
                            return Err(crate::error::user(format!(
                                "weight record {name} has {} bytes, but the library's kernels read it as {l:?} ({} bytes); the library and the weights do not belong together, rebuild",
                                records[w][i],
                                l.bytes()
                            )));
                        }
                    }
                    layouts[w][i] = Some(a.row_blocks);
                }
            }
        }
    }
    Ok(layouts
        .into_iter()
        .map(|w| w.into_iter().map(Option::flatten).collect())
        .collect())
}

/// A record's bytes as they go to the device (see [`weight_layouts`]).
pub fn device_bytes<'a>(
    bytes: &'a [u8],
    layout: Option<RowBlocks>,
    name: &str,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    match layout {
        None => Ok(std::borrow::Cow::Borrowed(bytes)),
        Some(l) => l.permute(bytes).map(std::borrow::Cow::Owned).map_err(|e| {
            crate::error::user(format!("weight record {name}: {e}; rebuild the library"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::cuda::generate_plan;
    use crate::runtime::artifact::tests::tiny_plan;

    /// The plan's kernels for sm_80 as the runtime tables them: signature → (index, launch).
    fn kernel_table(
        plan: &Plan,
        records: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> HashMap<String, (usize, CudaLaunch)> {
        generate_plan(plan, records, "sm_80")
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k.signature, (i, k.launch)))
            .collect()
    }

    /// The tiny plan's kernels, bound without a GPU: every argument resolves to the op's own
    /// buffers and weights in the documented order.
    #[test]
    fn every_step_of_a_plan_binds() {
        let plan = tiny_plan();
        let records = crate::codegen::signature::plan_signatures(&plan)
            .into_iter()
            .map(|s| {
                (
                    s,
                    serde_json::json!({"threads_per_block": 64, "rows_per_block": 2}),
                )
            })
            .collect();
        let kernels = kernel_table(&plan, &records);
        for (phase, ops) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
            for op in ops.iter() {
                let step = bind(&plan, op, phase, &kernels, "cuda").unwrap();
                match op {
                    Op::Embedding { weight, out } => {
                        assert_eq!(
                            step.args,
                            vec![
                                ArgRef::Tokens,
                                ArgRef::Weight(*weight, 0),
                                ArgRef::Buffer(*out)
                            ]
                        )
                    }
                    Op::RmsNorm {
                        input,
                        weight,
                        eps,
                        out,
                    } => {
                        assert_eq!(
                            step.args,
                            vec![
                                ArgRef::Buffer(*input),
                                ArgRef::Weight(*weight, 0),
                                ArgRef::Buffer(*out)
                            ]
                        );
                        assert_eq!(step.scalar, *eps);
                    }
                    Op::Logits { input, weight } => {
                        assert!(step.logits);
                        assert_eq!(
                            step.args,
                            vec![
                                ArgRef::Buffer(*input),
                                ArgRef::Weight(*weight, 0),
                                ArgRef::Buffer(plan.logits)
                            ]
                        );
                    }
                    _ => {}
                }
            }
        }
        // A library without the kernel names the target to rebuild for.
        let e = bind(&plan, &plan.decode[0], "decode", &HashMap::new(), "cpu").unwrap_err();
        assert!(e.to_string().contains("--target cuda"), "{e}");
    }

    /// The row-major q4 matrices of an f16 scheme go to the device in row blocks, as every
    /// kernel reading them says; kernels that disagree on a record's layout, or a record of
    /// another size than its layout's, are refused as a user error (rebuild).
    #[test]
    fn weight_layouts_agree_across_kernels_or_the_library_is_refused() {
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        let records = crate::codegen::cuda::tune_space::default_records(&plan);
        let mut kernels = kernel_table(&plan, &records);
        let layouts = |kernels: &HashMap<String, (usize, CudaLaunch)>, grow: usize| {
            let prefill = bind_phase(&plan, &plan.prefill, "prefill", kernels, "cuda").unwrap();
            let decode = bind_phase(&plan, &plan.decode, "decode", kernels, "cuda").unwrap();
            let mut launches: Vec<(usize, &CudaLaunch)> =
                kernels.values().map(|(i, l)| (*i, l)).collect();
            launches.sort_by_key(|(i, _)| *i);
            let launches: Vec<&CudaLaunch> = launches.into_iter().map(|(_, l)| l).collect();
            // Record sizes as the layouts say (others are not checked).
            let mut sizes: Vec<Vec<usize>> = plan
                .weights
                .iter()
                .map(|w| vec![0; w.records.len()])
                .collect();
            for step in prefill.iter().chain(&decode) {
                for (a, r) in launches[step.kernel].args.iter().zip(&step.args) {
                    if let (ArgRef::Weight(w, i), Some(l)) = (*r, a.row_blocks) {
                        sizes[w][i] = l.bytes() + grow;
                    }
                }
            }
            weight_layouts(&plan, &[&prefill, &decode], &launches, &sizes)
        };
        let ok = layouts(&kernels, 0).unwrap();
        let in_blocks = ok.iter().flatten().filter(|l| l.is_some()).count();
        // q, k, v (fused), o, gate/up, down and the head: codes and scales; not the norms.
        assert!(in_blocks >= 4, "{ok:?}");
        assert!(ok.iter().flatten().any(|l| l.is_none()));
        let e = layouts(&kernels, 1).unwrap_err();
        assert!(e.to_string().contains("do not belong together"), "{e}");
        assert_eq!(crate::error::class_of(&e).exit_code(), 2);
        let gemv = kernels
            .iter_mut()
            .find(|(s, (_, l))| {
                s.starts_with("decode:matmul") && l.args.iter().any(|a| a.row_blocks.is_some())
            })
            .unwrap()
            .1;
        for a in &mut gemv.1.args {
            a.row_blocks = None;
        }
        let e = layouts(&kernels, 0).unwrap_err();
        assert!(
            e.to_string().contains("disagree on the device layout"),
            "{e}"
        );
        assert_eq!(crate::error::class_of(&e).exit_code(), 2);
    }

    /// A library of an f16 scheme keeps `normed` in f16 in prefill (its rms_norm kernel writes
    /// it so, its GEMMs read it so); kernels that disagree on a buffer, or an activation of
    /// another element, are refused as a user error (rebuild).
    #[test]
    fn kernels_that_disagree_on_a_buffer_are_refused() {
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        let records = crate::codegen::cuda::tune_space::default_records(&plan);
        let mut kernels = kernel_table(&plan, &records);
        bind_phase(&plan, &plan.prefill, "prefill", &kernels, "cuda").unwrap();
        bind_phase(&plan, &plan.decode, "decode", &kernels, "cuda").unwrap();
        let norm = kernels
            .keys()
            .find(|s| s.starts_with("prefill:rms_norm"))
            .unwrap()
            .clone();
        let set_out = |kernels: &mut HashMap<String, (usize, CudaLaunch)>, elem: &str| {
            let mut args = kernels.get_mut(&norm).unwrap().1.args.iter_mut();
            let arg = args.find(|a| a.op_field == "out").unwrap();
            std::mem::replace(&mut arg.elem, elem.to_string())
        };
        assert_eq!(set_out(&mut kernels, "f32"), "f16");
        let e = bind_phase(&plan, &plan.prefill, "prefill", &kernels, "cuda").unwrap_err();
        assert!(e.to_string().contains("on buffer 'normed'"), "{e}");
        assert_eq!(crate::error::class_of(&e).exit_code(), 2);
        set_out(&mut kernels, "bf16");
        let e = bind_phase(&plan, &plan.prefill, "prefill", &kernels, "cuda").unwrap_err();
        assert!(e.to_string().contains("not f32 or f16"), "{e}");
    }

    /// Decode attention split over blocks binds its scratch (the kernel's own index); prefill
    /// attention has none.
    #[test]
    fn split_decode_attention_binds_its_scratch() {
        let plan = crate::codegen::fuse::fuse_for_cuda(crate::model::testing::lowered_plan(
            "tiny-llama",
            "llama",
            "q4f16_1",
            32,
        ));
        let records = crate::codegen::cuda::tune_space::default_records(&plan);
        let kernels = kernel_table(&plan, &records);
        let mut seen = 0;
        for (phase, ops) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
            for op in ops.iter() {
                let Op::Attention {
                    qkv, state, out, ..
                } = op
                else {
                    continue;
                };
                let step = bind(&plan, op, phase, &kernels, "cuda").unwrap();
                let mut want = vec![
                    ArgRef::Buffer(*qkv),
                    ArgRef::KvK(*state),
                    ArgRef::KvV(*state),
                    ArgRef::Buffer(*out),
                ];
                if phase == "decode" {
                    want.push(ArgRef::Scratch(step.kernel));
                    seen += 1;
                }
                assert_eq!(step.args, want, "{phase}");
            }
        }
        assert_eq!(seen, config_layers(&plan));
        // A scratch without a size is a corrupt library, not a crash.
        let mut broken = kernels.clone();
        for (_, l) in broken.values_mut() {
            for a in &mut l.args {
                a.bytes = None;
            }
        }
        let op = plan
            .decode
            .iter()
            .find(|op| matches!(op, Op::Attention { .. }))
            .unwrap();
        let e = bind(&plan, op, "decode", &broken, "cuda").unwrap_err();
        assert!(e.to_string().contains("no size"), "{e}");
    }

    fn config_layers(plan: &Plan) -> usize {
        plan.states
            .iter()
            .filter(|s| matches!(s, StateDecl::KvCache { .. }))
            .count()
    }
}
