//! The execution plan: the contract between `mlcb build` and every runtime backend.
//!
//! The build side lowers a model (llama, gpt_neox, rwkv, …) into this data; a backend executes it
//! without knowing which architecture it came from. Conventions every op relies on:
//!
//! - **Activations** are f32 matrices `[T, cols]`, row-major, where `T` is the number of tokens in
//!   the current call (prompt length for prefill, 1 for decode). A [`BufferDecl`] gives `cols`.
//! - **Positions**: a call processes tokens at absolute positions `pos .. pos+T`, where `pos` is the
//!   number of tokens the session has already processed (the runtime tracks it; reset sets it to 0).
//! - **Weights** are bound by [`WeightDecl::records`] to records of `params/ndarray-cache.json`.
//!   A matrix weight has logical shape `[N out, K in]` (Hugging Face `nn.Linear` orientation),
//!   whatever its storage layout. `y = x · Wᵀ (+ b)`.
//! - **State** persists across calls of one session: the KV cache, or RWKV's recurrent vectors.
//! - Ops may name the same buffer as input and output only where the op says so.

use crate::formats::dtype::DType;
use serde::{Deserialize, Serialize};

/// Bumped whenever a change would make an older runtime misread a plan: the newest version this
/// mlcb writes and reads. 2: fused steps ([`MatmulFusion`], [`Op::Attention`]'s `rotary`).
pub const PLAN_FORMAT_VERSION: u32 = 2;

/// The oldest version this mlcb reads, and the version of every plan without fused steps: such a
/// plan is written as version 1 so that a runtime from before fusion still runs it (and libraries
/// of targets that do not fuse stay byte for byte what they were).
pub const PLAN_FORMAT_BASE: u32 = 1;

pub type BufId = usize;
pub type WeightId = usize;
pub type StateId = usize;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    /// For humans and reports only: a backend must not branch on it.
    pub arch: String,
    /// The quantization scheme name (a row of `quant::SCHEMES`).
    pub quantization: String,
    /// The dtype of unquantized weights and scales (float16 or float32).
    pub model_dtype: DType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Capacity of the KV cache in tokens (`S`); a session cannot go beyond it.
    pub max_seq_len: usize,
    /// Token ids that end generation.
    pub stop_tokens: Vec<u32>,
    pub weights: Vec<WeightDecl>,
    pub buffers: Vec<BufferDecl>,
    pub states: Vec<StateDecl>,
    /// Processes `T ≥ 1` tokens. Ends with [`Op::Logits`] writing into [`Plan::logits`].
    pub prefill: Vec<Op>,
    /// Processes exactly one token (`T = 1`). Same semantics as `prefill`; separate so GPU backends
    /// can specialise kernels for matrix-vector work.
    pub decode: Vec<Op>,
    /// The buffer [`Op::Logits`] writes: `[rows, vocab_size]`.
    pub logits: BufId,
}

/// A weight tensor, stored as one or more records in the parameter shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightDecl {
    /// Logical name, e.g. `model.layers.0.self_attn.qkv_proj.weight`.
    pub name: String,
    /// Logical shape: `[N, K]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    pub storage: WeightStorage,
    /// Record names in `ndarray-cache.json`, in the order [`WeightStorage`] documents.
    pub records: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WeightStorage {
    /// One record of `dtype` with the logical shape.
    Raw { dtype: DType },
    /// Quantized with a scheme of `quant::SCHEMES` (its encoding) in the given layout.
    /// Records: `[q_weight, q_scale]` (Sym) or `[q_weight, q_scale_min]` (AsymBf16x2).
    Quantized {
        scheme: String,
        layout: crate::quant::scheme::Layout,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferDecl {
    pub name: String,
    /// Columns; the buffer is `[T, cols]` f32 (or `[rows, vocab]` for logits). A backend may
    /// hold one its own kernels alone touch in a narrower type inside that space (the cuda
    /// target's f16 prefill activations).
    pub cols: usize,
}

/// Persistent per-session state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StateDecl {
    /// Keys and values of one attention layer for `max_seq_len` positions:
    /// K and V each `[max_seq_len, n_kv_heads, head_dim]`.
    KvCache {
        layer: usize,
        n_kv_heads: usize,
        head_dim: usize,
    },
    /// RWKV-4 per-layer state, five vectors of `hidden` f32: attention token-shift (last x),
    /// wkv numerator, wkv denominator, wkv running max (initialised to -1e38), FFN token-shift.
    /// Every vector except the max starts at 0.
    Rwkv { layer: usize, hidden: usize },
}

/// Which token-shift vector of an RWKV state an op uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShiftSlot {
    Attention,
    FeedForward,
}

