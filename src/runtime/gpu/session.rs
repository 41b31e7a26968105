//! A plan running on a wgpu device: weights uploaded once into persistent buffers, the KV cache
//! (or RWKV state) on the device, one command buffer and one submit per `forward` call, and only
//! the logits rows the caller needs read back.
//!
//! Activation buffers are sized for the largest call seen so far (rounded up to a power of two,
//! capped at `max_seq_len` rows) and bind groups are rebuilt only when they grow. Every dispatch
//! takes its params from its own 256-byte slot of one uniform buffer (a dynamic offset), written
//! once per call. Logits of many rows that exceed the device's largest storage binding are
//! computed in row chunks, each copied out before the next.

use super::adapter::GpuContext;
use super::bind::{self, Params, Resource, StatePart};
use super::kernels::{self, Kernel, PARAMS_BYTES};
use crate::codegen::signature::op_signature;
use crate::error::user;
use crate::formats::model_lib::plan::{Op, Plan, StateDecl};
use crate::formats::model_lib::ModelLibrary;
use crate::runtime::cpu::kernels::WeightView;
use crate::runtime::cpu::{validate_plan, validate_weights};
use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use wgpu::util::DeviceExt;

/// Which op list a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill = 0,
    Decode = 1,
}

impl Phase {
    fn prefix(self) -> &'static str {
        match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        }
    }
}

/// One op bound to its kernel and resources.
struct Step {
    op: usize,
    kernel: String,
    resources: Vec<Resource>,
    /// Byte range of the resource each binding covers (None: all of it).
    ranges: Vec<Option<[u64; 2]>>,
    scalar: f32,
    index: u32,
}

enum StateBufs {
    Kv { k: wgpu::Buffer, v: wgpu::Buffer },
    Rwkv { buf: wgpu::Buffer, hidden: usize },
}

/// Buffers whose size depends on the call: activations, token ids, logits, readback.
struct Scratch {
    /// Activation rows every buffer holds.
    rows: usize,
    /// Logits rows the logits buffer holds.
    logit_rows: usize,
    acts: Vec<wgpu::Buffer>,
    tokens: wgpu::Buffer,
    logits: wgpu::Buffer,
    readback: wgpu::Buffer,
    readback_bytes: u64,
    /// Bind groups of each phase's steps for these buffers (built on first use).
    groups: [Option<Vec<wgpu::BindGroup>>; 2],
}

pub struct GpuSession {
    ctx: GpuContext,
    plan: Plan,
    kernels: HashMap<String, Kernel>,
    /// Device buffer of each weight record, `[weight][record]` (a record shared by two weights,
    /// such as a tied embedding, is uploaded once).
    weights: Vec<Vec<wgpu::Buffer>>,
    steps: [Vec<Step>; 2],
    states: Vec<StateBufs>,
    scratch: Option<Scratch>,
    params: wgpu::Buffer,
    params_slots: usize,
    slot_stride: u64,
    /// Logits rows one dispatch may write (the storage-binding limit over the vocabulary).
    logit_chunk: usize,
    pos: usize,
}

fn padded(len: usize) -> u64 {
    (len.max(4) as u64).div_ceil(4) * 4
}

