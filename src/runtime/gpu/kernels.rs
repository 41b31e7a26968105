//! Loading a library's kernels into compute pipelines.
//!
//! SPIR-V (vulkan, android targets) goes in through wgpu's SPIR-V front end (naga spv-in), so it
//! runs on every wgpu backend; WGSL (webgpu) likewise. Libraries of the metal targets carry each
//! kernel's WGSL beside its MSL, and the WGSL is what runs here (on Metal, wgpu compiles it to MSL
//! with the array-sizes buffer naga's MSL needs, which wgpu's MSL passthrough would not bind). An
//! MSL-only library (built before that) is refused with the way out. Each pipeline gets an
//! explicit layout from the launch JSON (storage read / read_write per binding, the params uniform
//! with a dynamic offset), so a kernel that declares a binding it never reads still binds what the
//! runtime passes.

use super::adapter::GpuContext;
use crate::codegen::wgsl::launch::Launch;
use crate::error::user;
use crate::formats::model_lib::{KernelEntry, ModelLibrary};
use anyhow::Result;
use std::borrow::Cow;
use std::collections::HashMap;

/// Size of the params uniform ([`crate::codegen::wgsl::launch::PARAMS_WGSL`]).
pub const PARAMS_BYTES: u64 = 32;

pub struct Kernel {
    pub signature: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub launch: Launch,
}

/// Why a library's kernels cannot run through wgpu, if they cannot.
pub fn unsupported_language(language: &str, backend: wgpu::Backend) -> Option<String> {
    match language {
        "spirv" | "wgsl" => None,
        "msl" => {
            let why = if backend == wgpu::Backend::Metal {
                " (wgpu's Metal passthrough does not bind naga's buffer-sizes buffer the kernels need)"
                    .to_string()
            } else {
                format!(" and which only Metal could run (the adapter is {backend:?})")
            };
            Some(format!(
                "this library holds only Metal Shading Language kernels (a metal/iphone library \
                 built by an older mlcb), which mlcb's wgpu runtime cannot load{why}: rebuild it \
                 with this mlcb (metal libraries now carry each kernel's WGSL too, which wgpu runs \
                 on Metal, Vulkan and DX12), build for `webgpu` or `vulkan`, or run with \
                 `--device cpu`"
            ))
        }
        other => Some(format!(
            "this library holds {other} kernels, which the wgpu runtime cannot load; rebuild it \
             for a vulkan or webgpu target"
        )),
    }
}

