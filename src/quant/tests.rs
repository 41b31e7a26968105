//! Hand-computed encodings for every scheme (expected words worked out on paper from the
//! definitions in `shared/reference/mlc-build-py.md` §2 with ties to even), plus a round-trip
//! property on random data.

use super::scheme::{scheme, TensorRole};
use super::{dequantize_param, quantize_param, quantize_param_with, EncodedRecord, ScaleRule};
use crate::error::{class_of, ErrorClass};
use crate::formats::dtype::DType;

/// build.py's absmax rule: the encodings below were worked out on paper for it.
fn q(name: &str, role: TensorRole, shape: &[usize], values: &[f32]) -> Vec<EncodedRecord> {
    let s = scheme(name).unwrap();
    quantize_param_with(s, ScaleRule::Absmax, role, "layer.w.weight", shape, values).unwrap()
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn dequant(name: &str, role: TensorRole, shape: &[usize], recs: &[EncodedRecord]) -> Vec<f32> {
    let bytes: Vec<&[u8]> = recs.iter().map(|r| r.bytes.as_slice()).collect();
    dequantize_param(scheme(name).unwrap(), role, shape, &bytes).unwrap()
}

/// Row 0: `w = (i % 15) - 7`, absmax 7 so `s = 1` and `q = i % 15`.
fn ramp15() -> Vec<f32> {
    (0..32).map(|i| (i % 15) as f32 - 7.0).collect()
}

/// Row 1: ties. s = 1; -0.5 → u = 6.5 → 6; 0.5 → 7.5 → 8; 1.5 → 8.5 → 8; 2.5 → 9.5 → 10
/// (ties away from zero would give 7, 8, 9, 10). The remaining zeros give 7.
fn ties4() -> Vec<f32> {
    let mut r = vec![7.0, -0.5, 0.5, 1.5, 2.5, -7.0];
    r.resize(32, 0.0);
    r
}

const RAMP15_WORDS: [u32; 4] = [0x7654_3210, 0x0EDC_BA98, 0x8765_4321, 0x10ED_CBA9];
// codes 14,6,8,8,10,0,7,7 (LSB first), then 24 sevens.
const TIES4_WORDS: [u32; 4] = [0x770A_886E, 0x7777_7777, 0x7777_7777, 0x7777_7777];

#[test]
fn q4f16_1_words_scales_and_ties() {
    let vals: Vec<f32> = [ramp15(), ties4()].concat();
    let recs = q("q4f16_1", TensorRole::Linear, &[2, 32], &vals);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].name, "layer.w.q_weight");
    assert_eq!(recs[0].dtype, DType::U32);
    assert_eq!(recs[0].shape, vec![2, 4]);
    assert_eq!(u32s(&recs[0].bytes), [RAMP15_WORDS, TIES4_WORDS].concat());
    assert_eq!(recs[1].name, "layer.w.q_scale");
    assert_eq!(recs[1].dtype, DType::F16);
    assert_eq!(recs[1].shape, vec![2, 1]);
    assert_eq!(u16s(&recs[1].bytes), vec![0x3C00, 0x3C00]);
    // Integers decode exactly; the ties decode to their even codes.
    let back = dequant("q4f16_1", TensorRole::Linear, &[2, 32], &recs);
    assert_eq!(&back[..32], &ramp15()[..]);
    assert_eq!(&back[32..38], &[7.0, -1.0, 1.0, 1.0, 3.0, -7.0]);
}

#[test]
fn q4f16_1_ragged_k_and_1e4_floor() {
    // K = 36: group 0 is all zeros (absmax floored to f16(1e-4) = 0x068E, s = f16(1.00017e-4 / 7)
    // = 240·2^-24 = 0x00F0, every code 7). Group 1 has 4 valid positions: absmax 2, s = f16(2/7) =
    // 0x3492 = 0.28564453125; 1/s = 3.50085 rounds in f16 to exactly 3.5, so u = 10.5 → 10 (a tie
    // created by the f16 arithmetic); -2 → t = -7 → 0; 0.25 → t = 0.875 → u = 7.875 → 8; 2 → 14.
    let mut vals = vec![0.0f32; 32];
    vals.extend([1.0, -2.0, 0.25, 2.0]);
    let recs = q("q4f16_1", TensorRole::Linear, &[1, 36], &vals);
    assert_eq!(recs[0].shape, vec![1, 8]);
    assert_eq!(
        u32s(&recs[0].bytes),
        vec![
            0x7777_7777,
            0x7777_7777,
            0x7777_7777,
            0x7777_7777,
            0x0000_E80A,
            0,
            0,
            0
        ]
    );
    assert_eq!(recs[1].shape, vec![1, 2]);
    assert_eq!(u16s(&recs[1].bytes), vec![0x00F0, 0x3492]);
    // (10-7)·s = 3510/4096 exactly (s = 1170/4096); 7·s = 1.99951171875 is a tie in f16 → 2.0.
    let back = dequant("q4f16_1", TensorRole::Linear, &[1, 36], &recs);
    assert_eq!(&back[..32], &[0.0; 32][..]);
    assert_eq!(&back[32..], &[3510.0 / 4096.0, -2.0, 1170.0 / 4096.0, 2.0]);
}

