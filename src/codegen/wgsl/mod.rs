//! WGSL kernels for every op of an execution plan, specialised at build time for the static shapes
//! of each kernel signature, the quantization scheme and the tuning record. One kernel per distinct
//! phase-prefixed signature (`prefill:…` / `decode:…`, as `signature::plan_signatures` spells
//! them); [`crate::codegen::gpu`] validates and cross-compiles them with naga.
//!
//! | op | entry point | dispatch |
//! |---|---|---|
//! | embedding | `mlcb_embedding` | `[ceil(K/WG), T, 1]` |
//! | rms_norm, layer_norm | `mlcb_rms_norm`, `mlcb_layer_norm` | `[1, T, 1]` |
//! | matmul, logits (decode, NK) | `mlcb_matmul_gemv_nk`, `mlcb_logits_gemv_nk` | `[ceil(N/rows_per_workgroup), 1, 1]` |
//! | matmul, logits (decode, KN) | `…_gemv_kn` | `[ceil(N/WG), 1, 1]` |
//! | matmul, logits (prefill) | `…_gemm` | `[ceil(N/(WG/8)), ceil(rows/8), 1]` |
//! | rotary | `mlcb_rotary` | `[ceil((nq+nkv)·rd/2 / WG), T, 1]` |
//! | attention | `mlcb_attention` | `[n_q_heads, T, 1]` |
//! | silu_mul, gelu, relu_square, sigmoid, scale, add, mul | `mlcb_<op>` | `[ceil(cols/(WG·VW)), T, 1]` |
//! | rwkv_token_shift, rwkv_wkv | `mlcb_rwkv_token_shift`, `mlcb_rwkv_wkv` | `[ceil(hidden/WG), 1, 1]` |
//!
//! Grid x above the device's per-dimension limit is folded into z by the runtime
//! ([`launch::fold_grid`]); every entry point recovers the linear x (`builder::ENTRY_HEAD`).
//!
//! Bindings (group 0, in this order): activation inputs / token ids, weight records, state
//! buffers, outputs, then the params uniform ([`launch::PARAMS_WGSL`]). The exact list, with the
//! op field each binding takes, is in the kernel's launch JSON ([`launch::Launch`]).
//!
//! Precision. f16 weights and scales are read as packed u32 and unpacked, so f32 kernels need no
//! `enable f16` (they run on WebGPU implementations without shader-f16). Libraries of f16 schemes
//! for a preset with `shader_f16` ([`f16_kernels`]) compute in f16 where it pays and is safe:
//! - the KV cache is stored in f16 (half the memory and attention traffic); keys and values of
//!   the call's own rows are rounded the same way, so prefill and decode see identical values;
//! - prefill matrix kernels (compute-bound) hold their tiles in f16: decoded weights rounded to
//!   f16 (for sym codes with f16 scales exactly the artifact's value) and activations rounded to
//!   f16 (saturating at ±65504), multiplied as 4-wide f16 dot products summed in f32;
//! - decode matrix kernels stay f32: they are bound by reading the weights, which f16 arithmetic
//!   does not shrink (on lavapipe, SmolLM2 q4f16_1 decoded 35% slower with it);
//! - norms, softmax, rotary, activations and the residual stream stay f32 (their traffic is
//!   negligible next to the weights', and these are where f16 loses accuracy).

mod attention;
mod builder;
mod elementwise;
pub mod erf;
pub mod launch;
mod matmul;
mod norm;
mod rwkv;
pub mod spec;
pub mod tune_space;
mod weights;

use crate::formats::model_lib::plan::Plan;
use anyhow::{bail, Result};
use builder::KernelBuilder;
use launch::{Launch, Tuning};
use spec::{KernelSpec, Phase};
use std::collections::BTreeMap;

/// One generated kernel.
#[derive(Debug, Clone)]
pub struct WgslKernel {
    /// Phase-prefixed signature (`decode:matmul[…]`).
    pub signature: String,
    pub entry_point: String,
    pub source: String,
    pub launch: Launch,
}

