//! Choosing a wgpu adapter and opening a device on it.
//!
//! The choice is explicit and reported: `--adapter NAME` picks the first adapter whose name (or
//! driver) contains NAME, case-insensitively; without it the best adapter of the backend the
//! library was built for wins (discrete GPU, then integrated, virtual, CPU — so lavapipe is the
//! pick on a machine without a GPU). The caller prints [`GpuContext::description`] to stderr.

use crate::error::{env, user};
use anyhow::Result;
use std::sync::{Arc, Mutex};

/// Environment variable lowering the workgroups per dispatch dimension the runtime plans with
/// (never above the device's), so tests can exercise grid folding on tiny models.
pub const MAX_WORKGROUPS_ENV: &str = "MLCB_WGPU_MAX_WORKGROUPS";

/// Environment variable (`1`) opening the device without shader-f16 even where the adapter has
/// it, so tests can exercise the refusal of f16 libraries and the f32 fallback on one machine.
pub const NO_SHADER_F16_ENV: &str = "MLCB_WGPU_NO_SHADER_F16";

/// An open device with what the runtime needs to know about it.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Errors wgpu reported outside an error scope (validation, out of memory): the session
    /// checks it after each submit instead of letting wgpu panic.
    pub uncaptured: Arc<Mutex<Option<String>>>,
    /// Whether the device was opened with subgroup operations (kernels built with subgroup
    /// reductions need them).
    pub subgroups: bool,
    /// Whether the device was opened with wgpu's `SHADER_F16` (f16 kernels need it).
    pub shader_f16: bool,
}

impl GpuContext {
    /// One line for stderr: adapter name, backend, kind and driver.
    pub fn description(&self) -> String {
        describe(&self.info)
    }

    /// Takes the first error wgpu reported outside a scope, if any.
    pub fn take_error(&self) -> Option<String> {
        self.uncaptured.lock().ok().and_then(|mut e| e.take())
    }
}

pub fn describe(info: &wgpu::AdapterInfo) -> String {
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "{} ({:?}, {:?}{})",
        info.name,
        info.backend,
        info.device_type,
        if driver.is_empty() {
            String::new()
        } else {
            format!(", driver {driver}")
        }
    )
}

/// Rank of a device type when no adapter is named: lower is better.
fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The wgpu backend a library target's kernels are meant for (`None`: any).
pub fn preferred_backend(target: &str) -> Option<wgpu::Backend> {
    match target {
        "vulkan" | "android" => Some(wgpu::Backend::Vulkan),
        "metal" | "metal_x86_64" | "iphone" => Some(wgpu::Backend::Metal),
        _ => None,
    }
}

/// Index into `infos` of the adapter to use: the first whose name or driver contains `wanted`
/// (case-insensitive), else the best-ranked one on `preferred` (then on any backend).
pub fn choose(
    infos: &[wgpu::AdapterInfo],
    preferred: Option<wgpu::Backend>,
    wanted: Option<&str>,
) -> Result<usize> {
    if let Some(w) = wanted {
        let w = w.to_lowercase();
        return infos
            .iter()
            .position(|i| {
                i.name.to_lowercase().contains(&w) || i.driver.to_lowercase().contains(&w)
            })
            .ok_or_else(|| {
                user(format!(
                    "--adapter {w:?} matches none of the wgpu adapters: {}",
                    list(infos)
                ))
            });
    }
    let key = |i: &wgpu::AdapterInfo| {
        (
            (Some(i.backend) != preferred) as u8,
            type_rank(i.device_type),
        )
    };
    (0..infos.len())
        .min_by_key(|&i| key(&infos[i]))
        .ok_or_else(|| env(no_adapter_message()))
}

