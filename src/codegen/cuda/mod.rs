//! CUDA C kernels for every op of an execution plan, specialised at build time for the static
//! shapes of each kernel signature, the quantization scheme, the tuning record and the target
//! architecture, then compiled to PTX by NVRTC ([`nvrtc`]). One kernel per distinct
//! phase-prefixed signature, exactly as for the WGSL targets (the same [`KernelSpec`]s).
//!
//! | op | entry point | block | grid |
//! |---|---|---|---|
//! | embedding | `mlcb_embedding` | TPB | `[ceil(K/TPB), T, 1]` |
//! | rms_norm, layer_norm | `mlcb_rms_norm`, `mlcb_layer_norm` | TPB | `[1, T, 1]` |
//! | matmul, logits (decode, NK) | `mlcb_matmul_gemv_nk`, `mlcb_logits_gemv_nk` | TPB | `[ceil(N/rows_per_block), rows, 1]` (tensor-core GEMV: `[ceil(N/(16·rows_per_block)), rows, 1]`, 8 output rows per 16 with a silu gate) |
//! | matmul, logits (decode, KN) | `…_gemv_kn` | TPB | `[ceil(N/32), rows, 1]` |
//! | matmul, logits (prefill, f32 schemes) | `…_gemm` (3xTF32 tensor cores) | 128 | `[ceil(N/64), ceil(rows/64), 1]` |
//! | matmul, logits (prefill, f16 schemes) | `…_gemm` (f16 tensor cores, [`gemm_f16`]) | 256 | `[ceil(N/128), ceil(rows/128), 1]` |
//! | rotary | `mlcb_rotary` | TPB | `[ceil((nq+nkv)·rd/2 / TPB), T, 1]` |
//! | attention (decode; prefill with head_dim > 128) | `mlcb_attention` | TPB | `[n_q_heads, T, 1]` |
//! | attention (prefill, f16 schemes, head_dim a multiple of 16 ≤ 128) | `mlcb_attention` (f16 tensor cores, [`attention_mma`]) | 128 | `[n_q_heads, ceil(T/64), 1]` |
//! | attention (prefill, other head_dim ≤ 128) | `mlcb_attention` (query tiles) | 128 | `[n_q_heads, ceil(T/16), 1]` |
//! | silu_mul, gelu, relu_square, sigmoid, scale, add, mul | `mlcb_<op>` | TPB | `[ceil(cols/TPB), T, 1]` |
//! | rwkv_token_shift, rwkv_wkv | `mlcb_rwkv_token_shift`, `mlcb_rwkv_wkv` | TPB | `[ceil(hidden/TPB), 1, 1]` |
//!
//! The argument list, the grid and the block are stored in the kernel's launch JSON
//! ([`launch::CudaLaunch`]); the runtime derives every launch from it. Arithmetic is f32
//! (decode GEMVs accumulate in f32) except the prefill matmuls: f16 tensor-core products with f32
//! sums in libraries of f16 schemes, 3xTF32 (f32-accurate) products otherwise; in libraries of
//! f16 schemes also prefill attention's two products and the decode GEMV over q4 weights and
//! row-major q8 ones. Activations are f32 but, in libraries of f16 schemes, the prefill buffers
//! that only feed a GEMM ([`half_activations`]).

pub(crate) mod attention;
mod attention_mma;
pub mod builder;
mod elementwise;
mod f16_ops;
pub mod gemm_f16;
pub mod gemm_wgmma;
mod gemv_mma;
pub mod half_activations;
pub mod launch;
mod matmul;
mod norm;
pub mod nvrtc;
#[cfg(test)]
pub mod ptxas;
pub mod row_blocks;
mod rwkv;
pub mod tune_space;
mod weights;

use crate::codegen::wgsl::spec::{self, KernelSpec, MatrixStorage, Phase};
use crate::formats::model_lib::plan::Plan;
use crate::formats::model_lib::KernelEntry;
use anyhow::{bail, Result};
use builder::CudaBuilder;
use half_activations::HalfIo;
use launch::{CudaLaunch, CudaTuning};
use std::collections::BTreeMap;

/// "sm_86" → 86.
pub fn arch_number(arch: &str) -> Option<u32> {
    arch.strip_prefix("sm_")?.parse().ok()
}

/// Architectures the cuda target compiles for (every kernel needs sm_80: TF32 `mma.sync`).
pub const CUDA_ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90"];

/// The `&'static str` of a supported architecture (NVRTC's options want one).
pub fn arch_str(arch: &str) -> Result<&'static str> {
    CUDA_ARCHS
        .iter()
        .copied()
        .find(|a| *a == arch)
        .ok_or_else(|| {
            crate::error::user(format!(
                "unknown CUDA architecture {arch}; valid: {}",
                CUDA_ARCHS.join(", ")
            ))
        })
}

/// One generated kernel.
#[derive(Debug, Clone)]
pub struct CudaKernel {
    /// Phase-prefixed signature (`decode:matmul[…]`).
    pub signature: String,
    pub entry_point: String,
    pub source: String,
    pub launch: CudaLaunch,
}

