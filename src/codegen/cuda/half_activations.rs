//! Prefill activations kept in f16 between kernels, in libraries of f16 schemes.
//!
//! Why: the f16 prefill GEMM ([`super::gemm_f16`]) reads a block's whole activation tile for
//! every 128 output columns, so activations are most of what it reads: per K step a 128×128
//! block of Llama-2-7B's q4f16_1 matmuls read 16 KiB of f32 activations against 2.3 KiB of
//! weights and scales, ~17 KB per million flops, i.e. ~7 TB/s from L2 at 400 TFLOP/s (~9 TB/s
//! for q0f16) — about what an H100/H200's L2 delivers, so the GEMM would wait on L2 instead of
//! its tensor cores (an estimate from the tile shape, not measured). Kept in f16 the tile is
//! half the bytes, and the GEMM copies it to shared memory without converting it.
//!
//! The GEMM rounded its activations to f16 (`cvt.rn.satfinite`) as it staged them; the kernel
//! writing such a buffer now rounds exactly so as it stores, so the products, and every result,
//! are bit for bit what they were.
//!
//! Which buffers: in prefill, those that every op touching them either writes whole from other
//! buffers (RMS/layer norm, silu·mul, tensor-core attention, a GEMM through its epilogue, with
//! the activation or SiLU·up fused into it: `codegen::fuse`) or reads as an f16 GEMM's
//! activations (matmul, logits) — nothing else reads them and nothing updates them in place
//! (Llama's normed, attention and SiLU·up outputs; GPT-NeoX's two normed buffers, its attention output
//! and its up projection's GELU; RWKV's channel-mix relu² key, not its other matmuls' inputs,
//! which are token-shift mixes). Kernels are shared per signature, so every op of one signature
//! must agree on whether its input, and its output, is f16: a buffer whose ops would not stays
//! f32, until nothing changes. Decode is left in f32: activations do not live across calls, so
//! a decode kernel never reads what prefill wrote. A kernel's launch JSON says `"elem": "f16"`
//! for such an argument, and the runtime checks that a buffer's writers and readers agree
//! (`runtime::cuda::bind::bind_phase`).

use crate::codegen::signature::op_signature;
use crate::codegen::wgsl::spec::{KernelSpec, Phase};
use crate::formats::model_lib::plan::{BufId, MatmulFusion, Op, Plan};
use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};

/// Which of a kernel's activations are f16: its input (an f16 GEMM's) or its output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HalfIo {
    pub input: bool,
    pub out: bool,
}

/// Which of an op's activations: its input or its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Input,
    Output,
}

/// The activations an op may hold in f16, with their buffers.
fn half_slots(op: &Op) -> Vec<(Side, BufId)> {
    match op {
        Op::Matmul {
            input, out, fusion, ..
        } => {
            // A GEMM writes f16 through its epilogue (an activation or SiLU·up); not the sum
            // of a fused residual (the f32 hidden state).
            let plain = MatmulFusion {
                activation: fusion.activation,
                silu_gate: fusion.silu_gate,
                ..Default::default()
            };
            let mut slots = vec![(Side::Input, *input)];
            if *fusion == plain {
                slots.push((Side::Output, *out));
            }
            slots
        }
        Op::Logits { input, .. } => vec![(Side::Input, *input)],
        Op::RmsNorm { out, .. } | Op::LayerNorm { out, .. } | Op::SiluMul { out, .. } => {
            vec![(Side::Output, *out)]
        }
        Op::Attention {
            head_dim,
            out,
            rotary: None,
            ..
        } if super::attention_mma::fits(true, *head_dim) => vec![(Side::Output, *out)],
        _ => vec![],
    }
}

