//! Fusing neighbouring steps into one kernel, for backends whose kernels implement the fused
//! forms (the cuda target; see [`fuse_for_cuda`]).
//!
//! Why: a decode step runs one token, so most of its kernels are tiny (a norm, a residual add,
//! rotary on one row) and cost their launch and the gap between kernels more than their work: a
//! Llama layer was 11 kernels, 4 of them GEMVs. In a captured CUDA graph each kernel still
//! costs a few microseconds, which at 32 layers is a large share of a token's time when the
//! weights stream at several TB/s. Five rewrites remove 6 kernels per Llama layer (11 → 5), 4 per
//! GPT-NeoX layer (11 → 7, its norms are LayerNorms) and 4 per RWKV-4 layer (19 → 15):
//!
//! | ops | fused into |
//! |---|---|
//! | `RmsNorm{input: h, out: x}`, `Matmul{input: x}` | `Matmul{input: h, fusion.rms_norm}` (scales its sums by the row's norm) |
//! | `Rotary{qkv}`, `Attention{qkv}` | `Attention{qkv, rotary}` (rotates q and the new key as it reads them) |
//! | `Matmul{out: p}`, `SiluMul{input: p, out: a}` | `Matmul{out: a, fusion.silu_gate}` |
//! | `Matmul{out: p}`, `Add{p, r → o}` | `Matmul{out: o, fusion.residual: r}` |
//! | `Matmul{out: p}`, `Gelu`/`ReluSquare`/`Sigmoid{buf: p}` | `Matmul{out: p, fusion.activation}` |
//!
//! Each applies only where the intermediate (`x`, `p`, the rotated `qkv`; an activation writes
//! `p` itself, as the in-place op did) is dead afterwards: the
//! next op that touches it overwrites it without reading it, or none does (activations do not
//! live across calls; the logits buffer, which the caller reads, is never an intermediate).
//! In prefill, whose kernels are large (the elementwise ones a small share), the last three rows
//! apply: the GEMM's epilogue applies SiLU·up or the activation and adds the residual, so the
//! product does not go to memory and back before them (a Llama-2-7B prefill of 512 tokens spent
//! 0.68 of 41.7 ms in its 64 separate residual adds and 1.0 in its SiLU·up), and in libraries
//! of f16 schemes the
//! activation's output, which only the next GEMM reads, can be written in f16
//! ([`crate::codegen::cuda::half_activations`]: GPT-NeoX's GELU and RWKV's relu² outputs).
//! A plan that fused anything is written as plan format version 2
//! ([`crate::formats::model_lib::plan::PLAN_FORMAT_VERSION`]).

use crate::formats::model_lib::plan::{
    Activation, BufId, FusedRmsNorm, FusedRotary, MatmulFusion, Op, Plan, PLAN_FORMAT_VERSION,
};

/// Whether `buf`'s value after `ops[at]` is never read: the first later op touching it
/// overwrites it without reading it, or no later op touches it.
fn dead_after(plan: &Plan, ops: &[Op], at: usize, buf: BufId) -> bool {
    if buf == plan.logits {
        return false;
    }
    for op in &ops[at + 1..] {
        if op.reads().contains(&buf) {
            return false;
        }
        if op.writes().contains(&buf) {
            return true;
        }
    }
    true
}

/// `first` and `second` (= `ops[at]`, `ops[at + 1]`) as one op, if a rewrite of the module's
/// table applies.
fn fuse_pair(plan: &Plan, ops: &[Op], at: usize) -> Option<Op> {
    match (&ops[at], &ops[at + 1]) {
        (
            &Op::Rotary {
                qkv,
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
                theta,
            },
            &Op::Attention {
                qkv: attn_qkv,
                state,
                n_q_heads: q2,
                n_kv_heads: kv2,
                head_dim: hd2,
                out,
                rotary: None,
            },
        ) if attn_qkv == qkv
            && (q2, kv2, hd2) == (n_q_heads, n_kv_heads, head_dim)
            && dead_after(plan, ops, at + 1, qkv) =>
        {
            Some(Op::Attention {
                qkv,
                state,
                n_q_heads,
                n_kv_heads,
                head_dim,
                out,
                rotary: Some(FusedRotary { rotary_dim, theta }),
            })
        }
        (
            &Op::RmsNorm {
                input,
                weight: norm,
                eps,
                out: x,
            },
            second @ &Op::Matmul {
                input: mm_input,
                out,
                fusion,
                ..
            },
        ) if mm_input == x
            && fusion.rms_norm.is_none()
            && out != input
            && dead_after(plan, ops, at + 1, x) =>
        {
            let fusion = MatmulFusion {
                rms_norm: Some(FusedRmsNorm { weight: norm, eps }),
                ..fusion
            };
            rewired(second, input, out, fusion)
        }
        (&Op::Matmul { .. }, &Op::SiluMul { .. } | &Op::Add { .. }) => fuse_epilogue(plan, ops, at),
        (first, second) => fuse_activation(first, second),
    }
}

