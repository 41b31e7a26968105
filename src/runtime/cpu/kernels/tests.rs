//! Kernels against the quantizer's reference decoder: every scheme and layout, ragged K, N not a
//! multiple of the chunk or lane width, one and several activation rows, SIMD and portable paths.

use super::simd::FORCE_PORTABLE;
use super::{gather_row, matmul, matmul_int8_activations, vector, WeightView};
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;
use crate::quant::scheme::{scheme, TensorRole};
use crate::quant::{dequantize_param, quantize_param};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// A weight encoded by `quantize_param`, with what a view needs.
pub(super) struct Encoded {
    pub storage: WeightStorage,
    pub shape: Vec<usize>,
    pub bytes: Vec<Vec<u8>>,
    pub model_dtype: DType,
    /// `dequantize_param`'s values (the reference).
    reference: Vec<f32>,
}

impl Encoded {
    pub fn new(name: &str, role: TensorRole, n: usize, k: usize, values: &[f32]) -> Encoded {
        let s = scheme(name).unwrap();
        let recs = quantize_param(s, role, "w.weight", &[n, k], values).unwrap();
        let bytes: Vec<Vec<u8>> = recs.iter().map(|r| r.bytes.clone()).collect();
        let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let reference = dequantize_param(s, role, &[n, k], &slices).unwrap();
        let storage = match s.layout_for(role) {
            Some(layout) => WeightStorage::Quantized {
                scheme: name.to_string(),
                layout,
            },
            None => WeightStorage::Raw {
                dtype: recs[0].dtype,
            },
        };
        Encoded {
            storage,
            shape: vec![n, k],
            bytes,
            model_dtype: s.model_dtype,
            reference,
        }
    }

    fn with_view<R>(&self, f: impl FnOnce(&WeightView) -> R) -> R {
        let slices: Vec<&[u8]> = self.bytes.iter().map(|b| b.as_slice()).collect();
        f(&WeightView {
            storage: &self.storage,
            shape: &self.shape,
            records: &slices,
            model_dtype: self.model_dtype,
        })
    }
}

/// `matmul` against an f64 product with the reference values. Quantized sym weights are
/// multiplied unrounded, within 2^-11 relative of the f16-rounded reference per weight.
fn check_matmul(e: &Encoded, rows: usize, rng: &mut Rng, what: &str) {
    let (n, k) = (e.shape[0], e.shape[1]);
    let x = rng.vec(rows * k);
    let mut out = vec![f32::NAN; rows * n];
    e.with_view(|w| matmul(w, &x, rows, &mut out));
    let rel = match (&e.storage, e.model_dtype) {
        (WeightStorage::Quantized { .. }, DType::F16) => 2f64.powi(-11) + 1e-6,
        _ => 1e-6,
    };
    for t in 0..rows {
        for j in 0..n {
            let (mut want, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let prod = x[t * k + p] as f64 * e.reference[j * k + p] as f64;
                want += prod;
                mag += prod.abs();
            }
            let got = out[t * n + j] as f64;
            assert!(
                (got - want).abs() <= rel * mag + 1e-30,
                "{what}: out[{t},{j}] = {got}, want {want} (Σ|x·w| = {mag})"
            );
        }
    }
}

fn check_gather(e: &Encoded, what: &str) {
    let (n, k) = (e.shape[0], e.shape[1]);
    let mut row = vec![0f32; k];
    for j in 0..n {
        e.with_view(|w| gather_row(w, j, &mut row));
        assert_eq!(
            &row[..],
            &e.reference[j * k..(j + 1) * k],
            "{what}: row {j}"
        );
    }
}

const SCHEMES: [&str; 10] = [
    "q0f16", "q0f32", "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q4f32_0", "q4f32_1", "q8f16_0",
    "q8f16_1",
];

/// N not a multiple of 8 or 32, K ragged for group 32 (80, 36) and group 40 (45, 80), K = 1.
const SHAPES: [(usize, usize); 6] = [(37, 80), (70, 64), (9, 45), (33, 128), (8, 36), (3, 1)];