/// The prefill signature of every op of `plan` that holds an activation in f16, with which one;
/// empty for plans of f32 schemes (their GEMM is f32-accurate).
pub fn half_io(plan: &Plan) -> BTreeMap<String, HalfIo> {
    if !super::f16_prefill(plan) {
        return BTreeMap::new();
    }
    let ops = &plan.prefill;
    let touches = |op: &Op, b: BufId| {
        op.reads()
            .iter()
            .chain(op.writes().iter())
            .filter(|&&x| x == b)
            .count()
    };
    // Buffers every op touches only through a half slot.
    let mut half: BTreeSet<BufId> = (0..plan.buffers.len())
        .filter(|&b| b != plan.logits)
        .filter(|&b| {
            let mut any = false;
            let only_slots = ops.iter().all(|op| match touches(op, b) {
                0 => true,
                n => {
                    any = true;
                    n == 1 && half_slots(op).iter().any(|&(_, s)| s == b)
                }
            });
            any && only_slots
        })
        .collect();
    let sig = |op: &Op| format!("prefill:{}", op_signature(plan, op));
    loop {
        // Each signature's side's buffers, and whether they are f16.
        let mut by_sig: BTreeMap<(String, Side), Vec<BufId>> = BTreeMap::new();
        for op in ops {
            for (side, b) in half_slots(op) {
                by_sig.entry((sig(op), side)).or_default().push(b);
            }
        }
        let mixed: Vec<BufId> = by_sig
            .values()
            .filter(|bufs| {
                let n = bufs.iter().filter(|b| half.contains(b)).count();
                n > 0 && n < bufs.len()
            })
            .flatten()
            .copied()
            .collect();
        if mixed.iter().all(|b| !half.contains(b)) {
            break;
        }
        for b in mixed {
            half.remove(&b);
        }
    }
    let mut io: BTreeMap<String, HalfIo> = BTreeMap::new();
    for op in ops {
        for (side, b) in half_slots(op) {
            if half.contains(&b) {
                let e = io.entry(sig(op)).or_default();
                match side {
                    Side::Input => e.input = true,
                    Side::Output => e.out = true,
                }
            }
        }
    }
    io
}

