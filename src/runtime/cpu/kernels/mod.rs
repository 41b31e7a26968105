//! Native CPU kernels over weights as stored in the artifact (raw f16/f32 or quantized per scheme),
//! read in place from the memory-mapped shards: no dequantized copy of a matrix is ever made.
//!
//! Quantized weights are multiplied with their decoded values `(q - maxq)·s` (sym) or `q·s + min`
//! (asym) computed in f32 — the exact products, not rounded to the model dtype, so `matmul` can
//! differ from a product with [`crate::quant::dequantize_param`]'s f16-rounded values by at most
//! 2^-11 relative per weight. `gather_row` returns exactly the artifact's values.
//!
//! Work is split over output rows with rayon in fixed chunks; every output element is computed by
//! one thread with a summation order that does not depend on the number of threads.

#[cfg(test)]
mod bench;
mod f16_raw;
mod int8_act;
mod int8_act_kn;
mod kn;
mod matrix;
#[cfg(target_arch = "aarch64")]
mod neon;
mod q3_nk;
mod q4_asym_nk;
mod q4_nk;
mod q8_nk;
mod row_dot;
mod simd;
#[cfg(test)]
mod tests;

use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{Plan, WeightStorage};
use matrix::{read_float, read_floats, Matrix, QMatrix};
use rayon::prelude::*;

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

impl<'a> WeightView<'a> {
    /// One view per weight of `plan`, in plan order, over `records[i]` (the bytes of weight i's
    /// records).
    pub fn for_plan<R: AsRef<[&'a [u8]]>>(plan: &'a Plan, records: &'a [R]) -> Vec<WeightView<'a>> {
        plan.weights
            .iter()
            .zip(records)
            .map(|(decl, recs)| WeightView {
                storage: &decl.storage,
                shape: &decl.shape,
                records: recs.as_ref(),
                model_dtype: plan.model_dtype,
            })
            .collect()
    }
}

/// Output rows per parallel work item (a multiple of 8, the SIMD lane blocks of the KN kernel).
const CHUNK: usize = 32;

/// Check that a matrix weight's records match its declaration (scheme known, byte sizes right),
/// so the kernels cannot index out of bounds. `Err` says what is wrong.
pub fn validate_matrix(w: &WeightView) -> Result<(), String> {
    Matrix::new(w).map(|_| ())
}

fn matrix<'a>(w: &WeightView<'a>) -> Matrix<'a> {
    Matrix::new(w).unwrap_or_else(|e| {
        panic!(
            "weight {:?} does not match its declaration: {e} (validate_matrix first)",
            w.shape
        )
    })
}

/// `out[t, n] = Σ_k x[t, k] · W[n, k]` for `t < rows`, with `x` `[rows, K]` and `out` `[rows, N]`.
pub fn matmul(w: &WeightView, x: &[f32], rows: usize, out: &mut [f32]) {
    let m = matrix(w);
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), rows * k);
    assert_eq!(out.len(), rows * n);
    if rows == 0 || n == 0 {
        return;
    }
    let kernel = Kernel::select(m);
    if rows == 1 {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, o)| kernel.gemv_block(c * CHUNK, x, o));
    } else {
        // Each work item owns output rows n0..n0+CHUNK for every t: `[N, rows]`, transposed after.
        let mut out_t = vec![0f32; n * rows];
        out_t
            .par_chunks_mut(CHUNK * rows)
            .enumerate()
            .for_each(|(c, o)| kernel.gemm_block(c * CHUNK, x, rows, o));
        for (j, col) in out_t.chunks_exact(rows).enumerate() {
            for (t, v) in col.iter().enumerate() {
                out[t * n + j] = *v;
            }
        }
    }
}

/// A GEMV over int8-quantized activations: `(matrix, first row, x, out)`.
type Int8Gemv = fn(&QMatrix, usize, &int8_act::QuantizedX, &mut [f32]);

