//! ggml block formats → f32, exactly as ggml's reference `dequantize_row_*` define them (same
//! arithmetic order, f32 throughout, scales stored as f16).
//!
//! Blocks run along ggml's `ne[0]` (the innermost dimension), so the output is the tensor in
//! row-major order with shape `ne` reversed.

use super::ggml_type::GgmlType;
use super::reader::{GgufFile, GgufTensorInfo};
use crate::error::user;
use anyhow::Result;
use half::{bf16, f16};
use rayon::prelude::*;

/// The types [`dequantize`] handles.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q8_0 => q8_0_block,
        GgmlType::Q4_0 => q4_0_block,
        GgmlType::Q4_1 => q4_1_block,
        GgmlType::Q5_0 => q5_0_block,
        GgmlType::Q5_1 => q5_1_block,
        GgmlType::Q4_K => q4_k_block,
        GgmlType::Q6_K => q6_k_block,
        _ => return None,
    })
}

/// Dequantize `data` (whole blocks of `ty`) into `numel` f32 values. None when the type is not
/// supported or the sizes do not match (`data` must be exactly `numel / block * block_bytes`).
pub fn dequantize(ty: GgmlType, data: &[u8], numel: usize) -> Option<Vec<f32>> {
    let f = block_fn(ty)?;
    let (block, bytes) = ty.block_layout()?;
    if numel % block != 0 || data.len() != numel / block * bytes {
        return None;
    }
    let mut out = vec![0f32; numel];
    // Chunks of many blocks per rayon task keep the scheduling overhead negligible.
    const BLOCKS_PER_TASK: usize = 4096;
    data.par_chunks(bytes * BLOCKS_PER_TASK)
        .zip(out.par_chunks_mut(block * BLOCKS_PER_TASK))
        .for_each(|(d, o)| {
            for (db, ob) in d.chunks_exact(bytes).zip(o.chunks_exact_mut(block)) {
                f(db, ob);
            }
        });
    Some(out)
}

/// A tensor of `file` as f32 values in row-major order (shape `t.row_major_shape()`).
/// An unsupported type is a user error naming the file, the tensor and its type.
pub fn dequantize_tensor(file: &GgufFile, t: &GgufTensorInfo) -> Result<Vec<f32>> {
    if block_fn(t.ggml_type).is_none() {
        let names: Vec<String> = SUPPORTED.iter().map(|t| t.to_string()).collect();
        return Err(user(format!(
            "GGUF file {}: tensor `{}` has type {}, which mlcb cannot dequantize (supported: {}); \
             use a GGUF file quantized with one of those",
            file.path().display(),
            t.name,
            t.ggml_type,
            names.join(", ")
        )));
    }
    dequantize(t.ggml_type, file.tensor_bytes(t), t.numel() as usize).ok_or_else(|| {
        anyhow::anyhow!(
            "internal: size mismatch dequantizing `{}` ({} bytes for {} elements)",
            t.name,
            t.nbytes,
            t.numel()
        )
    })
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn f32_block(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], y: &mut [f32]) {
    y[0] = half_at(b, 0);
}

fn bf16_block(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
}

