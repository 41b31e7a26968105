//! Matrix kernels: embedding gather, matmul and logits (`y[rows, N] = x[rows, K] · Wᵀ (+ b)`).
//!
//! - decode, NK storage (raw or quantized `_1`): `matmul_gemv_nk`, fused dequantize + GEMV.
//!   A block of `threads_per_block` threads computes `rows_per_block` output rows; its threads
//!   split K in 16-byte chunks (`uint4` loads: one chunk is a whole quantization group for q3/q4,
//!   half of one for q8, 8 f16 or 4 f32 raw values; a warp reads 512 contiguous bytes of a row).
//!   Each thread loads its chunk's activations once (float4) and reuses them for every row of the
//!   block, decodes the codes in registers, and the partial sums meet through warp shuffles and
//!   shared memory. Quantized groups use the group-sum form `s·(Σq·x − maxq·Σx)` (sym) or
//!   `s·Σq·x + min·Σx` (asym): one multiply by the scale per group.
//! - decode, KN storage (quantized `_0`, words `[K words, N]`): `matmul_gemv_kn`, 32 output rows
//!   per block (one per lane, so a warp reads 32 neighbouring words), the warps split the groups
//!   and meet in shared memory.
//! - prefill (any `T`), f16 schemes: `matmul_gemm` on f16 tensor cores ([`super::gemm_f16`]).
//! - prefill (any `T`), f32 schemes: `matmul_gemm`, tensor cores: 64×64 output tiles, 4 warps each owning
//!   32×32 (2×4 `mma.sync.m16n8k8` TF32 tiles), K in steps of 32 staged through shared memory
//!   (weights decoded there once per tile). Operands are split into a TF32 high part and a TF32
//!   remainder and multiplied as `hi·hi + hi·lo + lo·hi` ("3xTF32"), which keeps f32-level
//!   accuracy (the CPU reference is f32).
//!
//! Every variant reads activation row `ROW0 + t` and writes output row `t`, for `t < ROWS`.

use super::builder::CudaBuilder;
use super::half_activations::HalfIo;
use super::launch::{CudaLaunch, GridDim, GEMM_THREADS};
use super::weights::{declare_matrix, declare_round, declare_vector};
use crate::codegen::wgsl::spec::{Fusion, MatrixSpec, MatrixStorage, Phase, Unary};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// `out[t] = row tokens[t] of W`, rounded as the artifact defines decoded values.
pub fn embedding(mut b: CudaBuilder, m: &MatrixSpec) -> (String, CudaLaunch) {
    b.tokens("tokens");
    declare_matrix(&mut b, "weight", m);
    declare_round(&mut b, m);
    b.activation("out", true, "y");
    let body = "    const unsigned t = blockIdx.y;
    const unsigned k = blockIdx.x * TPB + threadIdx.x;
    if (t >= T || k >= W_K) return;
    const unsigned tok = tokens[t];
    // Ids out of range are the runtime's to reject; a zero row beats a stray read.
    y[(u64)t * W_K + k] = tok < W_N ? w_round(w_at(tok, k)) : 0.0f;
";
    let tpb = b.tuning.threads_per_block;
    let grid = [
        GridDim::fixed(m.k as u64, tpb as u64),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish("", body, tpb, grid)
}

/// Matmul or logits. Arguments: input, a fused norm's weight, weight records, bias record, a
/// fused residual, output. The decode GEMVs implement every `fusion`, the prefill GEMMs all but
/// a norm (`generate` refuses a fused norm in prefill before it gets here). `f16`: prefill runs
/// on f16 tensor cores ([`super::f16_prefill`]); `half`: the input or the output is an f16
/// buffer ([`super::half_activations`]; only then, `generate` checks).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    mut b: CudaBuilder,
    m: &MatrixSpec,
    bias: Option<DType>,
    phase: Phase,
    logits: bool,
    f16: bool,
    half: HalfIo,
    fusion: Fusion,
) -> Result<(String, CudaLaunch), String> {
    b.activation_of("input", false, "x", half.input);
    if let Some(d) = fusion.rms_norm {
        declare_vector(&mut b, "norm", d, "g");
        b.params_scalar("eps");
    }
    declare_matrix(&mut b, "weight", m);
    if let Some(d) = bias {
        declare_vector(&mut b, "bias", d, "bias");
    }
    if fusion.residual {
        // The residual is usually the output itself (`h = h + x·Wᵀ`): neither is `__restrict__`.
        b.activation_aliased("residual", false, "res");
        b.activation_aliased("out", true, "y");
    } else if logits {
        b.logits("y");
    } else {
        b.activation_of("out", true, "y", half.out);
    }
    let out_n = if fusion.silu_gate { m.n / 2 } else { m.n };
    b.const_u32("OUT_N", out_n);
    let plus_bias = if bias.is_some() { " + bias_at(n)" } else { "" };
    let kn = matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
    let epilogue = GemmEpilogue {
        plus_bias,
        activation: fusion.activation,
        residual: fusion.residual,
        silu_gate: fusion.silu_gate,
        half: half.out,
    };
    match (phase, kn) {
        (Phase::Decode, _) if super::gemv_mma::fits(m) => Ok(super::gemv_mma::gemv_mma(
            b,
            m,
            plus_bias,
            fusion,
            |v, u| store_output(fusion, "o", v, u),
        )),
        (Phase::Decode, false) => gemv_nk(b, m, plus_bias, fusion),
        (Phase::Decode, true) => Ok(gemv_kn(b, m, plus_bias, fusion)),
        (Phase::Prefill, _) if f16 => Ok(super::gemm_f16::gemm_f16(b, m, &epilogue, half.input)),
        (Phase::Prefill, _) => Ok(gemm(b, m, &epilogue)),
    }
}