#[test]
fn q4f16_0_transposes_data_and_scale() {
    let vals: Vec<f32> = [ramp15(), ties4()].concat();
    let recs = q("q4f16_0", TensorRole::Linear, &[2, 32], &vals);
    assert_eq!(recs[0].shape, vec![4, 2]);
    let want: Vec<u32> = (0..4)
        .flat_map(|w| [RAMP15_WORDS[w], TIES4_WORDS[w]])
        .collect();
    assert_eq!(u32s(&recs[0].bytes), want);
    assert_eq!(recs[1].shape, vec![1, 2]);
    // Embeddings stay NK under a _0 scheme; lm_head follows the linear layout.
    let emb = q("q4f16_0", TensorRole::Embedding, &[2, 32], &vals);
    assert_eq!(emb[0].shape, vec![2, 4]);
    assert_eq!(u32s(&emb[0].bytes), [RAMP15_WORDS, TIES4_WORDS].concat());
    let head = q("q4f16_0", TensorRole::LmHead, &[2, 32], &vals);
    assert_eq!(head[0].bytes, recs[0].bytes);
    assert_eq!(
        dequant("q4f16_0", TensorRole::Linear, &[2, 32], &recs),
        dequant("q4f16_1", TensorRole::Linear, &[2, 32], &emb)
    );
}

/// `w = (i % 7) - 3` for K = 45: two groups of 40 (the second has 5 valid positions), s = 1.
fn ramp7_45() -> Vec<f32> {
    (0..45).map(|i| (i % 7) as f32 - 3.0).collect()
}

// Codes i % 7, five per uint16 word at bits 3m (bit 15 zero), 8 words per group.
// Word 0: 0,1,2,3,4 → 0 + 1·8 + 2·64 + 3·512 + 4·4096 = 0x4688, and so on.
const RAMP7_45_WORDS: [u16; 16] = [
    0x4688, 0x2235, 0x0D63, 0x58D1, 0x3446, 0x11AC, 0x6B1A, 0x4688, // group 0
    0x2235, 0, 0, 0, 0, 0, 0, 0, // group 1: codes 5,6,0,1,2 then padding zero bits
];

#[test]
fn q3f16_1_uint16_words_ragged_k() {
    let recs = q("q3f16_1", TensorRole::Linear, &[1, 45], &ramp7_45());
    assert_eq!(recs[0].dtype, DType::U16);
    assert_eq!(recs[0].shape, vec![1, 16]);
    assert_eq!(u16s(&recs[0].bytes), RAMP7_45_WORDS.to_vec());
    assert_eq!(u16s(&recs[1].bytes), vec![0x3C00, 0x3C00]);
    assert_eq!(
        dequant("q3f16_1", TensorRole::Linear, &[1, 45], &recs),
        ramp7_45()
    );
}

#[test]
fn q3f16_0_transposed_with_floor_row() {
    // Row 1 is all zeros: s = f16(f16(1e-4)/3) = 559·2^-24 = 0x022F and every valid code is 3
    // (3·(1+8+64+512+4096) = 0x36DB per full word); the ragged group has one full word (5 valid
    // positions) and zero bits after.
    let vals: Vec<f32> = [ramp7_45(), vec![0.0; 45]].concat();
    let recs = q("q3f16_0", TensorRole::Linear, &[2, 45], &vals);
    assert_eq!(recs[0].shape, vec![16, 2]);
    let row1: Vec<u16> = (0..16).map(|w| if w <= 8 { 0x36DB } else { 0 }).collect();
    let want: Vec<u16> = (0..16).flat_map(|w| [RAMP7_45_WORDS[w], row1[w]]).collect();
    assert_eq!(u16s(&recs[0].bytes), want);
    assert_eq!(recs[1].shape, vec![2, 2]);
    assert_eq!(u16s(&recs[1].bytes), vec![0x3C00, 0x022F, 0x3C00, 0x022F]);
}