impl GpuSession {
    /// Validates the plan against the weights, loads the kernels and uploads the weights.
    /// `records` are the bytes of each weight's records (from the mapped shards).
    pub fn new(ctx: GpuContext, lib: &ModelLibrary, records: &[Vec<&[u8]>]) -> Result<GpuSession> {
        let plan = lib.header.plan.clone();
        validate_plan(&plan)?;
        let views = WeightView::for_plan(&plan, records);
        validate_weights(&plan, &views)?;
        let max_binding = ctx.limits.max_storage_buffer_binding_size;
        let max_buffer = ctx.limits.max_buffer_size;
        let kernels = kernels::load(&ctx, lib)?;

        let mut uploaded: HashMap<&str, wgpu::Buffer> = HashMap::new();
        let mut weights = Vec::with_capacity(plan.weights.len());
        for (decl, recs) in plan.weights.iter().zip(records) {
            let mut bufs = Vec::with_capacity(recs.len());
            for (name, bytes) in decl.records.iter().zip(recs) {
                if let Some(b) = uploaded.get(name.as_str()) {
                    bufs.push(b.clone());
                    continue;
                }
                let size = padded(bytes.len());
                if size > max_buffer {
                    bail!(user(format!(
                        "weight {} (record {name}, {size} bytes) is larger than the largest buffer \
                         of {} ({max_buffer} bytes); run with `--device cpu`",
                        decl.name,
                        ctx.description()
                    )));
                }
                // Records are padded with zeros to whole u32 words (16-bit data are read as pairs).
                let mut contents = bytes.to_vec();
                contents.resize(size as usize, 0);
                let buf = ctx
                    .device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(name),
                        contents: &contents,
                        usage: wgpu::BufferUsages::STORAGE,
                    });
                uploaded.insert(name, buf.clone());
                bufs.push(buf);
            }
            weights.push(bufs);
        }

        let kv_elem_bytes = kernels::kv_cache_elem_bytes(&kernels)?;
        let mut states = Vec::with_capacity(plan.states.len());
        for s in &plan.states {
            states.push(match *s {
                StateDecl::KvCache {
                    n_kv_heads,
                    head_dim,
                    layer,
                } => {
                    let bytes = padded(plan.max_seq_len * n_kv_heads * head_dim * kv_elem_bytes);
                    if bytes > max_binding {
                        bail!(user(format!(
                            "the KV cache of layer {layer} needs {bytes} bytes per tensor, above the \
                             largest storage binding of {} ({max_binding}); build with a smaller \
                             max_seq_len",
                            ctx.description()
                        )));
                    }
                    let make = |label: &str| {
                        ctx.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(label),
                            size: bytes,
                            usage: wgpu::BufferUsages::STORAGE,
                            mapped_at_creation: false,
                        })
                    };
                    StateBufs::Kv {
                        k: make("kv.k"),
                        v: make("kv.v"),
                    }
                }
                StateDecl::Rwkv { hidden, .. } => StateBufs::Rwkv {
                    buf: ctx
                        .device
                        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                            label: Some("rwkv state"),
                            contents: &rwkv_initial(hidden),
                            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                        }),
                    hidden,
                },
            });
        }

        let steps = [
            bind_steps(&plan, Phase::Prefill, &kernels)?,
            bind_steps(&plan, Phase::Decode, &kernels)?,
        ];
        check_weight_bindings(&plan, &steps, &weights, &ctx)?;
        let row_bytes = (plan.vocab_size * 4) as u64;
        let logit_chunk = ((max_binding / row_bytes) as usize).clamp(1, plan.max_seq_len);
        let slot_stride = (ctx.limits.min_uniform_buffer_offset_alignment as u64).max(PARAMS_BYTES);
        let params_slots =
            steps[0].len().max(steps[1].len()) + plan.max_seq_len.div_ceil(logit_chunk);
        let params = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: params_slots as u64 * slot_stride,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let session = GpuSession {
            ctx,
            plan,
            kernels,
            weights,
            steps,
            states,
            scratch: None,
            params,
            params_slots,
            slot_stride,
            logit_chunk,
            pos: 0,
        };
        session.check_errors("uploading the weights")?;
        Ok(session)
    }

    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn max_seq_len(&self) -> usize {
        self.plan.max_seq_len
    }

    /// Position 0 and initial state. The KV cache needs no clearing: attention reads only
    /// positions below `pos + t`, all written in this session.
    pub fn reset(&mut self) {
        self.pos = 0;
        for s in &self.states {
            if let StateBufs::Rwkv { buf, hidden } = s {
                self.ctx.queue.write_buffer(buf, 0, &rwkv_initial(*hidden));
            }
        }
    }

    fn check_errors(&self, what: &str) -> Result<()> {
        match self.ctx.take_error() {
            Some(e) => Err(anyhow!(
                "the GPU reported an error while {what} on {}: {e}",
                self.ctx.description()
            )),
            None => Ok(()),
        }
    }

    /// Makes sure the scratch buffers hold `rows` activation rows and `logit_rows` logits rows.
    fn ensure_scratch(
        &mut self,
        rows: usize,
        logit_rows: usize,
        readback_bytes: u64,
    ) -> Result<()> {
        let fits = self.scratch.as_ref().is_some_and(|s| {
            s.rows >= rows && s.logit_rows >= logit_rows && s.readback_bytes >= readback_bytes
        });
        if fits {
            return Ok(());
        }
        let old = self.scratch.take();
        let grow = |want: usize, had: usize| {
            want.max(had)
                .next_power_of_two()
                .min(self.plan.max_seq_len)
                .max(want)
        };
        let rows = grow(rows, old.as_ref().map_or(1, |s| s.rows));
        let logit_rows = grow(logit_rows, old.as_ref().map_or(1, |s| s.logit_rows));
        let readback_bytes = readback_bytes.max(old.as_ref().map_or(0, |s| s.readback_bytes));
        let max_binding = self.ctx.limits.max_storage_buffer_binding_size;
        let device = &self.ctx.device;
        let mut acts = Vec::with_capacity(self.plan.buffers.len());
        for (i, b) in self.plan.buffers.iter().enumerate() {
            let n_rows = if i == self.plan.logits { 1 } else { rows };
            let size = padded(n_rows * b.cols * 4);
            if size > max_binding {
                bail!(user(format!(
                    "{rows} tokens in one call need {size} bytes for activation buffer {}, above \
                     the largest storage binding of {} ({max_binding}); use shorter prompts",
                    b.name,
                    self.ctx.description()
                )));
            }
            acts.push(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&b.name),
                size,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }));
        }
        let tokens = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tokens"),
            size: padded(rows * 4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let logits = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("logits"),
            size: (logit_rows * self.plan.vocab_size * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("logits readback"),
            size: readback_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.scratch = Some(Scratch {
            rows,
            logit_rows,
            acts,
            tokens,
            logits,
            readback,
            readback_bytes,
            groups: [None, None],
        });
        Ok(())
    }

    fn buffer_of(&self, s: &Scratch, r: Resource) -> wgpu::Buffer {
        match r {
            Resource::Activation(b) => s.acts[b].clone(),
            Resource::Tokens => s.tokens.clone(),
            Resource::Logits => s.logits.clone(),
            Resource::Weight(w, rec) => self.weights[w][rec].clone(),
            Resource::State(id, part) => match (&self.states[id], part) {
                (StateBufs::Kv { k, .. }, StatePart::K) => k.clone(),
                (StateBufs::Kv { v, .. }, StatePart::V) => v.clone(),
                (StateBufs::Rwkv { buf, .. }, StatePart::Rwkv) => buf.clone(),
                _ => unreachable!("checked by bind_steps"),
            },
        }
    }

    fn bind_groups(&self, phase: Phase) -> Vec<wgpu::BindGroup> {
        let s = self.scratch.as_ref().expect("ensure_scratch first");
        self.steps[phase as usize]
            .iter()
            .map(|step| {
                let k = &self.kernels[&step.kernel];
                let bufs: Vec<wgpu::Buffer> = step
                    .resources
                    .iter()
                    .map(|&r| self.buffer_of(s, r))
                    .collect();
                let mut entries: Vec<wgpu::BindGroupEntry> = bufs
                    .iter()
                    .zip(&step.ranges)
                    .enumerate()
                    .map(|(i, (b, range))| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource: match range {
                            None => b.as_entire_binding(),
                            Some([offset, len]) => {
                                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: b,
                                    offset: *offset,
                                    size: wgpu::BufferSize::new(*len),
                                })
                            }
                        },
                    })
                    .collect();
                entries.push(wgpu::BindGroupEntry {
                    binding: k.launch.params.binding,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &self.params,
                        offset: 0,
                        size: wgpu::BufferSize::new(PARAMS_BYTES),
                    }),
                });
                self.ctx
                    .device
                    .create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(&step.kernel),
                        layout: &k.layout,
                        entries: &entries,
                    })
            })
            .collect()
    }

    /// Workgroups of one dispatch, folded under the device's per-dimension limit.
    fn grid(&self, k: &Kernel, t: usize, rows: usize) -> Result<[u32; 3]> {
        let max = self.ctx.limits.max_compute_workgroups_per_dimension as u64;
        k.launch
            .dispatch(t as u64, rows as u64, max)
            .map_err(|[x, y, z]| {
                user(format!(
                    "kernel {} needs {x}×{y}×{z} workgroups, beyond {} per dimension on {}{}",
                    k.signature,
                    max,
                    self.ctx.description(),
                    if k.launch.folds_x_into_z {
                        ""
                    } else {
                        "; rebuild the model library with this mlcb (its kernels fold big grids)"
                    }
                ))
            })
    }

    /// Processes `tokens` at positions `pos..pos+T`; returns `[rows, vocab]` logits (every row when
    /// `all_logits`, else the last).
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        crate::runtime::check_forward_input(&self.plan, self.pos, tokens)?;
        let t = tokens.len();
        let vocab = self.plan.vocab_size;
        let rows = if all_logits { t } else { 1 };
        let row0 = t - rows;
        let chunk = self.logit_chunk.min(rows);
        let out_bytes = (rows * vocab * 4) as u64;
        self.ensure_scratch(t, chunk, out_bytes)?;
        let phase = if t > 1 { Phase::Prefill } else { Phase::Decode };
        if self.scratch.as_ref().expect("just made").groups[phase as usize].is_none() {
            let groups = self.bind_groups(phase);
            self.scratch.as_mut().expect("just made").groups[phase as usize] = Some(groups);
        }

        // Params of every dispatch, in order: one slot per op, the logits op once per chunk.
        let steps = &self.steps[phase as usize];
        let n_chunks = rows.div_ceil(chunk);
        let mut dispatches: Vec<(usize, Params, [u32; 3])> = Vec::new();
        for (si, step) in steps.iter().enumerate() {
            let k = &self.kernels[&step.kernel];
            let base = Params {
                t: t as u32,
                pos: self.pos as u32,
                rows: t as u32,
                row0: 0,
                scalar: step.scalar,
                index: step.index,
            };
            if matches!(self.plan_op(phase, step.op), Op::Logits { .. }) {
                for c in 0..n_chunks {
                    let r = chunk.min(rows - c * chunk);
                    let p = Params {
                        rows: r as u32,
                        row0: (row0 + c * chunk) as u32,
                        ..base
                    };
                    dispatches.push((si, p, self.grid(k, t, r)?));
                }
            } else {
                dispatches.push((si, base, self.grid(k, t, t)?));
            }
        }
        if dispatches.len() > self.params_slots {
            bail!(
                "{} dispatches exceed the {} params slots",
                dispatches.len(),
                self.params_slots
            );
        }
        let stride = self.slot_stride as usize;
        let mut params = vec![0u8; dispatches.len() * stride];
        for (i, (_, p, _)) in dispatches.iter().enumerate() {
            params[i * stride..i * stride + PARAMS_BYTES as usize].copy_from_slice(&p.to_bytes());
        }
        let scratch = self.scratch.as_ref().expect("just made");
        let groups = scratch.groups[phase as usize].as_ref().expect("just built");
        let queue = &self.ctx.queue;
        queue.write_buffer(&self.params, 0, &params);
        queue.write_buffer(&scratch.tokens, 0, bytemuck::cast_slice(tokens));

        let mut enc = self
            .ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        let chunk_bytes = (chunk * vocab * 4) as u64;
        let mut copied = 0u64;
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        for (i, (si, p, g)) in dispatches.iter().enumerate() {
            let step = &steps[*si];
            let k = &self.kernels[&step.kernel];
            pass.set_pipeline(&k.pipeline);
            pass.set_bind_group(0, &groups[*si], &[(i * stride) as u32]);
            pass.dispatch_workgroups(g[0], g[1], g[2]);
            if matches!(self.plan_op(phase, step.op), Op::Logits { .. }) {
                // Copy this chunk out before the next one overwrites the logits buffer.
                drop(pass);
                let n = (p.rows as u64) * (vocab as u64) * 4;
                enc.copy_buffer_to_buffer(&scratch.logits, 0, &scratch.readback, copied, n);
                copied += n;
                debug_assert!(n <= chunk_bytes);
                pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            }
        }
        drop(pass);
        queue.submit([enc.finish()]);

        let slice = scratch.readback.slice(..out_bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.ctx
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU on {}: {e}", self.ctx.description()))?;
        self.check_errors("running the plan")?;
        rx.recv()
            .map_err(|_| anyhow!("the GPU never finished mapping the logits"))?
            .map_err(|e| anyhow!("reading the logits back from the GPU: {e}"))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| anyhow!("reading the logits back from the GPU: {e}"))?;
            view.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<f32>>()
        };
        scratch.readback.unmap();
        self.pos += t;
        Ok(out)
    }

    fn plan_op(&self, phase: Phase, i: usize) -> &Op {
        match phase {
            Phase::Prefill => &self.plan.prefill[i],
            Phase::Decode => &self.plan.decode[i],
        }
    }
}