/// How a prefill GEMM stores its output `[t, n]` from the accumulator: plus the bias, through
/// the fused activation, as f32 or (`half`) f16 rounded as the GEMM reading it would round it.
pub(super) struct GemmEpilogue<'a> {
    pub plus_bias: &'a str,
    pub activation: Option<Unary>,
    /// `+ res[t, n]` after the activation (the residual is f32: `half` is false).
    pub residual: bool,
    /// `silu(gate) · up` of the weight's two halves (`W_N = 2·OUT_N`): the block's tile rows
    /// interleave 8 gate rows with the same features' 8 up rows ([`gemm_tile_row`]), so a
    /// thread's mma tiles `j` (even) and `j + 1` hold a feature's gate and up sums.
    pub silu_gate: bool,
    pub half: bool,
}

/// Row tiles a prefill GEMM's blocks take in turn for one column tile ([`GEMM_BLOCK_TILES`]).
const RASTER_GROUP: u32 = 8;

/// The first statements of a prefill GEMM: its block's tile, `tile_m` (rows, i.e. tokens) and
/// `tile_n` (columns: matrix rows), from the block index in grouped column-major order. Blocks
/// start in launch order (x fastest); in the grid's own order a weight tile is read by blocks a
/// whole row of tiles apart, so for a 512-token prompt each weight tile came from DRAM once per
/// row tile (4 times). Here runs of [`RASTER_GROUP`] row tiles take each column tile in turn,
/// so the blocks reading a weight tile run together (one DRAM read, the rest from L2) while a
/// group's activation rows (8 × 128 rows) stay in L2 as the column tiles go by; a group of
/// fewer row tiles (the last, or a short prompt's) the same way.
pub(super) const GEMM_BLOCK_TILES: &str = "const unsigned raster_lin = blockIdx.y * gridDim.x + blockIdx.x, raster_per_group = RASTER_GROUP * gridDim.x;
    const unsigned raster_first = raster_lin / raster_per_group * RASTER_GROUP, raster_left = gridDim.y - raster_first;
    const unsigned raster_rows = raster_left < RASTER_GROUP ? raster_left : RASTER_GROUP;
    const unsigned tile_m = raster_first + (raster_lin % raster_per_group) % raster_rows;
    const unsigned tile_n = (raster_lin % raster_per_group) / raster_rows;";

/// Declares [`RASTER_GROUP`] for [`GEMM_BLOCK_TILES`].
pub(super) fn raster_group(b: &mut CudaBuilder) {
    b.const_u32("RASTER_GROUP", RASTER_GROUP as usize);
}

/// The matrix row a prefill GEMM block stages as its tile row `nl` (`bn`: the block's tile
/// columns), as a C expression: `n0 + nl`; with a silu gate, 8 gate rows then the same 8
/// features' up rows (`OUT_N` further on), the block covering features `f0 …` (`f0 =
/// tile_n · bn/2`), and `W_N` (outside the matrix: staged as zeros) for a feature past
/// `OUT_N`.
pub(super) fn gemm_tile_row(silu_gate: bool, bn: u32, nl: &str) -> String {
    if silu_gate {
        format!(
            "([tile_n](unsigned nl) -> unsigned {{ const unsigned f = tile_n * {half}u + ((nl >> 4) << 3) + (nl & 7u); return f < OUT_N ? ((nl >> 3) & 1u) * OUT_N + f : W_N; }})({nl})",
            half = bn / 2
        )
    } else {
        format!("(tile_n * {bn}u + {nl})")
    }
}

/// A prefill GEMM's grid along x: its tiles of `bn` matrix rows (`bn / 2` features with a silu
/// gate).
pub(super) fn gemm_grid_x(m: &MatrixSpec, silu_gate: bool, bn: u32) -> GridDim {
    if silu_gate {
        GridDim::fixed((m.n / 2) as u64, (bn / 2) as u64)
    } else {
        GridDim::fixed(m.n as u64, bn as u64)
    }
}