pub(super) fn layout_entries(launch: &Launch) -> Vec<wgpu::BindGroupLayoutEntry> {
    let mut entries: Vec<wgpu::BindGroupLayoutEntry> = launch
        .bindings
        .iter()
        .map(|b| wgpu::BindGroupLayoutEntry {
            binding: b.binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: b.access != "read_write",
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    entries.push(wgpu::BindGroupLayoutEntry {
        binding: launch.params.binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: wgpu::BufferSize::new(PARAMS_BYTES),
        },
        count: None,
    });
    entries
}

fn spirv_words(bytes: &[u8], signature: &str) -> Result<Vec<u32>> {
    if bytes.len() % 4 != 0 || bytes.len() < 20 || bytes[..4] != 0x0723_0203u32.to_le_bytes() {
        crate::user_bail!(
            "kernel {signature} is not little-endian SPIR-V; the model library is corrupt, rebuild it"
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// Why a kernel built with subgroup reductions cannot run on this device, if it cannot.
fn missing_subgroups(kernel_uses: bool, device_has: bool, adapter: &str) -> Option<String> {
    (kernel_uses && !device_has).then(|| {
        format!(
            "this library reduces with subgroup operations, which wgpu adapter {adapter} does not \
             offer; build for a preset without them (android or webgpu use the same kernels \
             without subgroups), or pin a tuning file whose records say \"subgroups\": false"
        )
    })
}

/// Why a kernel computing in f16 cannot run on this device, if it cannot.
fn missing_f16(kernel_uses: bool, device_has: bool, adapter: &str) -> Option<String> {
    (kernel_uses && !device_has).then(|| {
        format!(
            "this library computes in f16, which wgpu adapter {adapter} does not offer (wgpu's \
             SHADER_F16: Vulkan shaderFloat16 with 16-bit storage buffers, or WebGPU's \
             shader-f16); rebuild with `--shader-f16 off` (or `shader_f16 = false` in the \
             recipe's [target]), or use a q*f32 scheme"
        )
    })
}

/// Bytes per element of the KV cache the library's attention kernels bind: 2 when they declare
/// it f16, else 4. Kernels that disagree make a corrupt library.
pub fn kv_cache_elem_bytes(kernels: &HashMap<String, Kernel>) -> Result<usize> {
    crate::runtime::kv_cache_elem_bytes(
        kernels
            .values()
            .flat_map(|k| &k.launch.bindings)
            .map(|b| (b.role.as_str(), b.part.as_deref(), b.elem.as_str())),
    )
}

/// The entry of each kernel signature that wgpu loads: its SPIR-V or WGSL one (an MSL library's
/// WGSL twin), in library order. `Err`: the language of a signature that has neither.
pub fn wgpu_entries(kernels: &[KernelEntry]) -> std::result::Result<Vec<&KernelEntry>, String> {
    let loadable = |k: &KernelEntry| matches!(k.language.as_str(), "spirv" | "wgsl");
    let mut chosen: Vec<&KernelEntry> = Vec::new();
    for k in kernels.iter().filter(|k| loadable(k)) {
        if !chosen.iter().any(|c| c.signature == k.signature) {
            chosen.push(k);
        }
    }
    match kernels
        .iter()
        .find(|k| !chosen.iter().any(|c| c.signature == k.signature))
    {
        Some(missing) => Err(missing.language.clone()),
        None => Ok(chosen),
    }
}

/// Every kernel of the library as a pipeline, by phase-prefixed signature.
pub fn load(ctx: &GpuContext, lib: &ModelLibrary) -> Result<HashMap<String, Kernel>> {
    let device = &ctx.device;
    let mut out = HashMap::new();
    let entries = wgpu_entries(&lib.header.kernels).map_err(|language| {
        user(
            unsupported_language(&language, ctx.info.backend)
                .unwrap_or_else(|| format!("kernels in {language} cannot load")),
        )
    })?;
    for entry in entries {
        let launch: Launch = serde_json::from_value(entry.launch.clone()).map_err(|e| {
            user(format!(
                "kernel {}: unreadable launch description ({e}); rebuild the model library with this mlcb",
                entry.signature
            ))
        })?;
        if let Some(why) =
            missing_subgroups(launch.tuning.subgroups, ctx.subgroups, &ctx.description())
        {
            return Err(user(format!("kernel {}: {why}", entry.signature)));
        }
        if let Some(why) = missing_f16(launch.shader_f16, ctx.shader_f16, &ctx.description()) {
            return Err(user(format!("kernel {}: {why}", entry.signature)));
        }
        let bytes = lib.kernel_bytes(entry);
        let source = match entry.language.as_str() {
            "spirv" => wgpu::ShaderSource::SpirV(Cow::Owned(spirv_words(bytes, &entry.signature)?)),
            _ => wgpu::ShaderSource::Wgsl(Cow::Borrowed(
                std::str::from_utf8(bytes)
                    .map_err(|_| user(format!("kernel {} is not UTF-8 WGSL", entry.signature)))?,
            )),
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&entry.signature),
            source,
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&entry.signature),
            entries: &layout_entries(&launch),
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&entry.signature),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&entry.signature),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(&entry.entry_point),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            anyhow::bail!(
                "kernel {} does not load on {}: {e}",
                entry.signature,
                ctx.description()
            );
        }
        out.insert(
            entry.signature.clone(),
            Kernel {
                signature: entry.signature.clone(),
                pipeline,
                layout,
                launch,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subgroup_kernels_need_a_subgroup_device() {
        assert!(missing_subgroups(false, false, "a").is_none());
        assert!(missing_subgroups(false, true, "a").is_none());
        assert!(missing_subgroups(true, true, "a").is_none());
        let why = missing_subgroups(true, false, "llvmpipe").unwrap();
        assert!(why.contains("llvmpipe") && why.contains("webgpu"), "{why}");
    }

    #[test]
    fn f16_kernels_need_an_f16_device() {
        assert!(missing_f16(false, false, "a").is_none());
        assert!(missing_f16(true, true, "a").is_none());
        let why = missing_f16(true, false, "old gpu").unwrap();
        assert!(
            why.contains("old gpu") && why.contains("--shader-f16 off"),
            "{why}"
        );
    }

    #[test]
    fn msl_and_unknown_languages_are_refused_with_a_way_out() {
        assert!(unsupported_language("spirv", wgpu::Backend::Vulkan).is_none());
        assert!(unsupported_language("wgsl", wgpu::Backend::Dx12).is_none());
        let off = unsupported_language("msl", wgpu::Backend::Vulkan).unwrap();
        assert!(
            off.contains("only Metal") && off.contains("webgpu"),
            "{off}"
        );
        let on = unsupported_language("msl", wgpu::Backend::Metal).unwrap();
        assert!(on.contains("passthrough"), "{on}");
        assert!(unsupported_language("ptx", wgpu::Backend::Vulkan).is_some());
    }

    #[test]
    fn wgpu_takes_an_msl_librarys_wgsl_twins() {
        let entry = |sig: &str, language: &str| KernelEntry {
            signature: sig.into(),
            entry_point: "main".into(),
            language: language.into(),
            offset: 0,
            len: 0,
            launch: serde_json::Value::Null,
        };
        let twins = [
            entry("a", "msl"),
            entry("a", "wgsl"),
            entry("b", "msl"),
            entry("b", "wgsl"),
        ];
        let chosen: Vec<(&str, &str)> = wgpu_entries(&twins)
            .unwrap()
            .iter()
            .map(|k| (k.signature.as_str(), k.language.as_str()))
            .collect();
        assert_eq!(chosen, [("a", "wgsl"), ("b", "wgsl")]);
        assert_eq!(wgpu_entries(&[entry("a", "spirv")]).unwrap().len(), 1);
        assert_eq!(
            wgpu_entries(&[entry("a", "wgsl"), entry("b", "msl")]).unwrap_err(),
            "msl"
        );
        assert_eq!(wgpu_entries(&[entry("a", "ptx")]).unwrap_err(), "ptx");
    }

    #[test]
    fn spirv_words_check_the_magic() {
        let mut b = 0x0723_0203u32.to_le_bytes().to_vec();
        b.extend([0u8; 16]);
        assert_eq!(spirv_words(&b, "k").unwrap()[0], 0x0723_0203);
        assert!(spirv_words(&b[..19], "k").is_err());
        b[0] = 0;
        assert!(spirv_words(&b, "k").is_err());
    }
}
