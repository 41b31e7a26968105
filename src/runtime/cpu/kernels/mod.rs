//! Native CPU kernels over weights as stored in the artifact (raw f16/f32 or quantized per scheme),
//! read in place from the memory-mapped shards: no dequantized copy of a matrix is ever made.

use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;

/// A weight as the runtime sees it: its plan declaration plus the bytes of its records.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub storage: &'a WeightStorage,
    /// Logical shape (`[N, K]` or `[n]`).
    pub shape: &'a [usize],
    /// Bytes of each record, in the order of `WeightDecl::records`.
    pub records: &'a [&'a [u8]],
    /// The plan's model dtype (dtype of scales).
    pub model_dtype: DType,
}

/// `out[t, n] = Σ_k x[t, k] · W[n, k]` for `t < rows`, with `x` `[rows, K]` and `out` `[rows, N]`.
pub fn matmul(w: &WeightView, x: &[f32], rows: usize, out: &mut [f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), rows * k);
    assert_eq!(out.len(), rows * n);
    let mut row = vec![0f32; k];
    for j in 0..n {
        gather_row(w, j, &mut row);
        for t in 0..rows {
            let xr = &x[t * k..(t + 1) * k];
            out[t * n + j] = xr.iter().zip(&row).map(|(a, b)| a * b).sum();
        }
    }
}

/// Row `row` of a matrix weight, dequantized to f32 (`out.len() == K`).
pub fn gather_row(w: &WeightView, row: usize, out: &mut [f32]) {
    let k = w.shape[1];
    match w.storage {
        WeightStorage::Raw { dtype } => {
            let bytes = w.records[0];
            let es = dtype.size();
            let start = row * k * es;
            for (i, o) in out.iter_mut().enumerate() {
                *o = read_scalar(*dtype, &bytes[start + i * es..]);
            }
        }
        WeightStorage::Quantized { .. } => unimplemented!("quantized kernels are being written"),
    }
}

/// A vector weight (norm weight, bias, RWKV mix) as f32.
pub fn vector(w: &WeightView) -> Vec<f32> {
    match w.storage {
        WeightStorage::Raw { dtype } => {
            let es = dtype.size();
            w.records[0]
                .chunks_exact(es)
                .map(|c| read_scalar(*dtype, c))
                .collect()
        }
        WeightStorage::Quantized { .. } => panic!("vector weights are never quantized"),
    }
}

fn read_scalar(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        other => panic!("raw weight of dtype {other} is not floating point"),
    }
}
