//! Elementwise kernels over `[T, cols]` buffers. Grid `[ceil(cols / (WG·VW)), T, 1]`: each
//! invocation handles `VW` (the tuning record's vector_width) columns of one row, `WG` apart so
//! neighbouring invocations touch neighbouring words.

use super::builder::KernelBuilder;
use super::builder::ENTRY_HEAD;
use super::launch::{GridDim, Launch};
use super::spec::{Binary, Unary};

fn grid(b: &KernelBuilder, cols: usize) -> [GridDim; 3] {
    let per = (b.tuning.workgroup_size * b.tuning.vector_width) as u64;
    [
        GridDim::fixed(cols as u64, per),
        GridDim::tokens(1),
        GridDim::one(),
    ]
}

/// The entry point, running `stmt` for every valid column `c` of row `t`.
fn body(b: &mut KernelBuilder, cols: usize, stmt: &str) -> String {
    b.const_u32("COLS", cols);
    b.const_u32("VW", b.tuning.vector_width as usize);
    format!(
        "@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let t = wid.y;
    for (var v = 0u; v < VW; v = v + 1u) {{
        let c = wid.x * WG * VW + v * WG + lid;
        if (c < COLS && t < params.t) {{
            {stmt}
        }}
    }}
}}
",
        b.entry_point
    )
}

/// In place: gelu (exact, with `erf_approx`), relu², sigmoid, scale (`params.scalar` = factor).
pub fn unary(mut b: KernelBuilder, op: Unary, cols: usize) -> (String, Launch) {
    b.activation("buf", true, "buf");
    let f = match op {
        Unary::Gelu => {
            b.helper(&super::erf::wgsl());
            "0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752))"
        }
        Unary::ReluSquare => "max(v, 0.0) * max(v, 0.0)",
        Unary::Sigmoid => "1.0 / (1.0 + exp(-v))",
        Unary::Scale => {
            b.params_scalar("factor");
            "v * params.scalar"
        }
    };
    let stmt = format!("let i = t * COLS + c; let v = buf[i]; buf[i] = {f};");
    let src = body(&mut b, cols, &stmt);
    let g = grid(&b, cols);
    b.finish(&src, g)
}

/// `out = a + b` / `a * b`. `out` may be the same buffer as `a` or `b` (each invocation reads and
/// writes only its own elements), so all three are read_write: WebGPU lets one buffer be bound
/// several times as read_write storage in a dispatch, not as read plus read_write.
pub fn binary(mut b: KernelBuilder, op: Binary, cols: usize) -> (String, Launch) {
    b.activation("a", true, "a");
    b.activation("b", true, "b");
    b.activation("out", true, "y");
    let sym = match op {
        Binary::Add => "+",
        Binary::Mul => "*",
    };
    let stmt = format!("let i = t * COLS + c; y[i] = a[i] {sym} b[i];");
    let src = body(&mut b, cols, &stmt);
    let g = grid(&b, cols);
    b.finish(&src, g)
}

/// `out[t, c] = silu(x[t, c]) * x[t, COLS + c]` with `x = [gate | up]` (`2·COLS` columns).
pub fn silu_mul(mut b: KernelBuilder, cols: usize) -> (String, Launch) {
    b.activation("input", false, "x");
    b.activation("out", true, "y");
    let stmt = "let g = x[t * 2u * COLS + c]; let u = x[t * 2u * COLS + COLS + c]; y[t * COLS + c] = g * (1.0 / (1.0 + exp(-g))) * u;";
    let src = body(&mut b, cols, stmt);
    let g = grid(&b, cols);
    b.finish(&src, g)
}
