//! CUDA C accessors for matrix weights as stored in the artifact, mirroring
//! `runtime::cpu::kernels::matrix` (word and scale indexing per layout, decoding per codec):
//!
//! - `w_at(n, k) -> float`: element `[n, k]` of the logical `[N, K]` matrix, decoded in f32.
//! - records in row blocks ([`super::row_blocks`]) are addressed through `row_block_unit`.
//! - quantized only: `w_word(n, w)` (storage word `w` along K of row `n`; its index in the
//!   record: `w_word_index(n, w)`, as `w_scale_index(n, g)` is a scale's), `w_scale(n, g)` and
//!   `w_min(n, g)` (group parameters; min is 0 for sym), `w_decode(q, s, mn)` (`(q - maxq)·s` or
//!   `q·s + min`), plus the constants `W_BITS W_MASK W_GROUP W_PER_WORD W_WPG W_NG W_WPR`, and
//!   `W_SYM` / `W_MAXQ` for the group-sum form `s·(Σq·x − maxq·Σx)` (sym) or `s·Σq·x + min·Σx`.

use super::builder::{float_read, CudaBuilder, Elem};
use super::row_blocks::{row_blocks, ROW_BLOCK_UNIT};
use crate::codegen::wgsl::spec::{Codec, MatrixSpec, MatrixStorage};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// Where row `n` of a row-major (NK) matrix's data starts: the record pointer and the bytes per
/// row (`n · bytes` from the pointer); `None` for K-major storage, whose rows are columns.
pub fn nk_rows(m: &MatrixSpec) -> Option<(&'static str, usize)> {
    match m.storage {
        MatrixStorage::Raw(dtype) => Some(("w_raw", m.k * dtype.size())),
        MatrixStorage::Quant(q) if q.layout == Layout::NK => {
            Some(("w_q", q.words_per_row * if q.word16 { 2 } else { 4 }))
        }
        MatrixStorage::Quant(_) => None,
    }
}

