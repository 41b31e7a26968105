//! Row normalisations: one block per activation row (grid `[1, T, 1]`); the threads stride over
//! the columns and a warp-shuffle block reduction forms the row statistics in f32.

use super::builder::CudaBuilder;
use super::f16_ops::F16_OPS;
use super::launch::{CudaLaunch, GridDim};
use super::weights::declare_vector;
use crate::formats::dtype::DType;

fn grid() -> [GridDim; 3] {
    [GridDim::one(), GridDim::tokens(1), GridDim::one()]
}

/// Declares the output (f16 when `half`) and gives the statement storing `v` at column `c` of
/// row `t`, with the device code it needs.
fn output(b: &mut CudaBuilder, half: bool) -> (&'static str, &'static str) {
    b.activation_of("out", true, "y", half);
    if half {
        // Rounded as the f16 GEMM that reads it used to round (see `half_activations`).
        ("y[(u64)t * COLS + c] = f2h_sat(v);", F16_OPS)
    } else {
        ("y[(u64)t * COLS + c] = v;", "")
    }
}

/// `out = x / sqrt(mean(x²) + eps) * weight`; `scalar` = eps. `half`: `out` is f16.
pub fn rms_norm(
    mut b: CudaBuilder,
    cols: usize,
    weight: DType,
    half: bool,
) -> (String, CudaLaunch) {
    b.const_u32("COLS", cols);
    b.activation("input", false, "x");
    declare_vector(&mut b, "weight", weight, "gamma");
    let (store, shared) = output(&mut b, half);
    b.params_scalar("eps");
    let body = format!(
        "    __shared__ float red[32];
    const unsigned t = blockIdx.y;
    if (t >= T) return;
    const float* xr = x + (u64)t * COLS;
    float ss = 0.0f;
    for (unsigned c = threadIdx.x; c < COLS; c += TPB) ss = fmaf(xr[c], xr[c], ss);
    const float total = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(total / (float)COLS + scalar);
    for (unsigned c = threadIdx.x; c < COLS; c += TPB) {{ const float v = (xr[c] * inv) * gamma_at(c); {store} }}
"
    );
    let tpb = b.tuning.threads_per_block;
    b.finish(shared, &body, tpb, grid())
}

/// `out = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance, two passes);
/// `scalar` = eps. `half`: `out` is f16.
pub fn layer_norm(
    mut b: CudaBuilder,
    cols: usize,
    weight: DType,
    bias: DType,
    half: bool,
) -> (String, CudaLaunch) {
    b.const_u32("COLS", cols);
    b.activation("input", false, "x");
    declare_vector(&mut b, "weight", weight, "gamma");
    declare_vector(&mut b, "bias", bias, "beta");
    let (store, shared) = output(&mut b, half);
    b.params_scalar("eps");
    let body = format!(
        "    __shared__ float red[32];
    const unsigned t = blockIdx.y;
    if (t >= T) return;
    const float* xr = x + (u64)t * COLS;
    float s = 0.0f;
    for (unsigned c = threadIdx.x; c < COLS; c += TPB) s += xr[c];
    const float mean = block_sum(s, red) / (float)COLS;
    float sq = 0.0f;
    for (unsigned c = threadIdx.x; c < COLS; c += TPB) {{ const float d = xr[c] - mean; sq = fmaf(d, d, sq); }}
    const float inv = 1.0f / sqrtf(block_sum(sq, red) / (float)COLS + scalar);
    for (unsigned c = threadIdx.x; c < COLS; c += TPB) {{ const float v = (xr[c] - mean) * inv * gamma_at(c) + beta_at(c); {store} }}
"
    );
    let tpb = b.tuning.threads_per_block;
    b.finish(shared, &body, tpb, grid())
}