/// Like [`matmul`], but for one activation row and `q4f16_*`/`q8f16_*` weights (4- or 8-bit sym,
/// group 32, f16 scales, NK or KN, `K % 32 == 0`) it first quantizes `x` to int8 per block of 32
/// and sums exact integer products. About 2× faster, but adds an error of up to
/// `Σ_k |W[n,k]|·d(k)/2` where `d` is the block's `absmax(x)/127` (≈0.4% of the block's largest
/// activation per weight, below the 4- and 8-bit weights' own rounding). Other weights and
/// `rows > 1` go to [`matmul`]. The executor uses it for decode steps.
pub fn matmul_int8_activations(w: &WeightView, x: &[f32], rows: usize, out: &mut [f32]) {
    let (Matrix::Quant(q), 1) = (matrix(w), rows) else {
        return matmul(w, x, rows, out);
    };
    let (order, gemv): (_, Int8Gemv) = match q {
        q if q.k % 32 == 0 && q4_nk::applies(&q) => {
            (int8_act::CodeOrder::Nibbles, int8_act::gemv_rows)
        }
        q if q.k % 32 == 0 && q8_nk::applies(&q) => {
            (int8_act::CodeOrder::Positions, int8_act::gemv_rows)
        }
        q => match int8_act_kn::order_for(&q) {
            Some(order) => (order, int8_act_kn::gemv_rows),
            None => return matmul(w, x, rows, out),
        },
    };
    assert_eq!(x.len(), q.k);
    assert_eq!(out.len(), q.n);
    let qx = int8_act::QuantizedX::new(x, order);
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, o)| gemv(&q, c * CHUNK, &qx, o));
}

/// `Σ a[i]·b[i]` with the SIMD kernels (fixed summation order for a given length).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    simd::dot(a, b)
}

/// Row `row` of a matrix weight as stored, decoded to f32 (`out.len() == K`): for quantized
/// weights exactly the values of [`crate::quant::dequantize_param`].
pub fn gather_row(w: &WeightView, row: usize, out: &mut [f32]) {
    let k = w.shape[1];
    assert_eq!(out.len(), k);
    match matrix(w) {
        Matrix::Raw { dtype, bytes, .. } => {
            let es = dtype.size();
            read_floats(dtype, &bytes[row * k * es..(row + 1) * k * es], out);
        }
        Matrix::Quant(q) => {
            q.decode_row_generic(row, out);
            for v in out.iter_mut() {
                *v = q.round_to_model(*v);
            }
        }
    }
}

/// A vector weight (norm weight, bias, RWKV mix) as f32.
pub fn vector(w: &WeightView) -> Vec<f32> {
    match w.storage {
        WeightStorage::Raw { dtype } => {
            assert!(
                dtype.is_float(),
                "raw weight of dtype {dtype} is not floating point"
            );
            let es = dtype.size();
            (0..w.records[0].len() / es)
                .map(|i| read_float(*dtype, w.records[0], i))
                .collect()
        }
        WeightStorage::Quantized { .. } => panic!("vector weights are never quantized"),
    }
}

