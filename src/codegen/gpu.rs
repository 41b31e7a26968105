//! Kernels of the wgpu targets: generate WGSL per signature, validate it with naga (every
//! validation flag), and cross-compile to the preset's kernel language: SPIR-V 1.3 (vulkan,
//! android), MSL 2.1 with an explicit buffer map plus the WGSL (metal, metal_x86_64, iphone) or
//! WGSL as is (webgpu). Deterministic: the same plan and tuning give the same bytes.

use super::wgsl::launch::MslLaunch;
use super::wgsl::{generate_plan, WgslKernel};
use crate::formats::model_lib::plan::Plan;
use crate::formats::model_lib::KernelEntry;
use anyhow::{anyhow, Result};
use naga::back::{msl, spv};
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::collections::BTreeMap;

/// MSL version the metal presets target.
pub const MSL_VERSION: (u8, u8) = (2, 1);
/// SPIR-V version the vulkan presets target.
pub const SPIRV_VERSION: (u8, u8) = (1, 3);

/// One compiled kernel: its library entry (offset/len relative to `blob` start 0) and bytes.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    pub entry: KernelEntry,
    pub blob: Vec<u8>,
}

/// Out-of-range storage reads give 0 and writes are dropped, on every backend: a runtime bug
/// must not read or write outside a buffer.
fn bounds() -> BoundsCheckPolicies {
    BoundsCheckPolicies {
        index: BoundsCheckPolicy::Restrict,
        buffer: BoundsCheckPolicy::ReadZeroSkipWrite,
        image_load: BoundsCheckPolicy::Unchecked,
        binding_array: BoundsCheckPolicy::Unchecked,
    }
}

