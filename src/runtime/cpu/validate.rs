//! Checks a plan and its weights before anything runs, so that a corrupt or mismatched model
//! library is a clear error rather than a panic or an out-of-range access mid-generation.

use super::kernels::WeightView;
use crate::error::user;
use crate::formats::model_lib::plan::{
    BufId, Op, Plan, StateDecl, StateId, WeightId, WeightStorage, PLAN_FORMAT_BASE,
    PLAN_FORMAT_VERSION,
};
use crate::quant::scheme::{scheme, Encoding};
use anyhow::Result;

/// Buffer widths and vocabularies above this are refused (no model comes near; a hostile plan
/// must not make `T × cols` allocations overflow).
const MAX_COLS: usize = 1 << 26;

fn bad(plan: &Plan, msg: impl std::fmt::Display) -> anyhow::Error {
    user(format!(
        "invalid execution plan ({} {}): {msg}; rebuild the model library",
        plan.arch, plan.quantization
    ))
}

/// Static checks of a plan: ids in range, widths consistent with the weights' shapes, in/out
/// aliasing only where an op allows it.
pub fn validate_plan(plan: &Plan) -> Result<()> {
    if !(PLAN_FORMAT_BASE..=PLAN_FORMAT_VERSION).contains(&plan.format_version) {
        return Err(bad(
            plan,
            format!(
                "format version {} is not one of the supported {PLAN_FORMAT_BASE}..={PLAN_FORMAT_VERSION}",
                plan.format_version
            ),
        ));
    }
    if plan.vocab_size == 0 || plan.vocab_size > MAX_COLS || plan.max_seq_len == 0 {
        return Err(bad(plan, "vocab_size and max_seq_len must be positive"));
    }
    for b in &plan.buffers {
        if b.cols == 0 || b.cols > MAX_COLS {
            return Err(bad(
                plan,
                format!("buffer {} has {} columns", b.name, b.cols),
            ));
        }
    }
    for s in &plan.states {
        let (a, b) = match *s {
            StateDecl::KvCache {
                n_kv_heads,
                head_dim,
                ..
            } => (n_kv_heads, head_dim),
            StateDecl::Rwkv { hidden, .. } => (hidden, 1),
        };
        if a == 0 || b == 0 || a.saturating_mul(b) > MAX_COLS {
            return Err(bad(plan, format!("state {s:?} has a bad size")));
        }
    }
    let v = Checker { plan };
    let logits = v.b(plan.logits).map_err(|e| bad(plan, e))?;
    if logits != plan.vocab_size {
        return Err(bad(plan, "the logits buffer is not vocab_size wide"));
    }
    for (name, ops) in [("prefill", &plan.prefill), ("decode", &plan.decode)] {
        match ops.last() {
            Some(Op::Logits { .. }) => {}
            _ => return Err(bad(plan, format!("{name} does not end with Logits"))),
        }
        for (i, op) in ops.iter().enumerate() {
            v.op(op)
                .map_err(|e| bad(plan, format!("{name} op {i} ({}): {e}", op_name(op))))?;
        }
    }
    Ok(())
}

pub(super) fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Embedding { .. } => "Embedding",
        Op::RmsNorm { .. } => "RmsNorm",
        Op::LayerNorm { .. } => "LayerNorm",
        Op::Matmul { .. } => "Matmul",
        Op::Rotary { .. } => "Rotary",
        Op::Attention { .. } => "Attention",
        Op::SiluMul { .. } => "SiluMul",
        Op::Gelu { .. } => "Gelu",
        Op::ReluSquare { .. } => "ReluSquare",
        Op::Sigmoid { .. } => "Sigmoid",
        Op::Add { .. } => "Add",
        Op::Mul { .. } => "Mul",
        Op::Scale { .. } => "Scale",
        Op::RwkvTokenShift { .. } => "RwkvTokenShift",
        Op::RwkvWkv { .. } => "RwkvWkv",
        Op::Logits { .. } => "Logits",
    }
}

struct Checker<'p> {
    plan: &'p Plan,
}

type R<T> = std::result::Result<T, String>;

fn same(what: &str, a: usize, b: usize) -> R<()> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: {a} != {b}"))
    }
}

fn distinct(ids: &[BufId]) -> R<()> {
    for (i, a) in ids.iter().enumerate() {
        if ids[i + 1..].contains(a) {
            return Err(format!("buffer {a} is used as input and output"));
        }
    }
    Ok(())
}

