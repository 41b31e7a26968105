//! A micro-benchmark of the GEMV kernels (ignored by default; no timed assertions). Run with
//! `CARGO_PROFILE_DEV_OPT_LEVEL=3 cargo test --lib kernels::bench -- --ignored --nocapture`.

use super::tests::Encoded;
use super::{matmul, matmul_int8_activations, WeightView};
use crate::quant::scheme::TensorRole;
use std::time::Instant;

/// Median seconds of `f` over `reps` runs after a warm-up.
pub(super) fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn bench_one(name: &str, n: usize, k: usize, threads: usize, int8: bool) {
    let values: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let e = Encoded::new(name, TensorRole::Linear, n, k, &values);
    let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0).collect();
    let mut out = vec![0f32; n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let slices: Vec<&[u8]> = e.bytes.iter().map(|b| b.as_slice()).collect();
    let w = WeightView {
        storage: &e.storage,
        shape: &e.shape,
        records: &slices,
        model_dtype: e.model_dtype,
    };
    let secs = pool.install(|| {
        time_median(200, || {
            if int8 {
                matmul_int8_activations(&w, &x, 1, &mut out)
            } else {
                matmul(&w, &x, 1, &mut out)
            }
        })
    });
    let bytes: usize = e.bytes.iter().map(|b| b.len()).sum();
    println!(
        "{name:8}{} [{n:5},{k:5}] threads={threads}: {:8.1} µs  {:6.2} GB/s",
        if int8 { "+i8" } else { "   " },
        secs * 1e6,
        bytes as f64 / secs / 1e9
    );
}

#[test]
#[ignore]
fn gemv_timings() {
    for threads in [1, 2] {
        for (name, int8) in [
            ("q4f16_1", false),
            ("q4f16_1", true),
            ("q4f16_0", false),
            ("q8f16_1", false),
            ("q0f16", false),
        ] {
            bench_one(name, 576, 1536, threads, int8);
            bench_one(name, 1536, 576, threads, int8);
        }
    }
}

#[test]
#[ignore]
fn prefill_and_quantize_timings() {
    let (n, k, rows) = (1536, 576, 16);
    let values: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..rows * k)
        .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
        .collect();
    for name in ["q4f16_1", "q4f16_0", "q3f16_1", "q4f32_1"] {
        let e = Encoded::new(name, TensorRole::Linear, n, k, &values);
        let slices: Vec<&[u8]> = e.bytes.iter().map(|b| b.as_slice()).collect();
        let w = WeightView {
            storage: &e.storage,
            shape: &e.shape,
            records: &slices,
            model_dtype: e.model_dtype,
        };
        let mut out = vec![0f32; rows * n];
        let pre = time_median(21, || matmul(&w, &x, rows, &mut out));
        let mut out1 = vec![0f32; n];
        let one = time_median(21, || matmul(&w, &x[..k], 1, &mut out1));
        println!(
            "{name} [{n},{k}]: rows={rows} {:.1} µs ({:.1} µs/row), rows=1 {:.1} µs",
            pre * 1e6,
            pre * 1e6 / rows as f64,
            one * 1e6
        );
    }
    let big: Vec<f32> = (0..49152 * 576)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let s = crate::quant::scheme::scheme("q4f16_1").unwrap();
    let t = time_median(1, || {
        crate::quant::quantize_param(s, TensorRole::Embedding, "e.weight", &[49152, 576], &big)
            .unwrap();
    });
    println!("quantize_param q4f16_1 [49152, 576]: {:.0} ms", t * 1e3);
}
