//! Target presets: a table, one row per target a recipe can name.
//!
//! A preset fixes everything about the target that used to come from probing the build machine in
//! MLC's build.py, so cross-compiling never needs the target device.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TargetPreset {
    /// The name recipes and `--target` use.
    pub name: &'static str,
    /// The runtime backend that executes the library: "cpu", "cuda" or "wgpu".
    pub backend: &'static str,
    /// The kernel language the library carries ("native" = the CPU runtime's own Rust kernels).
    pub kernel_language: &'static str,
    /// MLC's library kind, kept in the library file name: `<model>-<quant>-<kind>.mlcblib`.
    pub kind: &'static str,
    /// wgpu presets: libraries of f16 schemes compute in f16 (f16 KV cache, f16 prefill tiles;
    /// see `codegen::wgsl`), which needs wgpu's `SHADER_F16` on the device (Vulkan `shaderFloat16` +
    /// 16-bit storage, any Metal GPU, WebGPU's optional `shader-f16`, as WebLLM's q4f16 models
    /// need it too). A recipe may turn it off (`[target] shader_f16 = false`, `--shader-f16 off`)
    /// for devices without it. CPU and CUDA ignore it.
    pub shader_f16: bool,
    /// Default CUDA architecture for the cuda preset.
    pub default_cuda_arch: Option<&'static str>,
    /// wgpu presets: whether the WGSL kernels reduce with subgroup operations. On for desktop
    /// Vulkan and Apple-silicon Metal, where every current GPU has them; off (the workgroup-memory
    /// fallback) where support varies: Android, iPhone, Intel/AMD Macs and WebGPU (an optional
    /// browser feature).
    pub subgroups: bool,
}

pub const TARGETS: &[TargetPreset] = &[
    TargetPreset {
        name: "cpu",
        backend: "cpu",
        kernel_language: "native",
        kind: "cpu",
        shader_f16: false,
        default_cuda_arch: None,
        subgroups: false,
    },
    TargetPreset {
        name: "cuda",
        backend: "cuda",
        kernel_language: "ptx",
        kind: "cuda",
        shader_f16: false,
        default_cuda_arch: Some("sm_80"),
        subgroups: false,
    },
    TargetPreset {
        name: "vulkan",
        backend: "wgpu",
        kernel_language: "spirv",
        kind: "vulkan",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: true,
    },
    TargetPreset {
        name: "metal",
        backend: "wgpu",
        kernel_language: "msl",
        kind: "metal",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: true,
    },
    TargetPreset {
        name: "metal_x86_64",
        backend: "wgpu",
        kernel_language: "msl",
        kind: "metal_x86_64",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: false,
    },
    TargetPreset {
        name: "webgpu",
        backend: "wgpu",
        kernel_language: "wgsl",
        kind: "webgpu",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: false,
    },
    TargetPreset {
        name: "iphone",
        backend: "wgpu",
        kernel_language: "msl",
        kind: "iphone",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: false,
    },
    TargetPreset {
        name: "android",
        backend: "wgpu",
        kernel_language: "spirv",
        kind: "android",
        shader_f16: true,
        default_cuda_arch: None,
        subgroups: false,
    },
];

/// CUDA architectures the cuda preset accepts (`cuda_arch` / `--cuda-arch`): the kernels use TF32
/// tensor-core `mma.sync`, which needs sm_80. The preset's default is `default_cuda_arch`.
pub const CUDA_ARCHS: &[&str] = crate::codegen::cuda::CUDA_ARCHS;

pub fn target(name: &str) -> Option<&'static TargetPreset> {
    TARGETS.iter().find(|t| t.name == name)
}

pub fn target_names() -> Vec<&'static str> {
    TARGETS.iter().map(|t| t.name).collect()
}

/// `shader_f16` as a recipe or flag asks for it (`None`: the preset's own); only the wgpu presets
/// take it. `Err` says which targets do.
pub fn shader_f16_for(preset: &TargetPreset, asked: Option<bool>) -> Result<bool, String> {
    match asked {
        None => Ok(preset.shader_f16),
        Some(on) if preset.backend == "wgpu" => Ok(on),
        Some(_) => {
            let wgpu: Vec<&str> = TARGETS
                .iter()
                .filter(|t| t.backend == "wgpu")
                .map(|t| t.name)
                .collect();
            Err(format!(
                "shader_f16 applies to the wgpu targets ({}), not {}",
                wgpu.join(", "),
                preset.name
            ))
        }
    }
}
