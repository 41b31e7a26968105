//! codegen: lower the architecture's forward pass (prefill and decode) into the execution plan and
//! package it, with the target's kernels, into the model library
//! `<model>-<quant>-<kind>.mlcblib` (see `formats::model_lib`).
//!
//! The CPU target executes the plan with native kernels, so its library holds no kernel blobs.
//! The wgpu targets get one kernel per distinct signature, generated as WGSL, validated with naga
//! and compiled to the preset's language (`codegen::gpu`). The cuda target gets CUDA C kernels
//! compiled to PTX by NVRTC for the recipe's arch (`codegen::cuda`); the arch and the NVRTC
//! version are part of the cache key (another NVRTC may emit other PTX).

use super::load::ModelDescription;
use super::{cached_or_run, temp_output, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::model_lib::plan::Plan;
use crate::formats::model_lib::{LibraryHeader, ModelLibrary, TargetInfo};
use crate::quant::scheme::QuantScheme;
use crate::recipe::TargetSpec;
use anyhow::Result;
use std::collections::BTreeMap;

/// 2: wgpu targets carry WGSL/SPIR-V/MSL kernels. 3: kernels fold grid x into z for grids above
/// 65,535 workgroups (`Launch::folds_x_into_z`) and bind weight records above the tuning's
/// `max_binding_bytes` in parts; the cuda target carries PTX. 4: WGSL reductions use subgroup
/// operations where the preset says so (`Tuning::subgroups`). 5: libraries of f16 schemes for
/// wgpu presets with `shader_f16` compute in f16 and keep an f16 KV cache (`codegen::wgsl`); MSL
/// libraries also carry each kernel's WGSL (what the wgpu runtime loads). 6: cuda libraries of
/// f16 schemes run prefill matmuls on f16 tensor cores (`codegen::cuda::gemm_f16`); cuda prefill
/// attention runs in query tiles (`attention_tiled`). 7: cuda decode steps fuse
/// (`codegen::fuse`: an RMS norm into the GEMV after it, rotary into attention, activations,
/// the silu gate and the residual add into the GEMV before them); decode attention scores 4 keys
/// per warp and step. 8: cuda decode attention splits each head's keys over `kv_splits` blocks
/// (a tuning knob, default 8) merged by the last block to finish; kernels may own a scratch;
/// cuda libraries of f16 schemes keep an f16 KV cache (`attention::kv_f16`). 9: the cuda f16
/// prefill GEMM runs 128×128 tiles fed by `ldmatrix` and decodes sym 4/8-bit codes in f16 pairs.
/// 10: cuda decode GEMVs over q4 NK weights of f16 schemes run on tensor cores (`gemv_mma`).
/// 11: those and the f16 GEMM state the blocks per SM their registers must allow; vectorised
/// norm staging. 12: the tensor-core GEMV's blocks per SM follow its block size. 13: it also
/// takes q4 K-major weights (q4f16_0). 14: cuda prefill attention of f16 schemes runs on f16
/// tensor cores (`attention_mma`). 15: ldmatrix at 32-bit shared addresses, the f16 GEMM's
/// activation loads from one pointer per thread; sm_90 decode GEMVs over row-major weights
/// prefetch the start of their rows into L2 before waiting for the kernel before them. 16: the
/// f16 GEMM's short last row tile multiplies only its mma tiles that hold rows. 17: the
/// tensor-core decode GEMV also takes row-major q8 weights (q8f16_1). 18: its row-major loads
/// are one generated loop for 4- and 8-bit groups (the same machine code, another source). 19:
/// cuda libraries of f16 schemes keep the prefill buffers that only feed a GEMM in f16
/// (`half_activations`). 20: cuda prefill GEMMs apply the activation after them in their
/// epilogue (`fuse_for_cuda`), and may write f16. 21: the tensor-core decode GEMV runs its
/// tuning's `rows_per_block` runs of 16 rows per block (`gemv_mma`). 22: it asks ptxas for 32
/// warps per SM (64 registers). 23: cuda kernels read the row-major matrices of that GEMV in
/// row blocks, which the runtime lays out as it uploads them (`codegen::cuda::row_blocks`). 24:
/// it feeds 4-bit codes to the mma biased and scales each group's sum in f32, at 80 registers,
/// and its fused norm reads the row once where a thread holds at most one chunk. 25: the prefill
/// GEMM finds words and scales through `w_word_index`/`w_scale_index` (the same addresses, other
/// PTX text). 26: cuda decode attention reads whole 16-byte chunks of a key per lane where a
/// key row is at most 32 of them (`attention::ChunkedKeys`). 27: on sm_90 it prefetches its
/// cached keys and values into L2 before its PDL wait. 28: cuda prefill GEMMs take 128-thread
/// tuning records as 64×64 warp tiles, and add the residual after them in their epilogue
/// (`fuse_for_cuda`). 29: and SiLU·up after the gate/up GEMM, whose f16 output the down GEMM
/// reads. 30: the f16 helpers of cuda kernels include `cp.async`, and a prefill GEMM record of
/// `rows_per_block` 2 copies the f16 activation tile two K steps ahead through a ring of shared
/// buffers (`gemm_f16::x_ring`). 31: raw f16 weights take a ring of their own with it. 32: the
/// GEMM's weight staging is left out of the source where that ring replaces it (the same PTX
/// work, other text). 33: in sm_90 libraries a prefill GEMM record of `rows_per_block` 4 runs
/// on wgmma (`gemm_wgmma`, PTX for sm_90a); kernels compile for their launch's arch; prefill
/// GEMM blocks take their tiles in grouped column-major order (`matmul::GEMM_BLOCK_TILES`). 34:
/// the f16 GEMM stages 3-bit codes (and 4-bit ones where K is ragged) in units of the words 8
/// values span, decoded in f16 pairs (`gemm_f16::spanning_words_staging`), and so on wgmma too.
/// 35: the f32 decode GEMV reads a fused norm's weight in 16-byte loads, and leaves out the
/// per-value paths where every chunk lies inside K (`matmul::scale_by_norm`, `load_x`). 36: a
/// tuning record's `weight_ring` streams the tensor-core decode GEMV's weights through a
/// `cp.async` ring in shared memory (`gemv_mma::ring_depth`).
pub const VERSION: u32 = 36;

/// The context size a build uses: the recipe's, else the model's own.
pub fn max_seq_len(desc: &ModelDescription, requested: Option<usize>) -> usize {
    requested.unwrap_or(desc.config.context_length)
}

/// Lower a described model into its plan.
pub fn lower(desc: &ModelDescription, scheme: &QuantScheme, max_seq_len: usize) -> Result<Plan> {
    let arch = crate::model::by_name(&desc.config.arch).ok_or_else(|| {
        anyhow::anyhow!("model.json names unknown architecture {}", desc.config.arch)
    })?;
    arch.lower(&desc.config, scheme, max_seq_len)
}

/// The plan a target's library carries: the lowered plan, with its steps fused where the
/// target's kernels implement the fused forms (cuda: [`crate::codegen::fuse`]). Tune and codegen
/// both key on this plan, so a change in what fuses rebuilds them.
pub fn plan_for_target(
    desc: &ModelDescription,
    scheme: &QuantScheme,
    max_seq_len: usize,
    target: &TargetSpec,
) -> Result<Plan> {
    let plan = lower(desc, scheme, max_seq_len)?;
    Ok(match target.preset.backend {
        "cuda" => crate::codegen::fuse::fuse_for_cuda(plan),
        _ => plan,
    })
}

/// The naga release the kernels are compiled with (part of the cache key: another naga may emit
/// other bytes).
pub const NAGA_VERSION: &str = "30.0.2";

/// Whether a library's kernels compute in f16 anywhere (a key input of tune and codegen): on
/// wgpu targets with `shader_f16`, the kernels of f16 schemes
/// ([`crate::codegen::wgsl::f16_kernels`]); on cuda, the prefill matmuls of f16 schemes
/// ([`crate::codegen::cuda::f16_prefill`]); never on the CPU.
pub fn f16_kernels(plan: &Plan, target: &TargetSpec) -> bool {
    match target.preset.backend {
        "cuda" => crate::codegen::cuda::f16_prefill(plan),
        "wgpu" => crate::codegen::wgsl::f16_kernels(plan, target.shader_f16),
        _ => false,
    }
}

pub struct CodegenRequest<'a> {
    pub model_name: &'a str,
    pub scheme: &'static QuantScheme,
    pub target: &'a TargetSpec,
    pub plan: &'a Plan,
}