/// block_q8_0 { f16 d; int8 qs[32] }: y = q * d.
fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// block_q4_0 { f16 d; u8 qs[16] }: byte j holds element j (low nibble) and j+16 (high);
/// y = (q - 8) * d.
fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// block_q4_1 { f16 d; f16 m; u8 qs[16] }: y = q * d + m.
fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: bit j of qh is bit 4 of element j, bit j+16 of
/// element j+16; y = (q - 16) * d.
fn q5_0_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((q & 0x0F) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

/// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }: y = q * d + m.
fn q5_1_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..24].iter().enumerate() {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((q & 0x0F) | xh0) as f32 * d + m;
        y[j + 16] = ((q >> 4) | xh1) as f32 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4`): sub-blocks 0..4 use the low 6 bits of bytes j and j+4; 4..8 take their
/// low 4 bits from byte j+4's nibbles and their top 2 bits from bytes j-4 and j.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }, 256 elements: 4 groups of 64; in
/// group g, 32 bytes of qs hold sub-block 2g (low nibbles) and 2g+1 (high nibbles);
/// y = d * sc * q - dmin * m.
fn q4_k_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let min = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let q = &qs[32 * g..32 * g + 32];
        let y = &mut y[64 * g..64 * g + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// block_q6_K { u8 ql[128]; u8 qh[64]; int8 scales[16]; f16 d }, 256 elements in two halves of
/// 128; each 6-bit q = 4 low bits from ql and 2 high bits from qh, minus 32; y = d * sc * q.
fn q6_k_block(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        let v = f16::from_f32(x);
        assert_eq!(v.to_f32(), x, "test scale must be exact in f16");
        v.to_bits().to_le_bytes()
    }

    fn deq(ty: GgmlType, block: &[u8]) -> Vec<f32> {
        let n = ty.block_layout().unwrap().0;
        dequantize(ty, block, n).expect("supported, right size")
    }

    #[test]
    fn plain_float_types() {
        let mut b = Vec::new();
        b.extend_from_slice(&1.5f32.to_le_bytes());
        b.extend_from_slice(&(-2.0f32).to_le_bytes());
        assert_eq!(dequantize(GgmlType::F32, &b, 2).unwrap(), vec![1.5, -2.0]);
        // f16 1.5 = 0x3E00, -0.5 = 0xB800; bf16 1.5 = 0x3FC0, -3.0 = 0xC040.
        let b = [0x00, 0x3E, 0x00, 0xB8];
        assert_eq!(dequantize(GgmlType::F16, &b, 2).unwrap(), vec![1.5, -0.5]);
        let b = [0xC0, 0x3F, 0x40, 0xC0];
        assert_eq!(dequantize(GgmlType::BF16, &b, 2).unwrap(), vec![1.5, -3.0]);
    }

    #[test]
    fn q8_0() {
        let mut b = h(0.125).to_vec();
        let mut qs = [0u8; 32];
        qs[0] = (-8i8) as u8;
        qs[5] = 3;
        qs[31] = 127;
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q8_0, &b);
        assert_eq!(y[0], -1.0);
        assert_eq!(y[5], 0.375);
        assert_eq!(y[31], 15.875);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn q4_0_nibble_order() {
        let mut b = h(0.5).to_vec();
        let mut qs = [0x88u8; 16]; // (8 - 8) * d = 0 everywhere else
        qs[0] = 0x3A; // element 0 = (10-8)*0.5 = 1.0, element 16 = (3-8)*0.5 = -2.5
        qs[15] = 0xF0; // element 15 = (0-8)*0.5 = -4.0, element 31 = (15-8)*0.5 = 3.5
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q4_0, &b);
        assert_eq!(y[0], 1.0);
        assert_eq!(y[16], -2.5);
        assert_eq!(y[15], -4.0);
        assert_eq!(y[31], 3.5);
        assert_eq!(y[1], 0.0);
        assert_eq!(y[17], 0.0);
    }

    #[test]
    fn q4_1_scale_and_min() {
        let mut b = h(0.25).to_vec();
        b.extend_from_slice(&h(-1.0));
        let mut qs = [0u8; 16];
        qs[1] = 0xF0; // element 1 = 0*0.25-1 = -1, element 17 = 15*0.25-1 = 2.75
        qs[2] = 0x47; // element 2 = 7*0.25-1 = 0.75, element 18 = 4*0.25-1 = 0
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q4_1, &b);
        assert_eq!(y[1], -1.0);
        assert_eq!(y[17], 2.75);
        assert_eq!(y[2], 0.75);
        assert_eq!(y[18], 0.0);
        assert_eq!(y[0], -1.0);
    }

    #[test]
    fn q5_0_high_bits() {
        let mut b = h(1.0).to_vec();
        let qh: u32 = (1 << 2) | (1 << 18); // bit 4 of elements 2 and 18
        b.extend_from_slice(&qh.to_le_bytes());
        let mut qs = [0u8; 16];
        qs[2] = 0x51; // element 2 = (1|16)-16 = 1, element 18 = (5|16)-16 = 5
        qs[3] = 0x9F; // element 3 = 15-16 = -1, element 19 = 9-16 = -7
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q5_0, &b);
        assert_eq!(y[2], 1.0);
        assert_eq!(y[18], 5.0);
        assert_eq!(y[3], -1.0);
        assert_eq!(y[19], -7.0);
        assert_eq!(y[0], -16.0);
    }

    #[test]
    fn q5_1_high_bits_scale_and_min() {
        let mut b = h(0.5).to_vec();
        b.extend_from_slice(&h(2.0));
        let qh: u32 = 1 << 16; // bit 4 of element 16
        b.extend_from_slice(&qh.to_le_bytes());
        let mut qs = [0u8; 16];
        qs[0] = 0x2F; // element 0 = 15*0.5+2 = 9.5, element 16 = (2|16)*0.5+2 = 11
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q5_1, &b);
        assert_eq!(y[0], 9.5);
        assert_eq!(y[16], 11.0);
        assert_eq!(y[1], 2.0);
    }

    #[test]
    fn q4_k_scales_including_packed_upper_bits() {
        let mut b = h(2.0).to_vec();
        b.extend_from_slice(&h(1.0));
        let mut scales = [0u8; 12];
        scales[0] = 3 | (1 << 6); // sub-block 0 scale 3; top bits (1) of sub-block 4's scale
        scales[4] = 5; // sub-block 0 min 5
        scales[1] = 1; // sub-block 1 scale 1, min 0
        scales[8] = 0x72; // sub-block 4: scale low bits 2 (→ 2|16 = 18), min 7
        b.extend_from_slice(&scales);
        let mut qs = [0u8; 128];
        qs[0] = 0x21; // element 0: 2*3*1 - 1*5 = 1; element 32: 2*1*2 - 0 = 4
        qs[64] = 0x03; // element 128 (group 2, low): 2*18*3 - 1*7 = 101
        b.extend_from_slice(&qs);
        let y = deq(GgmlType::Q4_K, &b);
        assert_eq!(y[0], 1.0);
        assert_eq!(y[1], -5.0); // q = 0: -dmin*m
        assert_eq!(y[32], 4.0);
        assert_eq!(y[128], 101.0);
        assert_eq!(y[129], -7.0);
        assert_eq!(y[160], 0.0); // sub-block 5: scale and min 0
    }

    #[test]
    fn q6_k_layout() {
        let mut b = vec![0u8; 210];
        b[0] = 0x4A; // ql[0]
        b[16] = 0x0F; // ql[16]
        b[64] = 0x01; // ql[64]: second half, l = 0
        b[128] = 0b0001_0010; // qh[0]: bits 0-1 = 2, 2-3 = 0, 4-5 = 1, 6-7 = 0
        let sc: [i8; 16] = [2, 1, -1, 0, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
        for (i, s) in sc.iter().enumerate() {
            b[192 + i] = *s as u8;
        }
        b[208..210].copy_from_slice(&h(0.5));
        let y = deq(GgmlType::Q6_K, &b);
        assert_eq!(y[0], 0.5 * 2.0 * 10.0); // (0xA | 2<<4) - 32 = 10
        assert_eq!(y[32], 16.0); // 0.5 * -1 * -32: ql[32] = 0, qh bits 2-3 = 0
        assert_eq!(y[64], 0.5 * 3.0 * -12.0); // (4 | 1<<4) - 32 = -12
        assert_eq!(y[16], 0.5 * 1.0 * -17.0); // l = 16 uses scale 1: 15 - 32
        assert_eq!(y[128], 0.5 * 4.0 * -31.0); // second half uses scales 8..
    }

    #[test]
    fn several_blocks_land_in_order() {
        // Two Q8_0 blocks with different scales: the second fills elements 32..64.
        let mut b = h(1.0).to_vec();
        b.extend_from_slice(&[1u8; 32]);
        b.extend_from_slice(&h(2.0));
        b.extend_from_slice(&[1u8; 32]);
        let y = dequantize(GgmlType::Q8_0, &b, 64).unwrap();
        assert!(y[..32].iter().all(|&v| v == 1.0));
        assert!(y[32..].iter().all(|&v| v == 2.0));
    }

    #[test]
    fn unsupported_or_mismatched() {
        assert!(dequantize(GgmlType(10), &[0; 84], 256).is_none()); // Q2_K
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_none());
        assert!(dequantize(GgmlType::Q8_0, &[0; 34], 16).is_none());
    }
}