fn list(infos: &[wgpu::AdapterInfo]) -> String {
    if infos.is_empty() {
        return "(none)".into();
    }
    infos
        .iter()
        .map(|i| format!("{:?}", describe(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn no_adapter_message() -> String {
    "no wgpu adapter found (no Vulkan, Metal or DX12 driver). On Linux without a GPU install \
     lavapipe: `apt-get install mesa-vulkan-drivers libvulkan1`; or run with `--device cpu`"
        .into()
}

/// Every adapter of the compiled-in backends, in enumeration order.
pub fn enumerate() -> (wgpu::Instance, Vec<wgpu::Adapter>) {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    (instance, adapters)
}

/// Opens a device on the chosen adapter with the adapter's own limits (wgpu's defaults would cap
/// storage bindings lower than most hardware allows).
pub fn open(preferred: Option<wgpu::Backend>, wanted: Option<&str>) -> Result<GpuContext> {
    // lavapipe prints "XDG_RUNTIME_DIR is invalid" without one; it never uses it for compute.
    let (_instance, adapters) = enumerate();
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    if infos.is_empty() {
        return Err(env(no_adapter_message()));
    }
    let adapter = &adapters[choose(&infos, preferred, wanted)?];
    let info = adapter.get_info();
    let limits = adapter.limits();
    // The device gets the adapter's limits; the runtime may plan within lower ones (for tests of
    // the folded-grid path on small models).
    let mut planned = limits.clone();
    if let Some(n) = std::env::var(MAX_WORKGROUPS_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        planned.max_compute_workgroups_per_dimension =
            planned.max_compute_workgroups_per_dimension.min(n.max(1));
    }
    // Subgroup operations and f16 whenever the adapter has them: libraries of presets with
    // subgroup reductions or f16 kernels need them, the others ignore them.
    let mut wanted_features = wgpu::Features::SUBGROUP | wgpu::Features::SHADER_F16;
    if std::env::var(NO_SHADER_F16_ENV).is_ok_and(|v| v == "1") {
        wanted_features.remove(wgpu::Features::SHADER_F16);
    }
    let features = adapter.features() & wanted_features;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("mlcb"),
        required_features: features,
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| {
        env(format!(
            "cannot open a device on wgpu adapter {}: {e}",
            describe(&info)
        ))
    })?;
    let uncaptured: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let sink = uncaptured.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        if let Ok(mut slot) = sink.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    }));
    Ok(GpuContext {
        device,
        queue,
        info,
        limits: planned,
        uncaptured,
        subgroups: features.contains(wgpu::Features::SUBGROUP),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, backend: wgpu::Backend, t: wgpu::DeviceType) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: name.into(),
            driver: "drv".into(),
            ..wgpu::AdapterInfo::new(t, backend)
        }
    }

    #[test]
    fn named_adapter_wins_and_unknown_names_are_user_errors() {
        use wgpu::{Backend::*, DeviceType::*};
        let infos = [
            info("llvmpipe (LLVM 15)", Vulkan, Cpu),
            info("NVIDIA H200", Vulkan, DiscreteGpu),
            info("Intel UHD", Vulkan, IntegratedGpu),
        ];
        assert_eq!(choose(&infos, Some(Vulkan), None).unwrap(), 1);
        assert_eq!(choose(&infos, Some(Vulkan), Some("LLVMPIPE")).unwrap(), 0);
        assert_eq!(choose(&infos, None, Some("intel")).unwrap(), 2);
        let e = choose(&infos, None, Some("radeon")).unwrap_err();
        assert_eq!(crate::error::class_of(&e), crate::error::ErrorClass::User);
        assert!(e.to_string().contains("llvmpipe"), "{e}");
        // The library's backend beats a better device type on another backend.
        let mixed = [info("gpu", Dx12, DiscreteGpu), info("cpu", Vulkan, Cpu)];
        assert_eq!(choose(&mixed, Some(Vulkan), None).unwrap(), 1);
        assert_eq!(choose(&mixed, None, None).unwrap(), 0);
        assert!(choose(&[], None, None).is_err());
    }
}
