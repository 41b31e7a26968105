//! Prefill GEMM on f16 tensor cores, for libraries of f16 schemes (q0f16, q3/q4/q8 f16): the
//! scheme says the model computes in f16, and prefill is compute-bound, so its matmuls run as
//! `mma.sync.m16n8k16` with f16 operands and f32 accumulation — one tensor-core instruction per
//! 16×8×16 products where the f32 path's 3xTF32 needs six (`matmul::gemm`).
//!
//! - Tile: 128 rows (tokens) × 128 columns (features) per block; K in steps of 32. By default 8
//!   warps in a 2×4 arrangement, each warp 64×32 (4×4 mma tiles); with a tuning record of 128
//!   threads 4 warps of 64×64 ([`WarpTiles`]). A warp's fragments come from shared memory by
//!   `ldmatrix.x4` (one instruction per 16×16 operand tile): per 16 K, 6 loads feed 16 mma (64×32)
//!   or 8 feed 32 (64×64).
//! - Operands are staged in shared memory as f16: activations copied as they are where the
//!   kernel before wrote them in f16 ([`super::half_activations`]), else f32 rounded to f16 by
//!   `cvt.rn.satfinite` (saturating at ±65504 instead of overflowing), the same rounding;
//!   weights decoded in registers. Rows are padded to 40 halves, so each 8-row `ldmatrix`
//!   phase hits 32 distinct banks.
//! - Pipelining: the next K step's global loads go to registers before the current step's
//!   products, and are decoded into the other shared buffer after them (two buffers, one
//!   barrier per step), so memory latency overlaps the tensor-core work. With a tuning record of
//!   `rows_per_block` 2, an f16 activation tile instead goes by `cp.async` into a ring of three
//!   buffers, two steps ahead, and raw f16 weights into a ring of their own ([`x_ring`]); the
//!   tune stage times both. In an sm_90 library a record of `rows_per_block` 4 runs the same
//!   staging into Hopper's warpgroup MMA instead ([`super::gemm_wgmma`]; pinned tuning files
//!   only, until it is measured on a GPU).
//! - Why the weight decoding is specialised: a prefill block decodes its 128×32 weight tile
//!   every K step, and decoding one value at a time in f32 made the kernel issue-bound at ~450
//!   SASS instructions per warp per step for 16 mma (Llama-2-7B's q4f16_1 kernels). Sym 4/8-bit
//!   codes with f16 scales (every quantized f16 scheme but q3) are decoded two at a time in f16
//!   arithmetic, bit-identical ([`super::f16_ops`]); raw f16 weights are stored as they are.
//!   Bounds checks are emitted only for a dimension that is not a multiple of the tile.
//!   Addresses are formed once: `ldmatrix` takes a lane's 32-bit shared address plus constant
//!   offsets, and a thread's activation rows are one pointer plus constant row offsets (64-bit
//!   address arithmetic per load had been a third of the loop's instructions).
//! - A call's last row tile may be short (a 16-token prompt fills 16 of its 128 rows): its warps
//!   run a copy of the K loop that multiplies only their 16-row mma tiles holding rows of the
//!   call, instead of 8× the tensor-core work; full tiles run the loop without those branches.
//!
//! Every variant reads activation row `ROW0 + t` and writes output row `t`, for `t < ROWS`.

use super::builder::CudaBuilder;
use super::f16_ops::{f16_decodable, sym_f16_decoder, F16_OPS};
use super::launch::{CudaLaunch, GridDim};
use crate::codegen::wgsl::spec::{Codec, MatrixSpec, MatrixStorage, QuantSpec};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// Output tile rows (tokens), columns (features) and K per step.
pub const F16_BM: u32 = 128;
pub const F16_BN: u32 = 128;
pub const F16_BK: u32 = 32;
/// mma tiles per warp along M (16 rows each).
const WARP_MI: usize = 4;

/// Whether a prefill matmul over `m` runs here: the model computes in f16 (the scheme's
/// choice, [`super::f16_prefill`] of its plan); else the 3xTF32 GEMM (`matmul::gemm`).
pub fn runs(m: &MatrixSpec) -> bool {
    m.model_dtype == DType::F16
}

/// The tuning's `threads_per_block` values that pick the warp tilings ([`WarpTiles::for_threads`]):
/// the tune stage's candidates, the default first.
pub const TILING_THREADS: [u32; 2] = [256, 128];

/// The tuning's `rows_per_block` values, read as how many K steps ahead the activation tile is
/// fetched: 1 (the default) stages both operands through registers one step ahead;
/// [`X_RING_AHEAD`] copies the activation by `cp.async` into a ring of shared buffers
/// ([`x_ring`]).
pub const STAGING_ROWS: [u32; 2] = [1, X_RING_AHEAD];
/// K steps ahead the activation ring is filled; it has one buffer more.
pub const X_RING_AHEAD: u32 = 2;
const X_RING_STAGES: u32 = X_RING_AHEAD + 1;

/// Whether the GEMM with tuning `rows_per_block` copies its activation tile through the ring:
/// the record asks for it ([`X_RING_AHEAD`]), and the activation is f16 in rows of whole 16-byte
/// chunks (`cp.async` copies bytes as they are; a chunk is wholly inside K or past it).
///
/// Why: with one step of register staging, a K step's loads must land within one step's products
/// (per SM ~512 tensor-core cycles for two blocks of 128×128×32), about an L2 round trip under
/// load; two steps ahead they have twice that, and the activation needs no registers on the way
/// (their 16-byte units were a tenth of the default tiling's 126 registers). Raw f16 weights
/// (q0f16) take a ring of their own, filled in the same groups of copies; other weights are
/// decoded through registers as before. In rows of 64 bytes (no padding, 8 KiB a buffer: three
/// buffers and the two padded weight buffers, or the weights' three, fit the 48 KiB of static
/// shared memory), 16-byte chunk `c` of row `r` lies at chunk `c ^ ((r / 2) % 4)`, so an
/// `ldmatrix` phase's 8 rows still hit 32 distinct banks.
pub fn x_ring(rows_per_block: u32, half_input: bool, k: usize) -> bool {
    rows_per_block == X_RING_AHEAD && half_input && k % 8 == 0
}

