//! Cache keys are code with a version: every stage lists its inputs explicitly (input digests,
//! parameters, tool and kernel versions, its own key version), and the key is the blake3 of that
//! list. The list itself is kept in the stage record, so `mlcb explain` can say which input
//! changed.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The named inputs of one stage run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub stage: String,
    pub version: u32,
    pub inputs: BTreeMap<String, String>,
}

impl KeyInputs {
    pub fn new(stage: &str, version: u32) -> KeyInputs {
        KeyInputs {
            stage: stage.to_string(),
            version,
            inputs: BTreeMap::new(),
        }
    }

    pub fn with(mut self, name: &str, value: impl ToString) -> KeyInputs {
        self.inputs.insert(name.to_string(), value.to_string());
        self
    }

    pub fn add(&mut self, name: &str, value: impl ToString) {
        self.inputs.insert(name.to_string(), value.to_string());
    }

    /// The key: blake3 over the canonical (sorted) JSON of stage, version and inputs.
    pub fn key(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("key inputs serialise");
        blake3::hash(&canonical).to_hex().to_string()
    }

    /// Names of inputs that differ from `old` (added, removed or changed), plus "version".
    pub fn changes_from(&self, old: &KeyInputs) -> Vec<String> {
        let mut out = Vec::new();
        if self.version != old.version {
            out.push(format!("key version {} → {}", old.version, self.version));
        }
        for (k, v) in &self.inputs {
            match old.inputs.get(k) {
                None => out.push(format!("{k} (new input)")),
                Some(o) if o != v => out.push(format!("{k}: {} → {}", short(o), short(v))),
                _ => {}
            }
        }
        for k in old.inputs.keys() {
            if !self.inputs.contains_key(k) {
                out.push(format!("{k} (input removed)"));
            }
        }
        out
    }
}

fn short(v: &str) -> String {
    if v.len() > 48 {
        format!(
            "{}…",
            &v[..v.char_indices().nth(16).map(|(i, _)| i).unwrap_or(v.len())]
        )
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input_and_version() {
        let a = KeyInputs::new("quantize", 1)
            .with("weights", "abc")
            .with("scheme", "q4f16_1");
        let b = KeyInputs::new("quantize", 1)
            .with("scheme", "q4f16_1")
            .with("weights", "abc");
        assert_eq!(a.key(), b.key(), "order of insertion must not matter");
        assert_ne!(a.key(), a.clone().with("scheme", "q4f16_0").key());
        assert_ne!(
            a.key(),
            KeyInputs {
                version: 2,
                ..a.clone()
            }
            .key()
        );
        assert_ne!(
            a.key(),
            KeyInputs {
                stage: "tune".into(),
                ..a.clone()
            }
            .key()
        );
    }

    #[test]
    fn changes_are_named() {
        let a = KeyInputs::new("link", 1).with("chat", "x").with("lib", "1");
        let b = KeyInputs::new("link", 1)
            .with("chat", "y")
            .with("lib", "1")
            .with("new", "z");
        let c = b.changes_from(&a);
        assert_eq!(
            c,
            vec!["chat: x → y".to_string(), "new (new input)".to_string()]
        );
    }
}