/// The RWKV state's initial bytes: five `hidden` vectors, all 0 but the running max (-1e38).
fn rwkv_initial(hidden: usize) -> Vec<u8> {
    (0..5 * hidden)
        .flat_map(|i| {
            let v: f32 = if i / hidden == 3 { -1e38 } else { 0.0 };
            v.to_le_bytes()
        })
        .collect()
}

/// Each op of a phase with its kernel and the resources of its bindings, checked against the
/// plan's declarations (so a mismatched library is an error before anything runs).
fn bind_steps(plan: &Plan, phase: Phase, kernels: &HashMap<String, Kernel>) -> Result<Vec<Step>> {
    let ops = match phase {
        Phase::Prefill => &plan.prefill,
        Phase::Decode => &plan.decode,
    };
    let mut steps = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let sig = format!("{}:{}", phase.prefix(), op_signature(plan, op));
        let bad = |why: String| {
            user(format!(
                "{} op {i} (kernel {sig}): {why}; rebuild the model library with this mlcb",
                phase.prefix()
            ))
        };
        let k = kernels
            .get(&sig)
            .ok_or_else(|| bad("the library has no such kernel".into()))?;
        let mut resources = Vec::with_capacity(k.launch.bindings.len());
        let mut ranges = Vec::with_capacity(k.launch.bindings.len());
        for (bi, b) in k.launch.bindings.iter().enumerate() {
            if b.binding as usize != bi {
                return Err(bad(format!("binding {} is out of order", b.binding)));
            }
            let r = bind::resolve(op, b).map_err(bad)?;
            let ok = match r {
                Resource::Activation(id) => id < plan.buffers.len(),
                Resource::Weight(w, rec) => {
                    plan.weights.get(w).is_some_and(|d| rec < d.records.len())
                }
                Resource::State(s, part) => matches!(
                    (plan.states.get(s), part),
                    (Some(StateDecl::KvCache { .. }), StatePart::K | StatePart::V)
                        | (Some(StateDecl::Rwkv { .. }), StatePart::Rwkv)
                ),
                Resource::Tokens | Resource::Logits => true,
            };
            if !ok {
                return Err(bad(format!(
                    "binding {} refers to {r:?}, which the plan lacks",
                    b.name
                )));
            }
            if b.range.is_some() && !matches!(r, Resource::Weight(..)) {
                return Err(bad(format!(
                    "binding {} has a byte range but is no weight",
                    b.name
                )));
            }
            resources.push(r);
            ranges.push(b.range);
        }
        if k.launch.params.binding as usize != resources.len() {
            return Err(bad("the params uniform is not the last binding".into()));
        }
        steps.push(Step {
            op: i,
            kernel: sig.clone(),
            resources,
            ranges,
            scalar: bind::scalar(op, &k.launch).map_err(bad)?,
            index: bind::index(op),
        });
    }
    Ok(steps)
}