impl GemmEpilogue<'_> {
    /// The statement storing `acc` (an f32 expression) at `y[t, n]`.
    fn store(&self, acc: &str) -> String {
        let mut value = activated(self.activation, format!("{acc}{}", self.plus_bias));
        if self.residual {
            // The same element of `res` (usually `y` itself), read by the thread that writes it.
            value = format!("res[(u64)t * W_N + n] + {value}");
        }
        if self.half {
            format!("y[(u64)t * W_N + n] = f2h_sat({value});")
        } else {
            format!("y[(u64)t * W_N + n] = {value};")
        }
    }
}

/// `value` through `activation` (an f32 expression).
fn activated(activation: Option<Unary>, value: String) -> String {
    match activation {
        Some(op) => format!(
            "([](float v) -> float {{ return {}; }})({value})",
            super::elementwise::unary_expr(op)
        ),
        None => value,
    }
}

/// The 16-byte chunk geometry of an NK row, when rows split into whole chunks.
struct Chunks {
    /// Values per chunk.
    vpc: usize,
    /// Chunks per row.
    cpr: usize,
    /// Code that adds row `n`'s chunk `c` times `xv[]` to `acc[r]`.
    code: String,
}

/// Load the `vpc` activations of chunk `c` (from `k0`) into `xv[]` (float4 when aligned; zero
/// beyond K, unless `whole`: every chunk lies inside K).
fn load_x(vpc: usize, k: usize, whole: bool) -> String {
    let vec4 = k % 4 == 0 && vpc % 4 == 0;
    let full = if vec4 {
        format!(
            "#pragma unroll
                for (unsigned i = 0; i < {}u; ++i) {{
                    const float4 f = reinterpret_cast<const float4*>(xr + k0)[i];
                    xv[4 * i] = f.x; xv[4 * i + 1] = f.y; xv[4 * i + 2] = f.z; xv[4 * i + 3] = f.w;
                }}",
            vpc / 4
        )
    } else {
        format!("#pragma unroll\n                for (unsigned i = 0; i < {vpc}u; ++i) xv[i] = xr[k0 + i];")
    };
    let by_value = "#pragma unroll
                for (unsigned i = 0; i < VPC; ++i) xv[i] = (k0 + i < W_K) ? xr[k0 + i] : 0.0f;";
    format!(
        "float xv[{vpc}];
            {}",
        whole_or_checked(whole, &full, by_value)
    )
}

/// A chunk's code: `full` alone where every chunk lies inside K (`whole`), else `full` for a
/// chunk inside K and `by_value` (checking each value) for the one K ends in.
fn whole_or_checked(whole: bool, full: &str, by_value: &str) -> String {
    if whole {
        return full.to_string();
    }
    format!(
        "if (k0 + VPC <= W_K) {{
                {full}
            }} else {{
                {by_value}
            }}"
    )
}

/// A thread's activation chunk `xv` (VPC values from `k0`) times the fused norm's weight `g`
/// (elements of `dtype`): a whole chunk in 16-byte loads where it is whole vectors of `g`, else
/// value by value inside K (`whole_chunks`: every chunk lies inside K, no checks generated).
/// Why: read value by value (a bounds check, an address and a 2- or 4-byte load each) the
/// weight cost a chunk of 32 values ~200 instructions and 32 load instructions (Llama-2-7B
/// q4f32_1's qkv GEMV on sm_80: a fifth of its loop, and more load instructions than its
/// weights and activation together).
fn scale_by_norm(vpc: usize, whole_chunks: bool, dtype: DType) -> String {
    let by_value = "#pragma unroll
            for (unsigned i = 0; i < VPC; ++i) if (k0 + i < W_K) xv[i] *= g_at(k0 + i);";
    let per_vec = 16 / dtype.size();
    // `k0` is a multiple of VPC: with VPC whole vectors, `g + k0` is 16-byte aligned.
    if vpc % per_vec != 0 {
        return by_value.to_string();
    }
    let value = match dtype {
        DType::F16 => "h2f((unsigned short)((gw[j >> 1] >> ((j & 1u) * 16u)) & 0xFFFFu))",
        DType::BF16 => "bf2f((unsigned short)((gw[j >> 1] >> ((j & 1u) * 16u)) & 0xFFFFu))",
        _ => "__uint_as_float(gw[j])",
    };
    let whole = format!(
        "#pragma unroll
                for (unsigned i = 0; i < VPC / {per_vec}u; ++i) {{
                    const uint4 gv = reinterpret_cast<const uint4*>(g + k0)[i];
                    const unsigned gw[4] = {{gv.x, gv.y, gv.z, gv.w}};
                    #pragma unroll
                    for (unsigned j = 0; j < {per_vec}u; ++j) xv[{per_vec}u * i + j] *= {value};
                }}"
    );
    whole_or_checked(whole_chunks, &whole, by_value)
}

