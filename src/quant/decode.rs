//! `dequantize_param`: the exact inverse mapping of the stored records back to f32 values. It is
//! the reference the runtime kernels are tested against (the kernels decode in place instead).

use crate::formats::dtype::DType;
use crate::quant::geometry::Geometry;
use crate::quant::rounding::{read_float, round_to};
use crate::quant::scheme::{Encoding, QuantScheme, TensorRole};
use anyhow::Result;

/// Decode the records of a parameter of logical `shape` stored by `scheme` for `role` into
/// row-major f32 values. Sym: `w' = dtype((q - maxq) · s)`; AsymBf16x2: `w' = q·s + min` in f32
/// with the bf16 scale and min. Positions past K are not returned.
pub fn dequantize_param(
    scheme: &QuantScheme,
    role: TensorRole,
    shape: &[usize],
    records: &[&[u8]],
) -> Result<Vec<f32>> {
    decode(scheme, role, shape, records, true)
}

/// [`dequantize_param`] without the final rounding of sym values: `(q − maxq)·s` exactly (in
/// f32 for f16 scales and codes up to 8 bits) — what a kernel that scales its sums of codes
/// times activations in f32 applies (the CUDA decode GEMV over 4-bit codes).
#[cfg(test)]
pub(crate) fn sym_values_unrounded(
    scheme: &QuantScheme,
    role: TensorRole,
    shape: &[usize],
    records: &[&[u8]],
) -> Result<Vec<f32>> {
    decode(scheme, role, shape, records, false)
}

fn decode(
    scheme: &QuantScheme,
    role: TensorRole,
    shape: &[usize],
    records: &[&[u8]],
    round: bool,
) -> Result<Vec<f32>> {
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| crate::error::user(format!("shape {shape:?} is too large")))?;
    let Some(layout) = scheme.layout_for(role) else {
        let dtype = if role == TensorRole::RawF32 {
            DType::F32
        } else {
            scheme.model_dtype
        };
        expect_records(records, 1, shape)?;
        expect_len(records[0], numel * dtype.size(), "record", shape)?;
        return Ok((0..numel)
            .map(|i| read_float(dtype, records[0], i))
            .collect());
    };
    let &[n, k] = shape else {
        crate::user_bail!("a quantized {role:?} weight must be 2-D, got shape {shape:?}");
    };
    expect_records(records, 2, shape)?;
    let geo = Geometry::new(&scheme.encoding, layout, n, k);
    let storage = scheme
        .encoding
        .storage()
        .expect("quantized encodings have storage");
    let n_words = n * geo.words_per_row;
    expect_len(records[0], n_words * storage.size(), "q_weight", shape)?;
    let word = |i: usize| -> u32 {
        let b = records[0];
        match storage {
            DType::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
            _ => u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        }
    };
    let code = |row: usize, p: usize| -> u32 {
        let (g, i) = (p / geo.group, p % geo.group);
        let w = word(geo.word_index(row, g * geo.words_per_group + i / geo.per_word));
        (w >> ((i % geo.per_word) as u32 * geo.bits)) & ((1u32 << geo.bits) - 1)
    };
    let mut out = Vec::with_capacity(numel);
    match scheme.encoding {
        Encoding::None => unreachable!("layout_for returns None for unquantized schemes"),
        Encoding::Sym { bits, .. } => {
            let dtype = scheme.model_dtype;
            expect_len(records[1], n * geo.n_group * dtype.size(), "q_scale", shape)?;
            let maxq = ((1i32 << (bits - 1)) - 1) as f32;
            for row in 0..n {
                for p in 0..k {
                    let s = read_float(dtype, records[1], geo.scale_index(row, p / geo.group));
                    let v = (code(row, p) as f32 - maxq) * s;
                    out.push(if round { round_to(dtype, v) } else { v });
                }
            }
        }
        Encoding::AsymBf16x2 { .. } => {
            expect_len(records[1], n * geo.n_group * 4, "q_scale_min", shape)?;
            for row in 0..n {
                for p in 0..k {
                    let (s, mn) =
                        unpack_scale_min(read_u32(records[1], geo.scale_index(row, p / geo.group)));
                    out.push(code(row, p) as f32 * s + mn);
                }
            }
        }
    }
    Ok(out)
}

/// The bf16 scale (low half) and min (high half) of a `q_scale_min` word, as f32.
pub fn unpack_scale_min(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xFFFF_0000))
}

fn read_u32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

fn expect_records(records: &[&[u8]], want: usize, shape: &[usize]) -> Result<()> {
    if records.len() != want {
        crate::user_bail!(
            "a tensor of shape {shape:?} needs {want} record(s) but {} were given",
            records.len()
        );
    }
    Ok(())
}

fn expect_len(bytes: &[u8], want: usize, what: &str, shape: &[usize]) -> Result<()> {
    if bytes.len() != want {
        crate::user_bail!(
            "the {what} record of a tensor of shape {shape:?} has {} bytes, expected {want}; \
             the artifact is corrupt or was built by another version, rebuild it",
            bytes.len()
        );
    }
    Ok(())
}