/// Parse and validate one kernel; `Err` carries the signature and naga's message.
pub fn validate(k: &WgslKernel) -> Result<(naga::Module, naga::valid::ModuleInfo)> {
    let module = naga::front::wgsl::parse_str(&k.source).map_err(|e| {
        anyhow!(
            "generated kernel {} does not parse (an mlcb bug; please report it):\n{}",
            k.signature,
            e.emit_to_string(&k.source)
        )
    })?;
    // unpack2x16float / pack2x16float are core WGSL; naga gates them behind this capability.
    // Subgroup reductions (the preset's choice) need the subgroup capabilities.
    // f16 kernels (`enable f16;`) need f16 types, including in storage buffers (the KV cache).
    let mut caps = Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    if k.launch.tuning.subgroups {
        caps |= Capabilities::SUBGROUP;
    }
    if k.launch.shader_f16 {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .map_err(|e| {
            anyhow!(
                "generated kernel {} fails naga validation (an mlcb bug; please report it):\n{}",
                k.signature,
                e.emit_to_string(&k.source)
            )
        })?;
    Ok((module, info))
}

fn to_spirv(k: &WgslKernel, m: &naga::Module, info: &naga::valid::ModuleInfo) -> Result<Vec<u8>> {
    // Descriptor set 0, binding i, exactly as the WGSL declares them.
    let binding_map: spv::BindingMap = (0..k.launch.bindings.len() as u32 + 1)
        .map(|i| {
            (
                naga::ResourceBinding {
                    group: 0,
                    binding: i,
                },
                spv::BindingInfo {
                    descriptor_set: 0,
                    binding: i,
                    binding_array_size: None,
                },
            )
        })
        .collect();
    let opts = spv::Options {
        lang_version: SPIRV_VERSION,
        binding_map,
        // No DEBUG flag (it would make the bytes depend on how mlcb was compiled).
        flags: spv::WriterFlags::empty(),
        fake_missing_bindings: false,
        bounds_check_policies: bounds(),
        // Every kernel writes its workgroup arrays before reading them.
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: false,
        // Compute kernels have no f16 stage inputs/outputs; without this naga declares the
        // StorageInputOutput16 capability for any f16 use, which wgpu's SPIR-V reader refuses.
        use_storage_input_output_16: false,
        ..Default::default()
    };
    let pipe = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: k.entry_point.clone(),
    };
    let words = spv::write_vec(m, info, &opts, Some(&pipe))
        .map_err(|e| anyhow!("kernel {}: SPIR-V output failed: {e}", k.signature))?;
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// MSL with buffer `i` for binding `i` and naga's sizes buffer right after the last binding.
/// Returns the source and the entry point's name in it (naga renames reserved words).
fn to_msl(
    k: &WgslKernel,
    m: &naga::Module,
    info: &naga::valid::ModuleInfo,
) -> Result<(String, String, u32)> {
    let n = k.launch.bindings.len() as u32 + 1; // + params
    let mut resources = msl::BindingMap::new();
    for i in 0..n {
        let mutable = k
            .launch
            .bindings
            .get(i as usize)
            .map(|b| b.access == "read_write")
            .unwrap_or(false);
        resources.insert(
            naga::ResourceBinding {
                group: 0,
                binding: i,
            },
            msl::BindTarget {
                buffer: Some(i as u8),
                mutable,
                ..Default::default()
            },
        );
    }
    let sizes = n;
    let mut per_entry_point_map = msl::EntryPointResourceMap::new();
    per_entry_point_map.insert(
        k.entry_point.clone(),
        msl::EntryPointResources {
            resources,
            immediates_buffer: None,
            sizes_buffer: Some(sizes as u8),
        },
    );
    let opts = msl::Options {
        lang_version: MSL_VERSION,
        per_entry_point_map,
        fake_missing_bindings: false,
        bounds_check_policies: bounds(),
        zero_initialize_workgroup_memory: false,
        force_loop_bounding: false,
        emit_int_div_checks: false,
        ..Default::default()
    };
    let pipe = msl::PipelineOptions {
        entry_point: Some((naga::ShaderStage::Compute, k.entry_point.clone())),
        ..Default::default()
    };
    let (src, ti) = msl::write_string(m, info, &opts, &pipe)
        .map_err(|e| anyhow!("kernel {}: MSL output failed: {e}", k.signature))?;
    let name = match ti.entry_point_names.as_slice() {
        [Ok(name)] => name.clone(),
        other => {
            return Err(anyhow!(
                "kernel {}: MSL output has no usable entry point ({other:?})",
                k.signature
            ))
        }
    };
    Ok((src, name, sizes))
}

/// Compile one validated kernel for a kernel language ("spirv", "msl" or "wgsl").
pub fn compile(k: &WgslKernel, language: &str) -> Result<CompiledKernel> {
    let (m, info) = validate(k)?;
    let mut launch = k.launch.clone();
    let (entry_point, blob) = match language {
        "wgsl" => (k.entry_point.clone(), k.source.clone().into_bytes()),
        "spirv" => (k.entry_point.clone(), to_spirv(k, &m, &info)?),
        "msl" => {
            let (src, name, sizes) = to_msl(k, &m, &info)?;
            launch.msl = Some(MslLaunch {
                sizes_buffer: sizes,
            });
            (name, src.into_bytes())
        }
        other => {
            return Err(anyhow!(
                "no WGSL cross-compiler for kernel language {other}"
            ))
        }
    };
    Ok(CompiledKernel {
        entry: KernelEntry {
            signature: k.signature.clone(),
            entry_point,
            language: language.to_string(),
            offset: 0,
            len: blob.len() as u64,
            launch: serde_json::to_value(&launch)?,
        },
        blob,
    })
}

/// The tune stage's records map out of its `tuning.json` value.
pub fn tuning_records(tuning: &serde_json::Value) -> Result<BTreeMap<String, serde_json::Value>> {
    let recs = tuning
        .get("records")
        .and_then(|r| r.as_object())
        .ok_or_else(|| anyhow!("tuning.json has no `records` object"))?;
    Ok(recs.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Every kernel of a plan for a wgpu preset's language (in f16 where `f16`, see
/// `wgsl::f16_kernels`): entries (offsets into the returned blob area) and the blob area. MSL
/// libraries list each kernel twice, MSL then the WGSL it was compiled from: native Metal hosts
/// take the MSL, the wgpu runtime the WGSL (wgpu compiles it for Metal itself, with the
/// buffer-sizes binding naga's MSL needs, which wgpu's MSL passthrough would not provide).
pub fn build_kernels(
    plan: &Plan,
    language: &str,
    tuning: &serde_json::Value,
    f16: bool,
) -> Result<(Vec<KernelEntry>, Vec<u8>)> {
    let kernels = generate_plan(plan, &tuning_records(tuning)?, f16)?;
    let mut entries = Vec::with_capacity(kernels.len());
    let mut blobs = Vec::new();
    let languages: &[&str] = if language == "msl" {
        &["msl", "wgsl"]
    } else {
        std::slice::from_ref(&language)
    };
    for k in &kernels {
        for lang in languages {
            let mut c = compile(k, lang)?;
            c.entry.offset = blobs.len() as u64;
            blobs.extend_from_slice(&c.blob);
            // Keep blobs 4-byte aligned (SPIR-V words).
            while blobs.len() % 4 != 0 {
                blobs.push(0);
            }
            entries.push(c.entry);
        }
    }
    Ok((entries, blobs))
}