/// K = 36: group 0 is `8i - 127` (s = 1, codes 8i); group 1 has ties 0.5 → 127.5 → 128 and
/// -0.5 → 126.5 → 126, then ±127 → 254, 0.
fn q8_row() -> Vec<f32> {
    let mut r: Vec<f32> = (0..32).map(|i| (8 * i - 127) as f32).collect();
    r.extend([0.5, -0.5, 127.0, -127.0]);
    r
}
const Q8_WORDS: [u32; 16] = [
    0x1810_0800,
    0x3830_2820,
    0x5850_4840,
    0x7870_6860,
    0x9890_8880,
    0xB8B0_A8A0,
    0xD8D0_C8C0,
    0xF8F0_E8E0,
    0x00FE_7E80,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
];

#[test]
fn q8f16_both_layouts() {
    let recs = q("q8f16_1", TensorRole::Linear, &[1, 36], &q8_row());
    assert_eq!(recs[0].shape, vec![1, 16]);
    assert_eq!(u32s(&recs[0].bytes), Q8_WORDS.to_vec());
    assert_eq!(u16s(&recs[1].bytes), vec![0x3C00, 0x3C00]);
    let back = dequant("q8f16_1", TensorRole::Linear, &[1, 36], &recs);
    assert_eq!(&back[32..], &[1.0, -1.0, 127.0, -127.0]);

    let vals: Vec<f32> = [q8_row(), vec![0.0; 36]].concat();
    let kn = q("q8f16_0", TensorRole::Linear, &[2, 36], &vals);
    assert_eq!(kn[0].shape, vec![16, 2]);
    let floor_row: Vec<u32> = (0..16)
        .map(|w| match w {
            0..=7 => 0x7F7F_7F7F,
            8 => 0x7F7F_7F7F,
            _ => 0,
        })
        .collect();
    let want: Vec<u32> = (0..16).flat_map(|w| [Q8_WORDS[w], floor_row[w]]).collect();
    assert_eq!(u32s(&kn[0].bytes), want);
    // f16(f16(1e-4)/127) = 13·2^-24 = 0x000D.
    assert_eq!(u16s(&kn[1].bytes), vec![0x3C00, 0x000D, 0x3C00, 0x000D]);
}

#[test]
fn q4f32_asym_words_scale_min_and_ties() {
    // Row 0: min -1, max 14 → s = 1, q = i % 16; scale_min = bf16(1) | bf16(-1) << 16.
    // Row 1: min 0, max 15, s = 1: (w-min)/s = 1.5 → 2, 2.5 → 2, 3.5 → 4 (ties to even).
    // Row 2: min 0, max 1: s = 1/15 (f32 0x3D888889) stored as bf16 0x3D89; 0.5/s = 7.4999995 → 7.
    // Row 3: a constant group: s = 0 → codes 0, decodes to the min exactly.
    let r0: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 1.0).collect();
    let mut r1 = vec![0.0, 15.0, 1.5, 2.5, 3.5];
    r1.resize(32, 0.0);
    let mut r2 = vec![0.0, 1.0, 0.5];
    r2.resize(32, 0.0);
    let r3 = vec![2.0; 32];
    let vals = [r0.clone(), r1, r2, r3].concat();
    let recs = q("q4f32_1", TensorRole::Linear, &[4, 32], &vals);
    assert_eq!(recs[0].shape, vec![4, 4]);
    assert_eq!(
        u32s(&recs[0].bytes),
        vec![
            0x7654_3210,
            0xFEDC_BA98,
            0x7654_3210,
            0xFEDC_BA98, // row 0
            0x0004_22F0,
            0,
            0,
            0, // row 1: codes 0,15,2,2,4
            0x0000_07F0,
            0,
            0,
            0, // row 2: codes 0,15,7
            0,
            0,
            0,
            0, // row 3
        ]
    );
    assert_eq!(recs[1].name, "layer.w.q_scale_min");
    assert_eq!(recs[1].dtype, DType::U32);
    assert_eq!(recs[1].shape, vec![4, 1]);
    assert_eq!(
        u32s(&recs[1].bytes),
        vec![0xBF80_3F80, 0x0000_3F80, 0x0000_3D89, 0x4000_0000]
    );
    let back = dequant("q4f32_1", TensorRole::Linear, &[4, 32], &recs);
    assert_eq!(&back[..32], &r0[..]);
    assert_eq!(&back[32..37], &[0.0, 15.0, 2.0, 2.0, 4.0]);
    // Decoding uses the bf16 scale 0x3D890000 = 274/4096: 15·s = 4110/4096, 7·s = 1918/4096.
    assert_eq!(&back[64..67], &[0.0, 4110.0 / 4096.0, 1918.0 / 4096.0]);
    assert_eq!(&back[96..], &[2.0; 32][..]);

    // KN: data [4 words, 4 rows] and scale_min [1, 4] transposed.
    let kn = q("q4f32_0", TensorRole::Linear, &[4, 32], &vals);
    assert_eq!(kn[0].shape, vec![4, 4]);
    let nk = u32s(&recs[0].bytes);
    let want: Vec<u32> = (0..4)
        .flat_map(|w| (0..4).map(move |r| (w, r)))
        .map(|(w, r)| nk[r * 4 + w])
        .collect();
    assert_eq!(u32s(&kn[0].bytes), want);
    assert_eq!(kn[1].shape, vec![1, 4]);
    assert_eq!(kn[1].bytes, recs[1].bytes);
}