fn nk_chunks(m: &MatrixSpec) -> Option<Chunks> {
    match m.storage {
        MatrixStorage::Raw(dtype) => {
            let es = dtype.size();
            let vpc = 16 / es;
            if (m.k * es) % 16 != 0 {
                return None;
            }
            let conv = match dtype {
                DType::F16 => "h2f((unsigned short)((u[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu))",
                DType::BF16 => "__uint_as_float(((u[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu) << 16)",
                _ => "__uint_as_float(u[i])",
            };
            let code = format!(
                "const uint4 v = reinterpret_cast<const uint4*>(w_raw)[(u64)n * CPR + c];
                const unsigned u[4] = {{v.x, v.y, v.z, v.w}};
                #pragma unroll
                for (unsigned i = 0; i < VPC; ++i) acc[r] = fmaf({conv}, xv[i], acc[r]);"
            );
            Some(Chunks {
                vpc,
                cpr: m.k / vpc,
                code,
            })
        }
        MatrixStorage::Quant(q) => {
            let wb = if q.word16 { 2 } else { 4 };
            let wpc = 16 / wb;
            if q.words_per_group % wpc != 0 || q.words_per_group * q.per_word != q.group {
                return None;
            }
            let vpc = wpc * q.per_word;
            let cpg = q.words_per_group / wpc;
            let words = if q.word16 {
                "const unsigned u[8] = {v.x & 0xFFFFu, v.x >> 16, v.y & 0xFFFFu, v.y >> 16, v.z & 0xFFFFu, v.z >> 16, v.w & 0xFFFFu, v.w >> 16};"
            } else {
                "const unsigned u[4] = {v.x, v.y, v.z, v.w};"
            };
            let code = format!(
                "const uint4 v = reinterpret_cast<const uint4*>(w_q)[(u64)n * CPR + c];
                {words}
                float sqx = 0.0f;
                #pragma unroll
                for (unsigned wi = 0; wi < {wpc}u; ++wi) {{
                    #pragma unroll
                    for (unsigned j = 0; j < W_PER_WORD; ++j)
                        sqx = fmaf((float)((u[wi] >> (j * W_BITS)) & W_MASK), xv[wi * W_PER_WORD + j], sqx);
                }}
                const unsigned g = c / {cpg}u;
                const float s = w_scale(n, g);
                acc[r] += W_SYM ? s * (sqx - W_MAXQ * sx) : fmaf(s, sqx, w_min(n, g) * sx);"
            );
            Some(Chunks {
                vpc,
                cpr: q.n_group * cpg,
                code,
            })
        }
    }
}

/// Per-thread fallback when rows do not split into 16-byte chunks (raw weights with K·size not a
/// multiple of 16, or a word geometry without whole groups per chunk).
fn nk_scalar(m: &MatrixSpec) -> String {
    match m.storage {
        MatrixStorage::Raw(_) => "for (unsigned k = threadIdx.x; k < W_K; k += TPB) {
            const float xk = xin(k);
            #pragma unroll
            for (unsigned r = 0; r < NR; ++r) {
                const unsigned n = row_n(r);
                if (row_ok(r)) acc[r] = fmaf(w_at(n, k), xk, acc[r]);
            }
        }"
        .into(),
        MatrixStorage::Quant(_) => "for (unsigned w = threadIdx.x; w < W_WPR; w += TPB) {
            const unsigned g = w / W_WPG, j0 = (w % W_WPG) * W_PER_WORD, k0 = g * W_GROUP + j0;
            #pragma unroll
            for (unsigned r = 0; r < NR; ++r) {
                const unsigned n = row_n(r);
                if (!row_ok(r)) continue;
                const float s = w_scale(n, g), mn = w_min(n, g);
                unsigned word = w_word(n, w);
                for (unsigned j = 0; j < W_PER_WORD; ++j) {
                    if (j0 + j < W_GROUP && k0 + j < W_K) acc[r] = fmaf(w_decode(word & W_MASK, s, mn), xin(k0 + j), acc[r]);
                    word >>= W_BITS;
                }
            }
        }"
        .into(),
    }
}

/// The weight row of a decode GEMV block's accumulator `r` (C, over `n0`, `RPB`, `OUT_N`): row
/// `n0 + r`, or with a silu gate the gate rows for `r < RPB` and the up rows, `OUT_N` further,
/// for the rest.
pub(super) fn weight_row_of(silu_gate: bool) -> &'static str {
    if silu_gate {
        "r < RPB ? n0 + r : OUT_N + n0 + (r - RPB)"
    } else {
        "n0 + r"
    }
}

/// Bytes of its weight rows a decode GEMV block asks L2 for before it waits ([`prefetch_rows`]):
/// 32 KiB, two 128-byte lines per thread of a 128-thread block.
const PREFETCH_BYTES: usize = 32 << 10;