pub fn run(
    ctx: &BuildContext,
    req: &CodegenRequest,
    tune: &StageOutput,
    scope: &[String],
) -> Result<StageOutput> {
    let plan_json = serde_json::to_vec(req.plan)?;
    let cuda = req.target.preset.backend == "cuda";
    // Finding NVRTC is the first thing a cuda build needs; without it this is an environment
    // error that says how to install it.
    let nvrtc = if cuda {
        Some(crate::codegen::cuda::nvrtc::nvrtc()?)
    } else {
        None
    };
    let cuda_arch = req
        .target
        .cuda_arch
        .as_deref()
        .or(req.target.preset.default_cuda_arch);
    let f16 = f16_kernels(req.plan, req.target);
    let inputs = KeyInputs::new("codegen", VERSION)
        .with("plan", blake3::hash(&plan_json).to_hex())
        .with("model_name", req.model_name)
        .with("target", req.target.preset.name)
        .with("cuda_arch", cuda_arch.unwrap_or("-"))
        .with("f16_kernels", f16)
        .with(
            "nvrtc",
            nvrtc
                .as_ref()
                .map(|n| n.version())
                .unwrap_or_else(|| "-".into()),
        )
        .with("tuning", tune.digest())
        .with(
            "library_format",
            crate::formats::model_lib::LIBRARY_FORMAT_VERSION,
        )
        .with("mlcb", env!("CARGO_PKG_VERSION"))
        .with("naga", NAGA_VERSION);
    cached_or_run(ctx, inputs, scope, || {
        let tuning: serde_json::Value = serde_json::from_slice(
            &ctx.cache
                .blobs
                .read_verified(&tune.output("tuning.json")?.digest)?,
        )?;
        let mut options = serde_json::Map::new();
        if let (true, Some(a)) = (cuda, cuda_arch) {
            options.insert("cuda_arch".into(), a.into());
        }
        let (kernels, blobs) = match req.target.preset.backend {
            "wgpu" => {
                let language = req.target.preset.kernel_language;
                let version = match language {
                    "spirv" => Some(crate::codegen::gpu::SPIRV_VERSION),
                    "msl" => Some(crate::codegen::gpu::MSL_VERSION),
                    _ => None,
                };
                if let Some((major, minor)) = version {
                    options.insert(
                        format!("{language}_version"),
                        format!("{major}.{minor}").into(),
                    );
                }
                options.insert("shader_f16".into(), f16.into());
                crate::codegen::gpu::build_kernels(req.plan, language, &tuning, f16)?
            }
            "cuda" => {
                let arch = cuda_arch.ok_or_else(|| {
                    anyhow::anyhow!("the cuda preset has no default architecture")
                })?;
                if let Some(n) = &nvrtc {
                    options.insert("nvrtc_version".into(), n.version().into());
                }
                let (entries, blobs, _) =
                    crate::codegen::cuda::build_kernels(req.plan, arch, &tuning)?;
                (entries, blobs)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let lib = ModelLibrary {
            header: LibraryHeader {
                model: req.model_name.to_string(),
                quantization: req.scheme.name.to_string(),
                target: TargetInfo {
                    name: req.target.preset.name.to_string(),
                    backend: req.target.preset.backend.to_string(),
                    options,
                },
                plan: req.plan.clone(),
                kernels,
                tuning,
                generator: format!("mlcb {}", env!("CARGO_PKG_VERSION")),
            },
            blobs,
        };
        Ok(BTreeMap::from([(
            "library".to_string(),
            temp_output(ctx, "library", &lib.to_bytes()?)?,
        )]))
    })
}
