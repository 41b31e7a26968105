//! The quantization scheme table: one entry per scheme, pinned to the 2023 MLC definitions
//! (`shared/reference/mlc-build-py.md` §2) with one deliberate change: every rounding is round half
//! to even, computed on the CPU exactly as IEEE defines it, so the bits never depend on the machine.
//!
//! A new scheme is one row in [`SCHEMES`] plus, if its encoding is new, its code in this module.

use crate::formats::dtype::DType;
use serde::{Deserialize, Serialize};

/// Where the quantized data and scales of a `[N out, K in]` matrix go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// Transposed (`_0` schemes): data `[words_along_K, N]`, scale `[n_group, N]`.
    KN,
    /// Row-major (`_1` schemes): data `[N, words_along_K]`, scale `[N, n_group]`.
    NK,
}

/// How the weights of a scheme are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// No quantization: weights stored in the model dtype.
    None,
    /// Symmetric group quantization: `s = max(absmax, 1e-4) / maxq`, `q = clamp(round(w/s + maxq), 0, 2*maxq)`,
    /// every step in the model dtype. Records: `NAME.q_weight` (storage words) + `NAME.q_scale` (model dtype).
    Sym {
        bits: u32,
        group: usize,
        storage: DType,
    },
    /// Asymmetric group quantization: `s = (max-min)/(2^bits-1)`, `q = clamp(round((w-min)/s), 0, 2^bits-1)`,
    /// in f32; scale and min stored as bf16×2 in one uint32 (low half scale, high half min).
    /// Records: `NAME.q_weight` + `NAME.q_scale_min`.
    AsymBf16x2 {
        bits: u32,
        group: usize,
        storage: DType,
    },
}

impl Encoding {
    /// Values packed in one storage word.
    pub fn per_word(&self) -> usize {
        match *self {
            Encoding::None => 1,
            Encoding::Sym { bits, storage, .. } | Encoding::AsymBf16x2 { bits, storage, .. } => {
                (storage.size() * 8) / bits as usize
            }
        }
    }
    pub fn group(&self) -> usize {
        match *self {
            Encoding::None => 0,
            Encoding::Sym { group, .. } | Encoding::AsymBf16x2 { group, .. } => group,
        }
    }
    pub fn bits(&self) -> u32 {
        match *self {
            Encoding::None => 0,
            Encoding::Sym { bits, .. } | Encoding::AsymBf16x2 { bits, .. } => bits,
        }
    }
    pub fn storage(&self) -> Option<DType> {
        match *self {
            Encoding::None => None,
            Encoding::Sym { storage, .. } | Encoding::AsymBf16x2 { storage, .. } => Some(storage),
        }
    }
    /// Groups along K for a row of length `k` (the last group may be ragged).
    pub fn n_groups(&self, k: usize) -> usize {
        k.div_ceil(self.group())
    }
    /// Storage words per group: `ceil(group / per_word)`.
    pub fn words_per_group(&self) -> usize {
        self.group().div_ceil(self.per_word())
    }
    /// Storage words along K for a row of length `k`.
    pub fn words_per_row(&self, k: usize) -> usize {
        self.words_per_group() * self.n_groups(k)
    }
}

/// A quantization scheme: the name users type plus how each kind of tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct QuantScheme {
    pub name: &'static str,
    /// The dtype every unquantized tensor and every scale is stored in.
    pub model_dtype: DType,
    pub encoding: Encoding,
    /// Layout of linear (matmul) weights.
    pub linear_layout: Layout,
    /// Layout of the token embedding (always NK: rows are looked up).
    pub embedding_layout: Layout,
    /// Layout of the output projection (`lm_head`).
    pub lm_head_layout: Layout,
}

const fn sym(bits: u32, group: usize, storage: DType) -> Encoding {
    Encoding::Sym {
        bits,
        group,
        storage,
    }
}