/// Statements for [`CudaBuilder::pre_wait`] of a decode GEMV whose block reads weight rows
/// `row_n(r)` for `r < rows` (`RPB` output rows; with a silu gate `r < RPB` the gate rows and
/// the rest the up rows, `OUT_N` apart): prefetch the start of each row, up to
/// [`PREFETCH_BYTES`] per run, into L2, for each of the block's `tiles` runs of `RPB` rows.
/// Under programmatic dependent launch the block becomes resident while the kernel before it
/// finishes; its weights do not depend on that kernel, so their first bytes stream in during
/// what would be the gap between the two. Nothing for K-major weights (a block's rows are short
/// runs of many lines). A matrix in row blocks ([`super::row_blocks`]) is prefetched by blocks of
/// 8 rows, each contiguous from where row-major order would start its first row.
pub(super) fn prefetch_rows(m: &MatrixSpec, rows: usize, silu_gate: bool, tiles: usize) -> String {
    let Some((ptr, row_bytes)) = super::weights::nk_rows(m) else {
        return String::new();
    };
    // Prefetched pieces: rows, or blocks of 8 rows.
    let per_piece = if super::row_blocks::row_blocks(m).is_some() {
        super::row_blocks::BLOCK_ROWS
    } else {
        1
    };
    let pieces = rows.div_ceil(per_piece);
    let lines = (row_bytes * per_piece)
        .div_ceil(128)
        .min(PREFETCH_BYTES / 128 / pieces)
        .max(1);
    let row_of = weight_row_of(silu_gate);
    format!(
        "    // Before waiting for the kernel before: the start of this block's weight rows into L2.
    for (unsigned tile = 0; tile < {tiles}u; ++tile) {{
        const unsigned n0 = (blockIdx.x * {tiles}u + tile) * RPB;
        for (unsigned i = threadIdx.x; i < {pieces}u * {lines}u; i += TPB) {{
            const unsigned r = i / {lines}u * {per_piece}u;
            if (n0 + r % RPB >= OUT_N) continue;
            prefetch_l2(reinterpret_cast<const char*>({ptr}) + (u64)({row_of}) * {row_bytes}u + (i % {lines}u) * 128u);
        }}
    }}
"
    )
}

/// Decode GEMV over NK rows: the block's threads split each row's 16-byte chunks; a thread
/// loads a chunk's activations once and uses them for all `rows_per_block` rows (activation
/// reads per block are K floats, not K per row), then warp shuffles and shared memory sum.
fn gemv_nk(
    mut b: CudaBuilder,
    m: &MatrixSpec,
    plus_bias: &str,
    fusion: Fusion,
) -> Result<(String, CudaLaunch), String> {
    if super::row_blocks::row_blocks(m).is_some() {
        return Err("the f32 decode GEMV reads row-major weights, but this matrix is in row blocks for the tensor-core one (an mlcb bug)".into());
    }
    let rpb = b.tuning.rows_per_block;
    b.const_u32("RPB", rpb as usize);
    // Weight rows per block: with a silu gate, each output row needs its gate and its up row.
    b.const_u32("NR", rpb as usize * if fusion.silu_gate { 2 } else { 1 });
    let inner = match nk_chunks(m) {
        Some(ch) => {
            // Every chunk lies inside K: no per-value paths.
            let whole = ch.cpr * ch.vpc <= m.k;
            b.const_u32("VPC", ch.vpc);
            b.const_u32("CPR", ch.cpr);
            format!(
                "for (unsigned c = threadIdx.x; c < CPR; c += TPB) {{
            const unsigned k0 = c * VPC;
            {}{}
            float sx = 0.0f;
            #pragma unroll
            for (unsigned i = 0; i < VPC; ++i) sx += xv[i];
            (void)sx;
            #pragma unroll
            for (unsigned r = 0; r < NR; ++r) {{
                const unsigned n = row_n(r);
                if (!row_ok(r)) continue;
                {}
            }}
        }}",
                load_x(ch.vpc, m.k, whole),
                fusion
                    .rms_norm
                    .map(|d| format!("\n            {}", scale_by_norm(ch.vpc, whole, d)))
                    .unwrap_or_default(),
                ch.code
            )
        }
        None => nk_scalar(m),
    };
    let row_of = weight_row_of(fusion.silu_gate);
    let store = store_output(fusion, "o", "out_val(r)", "out_val(r + RPB)");
    let norm = norm_code(fusion);
    let body = format!(
        "    __shared__ float part[NWARPS][NR];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned t = blockIdx.y;
    if (t >= ROWS) return;
    const float* xr = x + (u64)(ROW0 + t) * W_K;
{prologue}
    // The block's output rows are n0 .. n0 + RPB; accumulator r belongs to weight row row_n(r).
    const unsigned n0 = blockIdx.x * RPB;
    auto row_n = [&](unsigned r) -> unsigned {{ return {row_of}; }};
    auto row_ok = [&](unsigned r) -> bool {{ return n0 + r % RPB < OUT_N; }};
    float acc[NR];
    #pragma unroll
    for (unsigned r = 0; r < NR; ++r) acc[r] = 0.0f;
        {inner}
    #pragma unroll
    for (unsigned r = 0; r < NR; ++r) {{
        const float v = warp_sum(acc[r]);
        if (lane == 0u) part[warp][r] = v;
    }}
{reduce}
    __syncthreads();
{rs}
    auto out_val = [&](unsigned r) -> float {{
        const unsigned n = row_n(r);
        float total = 0.0f;
        for (unsigned w = 0; w < NWARPS; ++w) total += part[w][r];
        return total{scale}{plus_bias};
    }};
    for (unsigned r = threadIdx.x; r < RPB; r += TPB) {{
        const unsigned o = n0 + r;
        if (o >= OUT_N) continue;
        {store}
    }}
",
        prologue = norm.prologue,
        reduce = norm.reduce,
        rs = norm.rs,
        scale = norm.scale,
    );
    let tpb = b.tuning.threads_per_block;
    let out_n = if fusion.silu_gate { m.n / 2 } else { m.n };
    let grid = [
        GridDim::fixed(out_n as u64, rpb as u64),
        GridDim::rows(1),
        GridDim::one(),
    ];
    b.pre_wait = prefetch_rows(
        m,
        rpb as usize * (1 + fusion.silu_gate as usize),
        fusion.silu_gate,
        1,
    );
    Ok(b.finish("", &body, tpb, grid))
}

