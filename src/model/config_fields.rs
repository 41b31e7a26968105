//! Reading fields of a Hugging Face `config.json`, with user errors that name the field and the
//! file's `model_type`. Shared by every architecture's `config.rs`.

use crate::error::user;
use anyhow::Result;
use serde_json::Value;

/// Dimensions above this are refused: no real model comes near, and a hostile value must not make
/// later size products overflow or allocate without bound.
const MAX_DIM: u64 = 1 << 24;

/// A `config.json` being read for one architecture.
pub(crate) struct ConfigFields<'a> {
    json: &'a serde_json::Map<String, Value>,
    model_type: String,
}

impl<'a> ConfigFields<'a> {
    /// Checks that `config` is an object whose `model_type` is one of `accepted`.
    pub fn new(config: &'a Value, accepted: &[&str]) -> Result<Self> {
        let json = config
            .as_object()
            .ok_or_else(|| user("config.json is not a JSON object"))?;
        let model_type = match json.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(user(format!(
                    "config.json: field `model_type` is missing or not a string (expected one of {accepted:?})"
                )))
            }
        };
        if !accepted.contains(&model_type.as_str()) {
            return Err(user(format!(
                "config.json: model_type \"{model_type}\" is not one of {accepted:?}"
            )));
        }
        Ok(ConfigFields { json, model_type })
    }

    /// A user error about `field`.
    pub fn error(&self, field: &str, what: impl std::fmt::Display) -> anyhow::Error {
        user(format!(
            "config.json (model_type \"{}\"): field `{field}` {what}",
            self.model_type
        ))
    }

    /// The value at a dotted path (`rope_parameters.rope_theta`); JSON null counts as absent.
    pub fn get(&self, path: &str) -> Option<&'a Value> {
        let mut parts = path.split('.');
        let mut cur = self.json.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_object()?.get(p)?;
        }
        (!cur.is_null()).then_some(cur)
    }

    /// A required dimension: an integer in `1..=2^24`.
    pub fn dim(&self, field: &str) -> Result<usize> {
        self.opt_dim(field)?
            .ok_or_else(|| self.error(field, "is missing"))
    }

    /// An optional dimension (absent or null → None).
    pub fn opt_dim(&self, field: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (1..=MAX_DIM).contains(&n) => Ok(Some(n as usize)),
            _ => Err(self.error(
                field,
                format!("must be an integer between 1 and {MAX_DIM}, found {v}"),
            )),
        }
    }

    /// An optional non-negative integer (absent or null → None).
    pub fn opt_count(&self, field: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if n <= MAX_DIM => Ok(Some(n as usize)),
            _ => Err(self.error(
                field,
                format!("must be an integer between 0 and {MAX_DIM}, found {v}"),
            )),
        }
    }

    /// An optional finite number (absent or null → None).
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(self.error(field, format!("must be a number, found {v}"))),
        }
    }

    /// An optional positive finite number.
    pub fn opt_positive(&self, field: &str) -> Result<Option<f64>> {
        match self.opt_f64(field)? {
            Some(x) if x <= 0.0 => Err(self.error(field, format!("must be positive, found {x}"))),
            other => Ok(other),
        }
    }

    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        v.as_bool()
            .map(Some)
            .ok_or_else(|| self.error(field, format!("must be true or false, found {v}")))
    }

    pub fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        v.as_str()
            .map(Some)
            .ok_or_else(|| self.error(field, format!("must be a string, found {v}")))
    }

    /// A token id field that may be an integer, a list of integers, or absent/null.
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| -> Result<u32> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.error(field, format!("must hold token ids, found {v}")))
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// The weights' dtype as the file names it (`torch_dtype` in seed-era files, `dtype` newer).
    pub fn dtype(&self) -> Result<Option<String>> {
        match self.opt_str("dtype")? {
            Some(s) => Ok(Some(s.to_string())),
            None => Ok(self.opt_str("torch_dtype")?.map(str::to_string)),
        }
    }

    /// Refuses a RoPE scaling other than the default (`rope_scaling` seed era, or
    /// `rope_parameters.rope_type` newer): the plan's rotary op has no scaling.
    pub fn require_default_rope(&self) -> Result<()> {
        for field in [
            "rope_scaling.rope_type",
            "rope_scaling.type",
            "rope_parameters.rope_type",
        ] {
            if let Some(kind) = self.opt_str(field)? {
                if kind != "default" {
                    return Err(self.error(
                        field,
                        format!("is \"{kind}\": RoPE scaling is not supported (only \"default\")"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A vocabulary size and bos/eos ids read the same way by every architecture.
    pub fn common(&self) -> Result<CommonFields> {
        let vocab_size = self.dim("vocab_size")?;
        let bos = self.token_ids("bos_token_id")?;
        if bos.len() > 1 {
            return Err(self.error("bos_token_id", "must be a single token id"));
        }
        let eos = self.token_ids("eos_token_id")?;
        Ok(CommonFields {
            vocab_size,
            bos_token_id: bos.first().copied(),
            eos_token_ids: eos,
            dtype: self.dtype()?,
        })
    }
}

pub(crate) struct CommonFields {
    pub vocab_size: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub dtype: Option<String>,
}
