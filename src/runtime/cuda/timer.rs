//! Timing generated CUDA kernels on the local GPU for the tune stage (`--tune=on`, cuda target).
//!
//! Only a GPU whose compute capability is the target's architecture counts as matching: records
//! measured on an sm_90 part would be wrong for an sm_80 build. A kernel is timed alone on
//! zero-filled buffers sized by [`buffer_bytes`] for typical calls ([`timed_calls`]: one token
//! for decode, a 16-token block for prefill, attention at position 64; decode attention at 512
//! too, and prefill matmuls at a 512-token prompt too, the two times summed): a warm-up launch,
//! then five batches of launches between two CUDA events; the median batch, per launch, is the
//! result.
//!
//! A model's forward pass streams every weight once, so each of its kernels starts with its
//! weights out of the L2 cache. Launched again and again on the same buffers, a kernel whose
//! buffers fit in the L2 (an H200's 60 MB holds a Llama-2-7B q4 attention projection) would be
//! timed reading from L2 instead, which favours other configurations than DRAM does (on an
//! H200 a build tuned that way decoded 5% slower than the untuned one). So the timer keeps
//! enough copies of the kernel's buffers to fill [`COLD_BYTES`], and each launch of a batch uses
//! the next copy. Before it is timed, the tune stage has it run once per call on the probe
//! inputs ([`crate::codegen::tune_check`]) and reads back what it wrote.

use super::driver::{self, Device, DeviceMem, Event, Kernel, Stream};
use crate::codegen::cuda::launch::META_FIELDS;
use crate::codegen::cuda::CudaKernel;
use crate::codegen::tune::{
    buffer_bytes, timed_tokens, KernelTimer, TimedKernel, LONG_POSITION, LONG_PROMPT, POSITION,
    PREFILL_TOKENS,
};
use crate::codegen::tune_check::{probe_fill, read_values, Written};
use crate::codegen::wgsl::spec::{KernelSpec, Phase};
use crate::error::env;
use anyhow::Result;
use cudarc::driver::sys;
use std::ffi::c_void;

const LAUNCHES_PER_BATCH: usize = 8;
const BATCHES: usize = 5;
/// Bytes the copies of a timed kernel's buffers span: twice the largest L2 of the GPUs the cuda
/// presets aim at (B200: 126 MB), so a copy is evicted before its next launch.
const COLD_BYTES: u64 = 256 << 20;
/// The most copies (a tiny kernel's launches are then spread over this many).
const MAX_COPIES: u64 = 64;
/// CUDA's grid limits (x, then y and z).
const MAX_GRID: [u64; 3] = [(1 << 31) - 1, 65535, 65535];

pub struct CudaTimer {
    device: Device,
    driver_version: i32,
}

/// A timer on the local GPU when the target is cuda and the GPU's compute capability is `arch`
/// (`sm_80` …; the preset default when `None`), else `None` (no driver, no GPU, another
/// architecture: the build then uses the preset defaults and says "untuned").
pub fn open_for_target(target: &str, arch: Option<&str>) -> Result<Option<Box<dyn KernelTimer>>> {
    if target != "cuda" || !driver::driver_present() {
        return Ok(None);
    }
    let device = match driver::open_device() {
        Ok(d) => d,
        Err(e) => {
            tracing::info!("tune: no CUDA device to time kernels on: {e}");
            return Ok(None);
        }
    };
    let arch = arch.unwrap_or("sm_80");
    if format!("sm_{}", device.sm) != arch {
        eprintln!(
            "tune: the local GPU ({}, sm_{}) is not the target architecture {arch}; using the \
             preset defaults (untuned)",
            device.name, device.sm
        );
        return Ok(None);
    }
    let mut version = 0i32;
    // SAFETY: writes one int; the driver library is loaded (open_device succeeded).
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| env(format!("CUDA driver version query failed: {e:?}")))?;
    Ok(Some(Box::new(CudaTimer {
        device,
        driver_version: version,
    })))
}

impl KernelTimer for CudaTimer {
    fn device_id(&self) -> String {
        format!(
            "CUDA:{}:sm_{}:driver {}.{}",
            self.device.name,
            self.device.sm,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10
        )
    }

