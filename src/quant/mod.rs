//! Quantization: the scheme table and the bit-exact quantize / pack / unpack code.

pub mod scheme;