/// Prefill's rewrites: SiLU·up, the residual add and the activation into the GEMM's epilogue.
fn fuse_prefill_pair(plan: &Plan, ops: &[Op], at: usize) -> Option<Op> {
    match (&ops[at], &ops[at + 1]) {
        (&Op::Matmul { .. }, &Op::SiluMul { .. } | &Op::Add { .. }) => fuse_epilogue(plan, ops, at),
        (first, second) => fuse_activation(first, second),
    }
}

/// `ops[at]`, a matmul writing `p`, with `ops[at + 1]` in its epilogue (the table's third and
/// fourth rows): `SiluMul{p → a}` as one matmul writing `a` with `fusion.silu_gate`, or
/// `Add{p, r → o}` as one writing `o` with `fusion.residual: r`.
fn fuse_epilogue(plan: &Plan, ops: &[Op], at: usize) -> Option<Op> {
    let first @ &Op::Matmul {
        input,
        out: p,
        fusion,
        ..
    } = &ops[at]
    else {
        return None;
    };
    if fusion.residual.is_some() {
        return None;
    }
    let (out, fusion) = match ops[at + 1] {
        Op::SiluMul { input: gated, out } if !fusion.silu_gate && gated == p => (
            out,
            MatmulFusion {
                silu_gate: true,
                ..fusion
            },
        ),
        Op::Add { a, b, out } if (a == p) != (b == p) => (
            out,
            MatmulFusion {
                residual: Some(if a == p { b } else { a }),
                ..fusion
            },
        ),
        _ => return None,
    };
    if out == input || !dead_after(plan, ops, at + 1, p) {
        return None;
    }
    rewired(first, input, out, fusion)
}

/// `first`, a matmul, with the in-place activation `second` of its output in its epilogue (the
/// table's last row).
fn fuse_activation(first: &Op, second: &Op) -> Option<Op> {
    let &Op::Matmul {
        input, out, fusion, ..
    } = first
    else {
        return None;
    };
    let (activation, buf) = Activation::of(second)?;
    if fusion.activation.is_some() || fusion.silu_gate || fusion.residual.is_some() || buf != out {
        return None;
    }
    let fusion = MatmulFusion {
        activation: Some(activation),
        ..fusion
    };
    rewired(first, input, out, fusion)
}

/// Matmul `op` (its weight and bias) reading `input` and writing `out` with `fusion`: what each
/// matmul rewrite makes, `None` for any other op.
fn rewired(op: &Op, input: BufId, out: BufId, fusion: MatmulFusion) -> Option<Op> {
    let &Op::Matmul { weight, bias, .. } = op else {
        return None;
    };
    Some(Op::Matmul {
        input,
        weight,
        bias,
        out,
        fusion,
    })
}

/// The plan with its decode steps fused as the module's table says, and in prefill each
/// matmul with the SiLU·up, the activation and the residual add after it.
pub fn fuse_for_cuda(mut plan: Plan) -> Plan {
    let decode = std::mem::take(&mut plan.decode);
    let (decode, fused_decode) = fuse_ops(decode, |ops, at| fuse_pair(&plan, ops, at));
    let prefill = std::mem::take(&mut plan.prefill);
    let (prefill, fused_prefill) = fuse_ops(prefill, |ops, at| fuse_prefill_pair(&plan, ops, at));
    plan.decode = decode;
    plan.prefill = prefill;
    if fused_decode || fused_prefill {
        plan.format_version = PLAN_FORMAT_VERSION;
    }
    plan
}

/// `ops` with every neighbouring pair that `fuse` (given the ops and the pair's first index)
/// turns into one op replaced by it; and whether any was.
fn fuse_ops(mut ops: Vec<Op>, fuse: impl Fn(&[Op], usize) -> Option<Op>) -> (Vec<Op>, bool) {
    let mut fused_any = false;
    let mut at = 0;
    while at + 1 < ops.len() {
        match fuse(&ops, at) {
            // The fused op may fuse again with its new neighbour (matmul → silu → add).
            Some(op) => {
                ops.splice(at..at + 2, [op]);
                fused_any = true;
            }
            None => at += 1,
        }
    }
    (ops, fused_any)
}

#[cfg(test)]
mod tests;