/// Declare the weight's records (argument order: record 0, record 1) and its accessors.
pub fn declare_matrix(b: &mut CudaBuilder, op_field: &str, m: &MatrixSpec) {
    b.const_u32("W_N", m.n);
    b.const_u32("W_K", m.k);
    match m.storage {
        MatrixStorage::Raw(dtype) => {
            let elem = Elem::float(dtype);
            b.weight(op_field, 0, elem, "w_raw");
            b.lambda(&format!(
                "auto w_at = [&](unsigned n, unsigned k) -> float {{ return {}; }};",
                float_read("w_raw", elem, "(u64)n * W_K + k")
            ));
        }
        MatrixStorage::Quant(q) => {
            b.const_u32("W_BITS", q.bits as usize);
            b.const_u32("W_MASK", ((1u64 << q.bits) - 1) as usize);
            b.const_u32("W_GROUP", q.group);
            b.const_u32("W_PER_WORD", q.per_word);
            b.const_u32("W_WPG", q.words_per_group);
            b.const_u32("W_NG", q.n_group);
            b.const_u32("W_WPR", q.words_per_row);
            let words = if q.word16 { Elem::U16 } else { Elem::U32 };
            let blocks = row_blocks(m);
            match blocks {
                Some((codes, _)) => b.weight_in_row_blocks(op_field, 0, words, "w_q", codes),
                None => b.weight(op_field, 0, words, "w_q"),
            }
            let (word_index, scale_index) = match (q.layout, blocks) {
                // Word w of row n: word w % 4 of 16-byte unit (w / 4) % U of group w / 4U.
                (_, Some(_)) => {
                    b.lambda(ROW_BLOCK_UNIT);
                    (
                        "row_block_unit(n, w / W_WPG, (w / 4u) % (W_WPG / 4u), W_NG, W_WPG / 4u) * 4u + (w & 3u)",
                        "row_block_unit(n, g, 0u, W_NG, 1u)",
                    )
                }
                (Layout::NK, None) => ("(u64)n * W_WPR + w", "(u64)n * W_NG + g"),
                (Layout::KN, None) => ("(u64)w * W_N + n", "(u64)g * W_N + n"),
            };
            b.lambda(&format!(
                "auto w_word_index = [&](unsigned n, unsigned w) -> u64 {{ return {word_index}; }};"
            ));
            b.lambda(&format!(
                "auto w_scale_index = [&](unsigned n, unsigned g) -> u64 {{ return {scale_index}; }};"
            ));
            b.lambda("auto w_word = [&](unsigned n, unsigned w) -> unsigned { return (unsigned)w_q[w_word_index(n, w)]; };");
            match q.codec {
                Codec::Sym { maxq, scale } => {
                    let elem = Elem::float(scale);
                    match blocks {
                        Some((_, scales)) => {
                            b.weight_in_row_blocks(op_field, 1, elem, "w_s", scales)
                        }
                        None => b.weight(op_field, 1, elem, "w_s"),
                    }
                    b.const_bool("W_SYM", true);
                    b.const_f32("W_MAXQ", maxq as f32);
                    b.lambda(&format!(
                        "auto w_scale = [&](unsigned n, unsigned g) -> float {{ return {}; }};",
                        float_read("w_s", elem, "w_scale_index(n, g)")
                    ));
                    b.lambda("auto w_min = [&](unsigned, unsigned) -> float { return 0.0f; };");
                    b.lambda("auto w_decode = [&](unsigned q, float s, float) -> float { return ((float)q - W_MAXQ) * s; };");
                }
                Codec::AsymBf16x2 => {
                    b.weight(op_field, 1, Elem::U32, "w_s");
                    b.const_bool("W_SYM", false);
                    b.const_f32("W_MAXQ", 0.0);
                    b.lambda(
                        "auto w_scale = [&](unsigned n, unsigned g) -> float { return __uint_as_float(w_s[w_scale_index(n, g)] << 16); };",
                    );
                    b.lambda(
                        "auto w_min = [&](unsigned n, unsigned g) -> float { return __uint_as_float(w_s[w_scale_index(n, g)] & 0xFFFF0000u); };",
                    );
                    b.lambda("auto w_decode = [&](unsigned q, float s, float mn) -> float { return (float)q * s + mn; };");
                }
            }
            b.lambda(
                "auto w_at = [&](unsigned n, unsigned k) -> float {
        const unsigned g = k / W_GROUP, r = k % W_GROUP;
        const unsigned word = w_word(n, g * W_WPG + r / W_PER_WORD);
        const unsigned q = (word >> ((r % W_PER_WORD) * W_BITS)) & W_MASK;
        return w_decode(q, w_scale(n, g), w_min(n, g));
    };",
            );
        }
    }
}

/// `w_round(v)`: a decoded value rounded the way the artifact defines it (the CPU's
/// `gather_row`): sym codes with f16 scales round to f16, bf16 scales to bf16, else exact.
pub fn declare_round(b: &mut CudaBuilder, m: &MatrixSpec) {
    let body = match m.storage {
        MatrixStorage::Quant(q) => match q.codec {
            Codec::Sym {
                scale: DType::F16, ..
            } => "f16_round(v)",
            Codec::Sym {
                scale: DType::BF16, ..
            } => "bf16_round(v)",
            _ => "v",
        },
        MatrixStorage::Raw(_) => "v",
    };
    b.lambda(&format!(
        "auto w_round = [&](float v) -> float {{ return {body}; }};"
    ));
}

/// Declare a raw vector weight `name` (record 0 of `op_field`) with reader `{name}_at(i)`.
pub fn declare_vector(b: &mut CudaBuilder, op_field: &str, dtype: DType, name: &str) {
    let elem = Elem::float(dtype);
    b.weight(op_field, 0, elem, name);
    b.lambda(&format!(
        "auto {name}_at = [&](unsigned i) -> float {{ return {}; }};",
        float_read(name, elem, "i")
    ));
}