/// The entry point name of a spec (the same names as the WGSL kernels).
pub fn entry_point(spec: &KernelSpec) -> String {
    crate::codegen::wgsl::entry_point(spec)
}

/// Kernels index with 32-bit counters along K and N; refuse what would overflow them.
fn check_dims(signature: &str, spec: &KernelSpec) -> Result<()> {
    if let KernelSpec::Embedding { m } | KernelSpec::Matmul { m, .. } = spec {
        let per_row = match m.storage {
            MatrixStorage::Raw(_) => m.k as u64,
            MatrixStorage::Quant(q) => (q.words_per_row * q.per_word) as u64,
        };
        if m.n as u64 >= u32::MAX as u64 / 2 || per_row >= u32::MAX as u64 / 2 {
            bail!("kernel {signature}: a [{}, {}] weight is too large for the CUDA kernels' 32-bit row and column indices", m.n, m.k);
        }
    }
    Ok(())
}

/// Whether a plan's prefill matmuls run on f16 tensor cores ([`gemm_f16`]): the plans of f16
/// schemes (their model computes in f16); f32 schemes keep the f32-accurate 3xTF32 GEMM.
pub fn f16_prefill(plan: &Plan) -> bool {
    plan.model_dtype == crate::formats::dtype::DType::F16
}

/// Whether some decode matmul of `plan` runs on f16 tensor cores ([`gemv_mma`]): its operands
/// are then rounded to f16 as prefill's are (q4 weights of f16 schemes, row-major q8 ones). The
/// emulator's tests choose their bound by it.
#[cfg(test)]
pub fn f16_decode(plan: &Plan) -> Result<bool> {
    Ok(crate::codegen::wgsl::spec::specs_by_signature(plan)?
        .values()
        .any(|spec| {
            matches!(spec, KernelSpec::Matmul { m, phase: Phase::Decode, .. } if gemv_mma::fits(m))
        }))
}

/// Generate the CUDA C of one spec (`f16`: see [`f16_prefill`]; `half`: which of its
/// activations are f16, see [`half_activations`]).
pub fn generate(
    signature: &str,
    spec: &KernelSpec,
    tuning: CudaTuning,
    arch: &str,
    f16: bool,
    half: HalfIo,
) -> Result<CudaKernel> {
    check_dims(signature, spec)?;
    half_activations::check(signature, spec, f16, half)?;
    let ep = entry_point(spec);
    let mut b = CudaBuilder::new(&ep, tuning, arch);
    // Decode steps are short kernels one after another: on sm_90 and newer their launches may
    // overlap the kernel before (programmatic dependent launch; the runtime decides).
    b.pdl =
        phase_of(signature) == Some(Phase::Decode) && arch_number(arch).is_some_and(|n| n >= 90);
    let (source, launch) = match spec {
        KernelSpec::Embedding { m } => matmul::embedding(b, m),
        KernelSpec::Matmul {
            phase: Phase::Prefill,
            fusion,
            ..
        } if *fusion
            != (spec::Fusion {
                activation: fusion.activation,
                residual: fusion.residual,
                silu_gate: fusion.silu_gate,
                ..Default::default()
            }) =>
        {
            bail!("kernel {signature}: the prefill GEMMs fuse no norm (an mlcb bug)")
        }
        KernelSpec::Matmul {
            m,
            bias,
            phase,
            logits,
            fusion,
        } => matmul::matmul(b, m, *bias, *phase, *logits, f16, half, *fusion).map_err(|e| {
            crate::error::user(format!("tuning record for kernel {signature}: {e}"))
        })?,
        KernelSpec::RmsNorm { cols, weight } => norm::rms_norm(b, *cols, *weight, half.out),
        KernelSpec::LayerNorm { cols, weight, bias } => {
            norm::layer_norm(b, *cols, *weight, *bias, half.out)
        }
        KernelSpec::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
        } => attention::rotary(b, *n_q_heads, *n_kv_heads, *head_dim, *rotary_dim),
        KernelSpec::Attention {
            rotary_dim: Some(_),
            ..
        } if phase_of(signature) != Some(Phase::Decode) => {
            bail!("kernel {signature}: only decode attention applies rotary itself (an mlcb bug)")
        }
        KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        } if phase_of(signature) == Some(Phase::Prefill) && attention_mma::fits(f16, *head_dim) => {
            attention_mma::attention_mma(b, *n_q_heads, *n_kv_heads, *head_dim, half.out)
        }
        KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        } if attention::tiled(phase_of(signature), *head_dim) => attention::attention_tiled(
            b,
            *n_q_heads,
            *n_kv_heads,
            *head_dim,
            attention::kv_f16(f16, *head_dim),
        ),
        KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
        } => {
            // Shared memory: q (and the rotated key), per-warp partial outputs and softmax
            // statistics (48 KiB static).
            let vectors = 1 + rotary_dim.is_some() as usize + tuning.warps() as usize;
            let bytes = 4 * (head_dim * vectors + 2 * tuning.warps() as usize);
            if bytes > 48 << 10 {
                bail!("kernel {signature}: head_dim {head_dim} with {} threads per block needs {bytes} bytes of shared memory (at most 48 KiB); use fewer threads", tuning.threads_per_block);
            }
            // Key splits are a decode knob: prefill's rows already give one block per query.
            let splits = match phase_of(signature) {
                Some(Phase::Decode) => tuning.kv_splits as usize,
                _ => 1,
            };
            attention::attention(
                b,
                *n_q_heads,
                *n_kv_heads,
                *head_dim,
                *rotary_dim,
                splits,
                attention::kv_f16(f16, *head_dim),
            )
        }
        KernelSpec::SiluMul { cols } => elementwise::silu_mul(b, *cols, half.out),
        KernelSpec::Unary { op, cols } => elementwise::unary(b, *op, *cols),
        KernelSpec::Binary { op, cols } => elementwise::binary(b, *op, *cols),
        KernelSpec::TokenShift { hidden, mixes } => rwkv::token_shift(b, *hidden, mixes),
        KernelSpec::Wkv {
            hidden,
            time_decay,
            time_first,
        } => rwkv::wkv(b, *hidden, *time_decay, *time_first),
    };
    Ok(CudaKernel {
        signature: signature.to_string(),
        entry_point: ep,
        source,
        launch,
    })
}