/// One step. Ops read and write whole buffers `[T, cols]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// `out[t] = row tokens[t] of weight` (a `[vocab, hidden]` embedding, raw or quantized NK).
    Embedding { weight: WeightId, out: BufId },
    /// `out = x / sqrt(mean(x²) + eps) * weight` per row (Llama RMSNorm, computed in f32).
    RmsNorm {
        input: BufId,
        weight: WeightId,
        eps: f32,
        out: BufId,
    },
    /// `out = (x - mean) / sqrt(var + eps) * weight + bias` per row (biased variance).
    LayerNorm {
        input: BufId,
        weight: WeightId,
        bias: WeightId,
        eps: f32,
        out: BufId,
    },
    /// `out[T, N] = input[T, K] · weightᵀ + bias`, with the steps `fusion` adds around it. `out`
    /// must differ from `input`.
    Matmul {
        input: BufId,
        weight: WeightId,
        bias: Option<WeightId>,
        out: BufId,
        #[serde(default, skip_serializing_if = "MatmulFusion::is_none")]
        fusion: MatmulFusion,
    },
    /// Rotary position embedding, in place, on the q and k parts of a fused qkv buffer whose columns
    /// are `[q: n_q_heads*head_dim | k: n_kv_heads*head_dim | v: n_kv_heads*head_dim]`.
    /// Applies to the first `rotary_dim` dims of each head, "rotate half" style (as Hugging Face Llama
    /// and GPT-NeoX): with `h = rotary_dim/2`, `inv_freq[i] = theta^(-2i/rotary_dim)`,
    /// `a = position * inv_freq[i]` (f32), `x[i], x[i+h] ← x[i]cos a − x[i+h]sin a, x[i+h]cos a + x[i]sin a`.
    Rotary {
        qkv: BufId,
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rotary_dim: usize,
        theta: f32,
    },
    /// Appends this call's k and v (from the fused qkv buffer, layout as in [`Op::Rotary`]) to the KV
    /// cache `state` at positions `pos..pos+T`, then causal attention for each query row:
    /// `softmax(q·kᵀ / sqrt(head_dim)) · v` over cache positions `0..=pos+t`; query head `h` uses kv head
    /// `h / (n_q_heads / n_kv_heads)`. `out` is `[T, n_q_heads*head_dim]`.
    ///
    /// With `rotary`, the op first applies [`Op::Rotary`] (same fields, `n_q_heads`, `n_kv_heads`
    /// and `head_dim` as here) to this call's q and k as it reads them: the cache receives rotated
    /// keys, and `qkv` itself is left as it was.
    Attention {
        qkv: BufId,
        state: StateId,
        n_q_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        out: BufId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rotary: Option<FusedRotary>,
    },
    /// `out = silu(input[:, :I]) * input[:, I:]` with `I = out.cols` (input is `[gate | up]`).
    SiluMul { input: BufId, out: BufId },
    /// In place: `x = 0.5 x (1 + erf(x / sqrt 2))` (exact GELU).
    Gelu { buf: BufId },
    /// In place: `x = max(x, 0)²` (RWKV channel-mix key).
    ReluSquare { buf: BufId },
    /// In place: `x = 1 / (1 + exp(-x))`.
    Sigmoid { buf: BufId },
    /// Elementwise `out = a + b`; `out` may be `a` or `b`.
    Add { a: BufId, b: BufId, out: BufId },
    /// Elementwise `out = a * b`; `out` may be `a` or `b`.
    Mul { a: BufId, b: BufId, out: BufId },
    /// In place: `x *= factor`.
    Scale { buf: BufId, factor: f32 },
    /// RWKV token shift: with `prev[t] = input[t-1]` (row 0 takes the state's `slot` vector),
    /// `outs[i] = input * mixes[i] + prev * (1 - mixes[i])` for each mix vector `[hidden]`; afterwards
    /// the state's `slot` vector is set to the last row of `input`.
    RwkvTokenShift {
        input: BufId,
        state: StateId,
        slot: ShiftSlot,
        mixes: Vec<WeightId>,
        outs: Vec<BufId>,
    },
    /// RWKV-4 WKV recurrence over the rows of `k` and `v` (both `[T, hidden]`), updating the state's
    /// numerator, denominator and max exactly as Hugging Face `rwkv_linear_attention_cpu` does.
    /// `time_decay` holds `-exp(time_decay)` already; `time_first` as is; both f32 `[hidden]`.
    RwkvWkv {
        k: BufId,
        v: BufId,
        state: StateId,
        time_decay: WeightId,
        time_first: WeightId,
        out: BufId,
    },
    /// `logits[rows, vocab] = input[rows] · weightᵀ` where rows are all `T` rows when the caller asks
    /// for every position (evaluation), else only the last row.
    Logits { input: BufId, weight: WeightId },
}

