//! Kernel specifications: everything static a WGSL kernel is specialised for, derived from one op
//! of a plan. Ops with the same signature must give the same spec (the signature is the dedup
//! key); [`specs_by_signature`] checks that, so a signature that misses a static property is
//! caught at build time instead of silently sharing a wrong kernel.

use crate::codegen::signature::op_signature;
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{Activation, Op, Plan, WeightStorage};
use crate::quant::scheme::{scheme, Encoding, Layout};
use anyhow::{bail, Result};
use std::collections::BTreeMap;

/// How the values of a quantized matrix decode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    /// `w = (q - maxq) · s`, `s` stored in `scale`.
    Sym { maxq: u32, scale: DType },
    /// `w = q · s + min`, `s` (low half) and `min` (high half) bf16 in one u32.
    AsymBf16x2,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    pub bits: u32,
    pub group: usize,
    pub per_word: usize,
    pub words_per_group: usize,
    pub n_group: usize,
    pub words_per_row: usize,
    /// Storage words are uint16 (read as u32 pairs).
    pub word16: bool,
    pub codec: Codec,
    pub layout: Layout,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MatrixStorage {
    Raw(DType),
    Quant(QuantSpec),
}

/// A `[N, K]` matrix weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatrixSpec {
    pub n: usize,
    pub k: usize,
    pub storage: MatrixStorage,
    /// Dtype the artifact defines decoded values in (gathered embedding rows round to it).
    pub model_dtype: DType,
}

