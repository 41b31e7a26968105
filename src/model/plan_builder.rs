//! Shared scaffolding for `lower`: weight declarations derived from the params, named buffers,
//! states and the op list, assembled into a [`Plan`].

use super::{record_names, ModelConfig, ParamSpec};
use crate::error::user;
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{
    BufId, BufferDecl, Op, Plan, StateDecl, StateId, WeightDecl, WeightId, WeightStorage,
    PLAN_FORMAT_BASE,
};
use crate::quant::scheme::{QuantScheme, TensorRole};
use anyhow::Result;

/// Larger KV-cache capacities are refused as surely a typo (a million tokens).
pub(crate) const MAX_SEQ_LEN_LIMIT: usize = 1 << 20;

pub(crate) struct PlanBuilder {
    weights: Vec<WeightDecl>,
    buffers: Vec<BufferDecl>,
    states: Vec<StateDecl>,
    ops: Vec<Op>,
}

impl PlanBuilder {
    /// One weight declaration per param, in param order, stored as `scheme` says for its role.
    pub fn new(params: &[ParamSpec], scheme: &QuantScheme) -> Self {
        let weights = params
            .iter()
            .map(|p| {
                let storage = match scheme.layout_for(p.role) {
                    Some(layout) => WeightStorage::Quantized {
                        scheme: scheme.name.to_string(),
                        layout,
                    },
                    None if p.role == TensorRole::RawF32 => {
                        WeightStorage::Raw { dtype: DType::F32 }
                    }
                    None => WeightStorage::Raw {
                        dtype: scheme.model_dtype,
                    },
                };
                WeightDecl {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    storage,
                    records: record_names(&p.name, p.role, scheme),
                }
            })
            .collect();
        PlanBuilder {
            weights,
            buffers: Vec::new(),
            states: Vec::new(),
            ops: Vec::new(),
        }
    }

    /// The id of a declared weight; a name `params` does not produce is a bug in the lowering.
    pub fn w(&self, name: &str) -> Result<WeightId> {
        self.weights
            .iter()
            .position(|w| w.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!("lowering refers to weight {name}, which no param declares")
            })
    }

    pub fn buf(&mut self, name: &str, cols: usize) -> BufId {
        self.buffers.push(BufferDecl {
            name: name.to_string(),
            cols,
        });
        self.buffers.len() - 1
    }

    pub fn state(&mut self, decl: StateDecl) -> StateId {
        self.states.push(decl);
        self.states.len() - 1
    }

    pub fn op(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// `out` = the rows of embedding weight `name` for the input tokens (every model's first
    /// op); returns the weight (tied output heads reuse it).
    pub fn embedding(&mut self, name: &str, out: BufId) -> Result<WeightId> {
        let weight = self.w(name)?;
        self.op(Op::Embedding { weight, out });
        Ok(weight)
    }

    /// `out = LayerNorm(input)` with the weights `{prefix}.weight` and `{prefix}.bias`.
    pub fn layer_norm(&mut self, prefix: &str, input: BufId, eps: f32, out: BufId) -> Result<()> {
        let weight = self.w(&format!("{prefix}.weight"))?;
        let bias = self.w(&format!("{prefix}.bias"))?;
        self.op(Op::LayerNorm {
            input,
            weight,
            bias,
            eps,
            out,
        });
        Ok(())
    }

    /// The final `Logits` op: through the output head `head`, or the embedding when tied.
    pub fn logits(
        &mut self,
        input: BufId,
        tied_embedding: Option<WeightId>,
        head: &str,
    ) -> Result<()> {
        let weight = match tied_embedding {
            Some(embed) => embed,
            None => self.w(head)?,
        };
        self.op(Op::Logits { input, weight });
        Ok(())
    }

    /// The plan. Decode runs the same ops as prefill (every op handles any `T`).
    pub fn finish(
        self,
        config: &ModelConfig,
        scheme: &QuantScheme,
        max_seq_len: usize,
        stop_tokens: Vec<u32>,
        logits: BufId,
    ) -> Plan {
        Plan {
            format_version: PLAN_FORMAT_BASE,
            arch: config.arch.clone(),
            quantization: scheme.name.to_string(),
            model_dtype: scheme.model_dtype,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            max_seq_len,
            stop_tokens,
            weights: self.weights,
            buffers: self.buffers,
            states: self.states,
            decode: self.ops.clone(),
            prefill: self.ops,
            logits,
        }
    }
}

/// Refuses a KV-cache capacity of 0 or beyond [`MAX_SEQ_LEN_LIMIT`].
pub(crate) fn check_max_seq_len(max_seq_len: usize, config: &ModelConfig) -> Result<()> {
    if max_seq_len == 0 || max_seq_len > MAX_SEQ_LEN_LIMIT {
        return Err(user(format!(
            "max_seq_len {max_seq_len} is out of range for {}: give a value between 1 and {MAX_SEQ_LEN_LIMIT} \
             (the model was trained for {} tokens)",
            config.arch, config.context_length
        )));
    }
    Ok(())
}

/// Reads the architecture-specific part of a [`ModelConfig`] back into its typed form.
pub(crate) fn arch_params<T: serde::de::DeserializeOwned>(
    config: &ModelConfig,
    arch: &str,
) -> Result<T> {
    if config.arch != arch {
        anyhow::bail!(
            "a {} config was given to the {arch} architecture",
            config.arch
        );
    }
    serde_json::from_value(config.arch_params.clone())
        .map_err(|e| anyhow::anyhow!("{arch} config parameters are malformed: {e}"))
}
