//! Binding a plan to weights, and running it.

use super::kernels::{self, WeightView};
use super::ops::attention::{attention, KvCache};
use super::ops::elementwise::{self, map_in_place, zip_in_place};
use super::ops::math::{Exp, NativeExp, PortableExp};
use super::ops::rwkv::{token_shift, wkv, RwkvState};
use super::ops::{norm, rotary};
use super::validate::{validate_plan, validate_weights};
use crate::formats::model_lib::plan::{
    Activation, BufId, Op, Plan, ShiftSlot, StateDecl, WeightId,
};
use anyhow::Result;
use rayon::prelude::*;

/// A plan bound to its weights. Vector weights (norms, biases, RWKV mixes) are decoded to f32 once;
/// matrices are read in place through the kernels.
pub struct CpuModel<'a> {
    plan: &'a Plan,
    weights: Vec<WeightView<'a>>,
    vectors: Vec<Option<Vec<f32>>>,
    /// Use the `libm` crate's exponential (see [`CpuModel::with_portable_math`]).
    portable_math: bool,
}

impl<'a> CpuModel<'a> {
    /// Validates the plan and that every weight view matches its declaration (shape, storage,
    /// record sizes).
    pub fn new(plan: &'a Plan, weights: Vec<WeightView<'a>>) -> Result<Self> {
        validate_plan(plan)?;
        validate_weights(plan, &weights)?;
        let vectors = weights
            .iter()
            .map(|w| (w.shape.len() == 1).then(|| kernels::vector(w)))
            .collect();
        Ok(CpuModel {
            plan,
            weights,
            vectors,
            portable_math: false,
        })
    }

    /// Computes with the `libm` crate's exponential instead of the platform's: slower (~10% of
    /// a prefill), but with the f32 kernels' fixed summation order every result is then the same
    /// on every machine. Build-time calibration needs that; serving does not.
    pub fn with_portable_math(mut self) -> Self {
        self.portable_math = true;
        self
    }

    pub fn plan(&self) -> &Plan {
        self.plan
    }

    /// A fresh session at position 0.
    pub fn session(&self) -> CpuSession<'_> {
        let states = self
            .plan
            .states
            .iter()
            .map(|s| match *s {
                StateDecl::KvCache { .. } => State::Kv(KvCache::default()),
                StateDecl::Rwkv { hidden, .. } => State::Rwkv(RwkvState::new(hidden)),
            })
            .collect();
        CpuSession {
            model: self,
            pos: 0,
            states,
            buffers: vec![Vec::new(); self.plan.buffers.len()],
        }
    }

    fn vector(&self, id: WeightId) -> &[f32] {
        self.vectors[id]
            .as_deref()
            .expect("validated: vector ops name 1-D weights")
    }
}

enum State {
    Kv(KvCache),
    Rwkv(RwkvState),
}

/// One conversation: position, persistent state and scratch buffers.
pub struct CpuSession<'m> {
    model: &'m CpuModel<'m>,
    pos: usize,
    states: Vec<State>,
    buffers: Vec<Vec<f32>>,
}

