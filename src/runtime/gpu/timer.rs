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
use crate::codegen::wgsl::launch::{fold_grid, Binding};
use crate::codegen::wgsl::spec::{KernelSpec, MatrixSpec, MatrixStorage, Phase};
use crate::codegen::wgsl::tune_space::KernelTimer;
use crate::codegen::wgsl::WgslKernel;
use anyhow::Result;
use std::borrow::Cow;
use wgpu::util::DeviceExt;

/// Tokens of a timed prefill call.
const PREFILL_TOKENS: u64 = 16;
/// Tokens already in the KV cache when attention is timed.
const POSITION: u64 = 64;
/// KV-cache capacity of the timed state buffers.
const STATE_TOKENS: u64 = POSITION + PREFILL_TOKENS;
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

/// Upper bound of the bytes a binding of `spec` may touch.
fn binding_bytes(spec: &KernelSpec, b: &Binding) -> u64 {
    if let Some([_, len]) = b.range {
        return len.max(4);
    }
    let t = match spec {
        KernelSpec::Matmul {
            phase: Phase::Decode,
            ..
        } => 1,
        _ => PREFILL_TOKENS,
    };
    let widest = widest(spec);
    let bytes = match b.role.as_str() {
        "weight" => match spec {
            KernelSpec::Matmul { m, .. } | KernelSpec::Embedding { m } => {
                matrix_bytes(m, b.record.unwrap_or(0))
            }
            _ => widest * 4,
        },
        "state" => STATE_TOKENS * widest * 4,
        "params" => PARAMS_BYTES,
        _ => t * widest * 4,
    };
    bytes.max(4).next_multiple_of(4)
}

/// The widest row any buffer of `spec` has (qkv and gate/up rows included), in elements.
fn widest(spec: &KernelSpec) -> u64 {
    let w = match spec {
        KernelSpec::Matmul { m, .. } | KernelSpec::Embedding { m } => m.n.max(m.k),
        KernelSpec::RmsNorm { cols, .. }
        | KernelSpec::LayerNorm { cols, .. }
        | KernelSpec::SiluMul { cols }
        | KernelSpec::Unary { cols, .. }
        | KernelSpec::Binary { cols, .. } => 2 * cols,
        KernelSpec::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        }
        | KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
        } => (n_q_heads + 2 * n_kv_heads) * head_dim,
        KernelSpec::TokenShift { hidden, .. } | KernelSpec::Wkv { hidden, .. } => 5 * hidden,
    };
    w as u64
}

fn matrix_bytes(m: &MatrixSpec, record: usize) -> u64 {
    let (n, k) = (m.n as u64, m.k as u64);
    match m.storage {
        MatrixStorage::Raw(_) => n * k * 4,
        MatrixStorage::Quant(q) if record == 0 => n * (q.words_per_row as u64) * 4,
        MatrixStorage::Quant(q) => n * (q.n_group as u64) * 4,
    }
}

impl WgpuTimer {
    fn grid(&self, kernel: &WgslKernel, t: u64) -> Result<[u32; 3]> {
        let g = &kernel.launch.grid;
        let (x, y, z) = (
            g[0].workgroups(t, t),
            g[1].workgroups(t, t),
            g[2].workgroups(t, t),
        );
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as u64;
        if x <= max && y <= max && z <= max {
            return Ok([x as u32, y as u32, z as u32]);
        }
        (z == 1 && kernel.launch.folds_x_into_z)
            .then(|| fold_grid(x, y, max))
            .flatten()
            .ok_or_else(|| {
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

    fn time(&mut self, kernel: &WgslKernel, spec: &KernelSpec) -> Result<f64> {
        let device = &self.ctx.device;
        let t = match spec {
            KernelSpec::Matmul {
                phase: Phase::Decode,
                ..
            } => 1,
            _ if kernel.signature.starts_with("decode:") => 1,
            _ => PREFILL_TOKENS,
        };
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
                let size = binding_bytes(spec, b);
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