/// Every weight binding fits the device: its range lies inside the record's buffer at an offset
/// the device accepts, and its size is within the largest storage binding.
fn check_weight_bindings(
    plan: &Plan,
    steps: &[Vec<Step>; 2],
    weights: &[Vec<wgpu::Buffer>],
    ctx: &GpuContext,
) -> Result<()> {
    let max = ctx.limits.max_storage_buffer_binding_size;
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    for step in steps.iter().flatten() {
        for (r, range) in step.resources.iter().zip(&step.ranges) {
            let Resource::Weight(w, rec) = *r else {
                continue;
            };
            let buf_size = weights[w][rec].size();
            let [offset, len] = range.unwrap_or([0, buf_size]);
            let name = &plan.weights[w].records[rec];
            if offset % align != 0 || offset.checked_add(len).is_none_or(|e| e > buf_size) {
                bail!(user(format!(
                    "kernel {} binds bytes {offset}..+{len} of weight record {name} ({buf_size} \
                     bytes, offsets aligned to {align}); rebuild the model library",
                    step.kernel
                )));
            }
            if len > max {
                bail!(user(format!(
                    "kernel {} binds {len} bytes of weight record {name} at once, above the largest \
                     storage binding of {} ({max} bytes); rebuild with a tuning record \
                     `max_binding_bytes` of at most {max}, or run with `--device cpu`",
                    step.kernel,
                    ctx.description()
                )));
            }
        }
    }
    Ok(())
}