/// Every kernel of a plan, in signature order, each specialised for its tuning record.
pub fn generate_plan(
    plan: &Plan,
    records: &BTreeMap<String, serde_json::Value>,
    arch: &str,
) -> Result<Vec<CudaKernel>> {
    generate_plan_with(plan, records, arch, &half_activations::half_io(plan))
}

/// [`generate_plan`] with the f16 activations of `half` (signature → which); the tests compare
/// the results with and without them.
pub(crate) fn generate_plan_with(
    plan: &Plan,
    records: &BTreeMap<String, serde_json::Value>,
    arch: &str,
    half: &BTreeMap<String, HalfIo>,
) -> Result<Vec<CudaKernel>> {
    let f16 = f16_prefill(plan);
    spec::specs_with_tuning(plan, records, CudaTuning::from_record)?
        .into_iter()
        .map(|(sig, spec, tuning)| {
            let h = half.get(&sig).copied().unwrap_or_default();
            generate(&sig, &spec, tuning, arch, f16, h)
        })
        .collect()
}

/// Compile one generated kernel to PTX, for the architecture its launch description names
/// (the library's, or an architecture-specific variant of it, [`ptx_arch_str`]).
pub fn compile(k: &CudaKernel) -> Result<Vec<u8>> {
    Ok(nvrtc::compile(&k.signature, &k.source, ptx_arch_str(&k.launch.arch)?)?.into_bytes())
}

/// The `&'static str` of an architecture a kernel's PTX may target: a supported one, or
/// [`gemm_wgmma::WGMMA_PTX_ARCH`].
pub fn ptx_arch_str(arch: &str) -> Result<&'static str> {
    if arch == gemm_wgmma::WGMMA_PTX_ARCH {
        return Ok(gemm_wgmma::WGMMA_PTX_ARCH);
    }
    arch_str(arch)
}

/// For PTX of an architecture-specific target (`sm_90a`), the compute capability it runs on
/// and nothing else (`Some(90)`); `None` for PTX any newer GPU can JIT-compile.
pub fn arch_specific(arch: &str) -> Option<u32> {
    arch_number(arch.strip_suffix('a')?)
}

/// Every kernel of a plan compiled to PTX for `arch`: entries (offsets into the returned blob
/// area, language "ptx", launch JSON) and the blob area. Also returns the CUDA C sources (for
/// `--debug-dump`).
pub fn build_kernels(
    plan: &Plan,
    arch: &str,
    tuning: &serde_json::Value,
) -> Result<(Vec<KernelEntry>, Vec<u8>, Vec<String>)> {
    let kernels = generate_plan(plan, &crate::codegen::gpu::tuning_records(tuning)?, arch)?;
    let mut entries = Vec::with_capacity(kernels.len());
    let mut blobs = Vec::new();
    let mut sources = Vec::with_capacity(kernels.len());
    for k in &kernels {
        let ptx = compile(k)?;
        entries.push(KernelEntry {
            signature: k.signature.clone(),
            entry_point: k.entry_point.clone(),
            language: "ptx".into(),
            offset: blobs.len() as u64,
            len: ptx.len() as u64,
            launch: serde_json::to_value(&k.launch)?,
        });
        blobs.extend_from_slice(&ptx);
        sources.push(k.source.clone());
    }
    Ok((entries, blobs, sources))
}

/// The phase of a signature (`prefill:…` / `decode:…`).
pub fn phase_of(signature: &str) -> Option<Phase> {
    match signature.split_once(':').map(|(p, _)| p) {
        Some("prefill") => Some(Phase::Prefill),
        Some("decode") => Some(Phase::Decode),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
