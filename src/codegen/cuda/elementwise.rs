//! Elementwise kernels over `[T, cols]` buffers: grid `[ceil(cols / TPB), T, 1]`, one thread per
//! element, neighbouring threads on neighbouring columns.

use super::builder::CudaBuilder;
use super::f16_ops::F16_OPS;
use super::launch::{CudaLaunch, GridDim};
use crate::codegen::wgsl::spec::{Binary, Unary};

fn finish(mut b: CudaBuilder, cols: usize, stmt: &str, shared: &str) -> (String, CudaLaunch) {
    b.const_u32("COLS", cols);
    let body = format!(
        "    const unsigned t = blockIdx.y, c = blockIdx.x * TPB + threadIdx.x;
    if (t >= T || c >= COLS) return;
    {stmt}
"
    );
    let tpb = b.tuning.threads_per_block;
    let grid = [
        GridDim::fixed(cols as u64, tpb as u64),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish(shared, &body, tpb, grid)
}

/// The C expression of `op` applied to the float variable `v` (Scale multiplies by `scalar`).
pub(super) fn unary_expr(op: Unary) -> &'static str {
    match op {
        Unary::Gelu => "0.5f * v * (1.0f + erff(v * 0.70710678118654752f))",
        Unary::ReluSquare => "fmaxf(v, 0.0f) * fmaxf(v, 0.0f)",
        Unary::Sigmoid => "1.0f / (1.0f + expf(-v))",
        Unary::Scale => "v * scalar",
    }
}

/// In place: gelu (exact, `erff`), relu², sigmoid, scale (`scalar` = factor).
pub fn unary(mut b: CudaBuilder, op: Unary, cols: usize) -> (String, CudaLaunch) {
    b.activation("buf", true, "buf");
    if op == Unary::Scale {
        b.params_scalar("factor");
    }
    let stmt = format!(
        "const u64 i = (u64)t * COLS + c; const float v = buf[i]; buf[i] = {};",
        unary_expr(op)
    );
    finish(b, cols, &stmt, "")
}

/// `out = a + b` / `a * b`. `out` may be the same buffer as `a` or `b` (each thread reads and
/// writes only its own element), so no argument is `__restrict__`.
pub fn binary(mut b: CudaBuilder, op: Binary, cols: usize) -> (String, CudaLaunch) {
    b.activation_aliased("a", false, "a");
    b.activation_aliased("b", false, "b");
    b.activation_aliased("out", true, "y");
    let sym = match op {
        Binary::Add => "+",
        Binary::Mul => "*",
    };
    let stmt = format!("const u64 i = (u64)t * COLS + c; y[i] = a[i] {sym} b[i];");
    finish(b, cols, &stmt, "")
}

/// `out[t, c] = silu(x[t, c]) * x[t, COLS + c]` with `x = [gate | up]` (`2·COLS` columns);
/// `half`: `out` is f16 (see [`super::half_activations`]).
pub fn silu_mul(mut b: CudaBuilder, cols: usize, half: bool) -> (String, CudaLaunch) {
    b.activation("input", false, "x");
    b.activation_of("out", true, "y", half);
    let store = if half { "f2h_sat(v)" } else { "v" };
    let stmt = format!("const float g = x[(u64)t * 2u * COLS + c], u = x[(u64)t * 2u * COLS + COLS + c]; const float v = silu_gate(g, u); y[(u64)t * COLS + c] = {store};");
    let shared = if half { F16_OPS } else { "" };
    finish(b, cols, &stmt, shared)
}