/// How a block's warps share its 128×128 tile. The tuning's `threads_per_block` picks it: 128
/// gives [`WarpTiles::Square`], anything else the default [`WarpTiles::Wide`] (the kernel's
/// block is fixed otherwise; records of other values predate the knob).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WarpTiles {
    /// 8 warps in 2 (M) × 4 (N), each 64×32 (4×4 mma tiles): per 16 K a warp's 6 `ldmatrix`
    /// feed 16 mma. Two blocks (16 warps) per SM.
    Wide,
    /// 4 warps in 2 × 2, each 64×64 (4×8 mma tiles): 8 `ldmatrix` feed 32 mma, a third less
    /// shared-memory traffic per product, for 128 accumulators a thread (CUTLASS's usual warp
    /// tile for f16 on sm_80). Two blocks (8 warps) per SM.
    Square,
}

impl WarpTiles {
    pub fn for_threads(threads_per_block: u32) -> WarpTiles {
        if threads_per_block == 128 {
            WarpTiles::Square
        } else {
            WarpTiles::Wide
        }
    }
    pub fn threads(self) -> u32 {
        32 * self.warps_m() * self.warps_n()
    }
    fn warps_m(self) -> u32 {
        2
    }
    fn warps_n(self) -> u32 {
        match self {
            WarpTiles::Wide => 4,
            WarpTiles::Square => 2,
        }
    }
    /// mma tiles per warp along N (8 columns each).
    fn nj(self) -> usize {
        (F16_BN / self.warps_n()) as usize / 8
    }
}

/// How a thread stages its share of the weight tile: `units` units of `vpu` consecutive values
/// of one row along K, with the code that fetches one (`fetch`, into registers `wr*[j]`), and
/// the code that turns it into f16 pairs `h[]` in K order (`decode`).
struct WeightStaging {
    /// Values per unit.
    vpu: usize,
    /// Device functions the decode calls.
    functions: String,
    /// Register declarations for `UPT` units.
    regs: String,
    /// Maps unit `u` to `n` (tile row) and `kk` (offset in the K step).
    map: String,
    /// Loads unit `j` (row `n` of the matrix, K offset `k0 + kk`) into registers `…[j]`.
    fetch: String,
    /// `h[(VPU + 1) / 2]` from registers `…[j]`.
    decode: String,
}

/// Map of units of `vpu` values for a row-major (NK) matrix: consecutive units walk a row's K
/// step (adjacent threads read adjacent bytes), then the next row.
fn nk_map(vpu: usize) -> String {
    format!(
        "const unsigned n = u / {upr}u, kk = (u % {upr}u) * VPU;",
        upr = F16_BK as usize / vpu
    )
}

/// Map for a K-major (KN) matrix: consecutive units are consecutive columns (coalesced words).
fn kn_map() -> String {
    format!(
        "const unsigned n = u % {bn}u, kk = (u / {bn}u) * VPU;",
        bn = F16_BN
    )
}

/// Units of sym 4/8-bit codes with f16 scales, decoded in f16 pairs (`dq_word`); `None` when
/// the storage has another shape.
fn sym_f16_staging(
    m: &MatrixSpec,
    q: &QuantSpec,
    edges: &Edges,
    threads: usize,
) -> Option<WeightStaging> {
    let Codec::Sym { maxq, .. } = q.codec else {
        return None;
    };
    if !f16_decodable(q) {
        return None;
    }
    let bk = F16_BK as usize;
    // Words per unit: every thread one unit per K step where the tile allows (NK), else one
    // word (KN, whose words of a row are a column apart).
    let uw = match q.layout {
        Layout::NK => {
            let words_per_step = bk / q.per_word;
            (words_per_step * F16_BN as usize / threads).clamp(1, 4)
        }
        Layout::KN => 1,
    };
    let vpu = uw * q.per_word;
    let whole = q.words_per_group * q.per_word == q.group
        && q.words_per_group % uw == 0
        && bk % vpu == 0
        && m.k % vpu == 0;
    if !whole || !matches!(uw, 1 | 2 | 4) {
        return None;
    }
    let (vec, zero, words) = match uw {
        1 => ("unsigned", "0u", "const unsigned u[1] = {wr_v[j]};"),
        2 => (
            "uint2",
            "uint2{0u, 0u}",
            "const unsigned u[2] = {wr_v[j].x, wr_v[j].y};",
        ),
        _ => (
            "uint4",
            "uint4{0u, 0u, 0u, 0u}",
            "const unsigned u[4] = {wr_v[j].x, wr_v[j].y, wr_v[j].z, wr_v[j].w};",
        ),
    };
    let (map, load) = match q.layout {
        // `w_word_index` is also right for row blocks ([`super::row_blocks`]): a unit of uw
        // words lies inside one 16-byte unit.
        Layout::NK => (
            nk_map(vpu),
            format!(
                "wr_v[j] = reinterpret_cast<const {vec}*>(w_q)[w_word_index(n, (k0 + kk) / W_PER_WORD) / {uw}u];
                wr_s[j] = w_s[w_scale_index(n, (k0 + kk) / W_GROUP)];"
            ),
        ),
        Layout::KN => (
            kn_map(),
            "wr_v[j] = w_q[(u64)((k0 + kk) / W_PER_WORD) * W_N + n];
                wr_s[j] = w_s[(u64)((k0 + kk) / W_GROUP) * W_N + n];"
                .to_string(),
        ),
    };
    let pairs = q.per_word / 2;
    Some(WeightStaging {
        vpu,
        functions: sym_f16_decoder(q, maxq),
        regs: format!("{vec} wr_v[UPT]; unsigned short wr_s[UPT];"),
        map,
        fetch: edges.fetch(&load, &format!("wr_v[j] = {zero}; wr_s[j] = 0;")),
        decode: format!(
            "{words}
                const unsigned s2 = (unsigned)wr_s[j] * 0x10001u;
                #pragma unroll
                for (unsigned wi = 0; wi < {uw}u; ++wi) dq_word(u[wi], s2, h + wi * {pairs}u);"
        ),
    })
}