impl MatrixSpec {
    pub fn records(&self) -> usize {
        match self.storage {
            MatrixStorage::Raw(_) => 1,
            MatrixStorage::Quant(_) => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    Gelu,
    ReluSquare,
    Sigmoid,
    Scale,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Mul,
}

/// Whether a kernel runs in the prefill (`T ≥ 1`) or decode (`T = 1`) entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// A matmul kernel's fused steps (the plan's `MatmulFusion` without ids, in its order): an RMS
/// norm of the input with a weight of this dtype (eps is the kernel's scalar parameter); an
/// activation of the product; the product is `[gate | up]` and the kernel writes
/// `silu(gate) * up`; a residual buffer is added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fusion {
    pub rms_norm: Option<DType>,
    /// Gelu, ReluSquare or Sigmoid (never Scale: its factor would need a second scalar).
    pub activation: Option<Unary>,
    pub silu_gate: bool,
    pub residual: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KernelSpec {
    Embedding {
        m: MatrixSpec,
    },
    RmsNorm {
        cols: usize,
        weight: DType,
    },
    LayerNorm {
        cols: usize,
        weight: DType,
        bias: DType,
    },
    /// Matmul and logits (`logits`: output is the plan's logits buffer, rows from params).
    Matmul {
        m: MatrixSpec,
        bias: Option<DType>,
        phase: Phase,
        logits: bool,
        fusion: Fusion,
    },
    Rotary {
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
    },
    /// `rotary_dim`: the fused rotary embedding ([`Op::Attention`]'s `rotary`; theta is the
    /// kernel's scalar parameter).
    Attention {
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rotary_dim: Option<usize>,
    },
    SiluMul {
        cols: usize,
    },
    Unary {
        op: Unary,
        cols: usize,
    },
    Binary {
        op: Binary,
        cols: usize,
    },
    TokenShift {
        hidden: usize,
        mixes: Vec<DType>,
    },
    Wkv {
        hidden: usize,
        time_decay: DType,
        time_first: DType,
    },
}

impl KernelSpec {
    /// Whether the kernel runs a fused step (a matmul fusion, rotary inside attention).
    pub fn fused(&self) -> bool {
        match self {
            KernelSpec::Matmul { fusion, .. } => *fusion != Fusion::default(),
            KernelSpec::Attention { rotary_dim, .. } => rotary_dim.is_some(),
            _ => false,
        }
    }
}

fn float_dtype(d: DType, what: &str) -> Result<DType> {
    if !d.is_float() {
        bail!("{what} has dtype {d}, which no GPU kernel reads as a float");
    }
    Ok(d)
}

fn vector(plan: &Plan, w: usize) -> Result<DType> {
    let d = plan
        .weights
        .get(w)
        .ok_or_else(|| anyhow::anyhow!("plan names weight {w}, which it does not declare"))?;
    match &d.storage {
        WeightStorage::Raw { dtype } => float_dtype(*dtype, &d.name),
        WeightStorage::Quantized { .. } => {
            bail!(
                "vector weight {} is quantized; kernels read vectors raw",
                d.name
            )
        }
    }
}

fn matrix(plan: &Plan, w: usize) -> Result<MatrixSpec> {
    let d = plan
        .weights
        .get(w)
        .ok_or_else(|| anyhow::anyhow!("plan names weight {w}, which it does not declare"))?;
    let &[n, k] = d.shape.as_slice() else {
        bail!(
            "matrix weight {} has shape {:?}, expected [N, K]",
            d.name,
            d.shape
        );
    };
    matrix_spec(&d.storage, n, k, plan.model_dtype)
        .map_err(|e| anyhow::anyhow!("weight {}: {e}", d.name))
}

/// The spec of an `[n, k]` matrix stored as `storage` in a plan of `model_dtype`.
pub fn matrix_spec(
    storage: &WeightStorage,
    n: usize,
    k: usize,
    model_dtype: DType,
) -> Result<MatrixSpec> {
    let storage = match storage {
        WeightStorage::Raw { dtype } => MatrixStorage::Raw(float_dtype(*dtype, "the matrix")?),
        WeightStorage::Quantized {
            scheme: name,
            layout,
        } => {
            let s = scheme(name).ok_or_else(|| anyhow::anyhow!("unknown scheme {name}"))?;
            let enc = s.encoding;
            let (codec, storage) = match enc {
                Encoding::None => bail!("quantized with {name}, which stores raw"),
                Encoding::Sym { bits, storage, .. } => (
                    Codec::Sym {
                        maxq: (1u32 << (bits - 1)) - 1,
                        scale: float_dtype(model_dtype, "the model dtype (scales)")?,
                    },
                    storage,
                ),
                Encoding::AsymBf16x2 { storage, .. } => (Codec::AsymBf16x2, storage),
            };
            let word16 = match storage {
                DType::U16 => true,
                DType::U32 => false,
                other => {
                    bail!("scheme {name} stores words as {other}; kernels read uint16 or uint32")
                }
            };
            MatrixStorage::Quant(QuantSpec {
                bits: enc.bits(),
                group: enc.group(),
                per_word: enc.per_word(),
                words_per_group: enc.words_per_group(),
                n_group: enc.n_groups(k),
                words_per_row: enc.words_per_row(k),
                word16,
                codec,
                layout: *layout,
            })
        }
    };
    Ok(MatrixSpec {
        n,
        k,
        storage,
        model_dtype,
    })
}

fn cols(plan: &Plan, b: usize) -> Result<usize> {
    plan.buffers
        .get(b)
        .map(|d| d.cols)
        .ok_or_else(|| anyhow::anyhow!("plan names buffer {b}, which it does not declare"))
}

/// The spec of one op.
pub fn op_spec(plan: &Plan, op: &Op, phase: Phase) -> Result<KernelSpec> {
    Ok(match op {
        Op::Embedding { weight, .. } => KernelSpec::Embedding {
            m: matrix(plan, *weight)?,
        },
        Op::RmsNorm { input, weight, .. } => KernelSpec::RmsNorm {
            cols: cols(plan, *input)?,
            weight: vector(plan, *weight)?,
        },
        Op::LayerNorm {
            input,
            weight,
            bias,
            ..
        } => KernelSpec::LayerNorm {
            cols: cols(plan, *input)?,
            weight: vector(plan, *weight)?,
            bias: vector(plan, *bias)?,
        },
        Op::Matmul {
            weight,
            bias,
            fusion,
            ..
        } => {
            let m = matrix(plan, *weight)?;
            if fusion.silu_gate && fusion.activation.is_some() {
                bail!("a matmul with both a silu gate and an activation");
            }
            if fusion.silu_gate && m.n % 2 != 0 {
                bail!(
                    "a silu-gated matmul needs an even number of rows, not {}",
                    m.n
                );
            }
            KernelSpec::Matmul {
                m,
                bias: bias.map(|b| vector(plan, b)).transpose()?,
                phase,
                logits: false,
                fusion: Fusion {
                    rms_norm: fusion
                        .rms_norm
                        .map(|n| vector(plan, n.weight))
                        .transpose()?,
                    activation: fusion.activation.map(|a| match a {
                        Activation::Gelu => Unary::Gelu,
                        Activation::ReluSquare => Unary::ReluSquare,
                        Activation::Sigmoid => Unary::Sigmoid,
                    }),
                    silu_gate: fusion.silu_gate,
                    residual: fusion.residual.is_some(),
                },
            }
        }
        Op::Logits { weight, .. } => KernelSpec::Matmul {
            m: matrix(plan, *weight)?,
            bias: None,
            phase,
            logits: true,
            fusion: Fusion::default(),
        },
        &Op::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary_dim,
            ..
        } => {
            check_rotary_dim(rotary_dim, head_dim)?;
            KernelSpec::Rotary {
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
            }
        }
        &Op::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            rotary,
            ..
        } => {
            if n_kv_heads == 0 || head_dim == 0 || n_q_heads % n_kv_heads != 0 {
                bail!("attention with {n_q_heads} query heads, {n_kv_heads} kv heads, head_dim {head_dim}");
            }
            let rotary_dim = rotary.map(|r| r.rotary_dim);
            if let Some(rd) = rotary_dim {
                check_rotary_dim(rd, head_dim)?;
            }
            KernelSpec::Attention {
                n_q_heads,
                n_kv_heads,
                head_dim,
                rotary_dim,
            }
        }
        Op::SiluMul { out, .. } => KernelSpec::SiluMul {
            cols: cols(plan, *out)?,
        },
        Op::Gelu { buf } => unary(Unary::Gelu, cols(plan, *buf)?),
        Op::ReluSquare { buf } => unary(Unary::ReluSquare, cols(plan, *buf)?),
        Op::Sigmoid { buf } => unary(Unary::Sigmoid, cols(plan, *buf)?),
        Op::Scale { buf, .. } => unary(Unary::Scale, cols(plan, *buf)?),
        Op::Add { out, .. } => KernelSpec::Binary {
            op: Binary::Add,
            cols: cols(plan, *out)?,
        },
        Op::Mul { out, .. } => KernelSpec::Binary {
            op: Binary::Mul,
            cols: cols(plan, *out)?,
        },
        Op::RwkvTokenShift { input, mixes, .. } => KernelSpec::TokenShift {
            hidden: cols(plan, *input)?,
            mixes: mixes
                .iter()
                .map(|m| vector(plan, *m))
                .collect::<Result<_>>()?,
        },
        Op::RwkvWkv {
            out,
            time_decay,
            time_first,
            ..
        } => KernelSpec::Wkv {
            hidden: cols(plan, *out)?,
            time_decay: vector(plan, *time_decay)?,
            time_first: vector(plan, *time_first)?,
        },
    })
}