fn run_all(what: &str) {
    let mut rng = Rng(0xDEAD_BEEF_1234_5678);
    for name in SCHEMES {
        for role in [TensorRole::Linear, TensorRole::Embedding] {
            for (n, k) in SHAPES {
                let values = rng.vec(n * k);
                let e = Encoded::new(name, role, n, k, &values);
                let tag = format!("{what} {name} {role:?} [{n},{k}]");
                check_gather(&e, &tag);
                for rows in [1, 5] {
                    check_matmul(&e, rows, &mut rng, &format!("{tag} rows={rows}"));
                }
            }
        }
    }
}

#[test]
fn every_scheme_and_layout_matches_reference() {
    run_all("simd");
}

#[test]
fn portable_kernels_match_reference() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        FORCE_PORTABLE.with(|f| f.set(true));
        run_all("portable");
        FORCE_PORTABLE.with(|f| f.set(false));
    });
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(7);
    // Every scheme; K = 100 is ragged for both group sizes (32 and 40).
    for name in SCHEMES {
        let (n, k) = (203, 100);
        let e = Encoded::new(name, TensorRole::Linear, n, k, &rng.vec(n * k));
        for rows in [1, 3] {
            let x = rng.vec(rows * k);
            for int8 in [false, true] {
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![0f32; rows * n];
                    pool.install(|| {
                        e.with_view(|w| {
                            if int8 {
                                matmul_int8_activations(w, &x, rows, &mut out)
                            } else {
                                matmul(w, &x, rows, &mut out)
                            }
                        })
                    });
                    out
                };
                let one = run(1);
                assert_eq!(one, run(2), "{name} rows={rows} int8={int8}");
                assert_eq!(one, run(5), "{name} rows={rows} int8={int8}");
            }
        }
    }
}