fn gemv_kn(
    b: CudaBuilder,
    m: &MatrixSpec,
    plus_bias: &str,
    fusion: Fusion,
) -> (String, CudaLaunch) {
    // Lane l computes weight row n. Plain: 32 neighbouring rows per block. Silu-gated: 16 output
    // rows, lanes 0-15 their gate rows and lanes 16-31 their up rows; the up value moves down 16
    // lanes for the product.
    let (per_block, rows) = if fusion.silu_gate {
        (
            16u64,
            "const unsigned o = blockIdx.x * 16u + (lane & 15u);
    const unsigned n = lane < 16u ? o : OUT_N + o;",
        )
    } else {
        (
            32u64,
            "const unsigned o = blockIdx.x * 32u + lane;
    const unsigned n = o;",
        )
    };
    let finish = if fusion.silu_gate {
        format!(
            "const float v = o < OUT_N ? total{plus_bias} : 0.0f;
        const float u = __shfl_sync(0xffffffffu, v, lane + 16u);
        if (lane < 16u && o < OUT_N) {{
            {}
        }}",
            store_output(fusion, "o", "v", "u")
        )
    } else {
        format!(
            "if (o < OUT_N) {{
            const float v = total{plus_bias};
            {}
        }}",
            store_output(fusion, "o", "v", "")
        )
    };
    let norm = norm_code(fusion);
    let body = format!(
        "    __shared__ float part[NWARPS][32];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned t = blockIdx.y;
    if (t >= ROWS) return;
    const float* xr = x + (u64)(ROW0 + t) * W_K;
{prologue}
    {rows}
    float acc = 0.0f;
    if (o < OUT_N) {{
        for (unsigned g = warp; g < W_NG; g += NWARPS) {{
            float sqx = 0.0f, sx = 0.0f;
            for (unsigned wi = 0; wi < W_WPG; ++wi) {{
                unsigned word = w_word(n, g * W_WPG + wi);
                #pragma unroll
                for (unsigned j = 0; j < W_PER_WORD; ++j) {{
                    const unsigned r = wi * W_PER_WORD + j, k = g * W_GROUP + r;
                    if (r < W_GROUP && k < W_K) {{
                        const float xj = xin(k);
                        sqx = fmaf((float)(word & W_MASK), xj, sqx);
                        sx += xj;
                    }}
                    word >>= W_BITS;
                }}
            }}
            const float s = w_scale(n, g);
            acc += W_SYM ? s * (sqx - W_MAXQ * sx) : fmaf(s, sqx, w_min(n, g) * sx);
        }}
    }}
    part[warp][lane] = acc;
{reduce}
    __syncthreads();
    if (warp == 0u) {{
{rs}
        float total = 0.0f;
        for (unsigned i = 0; i < NWARPS; ++i) total += part[i][lane];
        {rescale}
        {finish}
    }}
",
        prologue = norm.prologue,
        reduce = norm.reduce,
        rs = norm.rs,
        rescale = norm.rescale,
    );
    let tpb = b.tuning.threads_per_block;
    let out_n = if fusion.silu_gate { m.n / 2 } else { m.n };
    let grid = [
        GridDim::fixed(out_n as u64, per_block),
        GridDim::rows(1),
        GridDim::one(),
    ];
    b.finish("", &body, tpb, grid)
}

/// The GEMV code of a fused RMS norm of the input ([`Fusion::rms_norm`]). Since
/// `W·(x·r·g) = r·(W·(x·g))` for the row's scalar `r = 1/sqrt(mean(x²) + eps)`, the kernel
/// multiplies by `x·g` (`xin`) and scales its sums by `r` at the end, so the norm costs no pass
/// of its own: every block forms `mean(x²)` itself from the row it reads anyway.
struct NormCode {
    /// After `xr`: `xin(k)` (the activation the products use) and, with the norm, the thread's
    /// share of `Σx²`.
    prologue: &'static str,
    /// Before the block's barrier: the warps' shares of `Σx²` to shared memory.
    reduce: &'static str,
    /// After it: `rs`, the row's scale.
    rs: &'static str,
    /// The factor of every sum.
    scale: &'static str,
    /// The statement applying it to `total`.
    rescale: &'static str,
}

