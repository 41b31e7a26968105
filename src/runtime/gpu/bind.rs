//! What each kernel binding of a plan op refers to, and the params uniform of one dispatch. The
//! kernels' launch JSON names bindings by op field (`input`, `mixes[1]`, …); this maps those names
//! back onto the [`Op`] the kernel runs for.

use crate::codegen::wgsl::launch::{Binding, Launch};
use crate::formats::model_lib::plan::{BufId, Op, ShiftSlot, StateId, WeightId};

/// A device resource a binding refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Activation(BufId),
    Tokens,
    Logits,
    /// Record `.1` of weight `.0`.
    Weight(WeightId, usize),
    State(StateId, StatePart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePart {
    K,
    V,
    Rwkv,
}

/// An indexed field name (`mixes[2]` → `("mixes", Some(2))`).
fn split_index(name: &str) -> (&str, Option<usize>) {
    match name.split_once('[') {
        Some((base, rest)) => (base, rest.strip_suffix(']').and_then(|i| i.parse().ok())),
        None => (name, None),
    }
}

/// The id an op field holds: a buffer, weight or state id (which one the binding's role says).
fn field(op: &Op, name: &str) -> Option<usize> {
    let (base, index) = split_index(name);
    let v = match (op, base) {
        (Op::Embedding { weight, .. }, "weight") => *weight,
        (Op::Embedding { out, .. }, "out") => *out,
        (Op::RmsNorm { input, .. }, "input") => *input,
        (Op::RmsNorm { weight, .. }, "weight") => *weight,
        (Op::RmsNorm { out, .. }, "out") => *out,
        (Op::LayerNorm { input, .. }, "input") => *input,
        (Op::LayerNorm { weight, .. }, "weight") => *weight,
        (Op::LayerNorm { bias, .. }, "bias") => *bias,
        (Op::LayerNorm { out, .. }, "out") => *out,
        (Op::Matmul { input, .. }, "input") => *input,
        (Op::Matmul { weight, .. }, "weight") => *weight,
        (Op::Matmul { bias, .. }, "bias") => (*bias)?,
        (Op::Matmul { out, .. }, "out") => *out,
        (Op::Rotary { qkv, .. }, "qkv") => *qkv,
        (Op::Attention { qkv, .. }, "qkv") => *qkv,
        (Op::Attention { state, .. }, "state") => *state,
        (Op::Attention { out, .. }, "out") => *out,
        (Op::SiluMul { input, .. }, "input") => *input,
        (Op::SiluMul { out, .. }, "out") => *out,
        (Op::Gelu { buf } | Op::ReluSquare { buf } | Op::Sigmoid { buf }, "buf") => *buf,
        (Op::Scale { buf, .. }, "buf") => *buf,
        (Op::Add { a, .. } | Op::Mul { a, .. }, "a") => *a,
        (Op::Add { b, .. } | Op::Mul { b, .. }, "b") => *b,
        (Op::Add { out, .. } | Op::Mul { out, .. }, "out") => *out,
        (Op::RwkvTokenShift { input, .. }, "input") => *input,
        (Op::RwkvTokenShift { state, .. }, "state") => *state,
        (Op::RwkvTokenShift { mixes, .. }, "mixes") => *mixes.get(index?)?,
        (Op::RwkvTokenShift { outs, .. }, "outs") => *outs.get(index?)?,
        (Op::RwkvWkv { k, .. }, "k") => *k,
        (Op::RwkvWkv { v, .. }, "v") => *v,
        (Op::RwkvWkv { state, .. }, "state") => *state,
        (Op::RwkvWkv { time_decay, .. }, "time_decay") => *time_decay,
        (Op::RwkvWkv { time_first, .. }, "time_first") => *time_first,
        (Op::RwkvWkv { out, .. }, "out") => *out,
        (Op::Logits { input, .. }, "input") => *input,
        (Op::Logits { weight, .. }, "weight") => *weight,
        _ => return None,
    };
    if index.is_some() && !matches!(base, "mixes" | "outs") {
        return None;
    }
    Some(v)
}

/// The resource of one binding of `op`'s kernel; `Err` says what does not fit.
pub fn resolve(op: &Op, b: &Binding) -> Result<Resource, String> {
    let missing = || {
        format!(
            "binding {} ({}) names op field {:?}, which the op lacks",
            b.binding, b.name, b.op_field
        )
    };
    Ok(match b.role.as_str() {
        "activation" => Resource::Activation(field(op, &b.op_field).ok_or_else(missing)?),
        "tokens" => Resource::Tokens,
        "logits" => Resource::Logits,
        "weight" => Resource::Weight(
            field(op, &b.op_field).ok_or_else(missing)?,
            b.record
                .ok_or_else(|| format!("weight binding {} has no record index", b.name))?,
        ),
        "state" => {
            let part = match b.part.as_deref() {
                Some("k") => StatePart::K,
                Some("v") => StatePart::V,
                Some("rwkv") => StatePart::Rwkv,
                other => {
                    return Err(format!(
                        "state binding {} has unknown part {other:?}",
                        b.name
                    ))
                }
            };
            Resource::State(field(op, &b.op_field).ok_or_else(missing)?, part)
        }
        other => return Err(format!("binding {} has unknown role {other:?}", b.name)),
    })
}

/// The params uniform of one dispatch, as the kernels declare it (8 × 4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Params {
    pub t: u32,
    pub pos: u32,
    pub rows: u32,
    pub row0: u32,
    pub scalar: f32,
    pub index: u32,
}

