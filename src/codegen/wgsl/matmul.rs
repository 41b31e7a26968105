//! Matrix kernels: embedding gather, matmul and logits (`y[rows, N] = x[rows, K] · Wᵀ (+ b)`).
//!
//! - decode, NK storage (raw or quantized `_1`): `matmul_gemv_nk`, one workgroup per
//!   `rows_per_workgroup` output rows; the invocations split K (whole storage words for quantized
//!   weights, so each word is decoded once) and a tree reduction sums their parts.
//! - decode, KN storage (quantized `_0`, words `[K words, N]`): `matmul_gemv_kn`, one invocation
//!   per output row walking K, so neighbouring invocations read neighbouring words.
//! - prefill (any `T`): `matmul_gemm`, tiles of `TT = 8` activation rows × `TN = WG / 8` output
//!   rows, K in steps of `TK = 32` held as `vec4`s; each invocation owns one output, summing 4-wide
//!   dot products. Weights decode through `w_at` into workgroup memory once per tile.
//!
//! In f16 kernels (`codegen::wgsl` module docs) the prefill tiles hold f16 and take 4-wide f16 dot
//! products into the f32 accumulator; the decode variants stay f32 (memory-bound: f16 arithmetic
//! saves no traffic there, and measured slower on lavapipe).
//!
//! Every variant reads activation row `params.row0 + t` and writes output row `t`, for
//! `t < params.rows`: matmul sets rows = T, row0 = 0; logits of the last position only sets rows = 1,
//! row0 = T - 1.

use super::builder::ENTRY_HEAD;
use super::builder::{reduce, KernelBuilder};
use super::launch::{GridDim, Launch};
use super::spec::{MatrixSpec, MatrixStorage, Phase};
use super::weights::{declare_matrix, declare_round, declare_vector};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// `out[t] = row tokens[t] of W`, rounded as the artifact defines decoded values.
pub fn embedding(b: KernelBuilder, m: &MatrixSpec) -> (String, Launch) {
    let mut b = b;
    b.tokens("tokens");
    declare_matrix(&mut b, "weight", m);
    declare_round(&mut b, m);
    b.activation("out", true, "y");
    let body = format!(
        "@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let t = wid.y;
    let k = wid.x * WG + lid;
    if (t >= params.t || k >= W_K) {{ return; }}
    let tok = tokens[t];
    // Ids out of range are the runtime's to reject; a zero row beats a stray read.
    var v = 0.0;
    if (tok < W_N) {{ v = w_round(w_at(tok, k)); }}
    y[t * W_K + k] = v;
}}
",
        b.entry_point
    );
    let grid = [
        GridDim::fixed(m.k as u64, b.tuning.workgroup_size as u64),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}

/// Matmul or logits. Bindings: input, weight records, bias record, output, params.
pub fn matmul(
    b: KernelBuilder,
    m: &MatrixSpec,
    bias: Option<DType>,
    phase: Phase,
    logits: bool,
) -> (String, Launch) {
    let mut b = b;
    b.activation("input", false, "x");
    declare_matrix(&mut b, "weight", m);
    if let Some(d) = bias {
        declare_vector(&mut b, "bias", d, "bias", m.n);
    }
    if logits {
        b.logits("y");
    } else {
        b.activation("out", true, "y");
    }
    let plus_bias = if bias.is_some() { " + bias_at(n)" } else { "" };
    let kn = matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
    match (phase, kn) {
        (Phase::Decode, false) => gemv_nk(b, m, plus_bias),
        (Phase::Decode, true) => gemv_kn(b, m, plus_bias),
        (Phase::Prefill, _) => gemm(b, m, plus_bias),
    }
}

fn gemv_nk(mut b: KernelBuilder, m: &MatrixSpec, plus_bias: &str) -> (String, Launch) {
    let rows = b.tuning.rows_per_workgroup;
    b.const_u32("ROWS", rows as usize);
    let inner = match m.storage {
        MatrixStorage::Raw(_) => {
            "            for (var k = lid; k < W_K; k = k + WG) {
                acc = acc + w_at(n, k) * x[xo + k];
            }"
        }
        MatrixStorage::Quant(_) => {
            "            for (var w = lid; w < W_WPR; w = w + WG) {
                let g = w / W_WPG;
                let j0 = (w % W_WPG) * W_PER_WORD;
                let k0 = g * W_GROUP + j0;
                let p = w_params(n, g);
                var word = w_word(n, w);
                for (var j = 0u; j < W_PER_WORD; j = j + 1u) {
                    if (j0 + j < W_GROUP && k0 + j < W_K) {
                        acc = acc + w_decode(word & W_MASK, p) * x[xo + k0 + j];
                    }
                    word = word >> W_BITS;
                }
            }"
        }
    };
    let body = format!(
        "var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let xo = params.row0 * W_K;
    for (var r = 0u; r < ROWS; r = r + 1u) {{
        let n = wid.x * ROWS + r;
        var acc = 0.0;
        if (n < W_N) {{
{inner}
        }}
{}        if (lid == 0u && n < W_N) {{ y[n] = total{plus_bias}; }}
    }}
}}
",
        b.entry_point,
        reduce(b.tuning.subgroups, "acc", "total", "+")
    );
    let grid = [
        GridDim::fixed(m.n as u64, rows as u64),
        GridDim::one(),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}