/// The WGSL entry point name of a spec.
pub fn entry_point(spec: &KernelSpec) -> String {
    use spec::MatrixStorage;
    let name = match spec {
        KernelSpec::Embedding { .. } => "embedding",
        KernelSpec::RmsNorm { .. } => "rms_norm",
        KernelSpec::LayerNorm { .. } => "layer_norm",
        KernelSpec::Matmul {
            m, phase, logits, ..
        } => {
            let kn = matches!(m.storage, MatrixStorage::Quant(q) if q.layout == crate::quant::scheme::Layout::KN);
            match (logits, phase, kn) {
                (false, Phase::Prefill, _) => "matmul_gemm",
                (false, Phase::Decode, false) => "matmul_gemv_nk",
                (false, Phase::Decode, true) => "matmul_gemv_kn",
                (true, Phase::Prefill, _) => "logits_gemm",
                (true, Phase::Decode, false) => "logits_gemv_nk",
                (true, Phase::Decode, true) => "logits_gemv_kn",
            }
        }
        KernelSpec::Rotary { .. } => "rotary",
        KernelSpec::Attention { .. } => "attention",
        KernelSpec::SiluMul { .. } => "silu_mul",
        KernelSpec::Unary { op, .. } => match op {
            spec::Unary::Gelu => "gelu",
            spec::Unary::ReluSquare => "relu_square",
            spec::Unary::Sigmoid => "sigmoid",
            spec::Unary::Scale => "scale",
        },
        KernelSpec::Binary { op, .. } => match op {
            spec::Binary::Add => "add",
            spec::Binary::Mul => "mul",
        },
        KernelSpec::TokenShift { .. } => "rwkv_token_shift",
        KernelSpec::Wkv { .. } => "rwkv_wkv",
    };
    format!("mlcb_{name}")
}

/// Dimensions index with u32 in WGSL; refuse what would overflow it.
fn check_dims(signature: &str, spec: &KernelSpec) -> Result<()> {
    let biggest: u64 = match spec {
        KernelSpec::Embedding { m } | KernelSpec::Matmul { m, .. } => {
            let words = match m.storage {
                spec::MatrixStorage::Raw(_) => m.k as u64,
                spec::MatrixStorage::Quant(q) => (q.words_per_row * q.per_word) as u64,
            };
            m.n as u64 * words
        }
        _ => 0,
    };
    if biggest >= u32::MAX as u64 / 2 {
        bail!("kernel {signature}: a weight of {biggest} elements is too large for 32-bit indexing in WGSL");
    }
    Ok(())
}

/// Whether a library of `plan` computes in f16: the target allows it (`TargetSpec::shader_f16`)
/// and the scheme's values are f16 (`q*f16_*`; the f32 schemes keep f32 everywhere).
pub fn f16_kernels(plan: &Plan, shader_f16: bool) -> bool {
    shader_f16 && plan.model_dtype == crate::formats::dtype::DType::F16
}

/// Generate the WGSL of one spec (`f16`: see [`f16_kernels`]).
pub fn generate(
    signature: &str,
    spec: &KernelSpec,
    tuning: Tuning,
    f16: bool,
) -> Result<WgslKernel> {
    check_dims(signature, spec)?;
    if spec.fused() {
        bail!("kernel {signature}: the WGSL kernels have no fused steps (only cuda plans fuse them; an mlcb bug)");
    }
    let ep = entry_point(spec);
    let b = KernelBuilder::new(&ep, tuning, f16);
    let (source, launch) = match spec {
        KernelSpec::Embedding { m } => matmul::embedding(b, m),
        KernelSpec::Matmul {
            m,
            bias,
            phase,
            logits,
            ..
        } => matmul::matmul(b, m, *bias, *phase, *logits),
        KernelSpec::RmsNorm { cols, weight } => norm::rms_norm(b, *cols, *weight),
        KernelSpec::LayerNorm { cols, weight, bias } => norm::layer_norm(b, *cols, *weight, *bias),
        KernelSpec::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
        } => attention::rotary(b, *n_q_heads, *n_kv_heads, *head_dim, *rotary_dim),
        KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        } => attention::attention(b, *n_q_heads, *n_kv_heads, *head_dim),
        KernelSpec::SiluMul { cols } => elementwise::silu_mul(b, *cols),
        KernelSpec::Unary { op, cols } => elementwise::unary(b, *op, *cols),
        KernelSpec::Binary { op, cols } => elementwise::binary(b, *op, *cols),
        KernelSpec::TokenShift { hidden, mixes } => rwkv::token_shift(b, *hidden, mixes),
        KernelSpec::Wkv {
            hidden,
            time_decay,
            time_first,
        } => rwkv::wkv(b, *hidden, *time_decay, *time_first),
    };
    Ok(WgslKernel {
        signature: signature.to_string(),
        entry_point: ep,
        source,
        launch,
    })
}

/// Every kernel of a plan, in signature order, each specialised for its tuning record
/// (`records`: the tune stage's signature → configuration map), in f16 where `f16`.
pub fn generate_plan(
    plan: &Plan,
    records: &BTreeMap<String, serde_json::Value>,
    f16: bool,
) -> Result<Vec<WgslKernel>> {
    spec::specs_with_tuning(plan, records, Tuning::from_record)?
        .into_iter()
        .map(|(sig, spec, tuning)| generate(&sig, &spec, tuning, f16))
        .collect()
}