#[test]
fn q4f32_ragged_group_ignores_padding() {
    // Group 1 has 4 valid values 3,4,5,6: min 3 (not 0 from padding), s = 0.2 → bf16 0x3E4D,
    // codes 0,5,10,15.
    let vals: Vec<f32> = [vec![1.0; 32], vec![3.0, 4.0, 5.0, 6.0]].concat();
    let recs = q("q4f32_1", TensorRole::Linear, &[1, 36], &vals);
    assert_eq!(u32s(&recs[0].bytes), vec![0, 0, 0, 0, 0x0000_FA50, 0, 0, 0]);
    assert_eq!(u32s(&recs[1].bytes), vec![0x3F80_0000, 0x4040_3E4D]);
}

#[test]
fn unquantized_roles_and_schemes() {
    let tie_lo = 1.0 + 2f32.powi(-11); // → 1.0 (0x3C00)
    let tie_hi = 1.0 + 3.0 * 2f32.powi(-11); // → 1 + 2^-9 (0x3C02)
    let vals = [tie_lo, tie_hi, -2.0];
    let r = q("q0f16", TensorRole::Linear, &[1, 3], &vals);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].name, "layer.w.weight");
    assert_eq!(r[0].dtype, DType::F16);
    assert_eq!(r[0].shape, vec![1, 3]);
    assert_eq!(u16s(&r[0].bytes), vec![0x3C00, 0x3C02, 0xC000]);
    let r = q("q0f32", TensorRole::Embedding, &[3], &vals);
    assert_eq!(r[0].dtype, DType::F32);
    assert_eq!(
        u32s(&r[0].bytes),
        vals.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // Norms under a quantized scheme: model dtype; RawF32: float32 whatever the scheme.
    let r = q("q4f16_1", TensorRole::Raw, &[3], &vals);
    assert_eq!(
        (r[0].dtype, r[0].name.as_str()),
        (DType::F16, "layer.w.weight")
    );
    assert_eq!(u16s(&r[0].bytes), vec![0x3C00, 0x3C02, 0xC000]);
    let r = q("q4f16_1", TensorRole::RawF32, &[3], &vals);
    assert_eq!(r[0].dtype, DType::F32);
    assert_eq!(
        dequant("q4f16_1", TensorRole::RawF32, &[3], &r),
        vals.to_vec()
    );
}

#[test]
fn bad_inputs_are_user_errors() {
    let s = scheme("q4f16_1").unwrap();
    let e = quantize_param(s, TensorRole::Linear, "m.w.weight", &[2, 32], &[0.0; 63]).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(
        e.to_string().contains("m.w.weight") && e.to_string().contains("[2, 32]"),
        "{e}"
    );
    let e = quantize_param(s, TensorRole::Linear, "m.w.weight", &[64], &[0.0; 64]).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(
        e.to_string().contains("2-D") && e.to_string().contains("[64]"),
        "{e}"
    );
    // 1e6 overflows f16: cannot be quantized in f16 arithmetic.
    let mut v = vec![0.0; 32];
    v[3] = 1e6;
    let e = quantize_param(s, TensorRole::Linear, "m.w.weight", &[1, 32], &v).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(e.to_string().contains("element 3"), "{e}");
    let a = scheme("q4f32_1").unwrap();
    v[3] = f32::NAN;
    let e = quantize_param(a, TensorRole::Linear, "m.w.weight", &[1, 32], &v).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    let e =
        dequantize_param(s, TensorRole::Linear, &[1, 32], &[&[0u8; 16], &[0u8; 1]]).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
}

