//! Prefill GEMM on f16 tensor cores, for libraries of f16 schemes (q0f16, q3/q4/q8 f16): the
//! scheme says the model computes in f16, and prefill is compute-bound, so its matmuls run as
//! `mma.sync.m16n8k16` with f16 operands and f32 accumulation — one tensor-core instruction per
//! 16×8×16 products where the f32 path's 3xTF32 needs six (`matmul::gemm`).
//!
//! - Tile: 64 rows (tokens) × 128 columns (features) per block of 8 warps in a 2×4
//!   arrangement, each warp 32×32 (2×4 mma tiles); K in steps of 32.
//! - Operands are staged in shared memory as f16: activations (f32 in global memory) rounded to
//!   f16, saturating at ±65504 instead of overflowing; weights decoded in registers (group
//!   scale, code, min in f32, the artifact's value) and rounded to f16. Rows are padded to 40
//!   halves, so the fragment loads (32-bit, `g` rows × `c` pairs) hit 32 distinct banks.
//! - Pipelining: the next K step's global loads go to registers before the current step's
//!   products, and are decoded into the other shared buffer after them (two buffers, one
//!   barrier per step), so memory latency overlaps the tensor-core work.
//! - Weight loads, by what the storage allows: one 16-byte chunk of a row-major (NK) row
//!   (quantized words of whole groups, or raw values), one word of a K-major (KN) matrix
//!   (consecutive threads read consecutive columns), else one decoded element (`w_at`).
//!
//! Every variant reads activation row `ROW0 + t` and writes output row `t`, for `t < ROWS`.

use super::builder::CudaBuilder;
use super::launch::{CudaLaunch, GridDim};
use crate::codegen::wgsl::spec::{Codec, MatrixSpec, MatrixStorage};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// Output tile rows (tokens), columns (features), K per step, and threads per block.
pub const F16_BM: u32 = 64;
pub const F16_BN: u32 = 128;
pub const F16_BK: u32 = 32;
pub const F16_THREADS: u32 = 256;