impl Params {
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let words = [
            self.t,
            self.pos,
            self.rows,
            self.row0,
            self.scalar.to_bits(),
            self.index,
            0,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// The op's f32 parameter the launch asks for in `params.scalar`.
pub fn scalar(op: &Op, launch: &Launch) -> Result<f32, String> {
    let Some(name) = launch.params.scalar.as_deref() else {
        return Ok(0.0);
    };
    match (op, name) {
        (Op::RmsNorm { eps, .. } | Op::LayerNorm { eps, .. }, "eps") => Ok(*eps),
        (Op::Rotary { theta, .. }, "theta") => Ok(*theta),
        (Op::Scale { factor, .. }, "factor") => Ok(*factor),
        _ => Err(format!(
            "the kernel wants op field {name:?} as its scalar, which the op lacks"
        )),
    }
}

/// `params.index`: the RWKV state vector a token shift uses (0 attention, 4 feed-forward).
pub fn index(op: &Op) -> u32 {
    match op {
        Op::RwkvTokenShift { slot, .. } => match slot {
            ShiftSlot::Attention => 0,
            ShiftSlot::FeedForward => 4,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(role: &str, field: &str) -> Binding {
        Binding {
            binding: 0,
            role: role.into(),
            op_field: field.into(),
            record: (role == "weight").then_some(1),
            part: (role == "state").then(|| "v".to_string()),
            range: None,
            access: "read".into(),
            elem: "f32".into(),
            packs: None,
            name: "x".into(),
        }
    }

    #[test]
    fn op_fields_resolve_to_their_ids() {
        let shift = Op::RwkvTokenShift {
            input: 3,
            state: 1,
            slot: ShiftSlot::FeedForward,
            mixes: vec![7, 8],
            outs: vec![4, 5],
        };
        assert_eq!(
            resolve(&shift, &binding("activation", "outs[1]")),
            Ok(Resource::Activation(5))
        );
        assert_eq!(
            resolve(&shift, &binding("weight", "mixes[0]")),
            Ok(Resource::Weight(7, 1))
        );
        assert_eq!(
            resolve(&shift, &binding("state", "state")),
            Ok(Resource::State(1, StatePart::V))
        );
        assert!(resolve(&shift, &binding("weight", "mixes[2]")).is_err());
        assert_eq!(index(&shift), 4);
        let mm = Op::matmul(1, 2, None, 3);
        assert!(resolve(&mm, &binding("weight", "bias")).is_err());
        assert_eq!(
            resolve(&mm, &binding("activation", "out")),
            Ok(Resource::Activation(3))
        );
        assert!(resolve(&mm, &binding("activation", "input[0]")).is_err());
        assert_eq!(
            resolve(&mm, &binding("logits", "logits")),
            Ok(Resource::Logits)
        );
    }

    #[test]
    fn params_are_little_endian_words() {
        let p = Params {
            t: 3,
            pos: 5,
            rows: 1,
            row0: 2,
            scalar: 1.5,
            index: 4,
        };
        let b = p.to_bytes();
        assert_eq!(&b[0..4], &3u32.to_le_bytes());
        assert_eq!(&b[12..16], &2u32.to_le_bytes());
        assert_eq!(&b[16..20], &1.5f32.to_bits().to_le_bytes());
        assert_eq!(&b[20..24], &4u32.to_le_bytes());
        assert_eq!(&b[24..], &[0; 8]);
    }
}
