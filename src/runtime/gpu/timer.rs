//! Timing generated kernels on the local wgpu device for the tune stage (`--tune=on`).
//!
//! A kernel is timed alone, on zero-filled buffers sized from its spec (generously: kernels bound-
//! check every access, so a larger buffer never changes the work done), for a typical call: one
//! token for decode kernels, a 16-token block for prefill kernels, attention at position 64.
//! Each measurement submits a batch of dispatches and waits for the device; the median of five
//! batches per dispatch is the result. Before it is timed, the tune stage has it run once on the
//! probe inputs ([`crate::codegen::tune_check`]) and reads back what it wrote.

use super::adapter::{self, GpuContext};
use super::bind::Params;
use super::kernels::{layout_entries, PARAMS_BYTES};
use crate::codegen::tune::{buffer_bytes, timed_tokens, KernelTimer, TimedKernel, POSITION};
use crate::codegen::tune_check::{probe_fill, read_values, Written};
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
        let Loaded {
            kernel,
            grid,
            pipeline,
            group,
            ..
        } = self.load(kernel, spec, false)?;
        let device = &self.ctx.device;
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

    fn probe(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> Result<Vec<Written>> {
        let loaded = self.load(kernel, spec, true)?;
        let (kernel, t, grid) = (loaded.kernel, loaded.t, loaded.grid);
        let device = &self.ctx.device;
        let written: Vec<(&Binding, &wgpu::Buffer)> = kernel
            .launch
            .bindings
            .iter()
            .zip(&loaded.buffers)
            .filter(|(b, _)| b.access == "read_write")
            .map(|(b, (_, buffer))| (b, buffer))
            .collect();
        let readbacks: Vec<wgpu::Buffer> = written
            .iter()
            .map(|(b, buffer)| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&b.name),
                    size: buffer.size(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&loaded.pipeline);
            pass.set_bind_group(0, &loaded.group, &[0]);
            pass.dispatch_workgroups(grid[0], grid[1], grid[2]);
        }
        for ((_, buffer), readback) in written.iter().zip(&readbacks) {
            enc.copy_buffer_to_buffer(buffer, 0, readback, 0, buffer.size());
        }
        self.ctx.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, readback) in readbacks.iter().enumerate() {
            let tx = tx.clone();
            readback
                .slice(..)
                .map_async(wgpu::MapMode::Read, move |r| drop(tx.send((i, r))));
        }
        drop(tx);
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow::anyhow!("waiting for the device: {e}"))?;
        for (i, r) in rx.iter() {
            r.map_err(|e| anyhow::anyhow!("reading {} back: {e}", written[i].0.name))?;
        }
        if let Some(e) = self.ctx.take_error() {
            anyhow::bail!("running kernel {}: {e}", kernel.signature);
        }
        let mut out = Vec::with_capacity(written.len());
        for ((b, _), readback) in written.iter().zip(&readbacks) {
            let values = {
                let view = readback
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| anyhow::anyhow!("reading {} back: {e}", b.name))?;
                read_values(value_elem(b), &view)
            };
            readback.unmap();
            out.push(Written {
                name: format!("{} ({t} tokens at position {POSITION})", b.name),
                values,
            });
        }
        Ok(out)
    }
}

/// How a binding's elements are read as values: 16-bit floats packed in pairs are f16s.
fn value_elem(b: &Binding) -> &str {
    match b.packs.as_deref() {
        Some("f16x2") => "f16",
        _ => &b.elem,
    }
}

/// A kernel ready to dispatch on the timer's device for a call of `t` tokens at [`POSITION`]:
/// its grid, pipeline, buffers (binding number, buffer) and the bind group over them.
struct Loaded<'k> {
    kernel: &'k WgslKernel,
    t: u64,
    grid: [u32; 3],
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<(u32, wgpu::Buffer)>,
    group: wgpu::BindGroup,
}

impl WgpuTimer {
    /// `kernel` on this device with buffers for a typical call ([`timed_tokens`]): zeroed, or with
    /// `probe` the inputs of [`probe_fill`] (and readable).
    fn load<'k>(
        &self,
        kernel: TimedKernel<'k>,
        spec: &KernelSpec,
        probe: bool,
    ) -> Result<Loaded<'k>> {
        let TimedKernel::Wgsl(kernel) = kernel else {
            anyhow::bail!("the wgpu timer runs WGSL kernels only (an mlcb bug)");
        };
        let t = timed_tokens(spec, &kernel.signature);
        let grid = self.grid(kernel, t)?;
        let device = &self.ctx.device;
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
                let buffer = if probe {
                    let fill =
                        probe_fill(&b.role, &b.elem, &b.name, size.next_multiple_of(4) as usize);
                    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(&b.name),
                        contents: &fill,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    })
                } else {
                    device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(&b.name),
                        size,
                        usage: wgpu::BufferUsages::STORAGE,
                        mapped_at_creation: false,
                    })
                };
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
        Ok(Loaded {
            kernel,
            t,
            grid,
            pipeline,
            buffers,
            group,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::tune_check::disagreement;
    use crate::codegen::wgsl::spec::specs_by_signature;
    use crate::codegen::wgsl::tune_space::{candidates, preset_default};

    /// A probe reads back what the kernel wrote: a decode matmul's rows replace the output's
    /// fill, its other configurations agree, and the same kernel launched on half its rows does
    /// not. On the local Vulkan adapter (lavapipe without a GPU); skips loudly without one.
    #[test]
    fn probes_read_back_what_the_kernel_wrote() {
        let Some(mut timer) = open_for_target("vulkan").unwrap() else {
            eprintln!("SKIPPED probes_read_back_what_the_kernel_wrote: no Vulkan adapter");
            return;
        };
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        let specs = specs_by_signature(&plan).unwrap();
        let (sig, spec) = specs
            .iter()
            .find(|(s, _)| s.starts_with("decode:matmul"))
            .expect("a decode matmul");
        let configs = candidates(spec, preset_default(false));
        assert!(configs.len() > 1, "{sig}: one candidate");
        let kernel = |t| crate::codegen::wgsl::generate(sig, spec, t, false).unwrap();
        let mut probe = |k: &WgslKernel| timer.probe(TimedKernel::Wgsl(k), spec).unwrap();
        let default_kernel = kernel(configs[0]);
        let default = probe(&default_kernel);
        let out = default_kernel
            .launch
            .bindings
            .iter()
            .find(|b| b.access == "read_write")
            .expect("an output");
        let written = default
            .iter()
            .find(|w| w.name.starts_with(&format!("{} (", out.name)))
            .expect("the output read back");
        let bytes = binding_bytes(spec, out, 1).next_multiple_of(4) as usize;
        let fill = read_values(
            value_elem(out),
            &probe_fill(&out.role, &out.elem, &out.name, bytes),
        );
        assert_ne!(written.values, fill, "{sig}: the output was not written");
        assert!(written.values.iter().all(|v| v.is_finite()));
        for t in &configs[1..] {
            assert_eq!(
                disagreement(&default, &probe(&kernel(*t))),
                None,
                "{sig}: {t:?}"
            );
        }
        let mut half_rows = default_kernel.clone();
        half_rows.launch.grid[0].per_workgroup *= 2;
        let why = disagreement(&default, &probe(&half_rows));
        assert!(why.is_some(), "{sig}: a kernel on half its rows agreed");
    }
}