    fn time(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> Result<f64> {
        let Loaded {
            kernel,
            module,
            calls,
            sizes,
        } = self.load(kernel, spec)?;
        let copies = COLD_BYTES
            .div_ceil(sizes.iter().sum::<u64>().max(1))
            .clamp(1, MAX_COPIES) as usize;
        let buffers = (0..copies)
            .map(|_| {
                kernel
                    .launch
                    .args
                    .iter()
                    .zip(&sizes)
                    .map(|(a, &bytes)| DeviceMem::zeroed(bytes as usize, &a.name))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut total = 0.0;
        for (t, pos) in calls {
            total += time_at(kernel, &module, &buffers, t, pos)?;
        }
        Ok(total)
    }

    fn probe(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> Result<Vec<Written>> {
        let loaded = self.load(kernel, spec)?;
        let (kernel, sizes) = (loaded.kernel, &loaded.sizes);
        let stream = Stream::new()?;
        let mut written = Vec::new();
        for &(t, pos) in &loaded.calls {
            // Fresh inputs per call: a kernel may write what it reads (a residual, the KV cache).
            let buffers = kernel
                .launch
                .args
                .iter()
                .zip(sizes)
                .map(|(a, &bytes)| {
                    let fill = probe_fill(&a.role, &a.elem, &a.name, bytes as usize);
                    DeviceMem::from_bytes(&fill, &a.name)
                })
                .collect::<Result<Vec<_>>>()?;
            let call = Call::new(kernel, t, pos)?;
            let mut ptrs: Vec<sys::CUdeviceptr> = buffers.iter().map(|m| m.ptr).collect();
            let mut tail = call.tail();
            let mut params = params(&mut ptrs, tail.pointers());
            driver::launch(
                &loaded.module,
                call.grid,
                call.block,
                &stream,
                &mut params,
                &kernel.signature,
                false,
            )?;
            stream.synchronize()?;
            for (a, m) in kernel.launch.args.iter().zip(&buffers) {
                if a.write && a.role != "scratch" {
                    written.push(Written {
                        name: probe_name(&a.name, t, pos),
                        values: read_values(&a.elem, &m.read(&a.name)?),
                    });
                }
            }
        }
        Ok(written)
    }
}

impl CudaTimer {
    /// `kernel`, loaded on this timer's device, with the calls it is timed at and its buffers'
    /// sizes.
    fn load<'k>(&self, kernel: TimedKernel<'k>, spec: &KernelSpec) -> Result<Loaded<'k>> {
        let TimedKernel::Cuda { kernel, ptx } = kernel else {
            anyhow::bail!("the CUDA timer runs CUDA kernels only (an mlcb bug)");
        };
        self.device
            .ctx
            .bind_to_thread()
            .map_err(|e| env(format!("binding the CUDA context: {e:?}")))?;
        let sig = &kernel.signature;
        let calls = timed_calls(spec, sig);
        let module = Kernel::load(ptx, &kernel.entry_point, sig)?;
        let sizes = arg_bytes(kernel, spec, &calls);
        Ok(Loaded {
            kernel,
            module,
            calls,
            sizes,
        })
    }
}

/// A kernel loaded for timing or a probe.
struct Loaded<'k> {
    kernel: &'k CudaKernel,
    module: Kernel,
    /// (tokens, position) of each call it is timed at ([`timed_calls`]).
    calls: Vec<(u64, u64)>,
    /// Each argument's bytes, for the largest call.
    sizes: Vec<u64>,
}

/// The calls, (tokens, position), a kernel of `spec` (signature `sig`) is timed at, its time the
/// sum: decode attention at a short and a long context (how many blocks share a head's keys pays
/// off with its length), prefill matmuls at a short and a long prompt (a 16-token call fills a
/// sixteenth of a GEMM block's rows, so it cannot tell the f16 GEMM's warp tilings apart),
/// every other kernel at [`timed_tokens`] and POSITION (its work does not depend on it).
pub(super) fn timed_calls(spec: &KernelSpec, sig: &str) -> Vec<(u64, u64)> {
    let t = timed_tokens(spec, sig);
    match spec {
        KernelSpec::Matmul {
            phase: Phase::Prefill,
            ..
        } => vec![(PREFILL_TOKENS, POSITION), (LONG_PROMPT, POSITION)],
        _ if sig.starts_with("decode:attention") => vec![(t, POSITION), (t, LONG_POSITION)],
        _ => vec![(t, POSITION)],
    }
}

/// Each argument's bytes for `calls`: sized for the largest; a scratch has its own size (zeroed:
/// the kernel expects that of a first launch).
pub(super) fn arg_bytes(kernel: &CudaKernel, spec: &KernelSpec, calls: &[(u64, u64)]) -> Vec<u64> {
    let most_tokens = calls.iter().map(|&(t, _)| t).max().unwrap_or(1);
    kernel
        .launch
        .args
        .iter()
        .map(|a| match a.bytes {
            Some(b) if a.role == "scratch" => b,
            _ => buffer_bytes(spec, &a.role, a.record, most_tokens),
        })
        .collect()
}

/// The call parameters (`META_FIELDS`) of a call of `t` tokens at position `pos`.
pub(super) fn meta_values(t: u64, pos: u64) -> Vec<u32> {
    META_FIELDS
        .iter()
        .map(|f| match *f {
            "pos" => pos as u32,
            "row0" => 0,
            _ => t as u32, // t and rows
        })
        .collect()
}

/// What a probe calls the buffer `name` after a call of `t` tokens at position `pos`.
pub(super) fn probe_name(name: &str, t: u64, pos: u64) -> String {
    format!("{name} ({t} tokens at position {pos})")
}

/// A launch of a kernel for `t` tokens at position `pos`: its grid, block and call parameters.
struct Call {
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    meta: DeviceMem,
}

/// The kernel parameters after the buffers (launch.rs's order): meta, scalar, index.
struct Tail {
    meta: sys::CUdeviceptr,
    scalar: f32,
    index: u32,
}

impl Call {
    fn new(kernel: &CudaKernel, t: u64, pos: u64) -> Result<Call> {
        let meta = DeviceMem::from_bytes(
            bytemuck::cast_slice(&meta_values(t, pos)),
            "call parameters",
        )?;
        let grid: Vec<u64> = kernel
            .launch
            .grid
            .iter()
            .map(|d| d.workgroups(t, t))
            .collect();
        if grid.iter().zip(MAX_GRID).any(|(g, m)| *g > m) {
            anyhow::bail!(
                "kernel {}: grid {grid:?} exceeds CUDA's limits",
                kernel.signature
            );
        }
        let b = kernel.launch.block;
        Ok(Call {
            grid: (grid[0] as u32, grid[1] as u32, grid[2] as u32),
            block: (b[0], b[1], b[2]),
            meta,
        })
    }