/// Every scheme mlcb knows. `_0` = KN for linear and lm_head, `_1` = NK; embeddings are NK.
pub const SCHEMES: &[QuantScheme] = &[
    QuantScheme {
        name: "q0f16",
        model_dtype: DType::F16,
        encoding: Encoding::None,
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
    QuantScheme {
        name: "q0f32",
        model_dtype: DType::F32,
        encoding: Encoding::None,
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
    QuantScheme {
        name: "q3f16_0",
        model_dtype: DType::F16,
        encoding: sym(3, 40, DType::U16),
        linear_layout: Layout::KN,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::KN,
    },
    QuantScheme {
        name: "q3f16_1",
        model_dtype: DType::F16,
        encoding: sym(3, 40, DType::U16),
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
    QuantScheme {
        name: "q4f16_0",
        model_dtype: DType::F16,
        encoding: sym(4, 32, DType::U32),
        linear_layout: Layout::KN,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::KN,
    },
    QuantScheme {
        name: "q4f16_1",
        model_dtype: DType::F16,
        encoding: sym(4, 32, DType::U32),
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
    QuantScheme {
        name: "q4f32_0",
        model_dtype: DType::F32,
        encoding: Encoding::AsymBf16x2 {
            bits: 4,
            group: 32,
            storage: DType::U32,
        },
        linear_layout: Layout::KN,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::KN,
    },
    QuantScheme {
        name: "q4f32_1",
        model_dtype: DType::F32,
        encoding: Encoding::AsymBf16x2 {
            bits: 4,
            group: 32,
            storage: DType::U32,
        },
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
    QuantScheme {
        name: "q8f16_0",
        model_dtype: DType::F16,
        encoding: sym(8, 32, DType::U32),
        linear_layout: Layout::KN,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::KN,
    },
    QuantScheme {
        name: "q8f16_1",
        model_dtype: DType::F16,
        encoding: sym(8, 32, DType::U32),
        linear_layout: Layout::NK,
        embedding_layout: Layout::NK,
        lm_head_layout: Layout::NK,
    },
];

/// Look a scheme up by name.
pub fn scheme(name: &str) -> Option<&'static QuantScheme> {
    SCHEMES.iter().find(|s| s.name == name)
}

/// The names, for error messages.
pub fn scheme_names() -> Vec<&'static str> {
    SCHEMES.iter().map(|s| s.name).collect()
}

/// What role a tensor plays, which decides how a scheme stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorRole {
    /// A 2-D matmul weight `[N out, K in]`.
    Linear,
    /// The token embedding `[V, H]`.
    Embedding,
    /// The output projection `[V, H]`.
    LmHead,
    /// Anything else: norms, biases, RWKV `time_*`: stored unquantized in the model dtype.
    Raw,
    /// Stored unquantized in f32 whatever the scheme (e.g. RWKV `time_decay`, `time_first`).
    RawF32,
}

impl QuantScheme {
    /// The layout for a role, or None when the role is stored unquantized.
    pub fn layout_for(&self, role: TensorRole) -> Option<Layout> {
        if self.encoding == Encoding::None {
            return None;
        }
        match role {
            TensorRole::Linear => Some(self.linear_layout),
            TensorRole::Embedding => Some(self.embedding_layout),
            TensorRole::LmHead => Some(self.lm_head_layout),
            TensorRole::Raw | TensorRole::RawF32 => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_complete_and_unique() {
        let names = scheme_names();
        for n in [
            "q0f16", "q0f32", "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q4f32_0", "q4f32_1",
            "q8f16_0", "q8f16_1",
        ] {
            assert!(names.contains(&n), "{n} missing");
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }

    #[test]
    fn word_geometry() {
        let q3 = scheme("q3f16_0").unwrap().encoding;
        assert_eq!(q3.per_word(), 5);
        assert_eq!(q3.words_per_group(), 8);
        assert_eq!(q3.n_groups(704), 18);
        let q4 = scheme("q4f16_1").unwrap().encoding;
        assert_eq!(q4.per_word(), 8);
        assert_eq!(q4.words_per_group(), 4);
        let q8 = scheme("q8f16_1").unwrap().encoding;
        assert_eq!(q8.per_word(), 4);
        assert_eq!(q8.words_per_row(64), 16);
    }
}