/// Which tile edges need bounds checks: N or K not a multiple of the tile's.
struct Edges {
    n: bool,
    k: bool,
}

impl Edges {
    /// A unit's fetch `code` under a bounds check where the matrix has a ragged edge; `zero`
    /// fills the registers of a unit outside the matrix.
    fn fetch(&self, code: &str, zero: &str) -> String {
        if self.n || self.k {
            format!("if (n < W_N && k0 + kk < W_K) {{ {code} }} else {{ {zero} }}")
        } else {
            code.to_string()
        }
    }
}

fn staging(m: &MatrixSpec, threads: usize) -> WeightStaging {
    let bk = F16_BK as usize;
    let edges = Edges {
        n: m.n % F16_BN as usize != 0,
        k: m.k % bk != 0,
    };
    // An odd last value pairs with zero.
    let pack_vals = "#pragma unroll
                for (unsigned i = 0; i < HPU; ++i) h[i] = pack_h2(vals[2 * i], 2 * i + 1 < VPU ? vals[2 * i + 1] : 0.0f);";
    match m.storage {
        MatrixStorage::Raw(dtype) => {
            let es = dtype.size();
            let vpu = 16 / es;
            if (m.k * es) % 16 == 0 && bk % vpu == 0 {
                let decode = match dtype {
                    // Already the operand's format.
                    DType::F16 => "const uint4 v = wr_v[j];
                h[0] = v.x; h[1] = v.y; h[2] = v.z; h[3] = v.w;"
                        .to_string(),
                    DType::BF16 => format!(
                        "const uint4 v = wr_v[j];
                const unsigned u[4] = {{v.x, v.y, v.z, v.w}};
                float vals[VPU];
                #pragma unroll
                for (unsigned i = 0; i < VPU; ++i) vals[i] = bf2f((unsigned short)((u[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu));
                {pack_vals}"
                    ),
                    _ => format!(
                        "const uint4 v = wr_v[j];
                const float vals[4] = {{__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w)}};
                {pack_vals}"
                    ),
                };
                return WeightStaging {
                    vpu,
                    functions: String::new(),
                    regs: "uint4 wr_v[UPT];".into(),
                    map: nk_map(vpu),
                    fetch: edges.fetch("wr_v[j] = reinterpret_cast<const uint4*>(w_raw)[((u64)n * W_K + k0 + kk) / VPU];",
                        "wr_v[j] = uint4{0u, 0u, 0u, 0u};",
                    ),
                    decode,
                };
            }
        }
        MatrixStorage::Quant(q) => {
            if let Some(s) = sym_f16_staging(m, &q, &edges, threads) {
                return s;
            }
            if let Some(s) = spanning_words_staging(&q, &edges) {
                return s;
            }
            if let Some(s) = generic_quant_staging(&q, pack_vals) {
                return s;
            }
        }
    }
    // Anything else: one decoded element per unit.
    WeightStaging {
        vpu: 1,
        functions: String::new(),
        regs: "float wr_f[UPT];".into(),
        map: format!("const unsigned n = u / {bk}u, kk = u % {bk}u;"),
        fetch: "wr_f[j] = (n < W_N && k0 + kk < W_K) ? w_at(n, k0 + kk) : 0.0f;".into(),
        decode: "h[0] = pack_h2(wr_f[j], 0.0f);".into(),
    }
}

/// Values per unit of [`spanning_words_staging`].
const SPAN_VPU: usize = 8;

/// Sym codes with f16 scales whose words do not tile the K step (3-bit codes, 5 to a u16 word:
/// a step of 32 values is 6.4 words; also 4-bit codes where K is not a multiple of
/// [`sym_f16_staging`]'s unit): units of 8 values, 8-aligned along K so they never straddle a
/// group (groups are multiples of 8), fetched as the whole words they span (at most 3) and
/// their scale, then decoded in f16 pairs as [`sym_f16_decoder`] does (`1024 + q` in the
/// mantissa, minus `1024 + maxq`, times the scale: bit-identical to `(q − maxq)·s` in f32
/// rounded to f16). A unit past K (K not a multiple of 8) decodes its group's padding codes
/// there, finite values that multiply the zeros staged past K. `None` for other storage.
///
/// Why: decoded value by value (`w_at`, two loads and a decode per value, held as one f32
/// each between fetch and stash) the 3-bit GEMMs held 16–32 staging registers a thread,
/// spilled up to 396 bytes on Llama-2-7B's shapes (528 on the fixtures') and ran 664–900 SASS
/// instructions per K step (ptxas, sm_80 and sm_90); here a unit is its words and scale, 2
/// units per thread of the default tiling, and the step 232–258 instructions without spills.
fn spanning_words_staging(q: &QuantSpec, edges: &Edges) -> Option<WeightStaging> {
    let Codec::Sym {
        maxq,
        scale: DType::F16,
    } = q.codec
    else {
        return None;
    };
    let (pw, bits) = (q.per_word, q.bits as usize);
    let word_bits = pw * bits;
    if q.group % SPAN_VPU != 0 || F16_BK as usize % SPAN_VPU != 0 || SPAN_VPU * bits > 32 {
        return None;
    }
    // The most words a unit spans (units start at multiples of 8 inside a group).
    let nw = (0..q.group)
        .step_by(SPAN_VPU)
        .map(|r| (r + SPAN_VPU - 1) / pw - r / pw + 1)
        .max()?;
    if nw * word_bits > 64 {
        return None;
    }
    let map = match q.layout {
        Layout::NK => nk_map(SPAN_VPU),
        Layout::KN => kn_map(),
    };
    // Words past the unit's last (the group's last unit may span fewer) are not read: they
    // may lie past the record.
    let load = format!(
        "const unsigned k = k0 + kk, grp = k / W_GROUP, w0 = (k % W_GROUP) / W_PER_WORD, last = (k % W_GROUP + {last}u) / W_PER_WORD;
                #pragma unroll
                for (unsigned i = 0; i < {nw}u; ++i) wr_c[j][i] = w0 + i <= last ? w_word(n, grp * W_WPG + w0 + i) : 0u;
                wr_s[j] = w_s[w_scale_index(n, grp)];",
        last = SPAN_VPU - 1,
    );
    let zero = format!(
        "
                #pragma unroll
                for (unsigned i = 0; i < {nw}u; ++i) wr_c[j][i] = 0u;
                wr_s[j] = 0;"
    );
    let mask = (1u32 << bits) - 1;
    Some(WeightStaging {
        vpu: SPAN_VPU,
        functions: format!(
            "// Codes 2p and 2p + 1 of `x` (`bits` bits each from bit 0) as the f16 pair
// (1024 + q0, 1024 + q1).
__device__ __forceinline__ unsigned biased_pair(unsigned x) {{
    return and_or(x, 0x{mask:X}u, and_or(x << {up}u, 0x{mask_hi:X}u, 0x64006400u));
}}
",
            up = 16 - bits,
            mask_hi = mask << 16,
        ),
        regs: format!("unsigned wr_c[UPT][{nw}]; unsigned short wr_s[UPT];"),
        map,
        fetch: edges.fetch(&load, &zero),
        decode: format!(
            "// The unit's words as one stream of codes, from its first value on.
                unsigned long long stream = 0ull;
                #pragma unroll
                for (unsigned i = 0; i < {nw}u; ++i) stream |= (unsigned long long)(wr_c[j][i] & 0x{word_mask:X}u) << (i * {word_bits}u);
                const unsigned lo = (unsigned)(stream >> (((k0 + kk) % W_GROUP % W_PER_WORD) * W_BITS));
                const unsigned s2 = (unsigned)wr_s[j] * 0x10001u;
                #pragma unroll
                for (unsigned p = 0; p < 4u; ++p)
                    h[p] = hmul2(hsub2(biased_pair(lo >> (p * {pair_bits}u)), {bias}), s2);",
            word_mask = ((1u64 << word_bits) - 1) as u32,
            pair_bits = 2 * bits,
            bias = super::f16_ops::h2_lit(1024.0 + maxq as f32),
        ),
    })
}

/// Quantized storage neither f16 decoder covers (other codecs or scale types), decoded value
/// by value in f32 from whole 16-byte chunks (NK) or words (KN): `None` when neither fits.
fn generic_quant_staging(q: &QuantSpec, pack_vals: &str) -> Option<WeightStaging> {
    let bk = F16_BK as usize;
    let whole_words = q.group % q.per_word == 0 && q.words_per_group * q.per_word == q.group;
    let (sym, minv) = match q.codec {
        Codec::Sym { .. } => (true, "0.0f"),
        Codec::AsymBf16x2 => (false, "wr_m[j]"),
    };
    let decode_values = |words: &str, n_words: usize| {
        format!(
            "{words}
                float vals[VPU];
                #pragma unroll
                for (unsigned wi = 0; wi < {n_words}u; ++wi)
                    #pragma unroll
                    for (unsigned i = 0; i < W_PER_WORD; ++i) {{
                        const unsigned v = wi * W_PER_WORD + i;
                        vals[v] = (k0 + kk + v < W_K) ? w_decode((u[wi] >> (i * W_BITS)) & W_MASK, wr_s[j], {minv}) : 0.0f;
                    }}
                {pack_vals}"
        )
    };
    // The unit's words (`load`) and its group's scale (and min), or zeros for a unit past the
    // matrix's rows or K.
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
                    "const uint4 v = wr_v[j];
                const unsigned u[8] = {v.x & 0xFFFFu, v.x >> 16, v.y & 0xFFFFu, v.y >> 16, v.z & 0xFFFFu, v.z >> 16, v.w & 0xFFFFu, v.w >> 16};"
                } else {
                    "const uint4 v = wr_v[j];
                const unsigned u[4] = {v.x, v.y, v.z, v.w};"
                };
                // A chunk of whole words inside one group: its first word is `k / W_PER_WORD`
                // of the row (no padding between groups; in row blocks too, one 16-byte unit).
                return Some(WeightStaging {
                    vpu,
                    functions: String::new(),
                    regs: format!("uint4 wr_v[UPT]; {scale_regs}"),
                    map: nk_map(vpu),
                    fetch: guarded_fetch(
                        &format!("wr_v[j] = reinterpret_cast<const uint4*>(w_q)[w_word_index(n, (k0 + kk) / W_PER_WORD) / {wpc}u];"),
                        "wr_v[j] = uint4{0u, 0u, 0u, 0u};",
                    ),
                    decode: decode_values(words, wpc),
                });
            }
        }
        Layout::KN => {
            if whole_words && bk % q.per_word == 0 {
                // One word per unit; consecutive units are consecutive columns.
                return Some(WeightStaging {
                    vpu: q.per_word,
                    functions: String::new(),
                    regs: format!("unsigned wr_w[UPT]; {scale_regs}"),
                    map: kn_map(),
                    fetch: guarded_fetch(
                        "wr_w[j] = w_word(n, (k0 + kk) / W_PER_WORD);",
                        "wr_w[j] = 0u;",
                    ),
                    decode: decode_values("const unsigned u[1] = {wr_w[j]};", 1),
                });
            }
        }
    }
    None
}