fn norm_code(fusion: Fusion) -> NormCode {
    if fusion.rms_norm.is_none() {
        return NormCode {
            prologue: "    auto xin = [&](unsigned k) -> float { return xr[k]; };",
            reduce: "",
            rs: "",
            scale: "",
            rescale: "",
        };
    }
    NormCode {
        prologue: "    auto xin = [&](unsigned k) -> float { return xr[k] * g_at(k); };
    __shared__ float ss_sh[NWARPS];
    float ss = 0.0f;
    for (unsigned k = threadIdx.x; k < W_K; k += TPB) ss = fmaf(xr[k], xr[k], ss);",
        reduce: "    ss = warp_sum(ss);
    if (lane == 0u) ss_sh[warp] = ss;",
        rs: "    float ss_total = 0.0f;
    for (unsigned w = 0; w < NWARPS; ++w) ss_total += ss_sh[w];
    const float rs = 1.0f / sqrtf(ss_total / (float)W_K + scalar);",
        scale: " * rs",
        rescale: "total *= rs;",
    }
}

/// The statement storing output element `o` of row `t` from the product `v` of its weight row
/// (bias added) and, for a silu gate, `u` of its up row: the activation of `v`, or `silu(v)·u`,
/// then `+ res` (as the CPU's activation op, `SiluMul` and `Add`, in that order), else `v`.
fn store_output(e: Fusion, o: &str, v: &str, u: &str) -> String {
    let mut value = activated(e.activation, v.to_string());
    if e.silu_gate {
        value = format!("silu_gate({value}, {u})");
    }
    if e.residual {
        value = format!("res[(u64)t * OUT_N + {o}] + {value}");
    }
    format!("y[(u64)t * OUT_N + {o}] = {value};")
}

/// Output tile of the tensor-core GEMM: rows (tokens) × columns (features), and K per step.
pub const GEMM_BM: u32 = 64;
pub const GEMM_BN: u32 = 64;
pub const GEMM_BK: u32 = 32;

const MMA_HELPERS: &str = r#"#ifndef MLCB_EMULATE
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned u; asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x)); return u;
}
__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
// x = hi + lo with hi, lo both TF32 (3xTF32 split).
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = to_tf32(x);
    lo = to_tf32(x - __uint_as_float(hi));
}
"#;

/// A warp's accumulators, zeroed: `mi` × `nj` mma tiles of 16×8 (C fragments of four floats).
pub(super) fn warp_tile_acc(mi: usize, nj: usize) -> String {
    format!("float acc[{mi}][{nj}][4] = {{}};")
}

/// Stores [`warp_tile_acc`] to `y` (+ bias), rows `t0 + wm …`, columns `n0 + wn …`, ragged
/// edges skipped. The C fragment layout is the same for the m16n8k8 and m16n8k16 shapes: `c_r`
/// of a 16×8 tile at (g + 8(r/2), 2c + r%2). Shared by [`gemm`] and `gemm_f16`.
pub(super) fn warp_tile_store(mi: usize, nj: usize, epilogue: &GemmEpilogue) -> String {
    if epilogue.silu_gate {
        return warp_tile_store_silu(mi, nj, epilogue);
    }
    let store = epilogue.store("acc[i][j][r]");
    format!(
        "    #pragma unroll
    for (unsigned i = 0; i < {mi}u; ++i)
        #pragma unroll
        for (unsigned j = 0; j < {nj}u; ++j)
            #pragma unroll
            for (unsigned r = 0; r < 4u; ++r) {{
                const unsigned t = t0 + wm + i * 16u + g + (r >> 1) * 8u;
                const unsigned n = n0 + wn + j * 8u + 2u * c + (r & 1u);
                if (t < ROWS && n < W_N) {{ {store} }}
            }}
"
    )
}

/// [`warp_tile_store`] of a silu-gated GEMM ([`GemmEpilogue::silu_gate`]): mma tile `j` (even)
/// holds gate sums and `j + 1` the up sums of the same features (the warp's first tile column
/// `wn` is a multiple of 16), feature `f0 + (wn + 8j)/2 + 2c + r%2`; each gets its bias, the
/// activation of the gate's, then `silu(gate)·up` (+ the residual), as the decode GEMV stores
/// it.
fn warp_tile_store_silu(mi: usize, nj: usize, e: &GemmEpilogue) -> String {
    let bias = |n: &str| e.plus_bias.replace("(n)", &format!("({n})"));
    let mut value = format!(
        "silu_gate({}, u)",
        activated(e.activation, format!("acc[i][j][r]{}", bias("f")))
    );
    if e.residual {
        value = format!("res[(u64)t * OUT_N + f] + {value}");
    }
    let store = if e.half {
        format!("y[(u64)t * OUT_N + f] = f2h_sat({value});")
    } else {
        format!("y[(u64)t * OUT_N + f] = {value};")
    };
    format!(
        "    #pragma unroll
    for (unsigned i = 0; i < {mi}u; ++i)
        #pragma unroll
        for (unsigned j = 0; j < {nj}u; j += 2u)
            #pragma unroll
            for (unsigned r = 0; r < 4u; ++r) {{
                const unsigned t = t0 + wm + i * 16u + g + (r >> 1) * 8u;
                const unsigned f = tile_n * (BN / 2u) + (wn + j * 8u) / 2u + 2u * c + (r & 1u);
                if (t < ROWS && f < OUT_N) {{
                    const float u = acc[i][j + 1u][r]{up_bias};
                    {store}
                }}
            }}
",
        up_bias = bias("OUT_N + f"),
    )
}