fn check_rotary_dim(rotary_dim: usize, head_dim: usize) -> Result<()> {
    if rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
        bail!("rotary_dim {rotary_dim} must be even, positive and at most head_dim {head_dim}");
    }
    Ok(())
}

fn unary(op: Unary, cols: usize) -> KernelSpec {
    KernelSpec::Unary { op, cols }
}

/// The op name of a signature (`prefill:matmul[…]` → `matmul`).
pub fn op_name(signature: &str) -> &str {
    let s = signature
        .split_once(':')
        .map(|(_, s)| s)
        .unwrap_or(signature);
    s.split('[').next().unwrap_or(s)
}

/// Every distinct kernel of a plan: phase-prefixed signature (as `plan_signatures` spells it) →
/// spec. Fails when two ops share a signature but not a spec.
pub fn specs_by_signature(plan: &Plan) -> Result<BTreeMap<String, KernelSpec>> {
    let mut out: BTreeMap<String, KernelSpec> = BTreeMap::new();
    for (phase, ops, prefix) in [
        (Phase::Prefill, &plan.prefill, "prefill"),
        (Phase::Decode, &plan.decode, "decode"),
    ] {
        for op in ops {
            let sig = format!("{prefix}:{}", op_signature(plan, op));
            let spec =
                op_spec(plan, op, phase).map_err(|e| anyhow::anyhow!("kernel {sig}: {e}"))?;
            match out.get(&sig) {
                Some(prev) if *prev != spec => bail!(
                    "kernel {sig}: two ops share this signature but need different kernels ({prev:?} vs {spec:?}); the signature must name what differs"
                ),
                Some(_) => {}
                None => {
                    out.insert(sig, spec);
                }
            }
        }
    }
    Ok(out)
}

/// Every distinct kernel of a plan with its tuning configuration: `records` is the tune stage's
/// signature → record map, `parse` reads one record (the kernel language's tuning type). A missing
/// or unreadable record is a user error naming the signature (pinned tuning files are user input).
pub fn specs_with_tuning<T>(
    plan: &Plan,
    records: &BTreeMap<String, serde_json::Value>,
    parse: impl Fn(&serde_json::Value) -> std::result::Result<T, String>,
) -> Result<Vec<(String, KernelSpec, T)>> {
    let specs = specs_by_signature(plan)?;
    let mut out = Vec::with_capacity(specs.len());
    for (sig, spec) in specs {
        let rec = records.get(&sig).ok_or_else(|| {
            crate::error::user(format!(
                "the tuning records have no entry for kernel {sig}; rebuild without the pinned tuning file or add the signature to it"
            ))
        })?;
        let tuning = parse(rec)
            .map_err(|e| crate::error::user(format!("tuning record for kernel {sig}: {e}")))?;
        out.push((sig, spec, tuning));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_come_from_signatures() {
        assert_eq!(op_name("prefill:matmul[q4f16_1:NK:64x64]"), "matmul");
        assert_eq!(op_name("decode:rms_norm[64]"), "rms_norm");
        assert_eq!(op_name("gelu[8]"), "gelu");
    }
}
