//! Row normalisations: one workgroup per activation row (grid `[1, T, 1]`); the invocations
//! stride over the columns and a tree reduction forms the row statistics in f32.

use super::builder::ENTRY_HEAD;
use super::builder::{reduce, KernelBuilder};
use super::launch::{GridDim, Launch};
use super::weights::declare_vector;
use crate::formats::dtype::DType;

fn grid() -> [GridDim; 3] {
    [GridDim::one(), GridDim::tokens(1), GridDim::one()]
}

/// `out = x / sqrt(mean(x²) + eps) * weight`; `params.scalar` = eps.
pub fn rms_norm(mut b: KernelBuilder, cols: usize, weight: DType) -> (String, Launch) {
    b.const_u32("COLS", cols);
    b.activation("input", false, "x");
    declare_vector(&mut b, "weight", weight, "gamma", cols);
    b.activation("out", true, "y");
    b.params_scalar("eps");
    let body = format!(
        "var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let row = wid.y * COLS;
    var ss = 0.0;
    for (var c = lid; c < COLS; c = c + WG) {{
        let v = x[row + c];
        ss = ss + v * v;
    }}
{}    let inv = 1.0 / sqrt(total / f32(COLS) + params.scalar);
    for (var c = lid; c < COLS; c = c + WG) {{
        y[row + c] = (x[row + c] * inv) * gamma_at(c);
    }}
}}
",
        b.entry_point,
        reduce(b.tuning.subgroups, "ss", "total", "+")
    );
    b.finish(&body, grid())
}

/// `out = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance, two passes);
/// `params.scalar` = eps.
pub fn layer_norm(
    mut b: KernelBuilder,
    cols: usize,
    weight: DType,
    bias: DType,
) -> (String, Launch) {
    b.const_u32("COLS", cols);
    b.activation("input", false, "x");
    declare_vector(&mut b, "weight", weight, "gamma", cols);
    declare_vector(&mut b, "bias", bias, "beta", cols);
    b.activation("out", true, "y");
    b.params_scalar("eps");
    let body = format!(
        "var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let row = wid.y * COLS;
    var s = 0.0;
    for (var c = lid; c < COLS; c = c + WG) {{
        s = s + x[row + c];
    }}
{}    let mean = sum / f32(COLS);
    var sq = 0.0;
    for (var c = lid; c < COLS; c = c + WG) {{
        let d = x[row + c] - mean;
        sq = sq + d * d;
    }}
{}    let inv = 1.0 / sqrt(ssd / f32(COLS) + params.scalar);
    for (var c = lid; c < COLS; c = c + WG) {{
        y[row + c] = (x[row + c] - mean) * inv * gamma_at(c) + beta_at(c);
    }}
}}
",
        b.entry_point,
        reduce(b.tuning.subgroups, "s", "sum", "+"),
        reduce(b.tuning.subgroups, "sq", "ssd", "+")
    );
    b.finish(&body, grid())
}
