//! ggml tensor element types: id, name, and block layout (elements per block, bytes per block).
//! The layouts are needed to check every tensor's extent against the file, including types mlcb
//! cannot dequantize.

use std::fmt;

/// A ggml type id as stored in a GGUF tensor info.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block). Ids 4, 5 and 31..=33 were removed from ggml.
const TABLE: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        TABLE.iter().find(|e| e.0 == self.0)
    }

    /// The ggml name (`Q4_1`), or None for an id this table does not know.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// (elements per block, bytes per block), or None for an unknown id.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        self.entry().map(|e| (e.2, e.3))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown ggml type {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_block_structs() {
        // Q4_1: f16 d, f16 m, 16 bytes of nibbles.
        assert_eq!(GgmlType::Q4_1.block_layout(), Some((32, 2 + 2 + 16)));
        // Q8_0: f16 d, 32 int8.
        assert_eq!(GgmlType::Q8_0.block_layout(), Some((32, 2 + 32)));
        // Q6_K: ql[128], qh[64], scales[16], f16 d.
        assert_eq!(
            GgmlType::Q6_K.block_layout(),
            Some((256, 128 + 64 + 16 + 2))
        );
        // Q4_K: f16 d, f16 dmin, scales[12], qs[128].
        assert_eq!(GgmlType::Q4_K.block_layout(), Some((256, 4 + 12 + 128)));
        assert_eq!(GgmlType(4).name(), None);
        assert_eq!(GgmlType(4).to_string(), "unknown ggml type 4");
        assert_eq!(GgmlType::BF16.to_string(), "BF16");
    }
}