const HELPERS: &str = r#"#ifndef MLCB_EMULATE
// {lo, hi} rounded to f16 (round to nearest even) in one register, lo in the low half.
__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {
    unsigned r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ void mma_f16(float* c, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
// Activations saturate at the largest f16 instead of becoming infinite.
__device__ __forceinline__ unsigned pack_h2_sat(float lo, float hi) {
    return pack_h2(fminf(fmaxf(lo, -65504.0f), 65504.0f), fminf(fmaxf(hi, -65504.0f), 65504.0f));
}
"#;

/// How a thread stages its share of the weight tile: `units` units of `vpu` consecutive values
/// of one row along K, with the code that fetches one (`fetch`, into registers `wr*[j]`), and
/// the code that decodes it into `vals[]` (`decode`).
struct WeightStaging {
    /// Values per unit.
    vpu: usize,
    /// Register declarations for `UPT` units.
    regs: String,
    /// Unit `u` → `n` (row) and `kk` (offset in the K step); then loads into `…[j]`.
    fetch: String,
    /// `vals[VPU]` from registers `…[j]`, values at `k ≥ W_K` or rows `n ≥ W_N` zero.
    decode: String,
    /// Maps unit `u` to `n`, `kk`.
    map: String,
}

fn staging(m: &MatrixSpec) -> WeightStaging {
    let bk = F16_BK as usize;
    let bn = F16_BN as usize;
    match m.storage {
        MatrixStorage::Raw(dtype) => {
            let es = dtype.size();
            let vpu = 16 / es;
            if (m.k * es) % 16 == 0 && bk % vpu == 0 {
                let conv = match dtype {
                    DType::F16 => {
                        "h2f((unsigned short)((u[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu))"
                    }
                    DType::BF16 => {
                        "bf2f((unsigned short)((u[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu))"
                    }
                    _ => "__uint_as_float(u[i])",
                };
                return WeightStaging {
                    vpu,
                    regs: "uint4 wr_v[UPT];".into(),
                    map: format!(
                        "const unsigned n = u / {upr}u, kk = (u % {upr}u) * VPU;",
                        upr = bk / vpu
                    ),
                    fetch: "wr_v[j] = (n < W_N && k0 + kk < W_K)
                    ? reinterpret_cast<const uint4*>(w_raw)[((u64)n * W_K + k0 + kk) / VPU]
                    : uint4{0u, 0u, 0u, 0u};"
                        .into(),
                    decode: format!(
                        "const uint4 v = wr_v[j];
                const unsigned u[4] = {{v.x, v.y, v.z, v.w}};
                #pragma unroll
                for (unsigned i = 0; i < VPU; ++i) vals[i] = {conv};"
                    ),
                };
            }
        }
        MatrixStorage::Quant(q) => {
            let whole_words =
                q.group % q.per_word == 0 && q.words_per_group * q.per_word == q.group;
            let (sym, minv) = match q.codec {
                Codec::Sym { .. } => (true, "0.0f"),
                Codec::AsymBf16x2 => (false, "wr_m[j]"),
            };
            let decode_values = |words: &str, n_words: usize| {
                format!(
                    "{words}
                #pragma unroll
                for (unsigned wi = 0; wi < {n_words}u; ++wi)
                    #pragma unroll
                    for (unsigned i = 0; i < W_PER_WORD; ++i) {{
                        const unsigned v = wi * W_PER_WORD + i;
                        vals[v] = (k0 + kk + v < W_K) ? w_decode((u[wi] >> (i * W_BITS)) & W_MASK, wr_s[j], {minv}) : 0.0f;
                    }}"
                )
            };
            // The unit's words (`load`) and its group's scale (and min), or zeros (`zero`) for a
            // unit past the matrix's rows or K.
            let (min_load, min_zero) = if sym {
                ("", "")
            } else {
                (" wr_m[j] = w_min(n, grp);", " wr_m[j] = 0.0f;")
            };
            let guarded_fetch = |load: &str, zero: &str| {
                format!(
                    "if (n < W_N && k0 + kk < W_K) {{
                    const unsigned grp = (k0 + kk) / W_GROUP;
                    {load}
                    wr_s[j] = w_scale(n, grp);{min_load}
                }} else {{
                    {zero} wr_s[j] = 0.0f;{min_zero}
                }}"
                )
            };
            let scale_regs = if sym {
                "float wr_s[UPT];"
            } else {
                "float wr_s[UPT], wr_m[UPT];"
            };
            match q.layout {
                Layout::NK => {
                    let wb = if q.word16 { 2 } else { 4 };
                    let wpc = 16 / wb;
                    let vpu = wpc * q.per_word;
                    if whole_words && q.words_per_group % wpc == 0 && bk % vpu == 0 {
                        let words = if q.word16 {
                            "const unsigned u[8] = {v.x & 0xFFFFu, v.x >> 16, v.y & 0xFFFFu, v.y >> 16, v.z & 0xFFFFu, v.z >> 16, v.w & 0xFFFFu, v.w >> 16};"
                        } else {
                            "const unsigned u[4] = {v.x, v.y, v.z, v.w};"
                        };
                        // A chunk of whole words inside one group: its first word is
                        // `k / W_PER_WORD` of the row (no padding between groups).
                        return WeightStaging {
                            vpu,
                            regs: format!("uint4 wr_v[UPT]; {scale_regs}"),
                            map: format!(
                                "const unsigned n = u / {upr}u, kk = (u % {upr}u) * VPU;",
                                upr = bk / vpu
                            ),
                            fetch: guarded_fetch(
                                &format!("wr_v[j] = reinterpret_cast<const uint4*>(w_q)[((u64)n * W_WPR + (k0 + kk) / W_PER_WORD) / {wpc}u];"),
                                "wr_v[j] = uint4{0u, 0u, 0u, 0u};",
                            ),
                            decode: format!(
                                "const uint4 v = wr_v[j];\n                {}",
                                decode_values(words, wpc)
                            ),
                        };
                    }
                }
                Layout::KN => {
                    if whole_words && bk % q.per_word == 0 {
                        // One word per unit; consecutive units are consecutive columns.
                        return WeightStaging {
                            vpu: q.per_word,
                            regs: format!("unsigned wr_w[UPT]; {scale_regs}"),
                            map: format!("const unsigned n = u % {bn}u, kk = (u / {bn}u) * VPU;"),
                            fetch: guarded_fetch(
                                "wr_w[j] = w_word(n, (k0 + kk) / W_PER_WORD);",
                                "wr_w[j] = 0u;",
                            ),
                            decode: decode_values("const unsigned u[1] = {wr_w[j]};", 1),
                        };
                    }
                }
            }
        }
    }
    // Anything else: one decoded element per unit.
    WeightStaging {
        vpu: 1,
        regs: "float wr_f[UPT];".into(),
        map: format!("const unsigned n = u / {bk}u, kk = u % {bk}u;"),
        fetch: "wr_f[j] = (n < W_N && k0 + kk < W_K) ? w_at(n, k0 + kk) : 0.0f;".into(),
        decode: "vals[0] = wr_f[j];".into(),
    }
}