fn gemm(mut b: CudaBuilder, m: &MatrixSpec, epilogue: &GemmEpilogue) -> (String, CudaLaunch) {
    raster_group(&mut b);
    b.const_u32("BM", GEMM_BM as usize);
    b.const_u32("BN", GEMM_BN as usize);
    b.const_u32("BK", GEMM_BK as usize);
    b.const_u32("GT", GEMM_THREADS as usize);
    // Fragment layouts of m16n8k8 (PTX ISA, "Matrix Fragments for mma.m16n8k8" .tf32), with
    // g = lane / 4 and c = lane % 4: A (row-major 16×8) a0 (g, c), a1 (g+8, c), a2 (g, c+4),
    // a3 (g+8, c+4); B (8×8, k × n) b0 (k=c, n=g), b1 (k=c+4, n=g); C/D (16×8) c0 (g, 2c),
    // c1 (g, 2c+1), c2 (g+8, 2c), c3 (g+8, 2c+1).
    let body = format!(
        "    __shared__ float xs[BM][BK + 4];
    __shared__ float ws[BN][BK + 4];
    const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    const unsigned g = lane >> 2, c = lane & 3u;
    const unsigned wm = (warp >> 1) * 32u, wn = (warp & 1u) * 32u;
    {tiles}
    const unsigned t0 = tile_m * BM, n0 = tile_n * BN;
    (void)n0;
    {acc}
    for (unsigned k0 = 0; k0 < W_K; k0 += BK) {{
        for (unsigned i = tid; i < BM * BK; i += GT) {{
            const unsigned r = i / BK, kk = i % BK, t = t0 + r, k = k0 + kk;
            xs[r][kk] = (t < ROWS && k < W_K) ? x[(u64)(ROW0 + t) * W_K + k] : 0.0f;
        }}
        for (unsigned i = tid; i < BN * BK; i += GT) {{
            const unsigned r = i / BK, kk = i % BK, n = {row}, k = k0 + kk;
            ws[r][kk] = (n < W_N && k < W_K) ? w_at(n, k) : 0.0f;
        }}
        __syncthreads();
        #pragma unroll
        for (unsigned ks = 0; ks < BK; ks += 8u) {{
            unsigned ahi[2][4], alo[2][4], bhi[4][2], blo[4][2];
            #pragma unroll
            for (unsigned i = 0; i < 2u; ++i) {{
                const unsigned r0 = wm + i * 16u + g;
                split_tf32(xs[r0][ks + c], ahi[i][0], alo[i][0]);
                split_tf32(xs[r0 + 8u][ks + c], ahi[i][1], alo[i][1]);
                split_tf32(xs[r0][ks + c + 4u], ahi[i][2], alo[i][2]);
                split_tf32(xs[r0 + 8u][ks + c + 4u], ahi[i][3], alo[i][3]);
            }}
            #pragma unroll
            for (unsigned j = 0; j < 4u; ++j) {{
                const unsigned nn = wn + j * 8u + g;
                split_tf32(ws[nn][ks + c], bhi[j][0], blo[j][0]);
                split_tf32(ws[nn][ks + c + 4u], bhi[j][1], blo[j][1]);
            }}
            #pragma unroll
            for (unsigned i = 0; i < 2u; ++i)
                #pragma unroll
                for (unsigned j = 0; j < 4u; ++j) {{
                    mma_tf32(acc[i][j], alo[i], bhi[j]);
                    mma_tf32(acc[i][j], ahi[i], blo[j]);
                    mma_tf32(acc[i][j], ahi[i], bhi[j]);
                }}
        }}
        __syncthreads();
    }}
{store}",
        acc = warp_tile_acc(2, 4),
        store = warp_tile_store(2, 4, epilogue),
        tiles = GEMM_BLOCK_TILES,
        row = gemm_tile_row(epilogue.silu_gate, GEMM_BN, "r"),
    );
    let grid = [
        gemm_grid_x(m, epilogue.silu_gate, GEMM_BN),
        GridDim::rows(GEMM_BM as u64),
        GridDim::one(),
    ];
    b.finish(MMA_HELPERS, &body, GEMM_THREADS, grid)
}
