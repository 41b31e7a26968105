//! WGSL accessors for matrix weights as stored in the artifact, mirroring
//! `runtime::cpu::kernels::matrix` (word and scale indexing per layout, decoding per codec):
//!
//! - `w_at(n, k) -> f32`: element `[n, k]` of the logical `[N, K]` matrix, decoded in f32.
//! - quantized only: `w_word(n, w) -> u32` (storage word `w` along K of row `n`, 16-bit words
//!   zero-extended), `w_params(n, g) -> vec2<f32>` (scale, min of group `g`; min is 0 for sym) and
//!   `w_decode(q, p) -> f32` (`(q - maxq)·s` or `q·s + min`, as the CPU kernels compute it), plus
//!   the constants `W_BITS W_MASK W_GROUP W_PER_WORD W_WPG W_NG W_WPR`.
//!
//! 16-bit data (f16/bf16 values, uint16 words) are bound as `array<u32>` and split, so no kernel
//! needs `enable f16`.

use super::builder::{float_reader, Elem, KernelBuilder};
use super::spec::{Codec, MatrixSpec, MatrixStorage};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// Declare the weight's records (binding order: record 0, record 1) and its accessors.
pub fn declare_matrix(b: &mut KernelBuilder, op_field: &str, m: &MatrixSpec) {
    b.const_u32("W_N", m.n);
    b.const_u32("W_K", m.k);
    match m.storage {
        MatrixStorage::Raw(dtype) => {
            let elem = Elem::float(dtype);
            b.weight(
                op_field,
                0,
                elem,
                "w_raw",
                (m.n * m.k * dtype.size()) as u64,
            );
            b.helper(&float_reader("w_elem", "w_raw", elem));
            b.helper("fn w_at(n: u32, k: u32) -> f32 { return w_elem(n * W_K + k); }");
        }
        MatrixStorage::Quant(q) => {
            b.const_u32("W_BITS", q.bits as usize);
            b.const_u32("W_MASK", ((1u64 << q.bits) - 1) as usize);
            b.const_u32("W_GROUP", q.group);
            b.const_u32("W_PER_WORD", q.per_word);
            b.const_u32("W_WPG", q.words_per_group);
            b.const_u32("W_NG", q.n_group);
            b.const_u32("W_WPR", q.words_per_row);
            let words = if q.word16 { Elem::U16x2 } else { Elem::U32 };
            let word_bytes = if q.word16 { 2 } else { 4 };
            b.weight(
                op_field,
                0,
                words,
                "w_q",
                (m.n * q.words_per_row * word_bytes) as u64,
            );
            let word_index = match q.layout {
                Layout::NK => "n * W_WPR + w",
                Layout::KN => "w * W_N + n",
            };
            let scale_index = match q.layout {
                Layout::NK => "n * W_NG + g",
                Layout::KN => "g * W_N + n",
            };
            let load = if q.word16 {
                "(w_q_ld(i >> 1u) >> ((i & 1u) * 16u)) & 0xFFFFu"
            } else {
                "w_q_ld(i)"
            };
            b.helper(&format!(
                "fn w_word(n: u32, w: u32) -> u32 {{ let i = {word_index}; return {load}; }}"
            ));
            match q.codec {
                Codec::Sym { maxq, scale } => {
                    let elem = Elem::float(scale);
                    b.weight(
                        op_field,
                        1,
                        elem,
                        "w_s",
                        (m.n * q.n_group * scale.size()) as u64,
                    );
                    b.const_f32("W_MAXQ", maxq as f32);
                    b.helper(&float_reader("w_scale", "w_s", elem));
                    b.helper(&format!(
                        "fn w_params(n: u32, g: u32) -> vec2<f32> {{ return vec2<f32>(w_scale({scale_index}), 0.0); }}"
                    ));
                    b.helper("fn w_decode(q: u32, p: vec2<f32>) -> f32 { return (f32(q) - W_MAXQ) * p.x; }");
                }
                Codec::AsymBf16x2 => {
                    b.weight(op_field, 1, Elem::U32, "w_s", (m.n * q.n_group * 4) as u64);
                    b.helper(&format!(
                        "fn w_params(n: u32, g: u32) -> vec2<f32> {{ let v = w_s_ld({scale_index}); return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xFFFF0000u)); }}"
                    ));
                    b.helper(
                        "fn w_decode(q: u32, p: vec2<f32>) -> f32 { return f32(q) * p.x + p.y; }",
                    );
                }
            }
            b.helper(
                "fn w_at(n: u32, k: u32) -> f32 {
    let g = k / W_GROUP;
    let r = k % W_GROUP;
    let word = w_word(n, g * W_WPG + r / W_PER_WORD);
    let q = (word >> ((r % W_PER_WORD) * W_BITS)) & W_MASK;
    return w_decode(q, w_params(n, g));
}",
            );
        }
    }
}

/// `fn w_round(v: f32) -> f32`: a decoded value rounded the way the artifact defines it (the
/// CPU's `gather_row`): sym codes with f16 scales round to f16, everything else is exact.
pub fn declare_round(b: &mut KernelBuilder, m: &MatrixSpec) {
    let body = match m.storage {
        MatrixStorage::Quant(q) => match q.codec {
            Codec::Sym {
                scale: DType::F16, ..
            } => "return unpack2x16float(pack2x16float(vec2<f32>(v, 0.0))).x;",
            Codec::Sym {
                scale: DType::BF16, ..
            } => "let u = bitcast<u32>(v); return bitcast<f32>((u + 0x7FFFu + ((u >> 16u) & 1u)) & 0xFFFF0000u);",
            _ => "return v;",
        },
        MatrixStorage::Raw(_) => "return v;",
    };
    b.helper(&format!("fn w_round(v: f32) -> f32 {{ {body} }}"));
}

/// Declare a raw vector weight `name` (record 0 of `op_field`, `len` values) with reader
/// `fn {name}_at(i)`.
pub fn declare_vector(b: &mut KernelBuilder, op_field: &str, dtype: DType, name: &str, len: usize) {
    let elem = Elem::float(dtype);
    b.weight(op_field, 0, elem, name, (len * dtype.size()) as u64);
    b.helper(&float_reader(&format!("{name}_at"), name, elem));
}