/// The GEMM (`y = x · Wᵀ (+ bias)`); the caller declared `x`, the weight, the bias and `y`.
pub fn gemm_f16(mut b: CudaBuilder, m: &MatrixSpec, plus_bias: &str) -> (String, CudaLaunch) {
    let st = staging(m);
    let units = (F16_BN * F16_BK) as usize / st.vpu;
    let threads = F16_THREADS as usize;
    b.const_u32("BM", F16_BM as usize);
    b.const_u32("BN", F16_BN as usize);
    b.const_u32("BK", F16_BK as usize);
    b.const_u32("PAD", F16_BK as usize + 8);
    b.const_u32("GT", threads);
    b.const_u32("VPU", st.vpu);
    b.const_u32("UNITS", units);
    b.const_u32("UPT", units.div_ceil(threads));
    // Activations: units of 4 values (float4 when rows are 16-byte aligned).
    let x_units = (F16_BM * F16_BK / 4) as usize;
    b.const_u32("XPT", x_units.div_ceil(threads));
    let x_vec = m.k % 4 == 0;
    let x_fetch = if x_vec {
        "xr[j] = (t < ROWS && k < W_K) ? *reinterpret_cast<const float4*>(x + (u64)(ROW0 + t) * W_K + k) : float4{0.0f, 0.0f, 0.0f, 0.0f};"
    } else {
        "const float* xp = x + (u64)(ROW0 + t) * W_K;
                const bool in = t < ROWS;
                xr[j] = float4{(in && k < W_K) ? xp[k] : 0.0f, (in && k + 1u < W_K) ? xp[k + 1u] : 0.0f,
                               (in && k + 2u < W_K) ? xp[k + 2u] : 0.0f, (in && k + 3u < W_K) ? xp[k + 3u] : 0.0f};"
    };
    // Stores of one unit's values into ws: 16 bytes at a time where the unit allows it.
    let w_store = if st.vpu % 8 == 0 {
        "#pragma unroll
                for (unsigned i = 0; i < VPU / 8u; ++i) {
                    uint4 h;
                    h.x = pack_h2(vals[8 * i], vals[8 * i + 1]); h.y = pack_h2(vals[8 * i + 2], vals[8 * i + 3]);
                    h.z = pack_h2(vals[8 * i + 4], vals[8 * i + 5]); h.w = pack_h2(vals[8 * i + 6], vals[8 * i + 7]);
                    *reinterpret_cast<uint4*>(&ws[buf][n][kk + 8 * i]) = h;
                }"
    } else if st.vpu % 2 == 0 {
        "#pragma unroll
                for (unsigned i = 0; i < VPU / 2u; ++i)
                    *reinterpret_cast<unsigned*>(&ws[buf][n][kk + 2 * i]) = pack_h2(vals[2 * i], vals[2 * i + 1]);"
    } else {
        "#pragma unroll
                for (unsigned i = 0; i < VPU; ++i) ws[buf][n][kk + i] = (unsigned short)(pack_h2(vals[i], 0.0f) & 0xFFFFu);"
    };
    // Fragment layouts of m16n8k16 .f16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
    // floating point type"), g = lane / 4, c = lane % 4, each register two halves (lower index
    // in the low half): A (16×16, row-major) a0 (g, 2c..), a1 (g+8, 2c..), a2 (g, 2c+8..),
    // a3 (g+8, 2c+8..); B (16×8, k × n) b0 (k = 2c.., n = g), b1 (k = 2c+8.., n = g);
    // C/D (16×8) c0 (g, 2c), c1 (g, 2c+1), c2 (g+8, 2c), c3 (g+8, 2c+1).
    let body = format!(
        "    __shared__ __align__(16) unsigned short xs[2][BM][PAD];
    __shared__ __align__(16) unsigned short ws[2][BN][PAD];
    const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    const unsigned g = lane >> 2, c = lane & 3u;
    const unsigned wm = (warp >> 2) * 32u, wn = (warp & 3u) * 32u;
    const unsigned t0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float4 xr[XPT];
    {regs}
    // Global memory → registers for the K step at k0.
    auto fetch = [&](unsigned k0) {{
        #pragma unroll
        for (unsigned j = 0; j < XPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (u < BM * BK / 4u) {{
                const unsigned t = t0 + u / (BK / 4u), k = k0 + (u % (BK / 4u)) * 4u;
                {x_fetch}
            }}
        }}
        #pragma unroll
        for (unsigned j = 0; j < UPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (u < UNITS) {{
                {map}
                (void)kk;
                // `map` gives the tile's row; the loads index the matrix's row.
                const unsigned nl = n;
                {{
                    const unsigned n = n0 + nl;
                    {fetch}
                }}
            }}
        }}
    }};
    // Registers → f16 in shared buffer `buf`.
    auto stash = [&](unsigned buf, unsigned k0) {{
        (void)k0;
        #pragma unroll
        for (unsigned j = 0; j < XPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (u < BM * BK / 4u) {{
                const unsigned r = u / (BK / 4u), kk = (u % (BK / 4u)) * 4u;
                const float4 f = xr[j];
                *reinterpret_cast<unsigned*>(&xs[buf][r][kk]) = pack_h2_sat(f.x, f.y);
                *reinterpret_cast<unsigned*>(&xs[buf][r][kk + 2u]) = pack_h2_sat(f.z, f.w);
            }}
        }}
        #pragma unroll
        for (unsigned j = 0; j < UPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (u < UNITS) {{
                {map}
                float vals[VPU];
                {decode}
                {w_store}
            }}
        }}
    }};
    {acc}
    fetch(0u);
    stash(0u, 0u);
    __syncthreads();
    unsigned buf = 0u;
    for (unsigned k0 = 0; k0 < W_K; k0 += BK) {{
        const bool more = k0 + BK < W_K;
        if (more) fetch(k0 + BK);
        #pragma unroll
        for (unsigned ks = 0; ks < BK; ks += 16u) {{
            unsigned a[2][4], bf[4][2];
            #pragma unroll
            for (unsigned i = 0; i < 2u; ++i) {{
                const unsigned r0 = wm + i * 16u + g;
                a[i][0] = *reinterpret_cast<const unsigned*>(&xs[buf][r0][ks + 2u * c]);
                a[i][1] = *reinterpret_cast<const unsigned*>(&xs[buf][r0 + 8u][ks + 2u * c]);
                a[i][2] = *reinterpret_cast<const unsigned*>(&xs[buf][r0][ks + 2u * c + 8u]);
                a[i][3] = *reinterpret_cast<const unsigned*>(&xs[buf][r0 + 8u][ks + 2u * c + 8u]);
            }}
            #pragma unroll
            for (unsigned j = 0; j < 4u; ++j) {{
                const unsigned nn = wn + j * 8u + g;
                bf[j][0] = *reinterpret_cast<const unsigned*>(&ws[buf][nn][ks + 2u * c]);
                bf[j][1] = *reinterpret_cast<const unsigned*>(&ws[buf][nn][ks + 2u * c + 8u]);
            }}
            #pragma unroll
            for (unsigned i = 0; i < 2u; ++i)
                #pragma unroll
                for (unsigned j = 0; j < 4u; ++j) mma_f16(acc[i][j], a[i], bf[j]);
        }}
        // The other buffer was last read before the previous barrier: safe to fill now.
        if (more) stash(buf ^ 1u, k0 + BK);
        __syncthreads();
        buf ^= 1u;
    }}
{store}",
        acc = super::matmul::WARP_TILE_ACC,
        store = super::matmul::warp_tile_store(plus_bias),
        regs = st.regs,
        map = st.map,
        fetch = st.fetch,
        decode = st.decode,
    );
    let grid = [
        GridDim::fixed(m.n as u64, F16_BN as u64),
        GridDim::rows(F16_BM as u64),
        GridDim::one(),
    ];
    b.finish(HELPERS, &body, F16_THREADS, grid)
}