impl CpuSession<'_> {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Capacity in tokens (the plan's KV-cache size).
    pub fn max_seq_len(&self) -> usize {
        self.model.plan.max_seq_len
    }

    /// Forget everything: position 0, empty KV cache, initial RWKV state.
    pub fn reset(&mut self) {
        self.pos = 0;
        for s in &mut self.states {
            match s {
                State::Kv(kv) => {
                    kv.k.clear();
                    kv.v.clear();
                }
                State::Rwkv(r) => *r = RwkvState::new(r.num.len()),
            }
        }
    }

    /// Processes `tokens` at positions `pos..pos+T` (prefill when `T > 1`, decode when `T = 1`) and
    /// returns logits `[rows, vocab]` row-major: every position when `all_logits`, else the last.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        let plan = self.model.plan;
        let t = tokens.len();
        self.prepare(tokens, if all_logits { t } else { 1 })?;
        let ops = if t > 1 { &plan.prefill } else { &plan.decode };
        for op in ops {
            self.run(op, tokens, all_logits);
        }
        self.pos += t;
        Ok(self.buffers[plan.logits].clone())
    }

    /// Checks a call's tokens and sizes every buffer for `T` rows (`logits_rows` for the logits).
    fn prepare(&mut self, tokens: &[u32], logits_rows: usize) -> Result<()> {
        let plan = self.model.plan;
        crate::runtime::check_forward_input(plan, self.pos, tokens)?;
        for (i, decl) in plan.buffers.iter().enumerate() {
            let rows = if i == plan.logits {
                logits_rows
            } else {
                tokens.len()
            };
            self.buffers[i].resize(rows * decl.cols, 0.0);
        }
        Ok(())
    }

    /// Runs one op with the model's exponential.
    fn run(&mut self, op: &Op, tokens: &[u32], all_logits: bool) {
        if self.model.portable_math {
            self.run_with::<PortableExp>(op, tokens, all_logits)
        } else {
            self.run_with::<NativeExp>(op, tokens, all_logits)
        }
    }

    /// Runs one op. Ids, widths and aliasing were validated by `CpuModel::new`.
    fn run_with<E: Exp>(&mut self, op: &Op, tokens: &[u32], all_logits: bool) {
        let model = self.model;
        let t = tokens.len();
        let pos = self.pos;
        match *op {
            Op::Embedding { weight, out } => {
                let w = &model.weights[weight];
                let cols = w.shape[1];
                self.buffers[out]
                    .par_chunks_mut(cols)
                    .zip(tokens)
                    .for_each(|(row, &tok)| kernels::gather_row(w, tok as usize, row));
            }
            Op::RmsNorm {
                input,
                weight,
                eps,
                out,
            } => {
                let (x, o) = self.in_out(input, out);
                norm::rms_norm(x, model.vector(weight), eps, o);
            }
            Op::LayerNorm {
                input,
                weight,
                bias,
                eps,
                out,
            } => {
                let (x, o) = self.in_out(input, out);
                norm::layer_norm(x, model.vector(weight), model.vector(bias), eps, o);
            }
            Op::Matmul {
                input,
                weight,
                bias,
                out,
                fusion,
            } if fusion.is_none() => {
                let (x, o) = self.in_out(input, out);
                decode_or_prefill_matmul(&model.weights[weight], x, t, o);
                if let Some(b) = bias {
                    add_bias(o, model.vector(b));
                }
            }
            Op::Matmul {
                input,
                weight,
                bias,
                out,
                fusion,
            } => {
                // The unfused ops' kernels, in their order, on a product buffer of its own.
                let w = &model.weights[weight];
                let mut p = vec![0f32; t * w.shape[0]];
                match fusion.rms_norm {
                    None => decode_or_prefill_matmul(w, &self.buffers[input], t, &mut p),
                    Some(n) => {
                        let mut x = vec![0f32; self.buffers[input].len()];
                        norm::rms_norm(&self.buffers[input], model.vector(n.weight), n.eps, &mut x);
                        decode_or_prefill_matmul(w, &x, t, &mut p);
                    }
                }
                if let Some(b) = bias {
                    add_bias(&mut p, model.vector(b));
                }
                if let Some(a) = fusion.activation {
                    activate::<E>(a, &mut p);
                }
                if fusion.silu_gate {
                    let mut gated = vec![0f32; p.len() / 2];
                    elementwise::silu_mul::<E>(&p, &mut gated, w.shape[0] / 2);
                    p = gated;
                }
                if let Some(r) = fusion.residual {
                    zip_in_place(&mut p, &self.buffers[r], |p, r| r + p);
                }
                self.buffers[out] = p;
            }
            Op::Rotary {
                qkv,
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
                theta,
            } => rotary::rotary(
                &mut self.buffers[qkv],
                pos,
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
                theta,
            ),
            Op::Attention {
                qkv,
                state,
                n_q_heads,
                n_kv_heads,
                head_dim,
                out,
                rotary,
            } => {
                let State::Kv(cache) = &mut self.states[state] else {
                    unreachable!("validated: attention names a KV cache")
                };
                match rotary {
                    None => {
                        let (x, o) = in_out(&mut self.buffers, qkv, out);
                        attention::<E>(x, pos, n_q_heads, n_kv_heads, head_dim, cache, o);
                    }
                    Some(r) => {
                        // The fused op leaves qkv as it is: rotate a copy.
                        let mut x = self.buffers[qkv].clone();
                        rotary::rotary(
                            &mut x,
                            pos,
                            n_q_heads,
                            n_kv_heads,
                            head_dim,
                            r.rotary_dim,
                            r.theta,
                        );
                        let o = &mut self.buffers[out];
                        attention::<E>(&x, pos, n_q_heads, n_kv_heads, head_dim, cache, o);
                    }
                }
            }
            Op::SiluMul { input, out } => {
                let cols = model.plan.buffers[out].cols;
                let (x, o) = self.in_out(input, out);
                elementwise::silu_mul::<E>(x, o, cols);
            }
            Op::Gelu { buf } => activate::<E>(Activation::Gelu, &mut self.buffers[buf]),
            Op::ReluSquare { buf } => activate::<E>(Activation::ReluSquare, &mut self.buffers[buf]),
            Op::Sigmoid { buf } => activate::<E>(Activation::Sigmoid, &mut self.buffers[buf]),
            Op::Scale { buf, factor } => map_in_place(&mut self.buffers[buf], |x| x * factor),
            Op::Add { a, b, out } => self.binary(a, b, out, |x, y| x + y),
            Op::Mul { a, b, out } => self.binary(a, b, out, |x, y| x * y),
            Op::RwkvTokenShift {
                input,
                state,
                slot,
                ref mixes,
                ref outs,
            } => {
                let State::Rwkv(s) = &mut self.states[state] else {
                    unreachable!("validated: token shift names an RWKV state")
                };
                let shift = match slot {
                    ShiftSlot::Attention => &mut s.att_shift,
                    ShiftSlot::FeedForward => &mut s.ffn_shift,
                };
                let mix: Vec<&[f32]> = mixes.iter().map(|&m| model.vector(m)).collect();
                let mut taken: Vec<Vec<f32>> = outs
                    .iter()
                    .map(|&o| std::mem::take(&mut self.buffers[o]))
                    .collect();
                token_shift(&self.buffers[input], shift, &mix, &mut taken);
                for (&o, buf) in outs.iter().zip(taken) {
                    self.buffers[o] = buf;
                }
            }
            Op::RwkvWkv {
                k,
                v,
                state,
                time_decay,
                time_first,
                out,
            } => {
                let State::Rwkv(s) = &mut self.states[state] else {
                    unreachable!("validated: wkv names an RWKV state")
                };
                let mut o = std::mem::take(&mut self.buffers[out]);
                wkv::<E>(
                    &self.buffers[k],
                    &self.buffers[v],
                    model.vector(time_decay),
                    model.vector(time_first),
                    s,
                    &mut o,
                );
                self.buffers[out] = o;
            }
            Op::Logits { input, weight } => {
                let logits = model.plan.logits;
                let cols = model.plan.buffers[input].cols;
                let (x, o) = self.in_out(input, logits);
                let (x, rows) = if all_logits {
                    (x, t)
                } else {
                    (&x[(t - 1) * cols..], 1)
                };
                decode_or_prefill_matmul(&model.weights[weight], x, rows, o);
            }
        }
    }

    fn in_out(&mut self, input: BufId, out: BufId) -> (&[f32], &mut [f32]) {
        in_out(&mut self.buffers, input, out)
    }

    /// `out = f(a, b)` elementwise, where `out` may be `a` or `b` (or both).
    fn binary(&mut self, a: BufId, b: BufId, out: BufId, f: impl Fn(f32, f32) -> f32 + Sync) {
        let bufs = &mut self.buffers;
        if a == out && b == out {
            map_in_place(&mut bufs[out], |x| f(x, x));
        } else if a == out {
            let (y, o) = in_out(bufs, b, out);
            zip_in_place(o, y, f);
        } else if b == out {
            let (x, o) = in_out(bufs, a, out);
            zip_in_place(o, x, |o, x| f(x, o));
        } else {
            let mut o = std::mem::take(&mut bufs[out]);
            o.copy_from_slice(&bufs[a]);
            zip_in_place(&mut o, &bufs[b], f);
            bufs[out] = o;
        }
    }
}