    fn tail(&self) -> Tail {
        Tail {
            meta: self.meta.ptr,
            scalar: 1e-5,
            index: 0,
        }
    }
}

impl Tail {
    /// Pointers to its three parameters, for every launch's parameter list.
    fn pointers(&mut self) -> [*mut c_void; 3] {
        [
            &mut self.meta as *mut sys::CUdeviceptr as *mut c_void,
            &mut self.scalar as *mut f32 as *mut c_void,
            &mut self.index as *mut u32 as *mut c_void,
        ]
    }
}

/// A launch's parameter pointers: one per buffer pointer of `ptrs`, then `tail`'s.
fn params(ptrs: &mut [sys::CUdeviceptr], tail: [*mut c_void; 3]) -> Vec<*mut c_void> {
    let mut p: Vec<*mut c_void> = ptrs
        .iter_mut()
        .map(|p| p as *mut sys::CUdeviceptr as *mut c_void)
        .collect();
    p.extend(tail);
    p
}

/// Seconds per launch of `kernel` (loaded as `module`) with `t` tokens at position `pos`, each
/// launch on the next copy of its `buffers`: the median batch.
fn time_at(
    kernel: &CudaKernel,
    module: &Kernel,
    buffers: &[Vec<DeviceMem>],
    t: u64,
    pos: u64,
) -> Result<f64> {
    let sig = &kernel.signature;
    let copies = buffers.len();
    let call = Call::new(kernel, t, pos)?;
    let (grid, block) = (call.grid, call.block);
    // Built once per copy, so a batch's launches cost the driver call alone.
    let mut ptrs: Vec<Vec<sys::CUdeviceptr>> = buffers
        .iter()
        .map(|copy| copy.iter().map(|m| m.ptr).collect())
        .collect();
    let mut tail_values = call.tail();
    let tail = tail_values.pointers();
    let mut params: Vec<Vec<*mut c_void>> =
        ptrs.iter_mut().map(|copy| params(copy, tail)).collect();
    let stream = Stream::new()?;
    let (start, end) = (Event::new()?, Event::new()?);
    for p in &mut params {
        driver::launch(module, grid, block, &stream, p, sig, false)?; // warm-up
    }
    stream.synchronize()?;
    let launches = LAUNCHES_PER_BATCH.max(copies);
    let mut runs = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        start.record(&stream)?;
        for i in 0..launches {
            driver::launch(
                module,
                grid,
                block,
                &stream,
                &mut params[i % copies],
                sig,
                false,
            )?;
        }
        end.record(&stream)?;
        stream.synchronize()?;
        runs.push(Event::elapsed_s(&start, &end)? / launches as f64);
    }
    runs.sort_by(f64::total_cmp);
    Ok(runs[BATCHES / 2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::wgsl::spec::specs_by_signature;

    #[test]
    fn prefill_matmuls_and_decode_attention_are_timed_at_a_short_and_a_long_call() {
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        let mut seen = [false; 3];
        for (sig, spec) in specs_by_signature(&plan).unwrap() {
            let calls = timed_calls(&spec, &sig);
            match &spec {
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                } => {
                    assert_eq!(calls, [(16, POSITION), (LONG_PROMPT, POSITION)], "{sig}");
                    seen[0] = true;
                }
                _ if sig.starts_with("decode:attention") => {
                    assert_eq!(calls, [(1, POSITION), (1, LONG_POSITION)], "{sig}");
                    seen[1] = true;
                }
                KernelSpec::Matmul {
                    phase: Phase::Decode,
                    ..
                } => {
                    assert_eq!(calls, [(1, POSITION)], "{sig}");
                    seen[2] = true;
                }
                _ => assert_eq!(calls.len(), 1, "{sig}"),
            }
        }
        assert_eq!(seen, [true; 3]);
        // The long prompt's activations fit the buffers the timer allocates.
        let specs = specs_by_signature(&plan).unwrap();
        let (_, gemm) = specs
            .iter()
            .find(|(s, _)| s.starts_with("prefill:matmul"))
            .expect("a prefill matmul");
        let KernelSpec::Matmul { m, .. } = gemm else {
            unreachable!()
        };
        let wide = m.n.max(m.k) as u64;
        assert!(buffer_bytes(gemm, "input", None, LONG_PROMPT) >= LONG_PROMPT * wide * 4);
    }
}
