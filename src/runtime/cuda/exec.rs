//! Executing a plan on the GPU: weights and state live in device memory for the model's life,
//! steps launch the library's PTX kernels on one stream, and the decode step (one token) is
//! captured once as a CUDA graph and replayed for every following token.
//!
//! Per-call values (`T`, `pos`, the logits row range) are in a small device buffer (`meta`) that
//! every kernel reads, written by a stream-ordered copy before each call, so the captured graph
//! stays valid as the position advances. Activation buffers grow (to the largest `T` seen); a
//! growth re-captures the graph, since its kernels hold the old addresses. Kernels made for it
//! (`CudaLaunch::pdl`, sm_90 decode kernels) enter the graph as programmatic dependent launches:
//! each may be launched while the one before still runs, and waits for it itself.
//!
//! With `MLCB_CUDA_PROFILE=1` every kernel is launched on its own between two events and timed
//! ([`super::profile`]); the table goes to stderr when the session ends.

use super::bind::{bind_phase, device_bytes, weight_layouts, ArgRef, Step};
use super::driver::{launch, Device, DeviceMem, Event, Graph, Kernel, Stream};
use super::profile::{self, KernelProfile};
use crate::codegen::cuda::launch::CudaLaunch;
use crate::error::{env, user};
use crate::formats::model_lib::plan::{Plan, StateDecl};
use crate::formats::model_lib::ModelLibrary;
use crate::runtime::cpu::kernels::WeightView;
use anyhow::Result;
use cudarc::driver::result;
use std::collections::HashMap;
use std::ffi::c_void;

/// Largest grid extent along y and z (CUDA's limit).
const MAX_GRID_YZ: u64 = 65535;

struct LoadedKernel {
    signature: String,
    kernel: Kernel,
    launch: CudaLaunch,
}

/// A plan bound to the GPU: kernels loaded, weights uploaded.
pub struct CudaModel {
    plan: Plan,
    kernels: Vec<LoadedKernel>,
    weights: Vec<Vec<DeviceMem>>,
    prefill: Vec<Step>,
    decode: Vec<Step>,
    /// Last: fields drop in order, and the kernels and weights need the context to be freed.
    pub device: Device,
}