impl Checker<'_> {
    fn b(&self, id: BufId) -> R<usize> {
        self.plan
            .buffers
            .get(id)
            .map(|b| b.cols)
            .ok_or_else(|| format!("buffer id {id} out of range"))
    }
    fn weight(&self, id: WeightId) -> R<&[usize]> {
        self.plan
            .weights
            .get(id)
            .map(|w| w.shape.as_slice())
            .ok_or_else(|| format!("weight id {id} out of range"))
    }
    /// A raw 1-D weight of `n` values.
    fn vector(&self, id: WeightId, n: usize) -> R<()> {
        let shape = self.weight(id)?;
        let w = &self.plan.weights[id];
        if !matches!(w.storage, WeightStorage::Raw { .. }) {
            return Err(format!("weight {} must be stored raw", w.name));
        }
        if shape != [n] {
            return Err(format!(
                "weight {} has shape {shape:?}, expected [{n}]",
                w.name
            ));
        }
        Ok(())
    }
    /// A 2-D weight `[N, K]`.
    fn matrix(&self, id: WeightId) -> R<(usize, usize)> {
        match *self.weight(id)? {
            [n, k] => Ok((n, k)),
            ref s => Err(format!(
                "weight {} has shape {s:?}, expected [N, K]",
                self.plan.weights[id].name
            )),
        }
    }
    fn kv_state(&self, id: StateId) -> R<(usize, usize)> {
        match self.plan.states.get(id) {
            Some(&StateDecl::KvCache {
                n_kv_heads,
                head_dim,
                ..
            }) => Ok((n_kv_heads, head_dim)),
            _ => Err(format!("state {id} is not a KV cache")),
        }
    }
    fn rwkv_state(&self, id: StateId) -> R<usize> {
        match self.plan.states.get(id) {
            Some(&StateDecl::Rwkv { hidden, .. }) => Ok(hidden),
            _ => Err(format!("state {id} is not an RWKV state")),
        }
    }
    fn heads(&self, qkv: BufId, nq: usize, nkv: usize, hd: usize) -> R<()> {
        if nq == 0 || nkv == 0 || hd == 0 || nq % nkv != 0 {
            return Err(format!("{nq} query heads / {nkv} kv heads / head_dim {hd}"));
        }
        let cols = nq
            .checked_add(2 * nkv)
            .and_then(|h| h.checked_mul(hd))
            .ok_or("head counts overflow")?;
        same("qkv width", self.b(qkv)?, cols)
    }

    fn op(&self, op: &Op) -> R<()> {
        match *op {
            Op::Embedding { weight, out } => {
                let (n, k) = self.matrix(weight)?;
                same("embedding rows vs vocab_size", n, self.plan.vocab_size)?;
                same("embedding width", self.b(out)?, k)
            }
            Op::RmsNorm {
                input,
                weight,
                out,
                eps,
            } => {
                let c = self.b(input)?;
                same("norm width", self.b(out)?, c)?;
                self.vector(weight, c)?;
                finite(eps)?;
                distinct(&[input, out])
            }
            Op::LayerNorm {
                input,
                weight,
                bias,
                out,
                eps,
            } => {
                let c = self.b(input)?;
                same("norm width", self.b(out)?, c)?;
                self.vector(weight, c)?;
                self.vector(bias, c)?;
                finite(eps)?;
                distinct(&[input, out])
            }
            Op::Matmul {
                input,
                weight,
                bias,
                out,
                fusion,
            } => {
                let (n, k) = self.matrix(weight)?;
                same("matmul input width vs K", self.b(input)?, k)?;
                let gate = if fusion.silu_gate { 2 } else { 1 };
                same("matmul output width vs N", gate * self.b(out)?, n)?;
                if let Some(b) = bias {
                    self.vector(b, n)?;
                }
                if let Some(r) = fusion.residual {
                    same("matmul residual width", self.b(r)?, self.b(out)?)?;
                }
                if fusion.silu_gate && fusion.activation.is_some() {
                    return Err("a matmul with both a silu gate and an activation".into());
                }
                if let Some(norm) = fusion.rms_norm {
                    self.vector(norm.weight, k)?;
                    finite(norm.eps)?;
                }
                distinct(&[input, out])
            }
            Op::Rotary {
                qkv,
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
                theta,
            } => {
                self.heads(qkv, n_q_heads, n_kv_heads, head_dim)?;
                rotary_fields(rotary_dim, theta, head_dim)
            }
            Op::Attention {
                qkv,
                state,
                n_q_heads,
                n_kv_heads,
                head_dim,
                out,
                rotary,
            } => {
                if let Some(r) = rotary {
                    rotary_fields(r.rotary_dim, r.theta, head_dim)?;
                }
                self.heads(qkv, n_q_heads, n_kv_heads, head_dim)?;
                same("KV cache heads", self.kv_state(state)?.0, n_kv_heads)?;
                same("KV cache head_dim", self.kv_state(state)?.1, head_dim)?;
                same("attention output width", self.b(out)?, n_q_heads * head_dim)?;
                distinct(&[qkv, out])
            }
            Op::SiluMul { input, out } => {
                same("silu_mul input width", self.b(input)?, 2 * self.b(out)?)?;
                distinct(&[input, out])
            }
            Op::Gelu { buf } | Op::ReluSquare { buf } | Op::Sigmoid { buf } => {
                self.b(buf).map(|_| ())
            }
            Op::Scale { buf, factor } => {
                finite(factor)?;
                self.b(buf).map(|_| ())
            }
            Op::Add { a, b, out } | Op::Mul { a, b, out } => {
                let c = self.b(a)?;
                same("elementwise widths", self.b(b)?, c)?;
                same("elementwise widths", self.b(out)?, c)
            }
            Op::RwkvTokenShift {
                input,
                state,
                ref mixes,
                ref outs,
                ..
            } => {
                let h = self.rwkv_state(state)?;
                same("token shift width", self.b(input)?, h)?;
                if mixes.is_empty() || mixes.len() != outs.len() {
                    return Err("token shift needs one output per mix vector".into());
                }
                for (&m, &o) in mixes.iter().zip(outs) {
                    self.vector(m, h)?;
                    same("token shift output width", self.b(o)?, h)?;
                }
                let mut ids = vec![input];
                ids.extend(outs);
                distinct(&ids)
            }
            Op::RwkvWkv {
                k,
                v,
                state,
                time_decay,
                time_first,
                out,
            } => {
                let h = self.rwkv_state(state)?;
                for b in [k, v, out] {
                    same("wkv width", self.b(b)?, h)?;
                }
                self.vector(time_decay, h)?;
                self.vector(time_first, h)?;
                distinct(&[k, out])?;
                distinct(&[v, out])
            }
            Op::Logits { input, weight } => {
                let (n, k) = self.matrix(weight)?;
                same("logits rows vs vocab_size", n, self.plan.vocab_size)?;
                same("logits input width", self.b(input)?, k)?;
                distinct(&[input, self.plan.logits])
            }
        }
    }
}