/// One activation row (decode) takes the int8-activation GEMV where the weight has one (its
/// rounding of `x` is far below the 4-bit weights' own error, and it is ~2× faster); several rows
/// (prefill, `mlcb logits`) use the exact kernels.
fn decode_or_prefill_matmul(w: &WeightView, x: &[f32], rows: usize, out: &mut [f32]) {
    if rows == 1 {
        kernels::matmul_int8_activations(w, x, rows, out)
    } else {
        kernels::matmul(w, x, rows, out)
    }
}

/// One matmul handed to the caller of [`forward_intercepting`]: for each session, its input
/// `[T, K]` and its output `[T, N]`.
pub type InterceptedMatmul<'s, 'b> = &'s mut [(&'b [f32], &'b mut [f32])];

/// Runs one token sequence per session through the plan in lockstep, op by op, like
/// [`CpuSession::forward`] — except that each `Matmul` and `Logits` op is handed to
/// `matmul(weight, pairs, output_needed)` instead of the kernels, with every session's input and
/// output at once; biases are still added here. `output_needed` is false for `Logits`, whose
/// buffer nothing reads afterwards. Build-time calibration uses this to collect every layer's
/// inputs over all its sequences, quantize the layer, and go on with the quantized weights.
/// Every sequence must have at least 2 tokens (the prefill ops run).
pub fn forward_intercepting(
    sessions: &mut [CpuSession],
    tokens: &[&[u32]],
    matmul: &mut dyn FnMut(WeightId, InterceptedMatmul, bool) -> Result<()>,
) -> Result<()> {
    anyhow::ensure!(
        sessions.len() == tokens.len(),
        "one token sequence per session"
    );
    let Some(first) = sessions.first() else {
        return Ok(());
    };
    let model = first.model;
    let plan = model.plan;
    for (s, toks) in sessions.iter_mut().zip(tokens) {
        anyhow::ensure!(
            std::ptr::eq(s.model, model) && toks.len() > 1,
            "lockstep sessions share a model and run prefills"
        );
        s.prepare(toks, toks.len())?;
    }
    for op in &plan.prefill {
        match *op {
            Op::Matmul {
                input,
                weight,
                bias,
                out,
                fusion,
            } => {
                // Calibration runs the plans the model lowers to, which fuse nothing.
                anyhow::ensure!(
                    fusion.is_none(),
                    "lockstep sessions run unfused plans (an mlcb bug)"
                );
                let mut pairs: Vec<(&[f32], &mut [f32])> = sessions
                    .iter_mut()
                    .map(|s| in_out(&mut s.buffers, input, out))
                    .collect();
                matmul(weight, &mut pairs, true)?;
                if let Some(b) = bias {
                    for (_, o) in pairs.iter_mut() {
                        add_bias(o, model.vector(b));
                    }
                }
            }
            Op::Logits { input, weight } => {
                let mut pairs: Vec<(&[f32], &mut [f32])> = sessions
                    .iter_mut()
                    .map(|s| in_out(&mut s.buffers, input, plan.logits))
                    .collect();
                matmul(weight, &mut pairs, false)?;
            }
            _ => {
                for (s, toks) in sessions.iter_mut().zip(tokens) {
                    s.run(op, toks, true);
                }
            }
        }
    }
    for (s, toks) in sessions.iter_mut().zip(tokens) {
        s.pos += toks.len();
    }
    Ok(())
}

/// In place, the activation an [`Op::Gelu`], [`Op::ReluSquare`] or [`Op::Sigmoid`] applies (and
/// a fused matmul's `activation`).
fn activate<E: Exp>(a: Activation, buf: &mut [f32]) {
    match a {
        Activation::Gelu => map_in_place(buf, elementwise::gelu),
        Activation::ReluSquare => map_in_place(buf, elementwise::relu_square),
        Activation::Sigmoid => map_in_place(buf, elementwise::sigmoid::<E>),
    }
}

/// `out[t] += bias` for every row.
fn add_bias(out: &mut [f32], bias: &[f32]) {
    out.chunks_mut(bias.len())
        .for_each(|row| row.iter_mut().zip(bias).for_each(|(o, b)| *o += b));
}

/// A shared view of buffer `input` and a mutable one of a different buffer `out`.
fn in_out(bufs: &mut [Vec<f32>], input: BufId, out: BufId) -> (&[f32], &mut [f32]) {
    assert_ne!(input, out, "validated: input and output differ");
    if input < out {
        let (lo, hi) = bufs.split_at_mut(out);
        (&lo[input], &mut hi[0])
    } else {
        let (lo, hi) = bufs.split_at_mut(input);
        (&hi[0], &mut lo[out])
    }
}