impl CudaModel {
    /// Check the library's kernels against the plan (no GPU needed), then load them and upload
    /// the weights (`weights` already validated against the plan by the caller).
    pub fn new(device: Device, lib: &ModelLibrary, weights: &[WeightView]) -> Result<CudaModel> {
        let plan = lib.header.plan.clone();
        let target = lib.header.target.name.clone();
        let mut table: HashMap<String, (usize, CudaLaunch)> = HashMap::new();
        for k in lib.header.kernels.iter().filter(|k| k.language == "ptx") {
            let l: CudaLaunch = serde_json::from_value(k.launch.clone()).map_err(|e| {
                user(format!(
                    "kernel {}: bad CUDA launch description: {e}; rebuild the library",
                    k.signature
                ))
            })?;
            let i = table.len();
            if table.insert(k.signature.clone(), (i, l)).is_some() {
                return Err(user(format!(
                    "the library has two CUDA kernels for {}; it is corrupt, rebuild it",
                    k.signature
                )));
            }
        }
        let prefill = bind_phase(&plan, &plan.prefill, "prefill", &table, &target)?;
        let decode = bind_phase(&plan, &plan.decode, "decode", &table, &target)?;
        // The PTX was compiled for one arch; the driver JIT-compiles it for this GPU or newer.
        if let Some(arch) = lib
            .header
            .target
            .options
            .get("cuda_arch")
            .and_then(|a| a.as_str())
        {
            if let Some(n) = crate::codegen::cuda::arch_number(arch) {
                if device.sm < n {
                    return Err(env(format!(
                        "the library was built for {arch}, but this GPU ({}) is sm_{}; rebuild with `--cuda-arch sm_{}`",
                        device.name, device.sm, device.sm
                    )));
                }
            }
        }
        device
            .ctx
            .bind_to_thread()
            .map_err(|e| env(format!("CUDA context: {e:?}")))?;
        let mut kernels: Vec<Option<LoadedKernel>> = (0..table.len()).map(|_| None).collect();
        for k in lib.header.kernels.iter().filter(|k| k.language == "ptx") {
            let (i, launch) = table[&k.signature].clone();
            // PTX of an architecture-specific target (sm_90a: wgmma) runs on that GPU only.
            if let Some(n) = crate::codegen::cuda::arch_specific(&launch.arch) {
                if device.sm != n {
                    return Err(env(format!(
                        "kernel {} was compiled for {} (instructions of that GPU generation only), but this GPU ({}) is sm_{}; rebuild for this GPU",
                        k.signature, launch.arch, device.name, device.sm
                    )));
                }
            }
            kernels[i] = Some(LoadedKernel {
                signature: k.signature.clone(),
                kernel: Kernel::load(lib.kernel_bytes(k), &k.entry_point, &k.signature)?,
                launch,
            });
        }
        let kernels: Vec<LoadedKernel> = kernels
            .into_iter()
            .map(|k| k.expect("every table entry loaded"))
            .collect();
        let total: usize = weights
            .iter()
            .flat_map(|w| w.records.iter())
            .map(|r| r.len())
            .sum();
        let (free, _) =
            result::mem_get_info().map_err(|e| env(format!("CUDA memory query: {e:?}")))?;
        if total > free {
            return Err(env(format!(
                "the weights need {:.2} GiB of GPU memory, {} has {:.2} GiB free",
                total as f64 / (1u64 << 30) as f64,
                device.name,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let launches: Vec<&CudaLaunch> = kernels.iter().map(|k| &k.launch).collect();
        let sizes: Vec<Vec<usize>> = weights
            .iter()
            .map(|w| w.records.iter().map(|r| r.len()).collect())
            .collect();
        let layouts = weight_layouts(&plan, &[&prefill, &decode], &launches, &sizes)?;
        let weights = weights
            .iter()
            .zip(&plan.weights)
            .zip(&layouts)
            .map(|((w, d), l)| {
                w.records
                    .iter()
                    .zip(&d.records)
                    .zip(l)
                    .map(|((bytes, name), l)| {
                        DeviceMem::from_bytes(&device_bytes(bytes, *l, name)?, name)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CudaModel {
            plan,
            kernels,
            weights,
            prefill,
            decode,
            device,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// A fresh session at position 0 (state allocated on the device).
    pub fn session(&self) -> Result<CudaSession<'_>> {
        self.device
            .ctx
            .bind_to_thread()
            .map_err(|e| env(format!("CUDA context: {e:?}")))?;
        let s = self.plan.max_seq_len;
        // f16 in libraries of f16 schemes (the attention kernels' k/v arguments say).
        let kv_elem = super::bind::kv_elem_bytes(self.kernels.iter().map(|k| &k.launch))?;
        let states = self
            .plan
            .states
            .iter()
            .map(|st| {
                Ok(match *st {
                    StateDecl::KvCache {
                        layer,
                        n_kv_heads,
                        head_dim,
                    } => {
                        let bytes = s * n_kv_heads * head_dim * kv_elem;
                        State::Kv(
                            DeviceMem::zeroed(
                                bytes,
                                &format!("the KV cache of layer {layer} (keys)"),
                            )?,
                            DeviceMem::zeroed(
                                bytes,
                                &format!("the KV cache of layer {layer} (values)"),
                            )?,
                        )
                    }
                    StateDecl::Rwkv { layer, hidden } => State::Rwkv(
                        DeviceMem::zeroed(
                            5 * hidden * 4,
                            &format!("the RWKV state of layer {layer}"),
                        )?,
                        hidden,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Kernel workspaces start zeroed; each launch leaves its own as the next one needs it.
        let scratch = self
            .kernels
            .iter()
            .map(|k| {
                k.launch
                    .scratch_bytes()
                    .map(|b| {
                        DeviceMem::zeroed(b as usize, &format!("the scratch of {}", k.signature))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut session = CudaSession {
            model: self,
            stream: Stream::new()?,
            pos: 0,
            states,
            scratch,
            buffers: Vec::new(),
            rows: 0,
            tokens: DeviceMem::alloc(s.max(1) * 4, "token ids")?,
            meta: DeviceMem::zeroed(8 * 4, "call parameters")?,
            graph: None,
            use_graph: std::env::var("MLCB_CUDA_GRAPHS")
                .map(|v| v != "0")
                .unwrap_or(true)
                && !profile::enabled(),
            use_pdl: std::env::var("MLCB_CUDA_PDL")
                .map(|v| v != "0")
                .unwrap_or(true),
            profile: profile::enabled().then(Profiler::default),
        };
        session.reset_rwkv()?;
        Ok(session)
    }
}

enum State {
    Kv(DeviceMem, DeviceMem),
    Rwkv(DeviceMem, usize),
}

/// One conversation on the GPU.
pub struct CudaSession<'m> {
    model: &'m CudaModel,
    stream: Stream,
    pos: usize,
    states: Vec<State>,
    /// Per kernel of the model's table, its scratch (if it declares one).
    scratch: Vec<Option<DeviceMem>>,
    /// Activation buffers, each `[rows, cols]` f32.
    buffers: Vec<DeviceMem>,
    rows: usize,
    tokens: DeviceMem,
    /// `[T, pos, T, 0, T, pos, rows, row0]`: the first four for every op, the last four for logits.
    meta: DeviceMem,
    graph: Option<Graph>,
    use_graph: bool,
    /// Capture the decode graph with programmatic dependent launches (`MLCB_CUDA_PDL`, default
    /// on; off for good once the driver refuses it).
    use_pdl: bool,
    profile: Option<Profiler>,
}

/// Kernel timing of a profiled session: an event pair per step, and the totals.
#[derive(Default)]
struct Profiler {
    events: Vec<(Event, Event)>,
    table: KernelProfile,
}

impl Drop for CudaSession<'_> {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let report = p.table.report();
            if !report.is_empty() {
                eprintln!(
                    "mlcb: cuda kernel profile ({}=1: kernels launched one by one between events, no CUDA graph)\n{report}",
                    profile::PROFILE_ENV
                );
            }
        }
    }
}

impl CudaSession<'_> {
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Position 0; RWKV state back to its initial values (KV slots are overwritten before use).
    pub fn reset(&mut self) -> Result<()> {
        self.pos = 0;
        self.reset_rwkv()
    }

    fn reset_rwkv(&mut self) -> Result<()> {
        for s in &self.states {
            if let State::Rwkv(m, hidden) = s {
                let mut init = vec![0f32; 5 * hidden];
                init[3 * hidden..4 * hidden].fill(-1e38);
                m.write(&init, "the RWKV state")?;
            }
        }
        Ok(())
    }

    /// Activation buffers hold at least `t` rows.
    fn ensure_rows(&mut self, t: usize) -> Result<()> {
        if t <= self.rows {
            return Ok(());
        }
        let rows = t.max(self.rows * 2).min(self.model.plan.max_seq_len.max(t));
        self.graph = None;
        self.buffers.clear();
        for d in &self.model.plan.buffers {
            self.buffers.push(DeviceMem::alloc(
                rows * d.cols * 4,
                &format!("buffer {}", d.name),
            )?);
        }
        self.rows = rows;
        Ok(())
    }

    fn pointer(&self, a: ArgRef) -> u64 {
        match a {
            ArgRef::Buffer(b) => self.buffers[b].ptr,
            ArgRef::Weight(w, r) => self.model.weights[w][r].ptr,
            ArgRef::Tokens => self.tokens.ptr,
            ArgRef::Scratch(k) => {
                self.scratch[k]
                    .as_ref()
                    .expect("bind checked the kernel declares a scratch")
                    .ptr
            }
            ArgRef::KvK(s) | ArgRef::KvV(s) | ArgRef::Rwkv(s) => match (&self.states[s], a) {
                (State::Kv(k, _), ArgRef::KvK(_)) => k.ptr,
                (State::Kv(_, v), ArgRef::KvV(_)) => v.ptr,
                (State::Rwkv(m, _), _) => m.ptr,
                _ => unreachable!("bind checked the state kind"),
            },
        }
    }

    /// Enqueue the steps of one call with `t` tokens and `rows` logits rows; with `events`
    /// (profiling), step `i`'s launch between the events of pair `i`; with `pdl`, kernels made
    /// for it as programmatic dependent launches. Returns the indices of the steps launched (a
    /// step with an empty grid is skipped).
    fn enqueue(
        &self,
        steps: &[Step],
        t: u64,
        rows: u64,
        events: Option<&[(Event, Event)]>,
        pdl: bool,
    ) -> Result<Vec<usize>> {
        let mut launched = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            let k = &self.model.kernels[step.kernel];
            let r = if step.logits { rows } else { t };
            let g: Vec<u64> = k.launch.grid.iter().map(|d| d.workgroups(t, r)).collect();
            if g.contains(&0) {
                continue;
            }
            if g[0] > i32::MAX as u64 || g[1] > MAX_GRID_YZ || g[2] > MAX_GRID_YZ {
                return Err(user(format!(
                    "kernel {}: grid {g:?} exceeds CUDA's limits for {t} tokens; process fewer tokens per call",
                    k.signature
                )));
            }
            let mut ptrs: Vec<u64> = step.args.iter().map(|a| self.pointer(*a)).collect();
            ptrs.push(self.meta.ptr + if step.logits { 16 } else { 0 });
            let mut scalar = step.scalar;
            let mut index = step.index;
            let mut params: Vec<*mut c_void> = ptrs
                .iter_mut()
                .map(|p| p as *mut u64 as *mut c_void)
                .collect();
            params.push(&mut scalar as *mut f32 as *mut c_void);
            params.push(&mut index as *mut u32 as *mut c_void);
            let b = k.launch.block;
            if let Some(ev) = events {
                ev[i].0.record(&self.stream)?;
            }
            launch(
                &k.kernel,
                (g[0] as u32, g[1] as u32, g[2] as u32),
                (b[0], b[1], b[2]),
                &self.stream,
                &mut params,
                &k.signature,
                pdl && k.launch.pdl,
            )?;
            if let Some(ev) = events {
                ev[i].1.record(&self.stream)?;
            }
            launched.push(i);
        }
        Ok(launched)
    }

    /// Bytes of weight records step `step` reads.
    fn weight_bytes(&self, step: &Step) -> u64 {
        step.args
            .iter()
            .map(|a| match *a {
                ArgRef::Weight(w, r) => self.model.weights[w][r].bytes as u64,
                _ => 0,
            })
            .sum()
    }

    /// Processes `tokens` at positions `pos..pos+T`; logits `[rows, vocab]` (every position when
    /// `all_logits`, else the last), exactly as the CPU session defines them.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let plan = &self.model.plan;
        crate::runtime::check_forward_input(plan, self.pos, tokens)?;
        let t = tokens.len();
        self.model
            .device
            .ctx
            .bind_to_thread()
            .map_err(|e| env(format!("CUDA context: {e:?}")))?;
        self.ensure_rows(t)?;
        let rows = if all_logits { t } else { 1 };
        let meta = crate::codegen::cuda::launch::call_meta(t, self.pos, rows);
        // SAFETY: `tokens` holds max_seq_len ≥ t ids and `meta` 8 u32; pageable sources are
        // staged by the driver before the calls return, and the copies are ordered on the stream
        // after the previous call's kernels.
        unsafe {
            result::memcpy_htod_async(self.tokens.ptr, tokens, self.stream.0)
                .and_then(|_| result::memcpy_htod_async(self.meta.ptr, &meta, self.stream.0))
        }
        .map_err(|e| env(format!("CUDA upload of the call parameters: {e:?}")))?;
        // The phase's bound steps and the plan's ops they run (one step per op).
        let (steps, ops, phase) = if t > 1 {
            (&self.model.prefill, &plan.prefill, "prefill")
        } else {
            (&self.model.decode, &plan.decode, "decode")
        };
        let mut launched = Vec::new();
        if t == 1 && self.use_graph {
            if self.graph.is_none() {
                let capture = |pdl: bool| {
                    Graph::capture(&self.stream, || {
                        self.enqueue(&self.model.decode, 1, 1, None, pdl).map(drop)
                    })
                };
                let (g, pdl) = match capture(self.use_pdl) {
                    Ok(g) => (g, self.use_pdl),
                    // A driver that refuses programmatic dependent launch in a graph: the
                    // kernels run the same without it (their waits return at once).
                    Err(e) if self.use_pdl => {
                        tracing::warn!("decode graph with programmatic dependent launch: {e:#}; capturing without it");
                        (capture(false)?, false)
                    }
                    Err(e) => return Err(e),
                };
                self.use_pdl = pdl;
                self.graph = Some(g);
            }
            self.graph
                .as_ref()
                .expect("captured above")
                .launch(&self.stream)?;
        } else {
            if let Some(p) = &mut self.profile {
                while p.events.len() < steps.len() {
                    p.events.push((Event::new()?, Event::new()?));
                }
            }
            let events = self.profile.as_ref().map(|p| p.events.as_slice());
            launched = self.enqueue(steps, t as u64, rows as u64, events, false)?;
        }
        let mut out = vec![0f32; rows * plan.vocab_size];
        // SAFETY: the logits buffer holds at least rows·vocab f32 (rows ≤ t ≤ self.rows).
        unsafe {
            result::memcpy_dtoh_async(&mut out, self.buffers[plan.logits].ptr, self.stream.0)
        }
        .map_err(|e| env(format!("CUDA download of the logits: {e:?}")))?;
        self.stream.synchronize()?;
        let timed = match &self.profile {
            Some(p) => launched
                .iter()
                .map(|&i| {
                    let (start, end) = &p.events[i];
                    let step = &steps[i];
                    Ok((
                        self.model.kernels[step.kernel].signature.as_str(),
                        Event::elapsed_s(start, end)?,
                        self.weight_bytes(step),
                        profile::op_flops(plan, &ops[i], t, self.pos, rows),
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        if let Some(p) = &mut self.profile {
            for (sig, secs, bytes, flops) in timed {
                p.table.add(phase, sig, secs, bytes, flops);
            }
            p.table.call(phase);
        }
        self.pos += t;
        Ok(out)
    }
}