/// The GEMM (`y = x · Wᵀ (+ bias)`, through `epilogue`); the caller declared `x`, the weight,
/// the bias and `y`.
/// The K loop over double-buffered tiles; `partial`: only the warp's first `live` mma row tiles
/// are loaded and multiplied (warp-uniform branches, in a copy of the loop that full tiles do not
/// run).
///
/// With the activation ring ([`x_ring`]) the step reading ring buffer `xsl` first issues the
/// copies of the step two ahead into the buffer read one step before (free since that step's
/// barrier; past K they zero-fill), and ends by waiting for all but those newest copies (the
/// next step's), then the barrier that makes every thread's copies visible.
fn k_loop(partial: bool, nj: usize, ring: bool, w_ring: bool) -> String {
    let (any, row) = if partial {
        ("if (live > 0u) ", "if (i < live) ")
    } else {
        ("", "")
    };
    let (issue, x_addr, a_addr, wait, next) = if ring {
        (
            "x_issue(xsl == 0u ? XSTAGES - 1u : xsl - 1u, k0 + 2u * BK);",
            "const unsigned xa0 = xs_lane0 + xsl * (BM * BK * 2u), xa1 = xs_lane1 + xsl * (BM * BK * 2u);",
            "(ks == 0u ? xa0 : xa1) + i * 16u * BK * 2u",
            "cp_async_wait<1>();",
            " xsl = xsl + 1u == XSTAGES ? 0u : xsl + 1u;",
        )
    } else {
        (
            "",
            "const unsigned xa = xs_lane + buf * (BM * PAD * 2u);",
            "xa + (i * 16u * PAD + ks) * 2u",
            "",
            "",
        )
    };
    let (w_addr, b_addr) = if w_ring {
        (
            "const unsigned wa0 = ws_lane0 + xsl * (BN * BK * 2u), wa1 = ws_lane1 + xsl * (BN * BK * 2u);",
            "(ks == 0u ? wa0 : wa1) + j * 8u * BK * 2u",
        )
    } else {
        (
            "const unsigned wa = ws_lane + buf * (BN * PAD * 2u);",
            "wa + (j * 8u * PAD + ks) * 2u",
        )
    };
    format!(
        "    unsigned buf = 0u, xsl = 0u;
    (void)xsl;
    for (unsigned k0 = 0; k0 < W_K; k0 += BK) {{
        const bool more = k0 + BK < W_K;
        {issue}
        if (more) fetch(k0 + BK);
        {x_addr}
        {w_addr}
        #pragma unroll
        for (unsigned ks = 0; ks < BK; ks += 16u) {any}{{
            unsigned a[{mi}][4], bf[{nj}][2];
            #pragma unroll
            for (unsigned i = 0; i < {mi}u; ++i) {row}ldsm_x4(a[i], {a_addr});
            #pragma unroll
            for (unsigned j = 0; j < {nj}u; j += 2u) {{
                unsigned r[4];
                ldsm_x4(r, {b_addr});
                bf[j][0] = r[0]; bf[j][1] = r[1]; bf[j + 1][0] = r[2]; bf[j + 1][1] = r[3];
            }}
            #pragma unroll
            for (unsigned i = 0; i < {mi}u; ++i)
                #pragma unroll
                for (unsigned j = 0; j < {nj}u; ++j) {row}mma_f16(acc[i][j], a[i], bf[j]);
        }}
        // The other buffer was last read before the previous barrier: safe to fill now.
        if (more) stash(buf ^ 1u, k0 + BK);
        {wait}
        __syncthreads();
        buf ^= 1u;{next}
    }}",
        mi = WARP_MI,
    )
}