/// Refuses `half` where `spec`'s kernel (signature `signature`; `f16`: the library's prefill
/// GEMMs are f16) cannot hold those activations in f16: a GEMM's only in prefill on f16 tensor
/// cores, and never its logits or a residual's output; a norm's, silu·mul's and tensor-core
/// prefill attention's output; nothing else.
pub fn check(signature: &str, spec: &KernelSpec, f16: bool, half: HalfIo) -> Result<()> {
    if half == HalfIo::default() {
        return Ok(());
    }
    let prefill = super::phase_of(signature) == Some(Phase::Prefill);
    let ok = match spec {
        KernelSpec::Matmul {
            phase,
            logits,
            fusion,
            ..
        } => f16 && *phase == Phase::Prefill && !(half.out && (*logits || fusion.residual)),
        KernelSpec::RmsNorm { .. } | KernelSpec::LayerNorm { .. } | KernelSpec::SiluMul { .. } => {
            !half.input
        }
        KernelSpec::Attention {
            head_dim,
            rotary_dim: None,
            ..
        } => !half.input && prefill && super::attention_mma::fits(f16, *head_dim),
        _ => false,
    };
    if !ok {
        bail!("kernel {signature}: cannot hold its activations in f16 ({half:?}; an mlcb bug)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::lowered_plan;

    /// The names of the buffers held in f16.
    fn half_names(plan: &Plan) -> BTreeSet<String> {
        let io = half_io(plan);
        let mut names = BTreeSet::new();
        for op in &plan.prefill {
            let h = io
                .get(&format!("prefill:{}", op_signature(plan, op)))
                .copied()
                .unwrap_or_default();
            for (side, b) in half_slots(op) {
                if (side == Side::Input && h.input) || (side == Side::Output && h.out) {
                    names.insert(plan.buffers[b].name.clone());
                }
            }
        }
        names
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn f16_schemes_keep_the_gemm_inputs_of_norms_attention_and_activations_in_f16() {
        let cuda = |fx, arch, scheme| {
            crate::codegen::fuse::fuse_for_cuda(lowered_plan(fx, arch, scheme, 32))
        };
        let llama = cuda("tiny-llama", "llama", "q4f16_1");
        assert_eq!(half_names(&llama), set(&["normed", "attn", "act"]));
        // GPT-NeoX's up projection applies its GELU (fused) and writes f16 for the down one.
        let neox = cuda("tiny-neox", "gpt_neox", "q0f16");
        assert_eq!(
            half_names(&neox),
            set(&["normed", "normed_mlp", "attn", "ff"])
        );
        // Unfused, the in-place GELU reads and writes it: f32.
        let unfused = lowered_plan("tiny-neox", "gpt_neox", "q0f16", 32);
        assert_eq!(half_names(&unfused), set(&["normed", "normed_mlp", "attn"]));
        // RWKV: the channel mix's relu² key (fused) feeds only its value matmul; its other
        // matmuls read token-shift mixes, and its norms feed token shifts.
        let rwkv = cuda("tiny-rwkv", "rwkv", "q4f16_1");
        assert_eq!(half_names(&rwkv), set(&["ffn_key"]));
        // f32 schemes: nothing.
        let f32 = cuda("tiny-llama", "llama", "q4f32_1");
        assert!(half_io(&f32).is_empty());
    }

    /// What the analysis picks, the kernels take; what they cannot hold is refused.
    #[test]
    fn kernels_take_the_f16_activations_the_analysis_picks_and_refuse_others() {
        use crate::codegen::wgsl::spec::specs_by_signature;
        let (ins, outs) = (
            HalfIo {
                input: true,
                out: false,
            },
            HalfIo {
                input: false,
                out: true,
            },
        );
        for (fx, arch, scheme) in [
            ("tiny-llama", "llama", "q4f16_1"),
            ("tiny-neox", "gpt_neox", "q0f16"),
            ("tiny-rwkv", "rwkv", "q4f16_1"),
        ] {
            let plan = crate::codegen::fuse::fuse_for_cuda(lowered_plan(fx, arch, scheme, 32));
            let specs = specs_by_signature(&plan).unwrap();
            let io = half_io(&plan);
            assert!(!io.is_empty(), "{fx}");
            for (sig, h) in &io {
                check(sig, &specs[sig], true, *h).unwrap();
            }
            for (sig, spec) in &specs {
                let refused = |h| check(sig, spec, true, h).is_err();
                match spec {
                    KernelSpec::Matmul {
                        phase: Phase::Decode,
                        ..
                    }
                    | KernelSpec::Rotary { .. }
                    | KernelSpec::Embedding { .. }
                    | KernelSpec::Unary { .. }
                    | KernelSpec::Binary { .. } => assert!(refused(ins) && refused(outs), "{sig}"),
                    KernelSpec::Matmul { logits: true, .. } => assert!(refused(outs), "{sig}"),
                    KernelSpec::Matmul { .. } => {
                        // Not without the f16 GEMM.
                        assert!(check(sig, spec, false, ins).is_err(), "{sig}")
                    }
                    KernelSpec::RmsNorm { .. } | KernelSpec::LayerNorm { .. } => {
                        assert!(refused(ins) && !refused(outs), "{sig}")
                    }
                    KernelSpec::Attention { .. } if sig.starts_with("decode:") => {
                        assert!(refused(outs), "{sig}")
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_signature_shared_with_an_f32_activation_keeps_its_buffers_in_f32() {
        let mut plan = lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        // A second rms_norm into a new buffer that a residual add reads: that buffer cannot be
        // f16, so neither can `normed`, which the same rms_norm kernel writes.
        let normed = plan
            .buffers
            .iter()
            .position(|b| b.name == "normed")
            .unwrap();
        let hidden = plan
            .buffers
            .iter()
            .position(|b| b.name == "hidden")
            .unwrap();
        let mut extra = plan.buffers[normed].clone();
        extra.name = "extra".into();
        plan.buffers.push(extra);
        let e = plan.buffers.len() - 1;
        let Some(Op::RmsNorm { weight, eps, .. }) = plan
            .prefill
            .iter()
            .find(|op| matches!(op, Op::RmsNorm { .. }))
            .cloned()
        else {
            panic!("no rms_norm")
        };
        plan.prefill.insert(
            1,
            Op::RmsNorm {
                input: hidden,
                weight,
                eps,
                out: e,
            },
        );
        plan.prefill.insert(
            2,
            Op::Add {
                a: hidden,
                b: e,
                out: hidden,
            },
        );
        assert_eq!(half_names(&plan), set(&["attn", "act"]));
    }
}
