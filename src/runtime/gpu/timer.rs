//! Timing generated kernels on the local wgpu device for the tune stage (`--tune=on`).
//!
//! A kernel is timed alone, on zero-filled buffers sized from its spec (generously: kernels bound-
//! check every access, so a larger buffer never changes the work done), for a typical call: one
//! token for decode kernels, a 16-token block for prefill kernels, attention at position 64.
//! Each measurement submits a batch of dispatches and waits for the device; the median of five
//! batches per dispatch is the result.

use super::adapter::{self, GpuContext};
use super::bind::Params;
use super::kernels::{layout_entries, PARAMS_BYTES};
use crate::codegen::tune::{buffer_bytes, timed_tokens, KernelTimer, TimedKernel, POSITION};
use crate::codegen::wgsl::launch::Binding;
use crate::codegen::wgsl::spec::KernelSpec;
use crate::codegen::wgsl::WgslKernel;
use anyhow::Result;
use std::borrow::Cow;
use wgpu::util::DeviceExt;

const DISPATCHES_PER_BATCH: usize = 8;
const BATCHES: usize = 5;

pub struct WgpuTimer {
    ctx: GpuContext,
}

/// A timer on the local adapter of the target's own API (Vulkan for vulkan, Metal for metal),
/// or `None`: webgpu runs in a browser, android and iphone on another machine, and a vulkan
/// build on a machine with only a Metal adapter would be timed on the wrong driver.
pub fn open_for_target(target: &str) -> Result<Option<Box<dyn KernelTimer>>> {
    if matches!(target, "android" | "iphone" | "webgpu") {
        return Ok(None);
    }
    let Some(backend) = adapter::preferred_backend(target) else {
        return Ok(None);
    };
    let (_instance, adapters) = adapter::enumerate();
    if !adapters.iter().any(|a| a.get_info().backend == backend) {
        return Ok(None);
    }
    let ctx = adapter::open(Some(backend), None)?;
    Ok(Some(Box::new(WgpuTimer { ctx })))
}

/// Bytes of a binding: its declared range, else the spec's upper bound for a call of `tokens`.
fn binding_bytes(spec: &KernelSpec, b: &Binding, tokens: u64) -> u64 {
    match (b.range, b.role.as_str()) {
        (Some([_, len]), _) => len.max(4),
        (None, "params") => PARAMS_BYTES,
        (None, role) => buffer_bytes(spec, role, b.record, tokens),
    }
}

impl WgpuTimer {
    fn grid(&self, kernel: &WgslKernel, t: u64) -> Result<[u32; 3]> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as u64;
        kernel.launch.dispatch(t, t, max).map_err(|[x, y, z]| {
            anyhow::anyhow!("kernel {} needs {x}×{y}×{z} workgroups", kernel.signature)
        })
    }
}

impl KernelTimer for WgpuTimer {
    fn device_id(&self) -> String {
        let i = &self.ctx.info;
        format!(
            "{:?}:{:04x}:{:04x}:{}:{} {}",
            i.backend, i.vendor, i.device, i.name, i.driver, i.driver_info
        )
    }

    fn time(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> Result<f64> {
        let TimedKernel::Wgsl(kernel) = kernel else {
            anyhow::bail!("the wgpu timer runs WGSL kernels only (an mlcb bug)");
        };
        let device = &self.ctx.device;
        let t = timed_tokens(spec, &kernel.signature);
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&kernel.signature),
            source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(&kernel.source)),
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&kernel.signature),
            entries: &layout_entries(&kernel.launch),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&kernel.signature),
            layout: Some(
                &device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&kernel.signature),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                }),
            ),
            module: &module,
            entry_point: Some(&kernel.entry_point),
            compilation_options: Default::default(),
            cache: None,
        });
        let buffers: Vec<(u32, wgpu::Buffer)> = kernel
            .launch
            .bindings
            .iter()
            .map(|b| {
                let size = binding_bytes(spec, b, t);
                let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&b.name),
                    size,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                });
                (b.binding, buffer)
            })
            .collect();
        let params = Params {
            t: t as u32,
            pos: POSITION as u32,
            rows: t as u32,
            row0: 0,
            scalar: 1e-5,
            index: 0,
        };
        let uniform = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: &params.to_bytes(),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .map(|(binding, buffer)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: kernel.launch.params.binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniform,
                offset: 0,
                size: wgpu::BufferSize::new(PARAMS_BYTES),
            }),
        });
        let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.signature),
            layout: &layout,
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            anyhow::bail!("kernel {} does not load: {e}", kernel.signature);
        }
        let grid = self.grid(kernel, t)?;
        let batch = || -> Result<f64> {
            let mut enc = device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &group, &[0]);
                for _ in 0..DISPATCHES_PER_BATCH {
                    pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
                }
            }
            let start = std::time::Instant::now();
            self.ctx.queue.submit([enc.finish()]);
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| anyhow::anyhow!("waiting for the device: {e}"))?;
            Ok(start.elapsed().as_secs_f64() / DISPATCHES_PER_BATCH as f64)
        };
        batch()?; // warm-up: the driver compiles the pipeline on first use
        let mut runs = (0..BATCHES)
            .map(|_| batch())
            .collect::<Result<Vec<f64>>>()?;
        if let Some(e) = self.ctx.take_error() {
            anyhow::bail!("timing kernel {}: {e}", kernel.signature);
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[BATCHES / 2])
    }
}