fn finite(x: f32) -> R<()> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(format!("non-finite constant {x}"))
    }
}

/// Checks that every weight view is the plan's declaration with the right number of bytes.
pub fn validate_weights(plan: &Plan, weights: &[WeightView]) -> Result<()> {
    if weights.len() != plan.weights.len() {
        return Err(user(format!(
            "the plan declares {} weights but {} were given",
            plan.weights.len(),
            weights.len()
        )));
    }
    for (decl, view) in plan.weights.iter().zip(weights) {
        let name = &decl.name;
        if view.shape != decl.shape.as_slice() {
            return Err(user(format!(
                "weight {name} has shape {:?}, the plan expects {:?}",
                view.shape, decl.shape
            )));
        }
        if *view.storage != decl.storage || view.model_dtype != plan.model_dtype {
            return Err(user(format!(
                "weight {name} is stored as {:?} ({}), the plan expects {:?} ({})",
                view.storage, view.model_dtype, decl.storage, plan.model_dtype
            )));
        }
        let expected = record_sizes(plan, &decl.storage, &decl.shape)
            .map_err(|e| user(format!("weight {name}: {e}")))?;
        let found: Vec<usize> = view.records.iter().map(|r| r.len()).collect();
        if found != expected || decl.records.len() != expected.len() {
            return Err(user(format!(
                "weight {name} (records {:?}) has {found:?} bytes, expected {expected:?}; \
                 the parameter shards do not match the model library",
                decl.records
            )));
        }
    }
    Ok(())
}

/// Byte sizes of the records of a weight.
fn record_sizes(plan: &Plan, storage: &WeightStorage, shape: &[usize]) -> R<Vec<usize>> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    match storage {
        WeightStorage::Raw { dtype } => {
            if !dtype.is_float() {
                return Err(format!("raw weights of dtype {dtype} are not supported"));
            }
            Ok(vec![numel * dtype.size()])
        }
        WeightStorage::Quantized { scheme: name, .. } => {
            let s = scheme(name).ok_or_else(|| format!("unknown quantization scheme {name}"))?;
            let [n, k] = *shape else {
                return Err(format!(
                    "quantized weight of shape {shape:?} is not a matrix"
                ));
            };
            let enc = s.encoding;
            let storage = enc.storage().ok_or("scheme without quantized storage")?;
            let data = enc.words_per_row(k) * n * storage.size();
            let scale = match enc {
                Encoding::Sym { .. } => enc.n_groups(k) * n * plan.model_dtype.size(),
                Encoding::AsymBf16x2 { .. } => enc.n_groups(k) * n * 4,
                Encoding::None => return Err("scheme without quantized storage".into()),
            };
            Ok(vec![data, scale])
        }
    }
}

/// The rotary fields of [`Op::Rotary`] and a fused [`Op::Attention`].
fn rotary_fields(rotary_dim: usize, theta: f32, head_dim: usize) -> Result<(), String> {
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
        return Err(format!("rotary_dim {rotary_dim} for head_dim {head_dim}"));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(format!("theta {theta}"));
    }
    Ok(())
}