fn gemv_kn(b: KernelBuilder, m: &MatrixSpec, plus_bias: &str) -> (String, Launch) {
    let body = format!(
        "@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let n = wid.x * WG + lid;
    if (n >= W_N) {{ return; }}
    let xo = params.row0 * W_K;
    var acc = 0.0;
    for (var g = 0u; g < W_NG; g = g + 1u) {{
        let p = w_params(n, g);
        for (var wi = 0u; wi < W_WPG; wi = wi + 1u) {{
            var word = w_word(n, g * W_WPG + wi);
            let k0 = g * W_GROUP + wi * W_PER_WORD;
            for (var j = 0u; j < W_PER_WORD; j = j + 1u) {{
                if (wi * W_PER_WORD + j < W_GROUP && k0 + j < W_K) {{
                    acc = acc + w_decode(word & W_MASK, p) * x[xo + k0 + j];
                }}
                word = word >> W_BITS;
            }}
        }}
    }}
    y[n] = acc{plus_bias};
}}
",
        b.entry_point
    );
    let grid = [
        GridDim::fixed(m.n as u64, b.tuning.workgroup_size as u64),
        GridDim::one(),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}

/// Activation rows per gemm tile.
pub const GEMM_TT: u32 = 8;
/// K per gemm step.
pub const GEMM_TK: u32 = 32;

fn gemm(mut b: KernelBuilder, m: &MatrixSpec, plus_bias: &str) -> (String, Launch) {
    let tn = b.tuning.workgroup_size / GEMM_TT;
    b.const_u32("TT", GEMM_TT as usize);
    b.const_u32("TN", tn as usize);
    b.const_u32("TK", GEMM_TK as usize);
    let f16 = b.use_f16();
    let body = gemm_body(&b.entry_point, plus_bias, f16);
    let grid = [
        GridDim::fixed(m.n as u64, tn as u64),
        GridDim::rows(GEMM_TT as u64),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}

/// The gemm body. Tiles hold four K values per `vec4` (`elem`), filled through `x_cvt` / `w_cvt`
/// (f16 kernels: activations and decoded weights rounded to f16 once per tile); each 4-wide dot
/// product is added to the f32 accumulator.
fn gemm_body(entry_point: &str, plus_bias: &str, f16: bool) -> String {
    let (elem, zero, x_cvt, w_cvt) = if f16 {
        ("vec4<f16>", "vec4<f16>(0.0h)", "to_h", "f16")
    } else {
        ("vec4<f32>", "vec4<f32>(0.0)", "", "")
    };
    format!(
        "const TK4: u32 = TK / 4u;
var<workgroup> xs: array<{elem}, TT * TK4>;
var<workgroup> ws: array<{elem}, TN * TK4>;

@compute @workgroup_size(WG)
fn {entry_point}{ENTRY_HEAD}
    let n0 = wid.x * TN;
    let t0 = wid.y * TT;
    let ln = lid % TN;
    let lt = lid / TN;
    let rows = params.rows;
    var acc = 0.0;
    for (var k0 = 0u; k0 < W_K; k0 = k0 + TK) {{
        for (var i = lid; i < TT * TK4; i = i + WG) {{
            let t = t0 + i / TK4;
            let k = k0 + (i % TK4) * 4u;
            var v = {zero};
            for (var e = 0u; e < 4u; e = e + 1u) {{
                if (t < rows && k + e < W_K) {{ v[e] = {x_cvt}(x[(params.row0 + t) * W_K + k + e]); }}
            }}
            xs[i] = v;
        }}
        for (var i = lid; i < TN * TK4; i = i + WG) {{
            let n = n0 + i / TK4;
            let k = k0 + (i % TK4) * 4u;
            var v = {zero};
            for (var e = 0u; e < 4u; e = e + 1u) {{
                if (n < W_N && k + e < W_K) {{ v[e] = {w_cvt}(w_at(n, k + e)); }}
            }}
            ws[i] = v;
        }}
        workgroupBarrier();
        for (var kk = 0u; kk < TK4; kk = kk + 1u) {{
            acc = acc + f32(dot(xs[lt * TK4 + kk], ws[ln * TK4 + kk]));
        }}
        workgroupBarrier();
    }}
    let n = n0 + ln;
    let t = t0 + lt;
    if (n < W_N && t < rows) {{ y[t * W_N + n] = acc{plus_bias}; }}
}}
"
    )
}
