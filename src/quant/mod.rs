//! Quantization: the scheme table and the bit-exact quantize / pack / unpack code.
//!
//! `quantize_param` turns the source values of one parameter into the records the artifact
//! stores; `dequantize_param` is its exact inverse mapping (used by tests and as the reference the
//! runtime kernels are checked against).

pub mod calibration;
mod decode;
mod encode;
mod geometry;
pub mod gptq;
pub mod rounding;
mod row_quant;
pub mod scale_rule;
pub mod scheme;

#[cfg(test)]
pub(crate) use decode::sym_values_unrounded;
pub use decode::{dequantize_param, unpack_scale_min};
pub use encode::{
    quantize_param, quantize_param_gptq, quantize_param_with, EncodedRecord, GptqFactor,
};
pub use scale_rule::ScaleRule;

#[cfg(test)]
mod tests;

/// Bumped whenever the bits `quantize_param` writes could change (part of the quantize key).
pub const CODE_VERSION: u32 = 2;