/// `half_input`: the activations are f16 already ([`super::half_activations`]), copied to shared
/// memory as they are; else f32, rounded to f16 as they are staged.
pub(super) fn gemm_f16(
    mut b: CudaBuilder,
    m: &MatrixSpec,
    epilogue: &super::matmul::GemmEpilogue,
    half_input: bool,
) -> (String, CudaLaunch) {
    // Warpgroup MMA (sm_90 libraries whose record asks for it) keeps the default block of 8
    // warps, as 2 warpgroups of 64×128 ([`super::gemm_wgmma`]).
    // (Only where both operands stage in vector units: its two sets of staging registers
    // would spill for the value-by-value decoders of ragged shapes.)
    let wgmma = super::gemm_wgmma::applies(b.tuning.rows_per_block, b.arch())
        && m.k % 8 == 0
        && staging(m, WarpTiles::Wide.threads() as usize).vpu >= 4;
    let tiles = if wgmma {
        WarpTiles::Wide
    } else {
        WarpTiles::for_threads(b.tuning.threads_per_block)
    };
    let ring = !wgmma && x_ring(b.tuning.rows_per_block, half_input, m.k);
    // Raw f16 weights are copied as they are too: through a ring of their own, in the same
    // groups of copies.
    let w_ring = ring && m.storage == MatrixStorage::Raw(DType::F16);
    let threads = tiles.threads() as usize;
    // A warp's accumulators: mi × nj mma tiles of 16×8 (with wgmma, 16 rows × all 128 columns).
    let (mi, nj) = if wgmma {
        (1, 16)
    } else {
        (WARP_MI, tiles.nj())
    };
    // Shared tile elements: padded rows, or wgmma's core matrices.
    let tile_at = |tile: &str, r: &str, k: &str| {
        if wgmma {
            format!(
                "{tile}[buf][{}]",
                super::gemm_wgmma::smem_index(r, k, F16_BK)
            )
        } else {
            format!("{tile}[buf][{r}][{k}]")
        }
    };
    let st = staging(m, threads);
    let units = (F16_BN * F16_BK) as usize / st.vpu;
    super::matmul::raster_group(&mut b);
    b.const_u32("BM", F16_BM as usize);
    b.const_u32("BN", F16_BN as usize);
    b.const_u32("BK", F16_BK as usize);
    b.const_u32("PAD", F16_BK as usize + 8);
    b.const_u32("GT", threads);
    b.const_u32("VPU", st.vpu);
    b.const_u32("HPU", st.vpu.div_ceil(2));
    b.const_u32("UNITS", units);
    b.const_u32("UPT", units.div_ceil(threads));
    // Activations: units of XV values, 16 bytes (float4 of f32, uint4 of f16) where rows are
    // 16-byte aligned.
    let xv = if half_input { 8 } else { 4 };
    b.const_u32("XV", xv);
    let x_units = F16_BM as usize * F16_BK as usize / xv;
    b.const_u32("XPT", x_units.div_ceil(threads));
    let k_edge = m.k % F16_BK as usize != 0;
    // A thread's activation units are rows `tid / (BK / XV) + j · GT / (BK / XV)` at the same K
    // offset: one pointer, advanced by k0, plus constant row offsets (the loads' immediates).
    assert!(
        (F16_BM * F16_BK / 8) as usize % threads == 0
            && (F16_BM * F16_BK / 4) as usize % threads == 0
            && threads % (F16_BK / 4) as usize == 0,
        "activation units per thread"
    );
    let in_k = if k_edge { " && k < W_K" } else { "" };
    let (x_type, x_reg, x_fetch, x_stash) = if half_input {
        let fetch = if m.k % 8 == 0 {
            format!("xr[j] = (t < ROWS{in_k}) ? *reinterpret_cast<const uint4*>(x_lane + (u64)j * (GT / (BK / XV)) * W_K + k0) : uint4{{0u, 0u, 0u, 0u}};")
        } else {
            "const unsigned short* xp = x + (u64)(ROW0 + t) * W_K;
                const bool in = t < ROWS;
                unsigned w[4];
                #pragma unroll
                for (unsigned i = 0; i < 4u; ++i) {
                    const unsigned lo = (in && k + 2u * i < W_K) ? xp[k + 2u * i] : 0u;
                    const unsigned hi = (in && k + 2u * i + 1u < W_K) ? xp[k + 2u * i + 1u] : 0u;
                    w[i] = lo | (hi << 16);
                }
                xr[j] = uint4{w[0], w[1], w[2], w[3]};"
                .to_string()
        };
        (
            "unsigned short",
            "uint4",
            fetch,
            format!(
                "*reinterpret_cast<uint4*>(&{}) = xr[j];",
                tile_at("xs", "r", "kk")
            ),
        )
    } else {
        let fetch = if m.k % 4 == 0 {
            format!("xr[j] = (t < ROWS{in_k}) ? *reinterpret_cast<const float4*>(x_lane + (u64)j * (GT / (BK / XV)) * W_K + k0) : float4{{0.0f, 0.0f, 0.0f, 0.0f}};")
        } else {
            "const float* xp = x + (u64)(ROW0 + t) * W_K;
                const bool in = t < ROWS;
                xr[j] = float4{(in && k < W_K) ? xp[k] : 0.0f, (in && k + 1u < W_K) ? xp[k + 1u] : 0.0f,
                               (in && k + 2u < W_K) ? xp[k + 2u] : 0.0f, (in && k + 3u < W_K) ? xp[k + 3u] : 0.0f};"
                .to_string()
        };
        (
            "float",
            "float4",
            fetch,
            format!(
                "const float4 f = xr[j];
                *reinterpret_cast<uint2*>(&{}) = uint2{{pack_h2_sat(f.x, f.y), pack_h2_sat(f.z, f.w)}};",
                tile_at("xs", "r", "kk")
            ),
        )
    };
    // Stores of one unit's f16 pairs into ws: 16 bytes at a time where the unit allows it.
    let w_store = if st.vpu % 8 == 0 {
        format!(
            "#pragma unroll
                for (unsigned i = 0; i < VPU / 8u; ++i)
                    *reinterpret_cast<uint4*>(&{}) = uint4{{h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]}};",
            tile_at("ws", "n", "kk + 8 * i")
        )
    } else if st.vpu % 2 == 0 {
        format!(
            "#pragma unroll
                for (unsigned i = 0; i < VPU / 2u; ++i)
                    *reinterpret_cast<unsigned*>(&{}) = h[i];",
            tile_at("ws", "n", "kk + 2 * i")
        )
    } else {
        format!(
            "#pragma unroll
                for (unsigned i = 0; i < VPU; ++i) {} = (unsigned short)((h[i >> 1] >> ((i & 1u) * 16u)) & 0xFFFFu);",
            tile_at("ws", "n", "kk + i")
        )
    };
    // The mma operands of m16n8k16 .f16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
    // floating point type"), g = lane / 4, c = lane % 4, each register two halves (lower index
    // in the low half): A (16×16, row-major) a0 (g, 2c..), a1 (g+8, 2c..), a2 (g, 2c+8..),
    // a3 (g+8, 2c+8..) — ldmatrix's matrices 0–3 when lanes 0–15 address rows 0–15 at column 0
    // and lanes 16–31 the same rows at column 8; B (16×8, k × n, stored n-major) b0 (k = 2c..,
    // n = g), b1 (k = 2c+8.., n = g) — matrices 0 and 1 for lanes 0–7 / 8–15 addressing the 8
    // columns' rows at k 0 / 8, and 2, 3 the next 8 columns (lanes 16–31).
    // The activation tile through registers: a thread's units of XV values, fetched ahead of
    // their K step and stashed as f16 after the products of the step before.
    let x_fetch_units = format!(
        "#pragma unroll
        for (unsigned j = 0; j < XPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (BM * BK / XV % GT == 0u || u < BM * BK / XV) {{
                const unsigned t = t0 + u / (BK / XV), k = k0 + (u % (BK / XV)) * XV;
                {x_fetch}
            }}
        }}"
    );
    let x_stash_units = format!(
        "#pragma unroll
        for (unsigned j = 0; j < XPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (BM * BK / XV % GT == 0u || u < BM * BK / XV) {{
                const unsigned r = u / (BK / XV), kk = (u % (BK / XV)) * XV;
                {x_stash}
            }}
        }}"
    );
    // The activation tile: the ring of XSTAGES swizzled buffers filled by cp.async (see
    // `x_ring`), or two buffers filled from registers: wgmma's core matrices, else padded rows.
    let (x_smem, x_lanes, x_fetch, x_stash, x_prologue) = if ring {
        b.const_u32("XSTAGES", X_RING_STAGES as usize);
        (
            "__shared__ __align__(128) unsigned short xs[XSTAGES][BM][BK];".to_string(),
            // Lane rows differ from a_row by multiples of 16, so (row / 2) % 4 is a_row's; the
            // second 16 K of a step is chunk + 2, i.e. the swizzled chunk ^ 2.
            format!(
                "const unsigned x_swz = (a_row >> 1) & 3u, x_row = smem_u32(&xs[0][wm + a_row][0]);
    const unsigned xs_lane0 = x_row + (((lane >> 4) ^ x_swz) * 16u), xs_lane1 = x_row + ((((lane >> 4) ^ x_swz) ^ 2u) * 16u);
    // This thread's activation units: 16-byte chunk tid % 4 of rows tid / 4 + j · GT / 4 (whose
    // (row / 2) % 4 is the same for every j).
    const unsigned xs_dst = smem_u32(&xs[0][tid / 4u][((tid & 3u) ^ ((tid >> 3) & 3u)) * 8u]);
    {w_lanes}
    // Global memory → ring buffer `slot` for the K step at k0: zeros past the call's rows or K.
    auto x_issue = [&](unsigned slot, unsigned k0) {{
        #pragma unroll
        for (unsigned j = 0; j < XPT; ++j) {{
            const bool in = t0 + tid / 4u + j * (GT / 4u) < ROWS && k0 + (tid & 3u) * 8u < W_K;
            const void* src = in ? (const void*)(x_lane + (u64)j * (GT / 4u) * W_K + k0) : (const void*)x;
            cp_async16(xs_dst + slot * (BM * BK * 2u) + j * (GT / 4u) * (BK * 2u), src, in);
        }}
        {w_issue}
        cp_async_commit();
    }};",
                w_lanes = if w_ring {
                    // B rows differ from b_row by multiples of 8; its lanes' chunk is
                    // (lane / 8) % 2, then + 2 for the second 16 K.
                    "const unsigned w_swz = (lane >> 1) & 3u, w_row = smem_u32(&ws[0][wn + b_row][0]);
    const unsigned ws_lane0 = w_row + ((((lane >> 3) & 1u) ^ w_swz) * 16u), ws_lane1 = w_row + (((((lane >> 3) & 1u) ^ w_swz) ^ 2u) * 16u);
    const unsigned ws_dst = smem_u32(&ws[0][tid / 4u][((tid & 3u) ^ ((tid >> 3) & 3u)) * 8u]);"
                } else {
                    ""
                },
                w_issue = if w_ring {
                    format!(
                        "// The weight tile's rows tid / 4 + j · GT / 4 (the matrix's row `n`), the same chunk.
        #pragma unroll
        for (unsigned j = 0; j < UPT; ++j) {{
            const unsigned nl = tid / 4u + j * (GT / 4u), n = {row}, kk = (tid & 3u) * 8u;
            const bool in = n < W_N && k0 + kk < W_K;
            const void* src = in ? (const void*)(w_raw + (u64)n * W_K + k0 + kk) : (const void*)w_raw;
            cp_async16(ws_dst + slot * (BN * BK * 2u) + j * (GT / 4u) * (BK * 2u), src, in);
        }}",
                        row = super::matmul::gemm_tile_row(epilogue.silu_gate, F16_BN, "nl")
                    )
                } else {
                    String::new()
                }
            ),
            String::new(),
            String::new(),
            "x_issue(0u, 0u);
    x_issue(1u, BK);
    fetch(0u);
    stash(0u, 0u);
    cp_async_wait<1>();"
                .to_string(),
        )
    } else if wgmma {
        (
            "__shared__ __align__(128) unsigned short xs[2][BM * BK];".to_string(),
            String::new(),
            x_fetch_units,
            x_stash_units,
            "fetch(0u);
    stash(0u, 0u);
    if (BK < W_K) fetch_b(BK);
    async_proxy_fence();"
                .to_string(),
        )
    } else {
        (
            "__shared__ __align__(16) unsigned short xs[2][BM][PAD];".to_string(),
            "// ... as shared-window addresses in buffer 0 (a buffer is the next PAD · rows halves).
    const unsigned xs_lane = smem_u32(&xs[0][wm + a_row][a_col]);"
                .to_string(),
            x_fetch_units,
            x_stash_units,
            "fetch(0u);
    stash(0u, 0u);"
                .to_string(),
        )
    };
    // The weight tile through registers: fetched one K step ahead, decoded and stashed after
    // the step's products (nothing, where raw f16 weights take their ring).
    // A thread's weight units of the step: `body` with unit `u`'s tile row `n` and K offset `kk`.
    let each_unit = |body: String| {
        format!(
            "#pragma unroll
        for (unsigned j = 0; j < UPT; ++j) {{
            const unsigned u = tid + j * GT;
            if (UNITS % GT == 0u || u < UNITS) {{
                {map}
                {body}
            }}
        }}",
            map = st.map
        )
    };
    let (w_regs, w_fetch, w_stash) = if w_ring {
        (String::new(), String::new(), String::new())
    } else {
        (
            st.regs.clone(),
            each_unit(format!(
                "(void)kk;
                // `map` gives the tile's row; the loads index the matrix's row.
                const unsigned nl = n;
                {{
                    const unsigned n = {row};
                    {fetch}
                }}",
                row = super::matmul::gemm_tile_row(epilogue.silu_gate, F16_BN, "nl"),
                fetch = st.fetch,
            )),
            each_unit(format!(
                "unsigned h[HPU];
                {decode}
                {w_store}",
                decode = st.decode,
            )),
        )
    };
    let (w_smem, ws_lane) = if w_ring {
        (
            "__shared__ __align__(128) unsigned short ws[XSTAGES][BN][BK];",
            "",
        )
    } else if wgmma {
        (
            "__shared__ __align__(128) unsigned short ws[2][BN * BK];",
            "",
        )
    } else {
        (
            "__shared__ __align__(16) unsigned short ws[2][BN][PAD];",
            "const unsigned ws_lane = smem_u32(&ws[0][wn + b_row][b_col]);",
        )
    };
    let x_regs = if ring {
        String::new()
    } else {
        format!("{x_reg} xr[XPT];")
    };
    let staging = format!(
        "    {x_regs}
    {w_regs}
    // Global memory → registers for the K step at k0.
    auto fetch = [&](unsigned k0) {{
        (void)k0;
        {x_fetch}
        {w_fetch}
    }};
    // Registers → f16 in shared buffer `buf`.
    auto stash = [&](unsigned buf, unsigned k0) {{
        (void)buf; (void)k0;
        {x_stash}
        {w_stash}
    }};"
    );
    // wgmma fetches two K steps ahead: a second set of staging registers, used in turn.
    let staging = if wgmma {
        format!(
            "{staging}\n{}",
            super::gemm_wgmma::second_register_set(&staging, &format!("{x_regs} {w_regs}"))
        )
    } else {
        staging
    };
    let body = format!(
        "    {x_smem}
    {w_smem}
    const unsigned tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
    const unsigned g = lane >> 2, c = lane & 3u;
    {warp_origin}
    {tiles}
    const unsigned t0 = tile_m * BM, n0 = tile_n * BN;
    (void)n0;
    // This lane's ldmatrix row addresses (see the fragment layouts above).
    const unsigned a_row = lane & 15u, a_col = (lane >> 4) * 8u;
    (void)a_col;
    const unsigned b_row = (lane & 7u) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1u) * 8u;
    (void)b_col;
    {ws_lane}
    const {x_type}* x_lane = x + (u64)(ROW0 + t0 + tid / (BK / XV)) * W_K + (tid % (BK / XV)) * XV;
    (void)x_lane;
    {x_lanes}
{staging}
    {acc}
    {x_prologue}
    __syncthreads();
{loops}
    {drain}
{store}",
        drain = if ring {
            // The last steps' zero fills: no copy outlives the kernel.
            "cp_async_wait<0>();"
        } else {
            ""
        },
        warp_origin = if wgmma {
            // Warp w of warpgroup w / 4 holds rows 16·(w % 4) of the group's 64.
            "const unsigned wm = (warp >> 2) * 64u + (warp & 3u) * 16u, wn = 0u;".to_string()
        } else {
            format!(
                "const unsigned wm = (warp / {warps_n}u) * {wtm}u, wn = (warp % {warps_n}u) * {wtn}u;",
                warps_n = tiles.warps_n(),
                wtm = WARP_MI * 16,
                wtn = nj * 8,
            )
        },
        loops = if wgmma {
            super::gemm_wgmma::k_loop(F16_BK)
        } else {
            format!(
                "    // The warp's 16-row mma tiles that hold rows of the call: all {mi} but in the last row tile
    // of a short call (a 16-token prompt needs one of the block's eight), where the loop that
    // skips the others runs instead.
    const unsigned live = t0 + wm >= ROWS ? 0u : (ROWS - t0 - wm + 15u) / 16u;
    if (live >= {mi}u) {{
{full_loop}
    }} else {{
{partial_loop}
    }}",
                full_loop = k_loop(false, nj, ring, w_ring),
                partial_loop = k_loop(true, nj, ring, w_ring),
            )
        },
        acc = super::matmul::warp_tile_acc(mi, nj),
        store = super::matmul::warp_tile_store(mi, nj, epilogue),
        tiles = super::matmul::GEMM_BLOCK_TILES,
        x_type = x_type,
    );
    let grid = [
        super::matmul::gemm_grid_x(m, epilogue.silu_gate, F16_BN),
        GridDim::rows(F16_BM as u64),
        GridDim::one(),
    ];
    // Two blocks (16 warps) per SM: one block's barrier waits are covered by the other's work.
    // Left alone, ptxas gives the raw-f16 variant 155 registers, i.e. one block per SM.
    b.min_blocks = Some(2);
    let mut helpers = format!("{F16_OPS}{}", st.functions);
    if wgmma {
        helpers.push_str(&super::gemm_wgmma::helpers());
        b.ptx_arch(super::gemm_wgmma::WGMMA_PTX_ARCH);
    }
    b.finish(&helpers, &body, threads as u32, grid)
}
