//! The roundings quantization uses, each defined exactly (IEEE round to nearest, ties to even) so
//! the output bits never depend on the machine.

use crate::formats::dtype::DType;

/// Round `x` to `dtype` (round to nearest even) and return it as f32 again.
///
/// A single `+ - * /` of two values of a narrower float type computed in f32 and then rounded with
/// this is the correctly rounded result in that type: double rounding is innocuous because f32 has
/// 24 significant bits ≥ 2·11 + 2 (f16) and ≥ 2·8 + 2 (bf16).
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => f32::from_bits((bf16_rne_bits(x) as u32) << 16),
        _ => x,
    }
}

/// The bf16 bits of `x`, rounded to nearest even: `(u + ((u >> 16) & 1) + 0x7FFF) >> 16` on the
/// f32 bits `u` (MLC's formula). Computed in u64 so no intermediate overflows; callers pass finite
/// values (a NaN payload could round to infinity with this formula).
pub fn bf16_rne_bits(x: f32) -> u16 {
    let u = x.to_bits() as u64;
    ((u + ((u >> 16) & 1) + 0x7FFF) >> 16) as u16
}

/// Round to the nearest integer, ties to even (the deliberate change from MLC's ties-away LLVM
/// `round`).
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Little-endian bytes of `values` stored as `dtype` (f32, f16 or bf16, round to nearest even).
pub fn float_bytes(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16_rne_bits(*v).to_le_bytes())),
        other => unreachable!("float_bytes called with non-float dtype {other}"),
    }
    out
}

/// Read element `i` of a little-endian float array of `dtype` (f32, f16 or bf16).
pub fn read_float(dtype: DType, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => {
            let b = &bytes[i * 4..i * 4 + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        }
        DType::F16 => {
            half::f16::from_bits(u16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]])).to_f32()
        }
        DType::BF16 => {
            let bits = u16::from_le_bytes([bytes[i * 2], bytes[i * 2 + 1]]);
            f32::from_bits((bits as u32) << 16)
        }
        other => unreachable!("read_float called with non-float dtype {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_half_to_even() {
        // Exactly halfway between 0x3F80 and 0x3F81: the even one (0x3F80) wins.
        assert_eq!(bf16_rne_bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        // Halfway between 0x3F81 and 0x3F82: 0x3F82 is even.
        assert_eq!(bf16_rne_bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        // Just above and below halfway.
        assert_eq!(bf16_rne_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bf16_rne_bits(f32::from_bits(0x3F80_7FFF)), 0x3F80);
        // 1/15 = 0x3D888889 rounds up to 0x3D89; -1.0 is exact.
        assert_eq!(bf16_rne_bits(1.0 / 15.0), 0x3D89);
        assert_eq!(bf16_rne_bits(-1.0), 0xBF80);
    }

    #[test]
    fn f16_rounds_half_to_even() {
        // 1 + 2^-11 is halfway between 1.0 and 1 + 2^-10: 1.0 (even mantissa) wins.
        assert_eq!(round_to(DType::F16, 1.0 + 2f32.powi(-11)), 1.0);
        // 1 + 3·2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9: the latter is even.
        assert_eq!(
            round_to(DType::F16, 1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(round_to(DType::F32, 0.1), 0.1);
    }

    #[test]
    fn integer_rounding_is_half_even() {
        assert_eq!(round_half_even(6.5), 6.0);
        assert_eq!(round_half_even(7.5), 8.0);
        assert_eq!(round_half_even(-0.5), -0.0);
        assert_eq!(round_half_even(2.500001), 3.0);
    }
}