/// Raw f32 rows are read in place where their bytes are aligned f32s (`Kernel::F32Raw`) and
/// decoded into a scratch otherwise: the same bits either way, for one activation row (decode)
/// and several (prefill), within f32 rounding of a plain dot product.
#[test]
fn raw_f32_rows_read_in_place_or_decoded_give_the_same_bits() {
    let (n, k) = (37, 70);
    let mut rng = Rng(7);
    let values = rng.vec(n * k);
    let x = rng.vec(3 * k);
    let aligned: &[u8] = bytemuck::cast_slice(&values);
    let mut buf = vec![0u8; aligned.len() + 1];
    buf[1..].copy_from_slice(aligned);
    let misaligned = &buf[1..];
    assert!(bytemuck::try_cast_slice::<u8, f32>(misaligned).is_err());
    let storage = WeightStorage::Raw { dtype: DType::F32 };
    let run = |bytes: &[u8], rows: usize| {
        let recs: [&[u8]; 1] = [bytes];
        let w = WeightView {
            storage: &storage,
            shape: &[n, k],
            records: &recs,
            model_dtype: DType::F32,
        };
        let mut out = vec![0f32; rows * n];
        matmul(&w, &x[..rows * k], rows, &mut out);
        out
    };
    for rows in [1, 3] {
        let (fast, generic) = (run(aligned, rows), run(misaligned, rows));
        assert_eq!(
            fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            generic.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{rows} rows"
        );
        for t in 0..rows {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| values[j * k + i] * x[t * k + i]).sum();
                let got = fast[t * n + j];
                assert!(
                    (got - want).abs() < 1e-4,
                    "row {t}, column {j}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn raw_bf16_and_f32_matrices_and_vectors() {
    // bf16 raw records as some source models ship them: values exactly representable.
    let vals = [1.0f32, -2.5, 0.15625, 3.0, 0.5, -1.0];
    let bytes: Vec<u8> = vals
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let storage = WeightStorage::Raw { dtype: DType::BF16 };
    let recs: [&[u8]; 1] = [&bytes];
    let w = WeightView {
        storage: &storage,
        shape: &[2, 3],
        records: &recs,
        model_dtype: DType::F16,
    };
    let mut out = [0f32; 4];
    matmul(&w, &[1.0, 2.0, 4.0, 0.0, 1.0, 0.0], 2, &mut out);
    assert_eq!(out, [1.0 - 5.0 + 0.625, 3.0 + 1.0 - 4.0, -2.5, 0.5]);
    let mut row = [0f32; 3];
    gather_row(&w, 1, &mut row);
    assert_eq!(row, [3.0, 0.5, -1.0]);
    let v = WeightView { shape: &[6], ..w };
    assert_eq!(vector(&v), vals.to_vec());
}

#[test]
fn misdeclared_records_are_rejected() {
    let e = Encoded::new("q4f16_1", TensorRole::Linear, 4, 64, &[0.5; 256]);
    let short = &e.bytes[0][..e.bytes[0].len() - 4];
    let recs: [&[u8]; 2] = [short, &e.bytes[1]];
    let w = WeightView {
        storage: &e.storage,
        shape: &e.shape,
        records: &recs,
        model_dtype: DType::F16,
    };
    let err = super::validate_matrix(&w).unwrap_err();
    assert!(err.contains("q_weight"), "{err}");
    let bad = WeightStorage::Quantized {
        scheme: "q5f16_9".into(),
        layout: crate::quant::scheme::Layout::NK,
    };
    let w = WeightView { storage: &bad, ..w };
    assert!(super::validate_matrix(&w).unwrap_err().contains("q5f16_9"));
}

/// Weights on an exact grid: each group of `group` is integers in [-maxq, maxq] (the first one
/// maxq) times a power of two, so `(q - maxq)·s` is exact in f16 and the reference has no
/// rounding of its own.
fn grid_weights(rng: &mut Rng, n: usize, k: usize, maxq: f32, group: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * k);
    for _ in 0..n {
        for p in 0..k {
            let scale = 2f32.powi(((p / group) % 5) as i32 - 3);
            let q = if p % group == 0 {
                maxq
            } else {
                (rng.next() * maxq).round()
            };
            v.push(q * scale);
        }
    }
    v
}

/// On grid weights every kernel must agree with the reference up to f32 summation order.
#[test]
fn fast_paths_are_exact_on_grid_weights() {
    let mut rng = Rng(31337);
    for (name, maxq, group) in [
        ("q4f16_1", 7.0, 32),
        ("q4f16_0", 7.0, 32),
        ("q8f16_1", 127.0, 32),
        ("q8f16_0", 127.0, 32),
        ("q3f16_1", 3.0, 40),
        ("q3f16_0", 3.0, 40),
    ] {
        for (n, k) in [(37, 96), (70, 80), (9, 45)] {
            let w = grid_weights(&mut rng, n, k, maxq, group);
            let e = Encoded::new(name, TensorRole::Linear, n, k, &w);
            assert_eq!(
                e.reference, w,
                "{name}: grid weights must round-trip exactly"
            );
            for rows in [1, 5] {
                let x = rng.vec(rows * k);
                let mut out = vec![0f32; rows * n];
                e.with_view(|v| matmul(v, &x, rows, &mut out));
                for t in 0..rows {
                    let xs = &x[t * k..(t + 1) * k];
                    for (j, wr) in w.chunks(k).enumerate() {
                        let prods = xs.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64);
                        let want: f64 = prods.clone().sum();
                        let mag: f64 = prods.map(f64::abs).sum();
                        let got = out[t * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * mag,
                            "{name} [{n},{k}] rows={rows} out[{t},{j}] = {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}

/// The int8-activation GEMV equals the product with `x` rounded to its int8 block grid (up to f32
/// summation), and so stays within `Σ|w|·d/2` of the exact product, on SIMD and portable paths;
/// other weights fall back to `matmul`.
#[test]
fn int8_activation_gemv_error_is_bounded() {
    let mut rng = Rng(4242);
    let (mut worst, mut sum_rel, mut count) = (0f64, 0f64, 0usize);
    for portable in [false, true] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            FORCE_PORTABLE.with(|f| f.set(portable));
            for (name, maxq, n, k) in [
                ("q4f16_1", 7.0, 37, 64),
                ("q4f16_1", 7.0, 19, 320),
                ("q4f16_1", 7.0, 8, 32),
                ("q8f16_1", 127.0, 37, 64),
                ("q8f16_1", 127.0, 19, 320),
                ("q8f16_1", 127.0, 8, 32),
                ("q4f16_0", 7.0, 37, 64),
                ("q4f16_0", 7.0, 19, 320),
                ("q4f16_0", 7.0, 8, 32),
                ("q8f16_0", 127.0, 37, 64),
                ("q8f16_0", 127.0, 19, 320),
                ("q8f16_0", 127.0, 8, 32),
            ] {
                let e = Encoded::new(
                    name,
                    TensorRole::Linear,
                    n,
                    k,
                    &grid_weights(&mut rng, n, k, maxq, 32),
                );
                let x = rng.vec(k);
                let mut out = vec![0f32; n];
                e.with_view(|w| matmul_int8_activations(w, &x, 1, &mut out));
                for (j, (got, w)) in out.iter().zip(e.reference.chunks(k)).enumerate() {
                    let (mut exact, mut grid, mut mag, mut bound) = (0f64, 0f64, 0f64, 0f64);
                    for (b, xs) in x.chunks(32).enumerate() {
                        let d = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                        for (i, xv) in xs.iter().enumerate() {
                            let wv = w[b * 32 + i] as f64;
                            let xg = (xv / d).round_ties_even() as f64 * d as f64;
                            exact += *xv as f64 * wv;
                            grid += xg * wv;
                            mag += (xg * wv).abs();
                            bound += wv.abs() * d as f64 / 2.0;
                        }
                    }
                    let got = *got as f64;
                    assert!(
                        (got - grid).abs() <= 1e-5 * mag,
                        "{name} [{n},{k}] row {j}: {got} vs {grid} on the int8 grid"
                    );
                    let err = (got - exact).abs();
                    assert!(
                        err <= bound * 1.001 + 1e-5 * mag,
                        "{name} [{n},{k}] row {j}: {got} vs {exact}"
                    );
                    worst = worst.max(err / mag);
                    sum_rel += err / mag;
                    count += 1;
                }
            }
            FORCE_PORTABLE.with(|f| f.set(false));
        });
    }
    println!(
        "int8 activations: error / Σ|x·w| mean {:.2e}, worst {:.2e}",
        sum_rel / count as f64,
        worst
    );
    // Unsupported weights (other schemes, K not a multiple of 32) fall back to the exact path.
    for (name, k) in [
        ("q4f32_0", 64),
        ("q3f16_1", 80),
        ("q4f16_0", 80),
        ("q8f16_1", 80),
    ] {
        let e = Encoded::new(name, TensorRole::Linear, 9, k, &rng.vec(9 * k));
        let x = rng.vec(k);
        let (mut a, mut b) = (vec![0f32; 9], vec![0f32; 9]);
        e.with_view(|w| matmul_int8_activations(w, &x, 1, &mut a));
        e.with_view(|w| matmul(w, &x, 1, &mut b));
        assert_eq!(a, b, "{name} K={k}");
    }
}

/// The 4×3 prefill tile gives bit-identical values to `dot4` (its callers mix the two), and both
/// match an f64 reference, for lengths with and without a SIMD tail.
#[test]
fn dot4x3_equals_dot4() {
    let mut rng = Rng(99);
    for n in [1, 7, 8, 29, 64, 576] {
        let w: Vec<Vec<f32>> = (0..4).map(|_| rng.vec(n)).collect();
        let x: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n)).collect();
        let wr = [&w[0][..], &w[1][..], &w[2][..], &w[3][..]];
        let got = super::simd::dot4x3(wr, [&x[0], &x[1], &x[2]]);
        for c in 0..3 {
            assert_eq!(got[c], super::simd::dot4(wr, &x[c]), "n={n} c={c}");
            for r in 0..4 {
                let want: f64 = w[r]
                    .iter()
                    .zip(&x[c])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!(
                    (got[c][r] as f64 - want).abs() < 1e-4 * (n as f64).sqrt(),
                    "n={n}"
                );
            }
        }
    }
}

/// The f32 kernels give the same bits with and without SIMD (the calibration's determinism across
/// machines rests on it): raw f32 matrix products of every shape class (4-row blocks, tail rows,
/// one activation row, ragged K) and the attention dot product.
#[test]
fn f32_results_are_identical_with_and_without_simd() {
    let mut rng = Rng(99);
    let storage = WeightStorage::Raw { dtype: DType::F32 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    for (n, k, rows) in [(37, 96, 7), (8, 77, 1), (13, 40, 3), (5, 8, 4)] {
        let w = rng.vec(n * k);
        let x = rng.vec(rows * k);
        let bytes: &[u8] = bytemuck::cast_slice(&w);
        let records = [bytes];
        let shape = [n, k];
        let view = WeightView {
            storage: &storage,
            shape: &shape,
            records: &records,
            model_dtype: DType::F32,
        };
        let run = |portable: bool| {
            pool.install(|| {
                FORCE_PORTABLE.with(|f| f.set(portable));
                let mut out = vec![0f32; rows * n];
                matmul(&view, &x, rows, &mut out);
                let d = super::dot(&w[..k], &x[..k]);
                FORCE_PORTABLE.with(|f| f.set(false));
                (out, d)
            })
        };
        let (simd, portable) = (run(false), run(true));
        assert_eq!(
            simd.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            portable.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "[{n},{k}] × {rows} rows"
        );
        assert_eq!(simd.1.to_bits(), portable.1.to_bits(), "dot of {k}");
    }
}

/// Every scheme's kernels, decode (f32 and int8 activations) and prefill, give the bits recorded
/// here, with SIMD and without: each NEON kernel and each portable one repeats its AVX2 one lane
/// for lane, and the f32 paths sum in one order everywhere, so every CPU computes the same
/// values. On x86-64 this pins the AVX2 and portable kernels; on aarch64
/// (`scripts/check-aarch64.sh` runs it under qemu) the NEON and portable ones.
#[test]
fn every_cpu_gives_the_recorded_bits() {
    let hashes = |portable: bool| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(if portable { 1 } else { 3 })
            .build()
            .unwrap();
        pool.install(|| {
            FORCE_PORTABLE.with(|f| f.set(portable));
            let h = kernel_hashes();
            FORCE_PORTABLE.with(|f| f.set(false));
            h
        })
    };
    for portable in [false, true] {
        let (encodings, outputs) = hashes(portable);
        assert_eq!(
            encodings, "e93610b0788faf8f74f7c3c8f44d3c336a48aaf2ca42721ef67fcbb2407878d5",
            "the quantizer's bytes changed (the outputs' check below assumes the same weights)"
        );
        assert_eq!(
            outputs, "711659d11df778ea3820bd4a120db038b69b05286a6d54909ee42392ae03fc35",
            "portable: {portable}. The kernels' results changed: if on purpose, in every \
             instruction set's kernel and the portable one, record the new hash"
        );
    }
}

/// The hashes of every scheme's encoded test matrices and of the kernels' results on them.
fn kernel_hashes() -> (String, String) {
    let mut rng = Rng(99);
    let (mut encodings, mut outputs) = (blake3::Hasher::new(), blake3::Hasher::new());
    let bits = |h: &mut blake3::Hasher, v: &[f32]| {
        for x in v {
            h.update(&x.to_le_bytes());
        }
    };
    // Ragged K for groups of 32 and 40 (80, 45); N with 4-block, 1-block and leftover rows.
    for name in SCHEMES {
        for (n, k) in [(70, 80), (37, 45), (41, 128)] {
            let e = Encoded::new(name, TensorRole::Linear, n, k, &rng.vec(n * k));
            for b in &e.bytes {
                encodings.update(b);
            }
            for rows in [1, 5] {
                let x = rng.vec(rows * k);
                let mut out = vec![0f32; rows * n];
                e.with_view(|w| matmul(w, &x, rows, &mut out));
                bits(&mut outputs, &out);
            }
            let x = rng.vec(k);
            let mut out = vec![0f32; n];
            e.with_view(|w| matmul_int8_activations(w, &x, 1, &mut out));
            bits(&mut outputs, &out);
        }
    }
    (
        encodings.finalize().to_hex().to_string(),
        outputs.finalize().to_hex().to_string(),
    )
}