/// Which kernel multiplies a matrix.
enum Kernel<'a> {
    F16Raw {
        bytes: &'a [u8],
        k: usize,
    },
    /// Raw f32 rows (`q0f32`), read in place: decoding a row into a scratch first, one value at
    /// a time, made q0f32 decode ~7× slower (SmolLM2-135M: 5.4 tok/s instead of 40).
    F32Raw {
        w: &'a [f32],
        k: usize,
    },
    Q4Nk(QMatrix<'a>),
    Q8Nk(QMatrix<'a>),
    /// Any scheme's transposed (KN) storage.
    Kn(QMatrix<'a>),
    Q4AsymNk(QMatrix<'a>),
    Q3Nk(QMatrix<'a>),
    /// Any other storage: decode a row (one code at a time), then an f32 dot.
    Generic(Matrix<'a>),
}

impl<'a> Kernel<'a> {
    fn select(m: Matrix<'a>) -> Kernel<'a> {
        match m {
            Matrix::Raw {
                dtype: DType::F16,
                k,
                bytes,
                ..
            } => Kernel::F16Raw { bytes, k },
            // Read in place where the record's bytes are f32s as the host reads them (little-
            // endian, 4-byte aligned: the params files start records at multiples of 64 bytes,
            // `formats::ndarray_cache::RECORD_ALIGN`); else the generic decode.
            Matrix::Raw {
                dtype: DType::F32,
                k,
                bytes,
                ..
            } if cfg!(target_endian = "little")
                && bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok() =>
            {
                Kernel::F32Raw {
                    w: bytemuck::cast_slice(bytes),
                    k,
                }
            }
            Matrix::Quant(q) if q4_nk::applies(&q) => Kernel::Q4Nk(q),
            Matrix::Quant(q) if q8_nk::applies(&q) => Kernel::Q8Nk(q),
            Matrix::Quant(q) if kn::applies(&q) => Kernel::Kn(q),
            Matrix::Quant(q) if q4_asym_nk::applies(&q) => Kernel::Q4AsymNk(q),
            Matrix::Quant(q) if q3_nk::applies(&q) => Kernel::Q3Nk(q),
            other => Kernel::Generic(other),
        }
    }

    /// Row `row` decoded to f32 for the prefill tiles.
    fn decode_row(&self, row: usize, out: &mut [f32]) {
        match self {
            Kernel::F16Raw { bytes, k } => {
                read_floats(DType::F16, &bytes[row * k * 2..(row + 1) * k * 2], out)
            }
            Kernel::F32Raw { w, k } => out.copy_from_slice(&w[row * k..(row + 1) * k]),
            Kernel::Q4Nk(q) => q4_nk::decode_row(q, row, out),
            Kernel::Q8Nk(q) => q8_nk::decode_row(q, row, out),
            Kernel::Kn(q) | Kernel::Q4AsymNk(q) | Kernel::Q3Nk(q) => q.decode_row_generic(row, out),
            Kernel::Generic(m) => m.decode_row(row, out),
        }
    }

    /// `out[j] = Σ_k x[k]·W[n0 + j, k]` (one activation row).
    fn gemv_block(&self, n0: usize, x: &[f32], out: &mut [f32]) {
        match self {
            Kernel::F16Raw { bytes, k } => {
                let rb = 2 * k;
                for (j, o) in out.iter_mut().enumerate() {
                    row_dot::prefetch_raw_row(bytes, rb, n0 + j);
                    *o = f16_raw::row_dot(bytes, *k, n0 + j, x);
                }
            }
            Kernel::F32Raw { w, k } => {
                let bytes: &[u8] = bytemuck::cast_slice(w);
                for (j, o) in out.iter_mut().enumerate() {
                    let row = n0 + j;
                    row_dot::prefetch_raw_row(bytes, 4 * k, row);
                    *o = simd::dot(&w[row * k..(row + 1) * k], x);
                }
            }
            Kernel::Q4Nk(q) => q4_nk::gemv_rows(q, n0, x, out),
            Kernel::Q8Nk(q) => q8_nk::gemv_rows(q, n0, x, out),
            Kernel::Kn(q) => kn::gemv_block(q, n0, x, out),
            Kernel::Q4AsymNk(q) => q4_asym_nk::gemv_rows(q, n0, x, out),
            Kernel::Q3Nk(q) => q3_nk::gemv_rows(q, n0, x, out),
            Kernel::Generic(m) => {
                let mut scratch = vec![0f32; x.len()];
                for (j, o) in out.iter_mut().enumerate() {
                    m.decode_row(n0 + j, &mut scratch);
                    *o = simd::dot(&scratch, x);
                }
            }
        }
    }

    /// `out_t[j·rows + t] = Σ_k x[t, k]·W[n0 + j, k]`: each weight row is decoded once and used
    /// for every activation row, four weight rows at a time. (For KN storage too: its SIMD GEMV
    /// run once per activation row, or decoding each word once for four rows, made SmolLM2's
    /// prefill 1.2–1.3× slower than these f32 tiles.)
    fn gemm_block(&self, n0: usize, x: &[f32], rows: usize, out_t: &mut [f32]) {
        let k = x.len() / rows;
        let len = out_t.len() / rows;
        let mut tile = vec![0f32; 4 * k];
        let mut j = 0;
        while j + 4 <= len {
            for (r, dst) in tile.chunks_exact_mut(k).enumerate() {
                self.decode_row(n0 + j + r, dst);
            }
            let w: Vec<&[f32]> = tile.chunks_exact(k).collect();
            let w = [w[0], w[1], w[2], w[3]];
            let xr = |t: usize| &x[t * k..(t + 1) * k];
            let mut t = 0;
            // Three activation rows at a time, the rest one by one: both give identical values.
            while t + 3 <= rows {
                let d = simd::dot4x3(w, [xr(t), xr(t + 1), xr(t + 2)]);
                for (c, dc) in d.iter().enumerate() {
                    for (r, v) in dc.iter().enumerate() {
                        out_t[(j + r) * rows + t + c] = *v;
                    }
                }
                t += 3;
            }
            for t in t..rows {
                let d = simd::dot4(w, xr(t));
                for (r, v) in d.iter().enumerate() {
                    out_t[(j + r) * rows + t] = *v;
                }
            }
            j += 4;
        }
        for j in j..len {
            let dst = &mut tile[..k];
            self.decode_row(n0 + j, dst);
            for t in 0..rows {
                out_t[j * rows + t] = simd::dot(dst, &x[t * k..(t + 1) * k]);
            }
        }
    }
}