/// The steps a fused [`Op::Matmul`] runs around its product, in this order: `x = input`, or
/// `rms_norm(input)` with `rms_norm`; `p = x · weightᵀ + bias`; `p = activation(p)`; `p =
/// silu(gate) * up` with `silu_gate` (not with an activation); `out = p`, or `p + residual` with
/// `residual`. The default (none) is a plain matmul.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MatmulFusion {
    /// The input is normalised first, as [`Op::RmsNorm`] with this weight and eps would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm: Option<FusedRmsNorm>,
    /// An elementwise activation of the product, as the op of that name would apply it in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// `p` has twice `out`'s columns, `[gate | up]`, and `out = silu(gate) * up` (as
    /// [`Op::SiluMul`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub silu_gate: bool,
    /// `out = p + residual` (as [`Op::Add`]); `residual` may be `out` itself (each element is read
    /// before it is written, by the same step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<BufId>,
}

impl MatmulFusion {
    pub fn is_none(&self) -> bool {
        *self == MatmulFusion::default()
    }
}

/// The in-place activation ops a matmul can apply to its product ([`MatmulFusion::activation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// As [`Op::Gelu`].
    Gelu,
    /// As [`Op::ReluSquare`].
    ReluSquare,
    /// As [`Op::Sigmoid`].
    Sigmoid,
}

impl Activation {
    /// The name of its op in signatures and renderings (`gelu`, `relu_square`, `sigmoid`).
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::ReluSquare => "relu_square",
            Activation::Sigmoid => "sigmoid",
        }
    }

    /// The activation an in-place op applies, if it is one of these.
    pub fn of(op: &Op) -> Option<(Activation, BufId)> {
        match *op {
            Op::Gelu { buf } => Some((Activation::Gelu, buf)),
            Op::ReluSquare { buf } => Some((Activation::ReluSquare, buf)),
            Op::Sigmoid { buf } => Some((Activation::Sigmoid, buf)),
            _ => None,
        }
    }
}

/// The RMS normalisation a fused [`Op::Matmul`] applies to its input (fields as in
/// [`Op::RmsNorm`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusedRmsNorm {
    pub weight: WeightId,
    pub eps: f32,
}

/// The rotary embedding a fused [`Op::Attention`] applies (fields as in [`Op::Rotary`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusedRotary {
    pub rotary_dim: usize,
    pub theta: f32,
}

impl Op {
    /// A plain matmul (no fusion).
    pub fn matmul(input: BufId, weight: WeightId, bias: Option<WeightId>, out: BufId) -> Op {
        Op::Matmul {
            input,
            weight,
            bias,
            out,
            fusion: MatmulFusion::default(),
        }
    }

    /// The buffers an op reads.
    pub fn reads(&self) -> Vec<BufId> {
        match self {
            Op::Embedding { .. } => vec![],
            Op::RmsNorm { input, .. } | Op::LayerNorm { input, .. } | Op::Logits { input, .. } => {
                vec![*input]
            }
            Op::Matmul { input, fusion, .. } => {
                std::iter::once(*input).chain(fusion.residual).collect()
            }
            Op::Rotary { qkv, .. } | Op::Attention { qkv, .. } => vec![*qkv],
            Op::SiluMul { input, .. } => vec![*input],
            Op::Gelu { buf }
            | Op::ReluSquare { buf }
            | Op::Sigmoid { buf }
            | Op::Scale { buf, .. } => {
                vec![*buf]
            }
            Op::Add { a, b, .. } | Op::Mul { a, b, .. } => vec![*a, *b],
            Op::RwkvTokenShift { input, .. } => vec![*input],
            Op::RwkvWkv { k, v, .. } => vec![*k, *v],
        }
    }

    /// The buffers an op writes.
    pub fn writes(&self) -> Vec<BufId> {
        match self {
            Op::Embedding { out, .. }
            | Op::RmsNorm { out, .. }
            | Op::LayerNorm { out, .. }
            | Op::Matmul { out, .. }
            | Op::Attention { out, .. }
            | Op::SiluMul { out, .. }
            | Op::Add { out, .. }
            | Op::Mul { out, .. }
            | Op::RwkvWkv { out, .. } => vec![*out],
            Op::Rotary { qkv, .. } => vec![*qkv],
            Op::Gelu { buf }
            | Op::ReluSquare { buf }
            | Op::Sigmoid { buf }
            | Op::Scale { buf, .. } => {
                vec![*buf]
            }
            Op::RwkvTokenShift { outs, .. } => outs.clone(),
            Op::Logits { .. } => vec![],
        }
    }
}

impl Plan {
    pub fn weight_id(&self, name: &str) -> Option<WeightId> {
        self.weights.iter().position(|w| w.name == name)
    }
}