/// A small deterministic generator (xorshift64*) for the property tests.
pub(crate) struct Rng(pub u64);
impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

#[test]
fn roundtrip_error_is_within_half_a_step() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for name in [
        "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q8f16_0", "q8f16_1", "q4f32_0", "q4f32_1",
    ] {
        let s = scheme(name).unwrap();
        for &(n, k) in &[(3usize, 45usize), (5, 80), (4, 36), (2, 64)] {
            let vals = rng.vec(n * k, 0.5);
            let recs = quantize_param_with(
                s,
                ScaleRule::Absmax,
                TensorRole::Linear,
                "w.weight",
                &[n, k],
                &vals,
            )
            .unwrap();
            let back = dequant(name, TensorRole::Linear, &[n, k], &recs);
            let g = s.encoding.group();
            for r in 0..n {
                for gi in 0..k.div_ceil(g) {
                    let idx: Vec<usize> =
                        (gi * g..((gi + 1) * g).min(k)).map(|p| r * k + p).collect();
                    let mn = idx.iter().map(|&i| vals[i]).fold(f32::INFINITY, f32::min);
                    let mx = idx
                        .iter()
                        .map(|&i| vals[i])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let amax = mn.abs().max(mx.abs());
                    let bits = s.encoding.bits();
                    // Half a step, plus the f16 rounding of w, t and u (u is up to 2·maxq, so
                    // its f16 ulp is 2·maxq·2^-10 steps) or the bf16 rounding of scale and min.
                    let tol = if name.starts_with("q4f32") {
                        let step = (mx - mn) / 15.0;
                        step / 2.0 + (15.0 * step + mn.abs()) * 2f32.powi(-8)
                    } else {
                        let maxq = ((1 << (bits - 1)) - 1) as f32;
                        let step = amax / maxq;
                        step * (0.5 + 2.0 * maxq * 2f32.powi(-11)) + amax * 2f32.powi(-10)
                    };
                    for &i in &idx {
                        let err = (vals[i] - back[i]).abs();
                        assert!(
                            err <= tol,
                            "{name} [{n},{k}] elem {i}: {} vs {} (tol {tol})",
                            vals[i],
                            back[i]
                        );
                    }
                }
            }
        }
    }
}

/// The default (mse) rule decodes through the same formula and never loses to absmax on a whole
/// tensor; on Gaussian-like weights it is clearly better at 3 and 4 bits.
#[test]
fn mse_scales_reduce_the_roundtrip_error() {
    let mut rng = Rng(0xC0FF_EE00_1234_5678);
    for name in [
        "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q8f16_0", "q8f16_1",
    ] {
        let s = scheme(name).unwrap();
        let (n, k) = (8usize, 96usize);
        // Sums of uniforms: roughly Gaussian, with the occasional outlier that absmax wastes
        // levels on.
        let vals: Vec<f32> = (0..n * k)
            .map(|_| (0..4).map(|_| rng.next_f32()).sum::<f32>() * 0.05)
            .collect();
        let err = |rule| {
            let recs = quantize_param_with(s, rule, TensorRole::Linear, "w.weight", &[n, k], &vals)
                .unwrap();
            let back = dequant(name, TensorRole::Linear, &[n, k], &recs);
            vals.iter()
                .zip(&back)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
        };
        let (absmax, mse) = (err(ScaleRule::Absmax), err(ScaleRule::Mse));
        assert!(mse <= absmax, "{name}: mse {mse} > absmax {absmax}");
        if !name.starts_with("q8") {
            assert!(mse < 0.8 * absmax, "{name}: mse {mse} vs absmax {absmax}");
        }
    }
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let vals = Rng(99).vec(64 * 100, 1.0);
    for name in ["q4f16_0", "q3f16_1", "q4f32_0"] {
        let s = scheme(name).unwrap();
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    quantize_param(s, TensorRole::Linear, "w.weight", &[64, 100], &vals).unwrap()
                })
        };
        assert_eq!(run(1), run(3), "{name}");
    }
}
