//! Decode GEMV on f16 tensor cores, for the 4-bit weights of f16 schemes (q4f16_1, q4f16_0) and
//! their row-major 8-bit ones (q8f16_1).
//!
//! Why: a decode step reads every weight once, so the GEMV should run at the memory bandwidth;
//! on an H200 that is ~18 bytes per SM clock, i.e. at most ~7 instructions per weight byte at
//! the issue limit of 4 warp-instructions per clock. The f32 GEMV (`matmul::gemv_nk`) spends
//! ~14 per byte on 4-bit codes (shift, mask, a quarter-rate integer-to-float conversion and an
//! fma per weight; Llama-2-7B's q4f16_1 kernels, sm_90 SASS), capping decode near half the
//! bandwidth, and `gemv_kn` (q4f16_0) ~27. Here codes are decoded two at a time into f16
//! ([`super::f16_ops`]) and the products and sums are `mma.sync.m16n8k16`
//! (`benches/cuda_sass_profile.sh`, sm_90: ~3.0–3.5 instructions per byte for 4-bit codes,
//! ~4.2–4.4 when they were decoded to scaled values; 8-bit codes ~2.3, where the f32 GEMV spent
//! ~6).
//!
//! How: a warp's mma multiplies 16 weight rows (A: lane `lr = lane / 4` decodes rows `lr` and
//! `lr + 8` of the block's, each one group of 32 codes — 4-bit: 4 words, one 16-byte load
//! row-major, 4 word loads a row of words apart K-major; 8-bit: 8 words, two 16-byte loads — at
//! group `c = lane % 4` of the warp's 4) by the activation (B: 8-bit codes, every one of its 8
//! columns, so every column of the result holds the 16 dot products; 4-bit codes, see below). Decoded pairs land in the A registers
//! and staged activation pairs in the B registers as they are: no moves. The K order inside an
//! mma is free as long as both operands use it: the weights stay in the pair order the decoder
//! produces (`(v0, v4) (v1, v5) …` per 4-bit word, `(v0, v1) (v2, v3)` per 8-bit one), and the
//! activation is staged once per block in shared memory as f16 pairs in that same order, after
//! the fused RMS norm if any (rounded as the prefill GEMM rounds its operands). 8-bit codes are
//! decoded to their f16 values `(q − maxq)·s` as the GEMM decodes them; 4-bit codes enter the
//! mma biased and unscaled (`1024 + 16q`: one instruction a pair instead of three), each lane's
//! group sum is kept apart in its own column of the result, and the scale and bias are applied
//! to it in f32 — exact products, the scale rounded once per group rather than per weight, so
//! 4-bit decode is a little closer to the f32 reference than prefill. The block's warps split K;
//! per-lane sums meet over a row's 4 lanes by shuffles, then the warps' in shared memory in warp
//! order (deterministic).
//!
//! Row-major matrices whose rows fill the 16-row tiles are on the device in row blocks
//! ([`super::row_blocks`]): a warp step's codes are then one 512-byte piece per 16-byte load
//! (8 rows × 4 groups) instead of 8 rows' 64-byte pieces, and its scales one 64-byte piece.
//!
//! Weights reach the registers one of two ways. By default a lane loads `BATCH` (4) steps' codes
//! and scales into registers, then decodes and multiplies them: its loads are in flight only
//! while it waits, and the 80-register bound caps the batch. A tuning record's `weight_ring`
//! instead streams a warp's steps through a ring of shared-memory slots by `cp.async`
//! ([`ring_depth`]: up to [`MAX_RING`] steps, as the block's 48 KiB allow), refilling each slot
//! as soon as the warp has read it, so up to `RING` steps stay in flight while it multiplies,
//! across tile boundaries, and the first ones are issued before the kernel waits for the one
//! before it (programmatic dependent launch). Why both: on an H200 (session 12's Nsight
//! Compute) the register GEMV read DRAM at 35% of peak with its warps waiting on loads, but the
//! ring costs ~30 more instructions per step (~125 instead of ~96, sm_90 SASS of Llama-2-7B's
//! shapes) in slot and pointer bookkeeping and the shared-memory round trip; which wins is for
//! the GPU to say (the tune stage times both, the GPU check compares them).

use super::builder::CudaBuilder;
use super::f16_ops::{f16_decodable, sym_f16_decoder, F16_OPS};
use super::launch::{CudaLaunch, GridDim};
use crate::codegen::wgsl::spec::{Codec, Fusion, MatrixSpec, MatrixStorage};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// Weight rows per block: the mma's M.
const ROWS: usize = 16;
/// Groups a warp multiplies per step (one per lane `c = lane % 4`).
pub const GROUPS_PER_WARP_STEP: usize = 4;

/// Output rows per block: the mma's 16 weight rows, or with a silu gate 8 (their gate and up
/// rows).
pub fn rows_per_block(silu_gate: bool) -> usize {
    if silu_gate {
        ROWS / 2
    } else {
        ROWS
    }
}
/// Warp steps whose loads are issued together (8-bit codes: half as many).
const BATCH: usize = 4;
/// The most staged activation chunks (64 bytes of f16 each) a block may hold: 40 KiB of shared
/// memory.
const MAX_STAGED_CHUNKS: usize = 40 * 1024 / 64;
/// The deepest weight ring (`CudaTuning::weight_ring`): steps per warp in flight.
pub const MAX_RING: usize = 8;
/// Warps per SM a GEMV with a weight ring asks ptxas to fit (80 registers).
const RING_WARPS_PER_SM: usize = 24;
/// Shared memory a block may declare statically (CUDA's limit without the dynamic kind).
const STATIC_SMEM: usize = 48 * 1024;

/// Whether the GEMV over `m` can stream its weights through a ring ([`ring_depth`]): a matrix
/// in row blocks ([`super::row_blocks`]) whose rows are whole runs of groups, so a warp step's
/// codes are `LPG` 512-byte pieces and its scales one 64-byte piece per 8 rows, all inside the
/// row (or all past it).
pub fn ring_applies(m: &MatrixSpec) -> bool {
    matches!(m.storage, MatrixStorage::Quant(q) if q.n_group % super::row_blocks::RUN_GROUPS == 0)
        && super::row_blocks::row_blocks(m).is_some()
}

/// Steps per warp the weight ring of a GEMV over `m` with `warps` warps holds: the tuning's
/// `weight_ring`, or fewer where its shared memory and the block's other arrays would pass
/// [`STATIC_SMEM`]; 0 (weights through registers) where the ring does not apply or not even 2
/// steps fit.
pub fn ring_depth(m: &MatrixSpec, weight_ring: u32, warps: usize, norm: bool) -> usize {
    let MatrixStorage::Quant(q) = m.storage else {
        return 0;
    };
    if weight_ring < 2 || !ring_applies(m) {
        return 0;
    }
    let lpg = if q.bits == 8 { 2 } else { 1 };
    // The block's other arrays: the staged activation (and its chunk sums, 4-bit), the warps'
    // partial rows, the norm's per-warp sums.
    let other = (q.n_group + 1) * 64
        + if q.bits == 8 { 0 } else { q.n_group * 4 }
        + warps * ROWS * 4
        + if norm { warps * 4 } else { 0 };
    // A step of a warp: its two 8-row pieces' codes and scales.
    let per_step = warps * (2 * lpg * 512 + 2 * 64);
    let fit = STATIC_SMEM.saturating_sub(other) / per_step;
    match fit.min(weight_ring as usize).min(MAX_RING) {
        d if d >= 2 => d,
        _ => 0,
    }
}

/// The weight ring's arrays, the lambda that issues a warp's next step of copies, and its first
/// `RING` steps ([`ring_depth`]; `{row_of}`: the weight row of output row `r` of the tile at
/// `n0`). A warp streams its steps of every tile of the block, one tile after another, through
/// `RING` slots, `RING` steps ahead of the one it multiplies. A slot holds a step's codes of the
/// tile's two 8-row pieces (`LPG` 512-byte units each, every lane copying and reading its own 16
/// bytes) and their scales (64 bytes each, copied by lanes 0–7, read by every lane after a
/// `__syncwarp`). Whole runs and blocks of 8 rows: a piece of a step is all inside the matrix or
/// all past it (then zeros, its source not read). The next step's sources advance by a constant
/// (no divisions per step), re-aimed once per tile.
const RING_SETUP: &str = "    __shared__ uint4 wring[RING][NWARPS][2u * LPG][32];
    __shared__ uint4 sring[RING][NWARPS][2][4];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    auto row_at = [&](unsigned n0, unsigned r) -> unsigned { return {row_of}; };
    // The next step to issue: step `is` of tile `it`. It goes to the slot of the step just
    // multiplied (or, the first RING, to the slots in turn): one slot counter serves both.
    unsigned is = 0u, it = 0u, slot = 0u;
    const uint4* wsrc[2];
    const unsigned short* ssrc = w_s;
    // Whether the tile's pieces are inside the output; `sok`: the piece whose scales this lane
    // copies (lanes 0-7).
    bool rok[2], sok = false;
    auto aim = [&]() {
        const unsigned n1 = (blockIdx.x * TILES + it) * RPB;
        const bool live = it < TILES && n1 < OUT_N;
        #pragma unroll
        for (unsigned p = 0; p < 2u; ++p) {
            rok[p] = live && (ROWS_EXACT || n1 + (8u * p) % RPB < OUT_N);
            const u64 run = rok[p] ? (u64)(row_at(n1, 8u * p) >> 3) * 8u * CPR + 32u * warp : 0u;
            wsrc[p] = reinterpret_cast<const uint4*>(w_q) + run * LPG + lane;
            if ((lane >> 2) == p) {
                ssrc = w_s + run + 8u * (lane & 3u);
                sok = rok[p];
            }
        }
    };
    aim();
    const unsigned wdst = smem_u32(&wring[0][warp][0][lane]);
    const unsigned sdst = smem_u32(&sring[0][warp][(lane >> 2) & 1u][lane & 3u]);
    auto issue = [&]() {
        const bool in = CHUNKS_EXACT || warp + is * NWARPS < CPR / 4u;
        #pragma unroll
        for (unsigned p = 0; p < 2u; ++p) {
            const bool ok = in && rok[p];
            #pragma unroll
            for (unsigned h = 0; h < LPG; ++h)
                cp_async16(wdst + slot * (NWARPS * 2u * LPG * 512u) + (p * LPG + h) * 512u,
                           ok ? wsrc[p] + h * 32u : wsrc[p], ok);
            wsrc[p] += STRIDE * 8u * LPG;
        }
        if (lane < 8u) cp_async16(sdst + slot * (NWARPS * 128u), ssrc, in && sok);
        ssrc += STRIDE * 8u;
        cp_async_commit(); // empty past the block's last step: every step is one group
        slot = slot + 1u == RING ? 0u : slot + 1u;
        if (++is == STEPS) {
            is = 0u;
            ++it;
            aim();
        }
    };
    for (unsigned j = 0; j < RING; ++j) issue();
    // Back at slot 0: the first step to multiply.
";

/// A tile's steps through the weight ring ([`RING_SETUP`]); `{products}` multiplies step `i` = 0
/// of the registers `v0`, `v1`, `sc0`, `sc1`.
const RING_LOOP: &str = "    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (unsigned s = 0; s < STEPS; ++s) {
        // This step has landed once at most RING - 1 later ones are in flight.
        cp_async_wait<(int)RING - 1>();
        __syncwarp(); // and so have the scales other lanes copied
        uint4 v0[LPG], v1[LPG];
        unsigned short sc0[1], sc1[1];
        #pragma unroll
        for (unsigned h = 0; h < LPG; ++h) {
            v0[h] = wring[slot][warp][h][lane];
            v1[h] = wring[slot][warp][LPG + h][lane];
        }
        sc0[0] = reinterpret_cast<const unsigned short*>(sring[slot][warp][0])[lane];
        sc1[0] = reinterpret_cast<const unsigned short*>(sring[slot][warp][1])[lane];
        {
            const unsigned i = 0u;
            const unsigned ch = cbase + s * STRIDE, chx = CHUNKS_EXACT || ch < CPR ? ch : 0u;
            const uint4* xc = xp + 4u * chx;
{products}
        }
        __syncwarp(); // every lane has read the slot before it is refilled
        issue(); // into this slot, then on to the next
    }";

/// Whether a decode matmul over `m` runs here: an f16 model, sym 4-bit codes with f16 scales in
/// u32 words, groups of 32 (4 words: one 16-byte chunk of a row-major matrix, or 4 words a row
/// of words apart in a K-major one), K small enough to stage.
pub fn fits(m: &MatrixSpec) -> bool {
    let MatrixStorage::Quant(q) = m.storage else {
        return false;
    };
    let codes = match (q.bits, q.layout) {
        (4, _) => q.words_per_group == 4,
        // 8-bit groups are two 16-byte chunks: row-major only (K-major words would be 8 loads).
        (8, Layout::NK) => q.words_per_group == 8,
        _ => false,
    };
    m.model_dtype == DType::F16
        && f16_decodable(&q)
        && codes
        && q.group == 32
        && q.n_group <= MAX_STAGED_CHUNKS
}

/// Warps per SM the GEMV over `m` asks ptxas to fit (its register bound, see `gemv_mma`): 32
/// (64 registers) for 8-bit codes, 24 (80 registers) for 4-bit ones.
pub fn warps_per_sm(m: &MatrixSpec) -> usize {
    match m.storage {
        MatrixStorage::Quant(q) if q.bits == 8 => 32,
        _ => 24,
    }
}

/// The GEMV (`fits(m)`); the caller declared `x`, the norm weight `g` (with a fused norm), the
/// weight, the bias, the residual and `y`, and the constants `OUT_N`, `NWARPS`, `TPB`.
pub fn gemv_mma(
    mut b: CudaBuilder,
    m: &MatrixSpec,
    plus_bias: &str,
    fusion: Fusion,
    store: impl Fn(&str, &str) -> String,
) -> (String, CudaLaunch) {
    let MatrixStorage::Quant(q) = m.storage else {
        unreachable!("gemv_mma of a raw matrix (fits() says no)")
    };
    let Codec::Sym { maxq, .. } = q.codec else {
        unreachable!("gemv_mma of asym codes (fits() says no)")
    };
    let warps = b.tuning.warps() as usize;
    let per_step = GROUPS_PER_WARP_STEP * warps;
    let steps = q.n_group.div_ceil(per_step);
    // 8-bit groups are 32 bytes: half the steps per batch keeps the same bytes in flight.
    let wide = q.bits == 8;
    let ring = ring_depth(m, b.tuning.weight_ring, warps, fusion.rms_norm.is_some());
    // A ring consumes one step at a time.
    let batch = if ring > 0 {
        1
    } else {
        steps.min(if wide { BATCH / 2 } else { BATCH })
    };
    let rpb = rows_per_block(fusion.silu_gate);
    // The tuning's rows_per_block is, here, the block's runs of RPB rows (mma tiles), one after
    // another: more weight bytes per block for its fixed costs (staging the activation, the
    // norm), in fewer blocks.
    let tiles = b.tuning.rows_per_block as usize;
    b.const_u32("RPB", rpb);
    b.const_u32("TILES", tiles);
    b.const_u32("CPR", q.n_group);
    b.const_u32("STEPS", steps);
    b.const_u32("BATCH", batch);
    b.const_u32("STRIDE", per_step);
    // 16-byte loads per group of a row-major matrix.
    b.const_u32("LPG", if wide { 2 } else { 1 });
    let out_n = if fusion.silu_gate { m.n / 2 } else { m.n };
    b.const_bool("ROWS_EXACT", out_n % (rpb * tiles) == 0);
    b.const_bool(
        "CHUNKS_EXACT",
        q.n_group % per_step == 0 && steps % batch == 0,
    );
    let x_chunk = if m.k % 4 == 0 {
        "if (k0 + 32u <= W_K) {
            #pragma unroll
            for (unsigned i = 0; i < 8u; ++i) {
                const float4 f = reinterpret_cast<const float4*>(xr + k0)[i];
                v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
            }
        } else {
            #pragma unroll
            for (unsigned i = 0; i < 32u; ++i) v[i] = k0 + i < W_K ? xr[k0 + i] : 0.0f;
        }"
    } else {
        "#pragma unroll
        for (unsigned i = 0; i < 32u; ++i) v[i] = k0 + i < W_K ? xr[k0 + i] : 0.0f;"
    };
    // With a fused norm and at most one 32-value chunk per thread, each thread keeps its chunk
    // in registers between the sum of squares and the scaling: the f32 row is read once, one
    // L2 round trip before the block's weights instead of two (Nsight Compute on an H200: the
    // two passes and the norm weights were 40 KB of a gate/up block's L1 traffic, its weights
    // 32 KB).
    let one_pass = fusion.rms_norm.is_some() && q.n_group <= b.tuning.threads_per_block as usize;
    let (norm, scale_x) = match fusion.rms_norm {
        Some(dtype) => {
            let ss = if one_pass {
                // Summed after the chunk is loaded (below): nothing to read here.
                String::new()
            } else if m.k % 4 == 0 {
                "for (unsigned i = threadIdx.x; i < W_K / 4u; i += TPB) {
        const float4 f = reinterpret_cast<const float4*>(xr)[i];
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, fmaf(f.z, f.z, fmaf(f.w, f.w, ss))));
    }"
                .to_string()
            } else {
                "for (unsigned k = threadIdx.x; k < W_K; k += TPB) ss = fmaf(xr[k], xr[k], ss);"
                    .to_string()
            };
            // A whole chunk's f16 norm weights in four 16-byte loads where rows allow.
            let full = if dtype == DType::F16 && m.k % 8 == 0 {
                "#pragma unroll
            for (unsigned i = 0; i < 4u; ++i) {
                const uint4 gv = reinterpret_cast<const uint4*>(g + k0)[i];
                const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w};
                #pragma unroll
                for (unsigned j = 0; j < 8u; ++j)
                    v[8 * i + j] = v[8 * i + j] * rs * h2f((unsigned short)((gw[j >> 1] >> ((j & 1u) * 16u)) & 0xFFFFu));
            }"
            } else {
                "#pragma unroll
            for (unsigned i = 0; i < 32u; ++i) v[i] = v[i] * rs * g_at(k0 + i);"
            };
            let reduce = "ss = warp_sum(ss);
    if (lane == 0u) ss_sh[warp] = ss;
    __syncthreads();
    float ss_total = 0.0f;
    for (unsigned w = 0; w < NWARPS; ++w) ss_total += ss_sh[w];
    const float rs = 1.0f / sqrtf(ss_total / (float)W_K + scalar);";
            let (norm, reduce_in_chunk) = if one_pass {
                (
                    "    __shared__ float ss_sh[NWARPS];".to_string(),
                    format!(
                        "float ss = 0.0f;
        #pragma unroll
        for (unsigned i = 0; i < 32u; ++i) ss = fmaf(v[i], v[i], ss);
        {reduce}"
                    ),
                )
            } else {
                (
                    format!(
                        "    __shared__ float ss_sh[NWARPS];
    float ss = 0.0f;
    {ss}
    {reduce}"
                    ),
                    String::new(),
                )
            };
            (
                norm,
                format!(
                    "{reduce_in_chunk}
        if (k0 + 32u <= W_K) {{
            {full}
        }} else {{
            #pragma unroll
            for (unsigned i = 0; i < 32u; ++i) if (k0 + i < W_K) v[i] = v[i] * rs * g_at(k0 + i);
        }}"
                ),
            )
        }
        None => (String::new(), String::new()),
    };
    let row_of = super::matmul::weight_row_of(fusion.silu_gate);
    // Group ch of row n: row-major, one 16-byte load for 4-bit codes, two for 8-bit; 4-bit
    // K-major, words 4ch … 4ch + 3 of column n, a row of words (W_N) apart — each a 32-byte run
    // across the 8 lanes of a word index.
    let blocked = super::row_blocks::row_blocks(m).is_some();
    b.const_bool("RUNS_EXACT", q.n_group % super::row_blocks::RUN_GROUPS == 0);
    b.const_u32("WL", q.n_group % super::row_blocks::RUN_GROUPS);
    // Where this lane's unit of a step's run is, relative to a whole run's `lane` (row blocks):
    // the last run of a row holds fewer groups (WL), its rows closer together.
    let mut pre_load = "";
    let (pointers, load, wstep, sstep) = match q.layout {
        // Row blocks: the warp's run at step 0 is its index, the next step's NWARPS runs on;
        // unit h of this lane's group in a whole run is h·32 + lane (one 512-byte load per h
        // for the warp, one 64-byte one for the scales).
        Layout::NK if blocked => {
            pre_load = "const bool whole = RUNS_EXACT || cbase + (s0 + i) * STRIDE < CPR / 4u * 4u;
            const int du = whole ? 0 : (int)(lr * WL + c) - (int)lane;
            const unsigned lh = whole ? 32u : 8u * WL;";
            (
                "    const u64 rb0 = (u64)(row_n(0u) >> 3) * 8u * CPR, rb1 = (u64)(row_n(8u) >> 3) * 8u * CPR;
    const uint4* p0 = reinterpret_cast<const uint4*>(w_q) + (rb0 + 32u * warp) * LPG + lane;
    const uint4* p1 = reinterpret_cast<const uint4*>(w_q) + (rb1 + 32u * warp) * LPG + lane;
    const unsigned short* q0 = w_s + rb0 + 32u * warp + lane;
    const unsigned short* q1 = w_s + rb1 + 32u * warp + lane;",
                "for (unsigned h = 0; h < LPG; ++h) v$[h * BATCH + i] = (p$ + du)[i * STRIDE * 8u * LPG + h * lh];
                sc$[i] = (q$ + du)[i * STRIDE * 8u];",
                "BATCH * STRIDE * 8u * LPG",
                "BATCH * STRIDE * 8u",
            )
        }
        // A group is LPG 16-byte loads (v[i], then v[BATCH + i]).
        Layout::NK => (
            "    const uint4* p0 = reinterpret_cast<const uint4*>(w_q) + ((u64)row_n(lr) * CPR + cbase) * LPG;
    const uint4* p1 = reinterpret_cast<const uint4*>(w_q) + ((u64)row_n(lr + 8u) * CPR + cbase) * LPG;
    const unsigned short* q0 = w_s + (u64)row_n(lr) * W_NG + cbase;
    const unsigned short* q1 = w_s + (u64)row_n(lr + 8u) * W_NG + cbase;",
            "for (unsigned h = 0; h < LPG; ++h) v$[h * BATCH + i] = p$[i * STRIDE * LPG + h];
                sc$[i] = q$[i * STRIDE];",
            "BATCH * STRIDE * LPG",
            "BATCH * STRIDE",
        ),
        Layout::KN => (
            "    const unsigned* p0 = w_q + (u64)cbase * 4u * W_N + row_n(lr);
    const unsigned* p1 = w_q + (u64)cbase * 4u * W_N + row_n(lr + 8u);
    const unsigned short* q0 = w_s + (u64)cbase * W_N + row_n(lr);
    const unsigned short* q1 = w_s + (u64)cbase * W_N + row_n(lr + 8u);",
            "const unsigned* w = p$ + (u64)i * STRIDE * 4u * W_N;
                v$[i] = uint4{w[0], w[W_N], w[2u * W_N], w[3u * W_N]};
                sc$[i] = q$[(u64)i * STRIDE * W_N];",
            "(u64)BATCH * STRIDE * 4u * W_N",
            "(u64)BATCH * STRIDE * W_N",
        ),
    };
    let (load0, load1) = (load.replace('$', "0"), load.replace('$', "1"));
    // The products of step i: A: a0 (row lr, k 2c..), a1 (row lr + 8, k 2c..), a2 (row lr,
    // k 2c + 8..), a3 (row lr + 8, k 2c + 8..); B: b0 (k 2c.., column lr), b1 (k 2c + 8..). A
    // 4-bit word gives 4 pairs (two mma, with the 4 staged pairs of its uint4); an 8-bit word 2
    // (one mma; a staged uint4 holds two words' pairs).
    let products = if wide {
        "            const unsigned s20 = (unsigned)sc0[i] * 0x10001u, s21 = (unsigned)sc1[i] * 0x10001u;
            const uint4 w0[2] = {v0[i], v0[BATCH + i]}, w1[2] = {v1[i], v1[BATCH + i]};
            #pragma unroll
            for (unsigned j = 0; j < 4u; ++j) {
                const uint4 xa = xc[j ^ c];
                const unsigned xb[4] = {xa.x, xa.y, xa.z, xa.w};
                const unsigned u0[2] = {j & 1u ? w0[j >> 1].z : w0[j >> 1].x, j & 1u ? w0[j >> 1].w : w0[j >> 1].y};
                const unsigned u1[2] = {j & 1u ? w1[j >> 1].z : w1[j >> 1].x, j & 1u ? w1[j >> 1].w : w1[j >> 1].y};
                #pragma unroll
                for (unsigned h = 0; h < 2u; ++h) {
                    unsigned p[2], q[2];
                    dq_pairs(u0[h], s20, p);
                    dq_pairs(u1[h], s21, q);
                    const unsigned a[4] = {p[0], q[0], p[1], q[1]};
                    mma_f16(acc, a, xb + 2u * h);
                }
            }"
    } else {
        // 4-bit: the codes go to the mma as they are, biased (`1024 + 16q`, one LOP3 a pair),
        // and each group's sums are scaled after it, in f32. For that a step's mma must not
        // add the 4 lanes' groups together: column n of B holds the activation only in the K
        // slots of lane column n / 2 (the lanes with c = lr / 2 supply theirs, the others
        // zeros), so lane c finds its own group's sums in its column 2c: C[lr][2c] (c4[0]) and
        // C[lr + 8][2c] (c4[2]). Then `Σ(q − maxq)·x = Σ(1024 + 16q)·x / 16 − (64 + maxq)·Σx`:
        // the products are exact in f32 and the bias costs ~6 of its 24 bits.
        "            const unsigned u0[4] = {v0[i].x, v0[i].y, v0[i].z, v0[i].w};
            const unsigned u1[4] = {v1[i].x, v1[i].y, v1[i].z, v1[i].w};
            const uint4* xl = c == (lr >> 1) ? xc : xp + 4u * CPR;
            float c4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            #pragma unroll
            for (unsigned w = 0; w < 4u; ++w) {
                unsigned p[4], q[4];
                dq_biased(u0[w], p);
                dq_biased(u1[w], q);
                const uint4 xa = xl[w ^ c];
                const unsigned xb[4] = {xa.x, xa.y, xa.z, xa.w};
                const unsigned lo[4] = {p[0], q[0], p[1], q[1]}, hi[4] = {p[2], q[2], p[3], q[3]};
                mma_f16(c4, lo, xb);
                mma_f16(c4, hi, xb + 2);
            }
            const float sx = xsum[chx];
            acc[0] = fmaf(h2f(sc0[i]), fmaf(-W_BIAS16, sx, c4[0] * 0.0625f), acc[0]);
            acc[2] = fmaf(h2f(sc1[i]), fmaf(-W_BIAS16, sx, c4[2] * 0.0625f), acc[2]);"
    };
    if !wide {
        b.const_f32("W_BIAS16", 64.0 + maxq as f32);
    }
    // Where the 4-bit sums of a lane's groups meet: over the 4 lanes of a row (its 4 groups of
    // each step), in a fixed order. (8-bit: the mma already summed them.)
    let lane_sum = if wide {
        ""
    } else {
        "#pragma unroll
    for (unsigned o = 1u; o < 4u; o <<= 1) {
        acc[0] += __shfl_xor_sync(0xffffffffu, acc[0], o);
        acc[2] += __shfl_xor_sync(0xffffffffu, acc[2], o);
    }"
    };
    // 4-bit: each chunk's sum of its staged (f16) values, for the bias above.
    let (sum_decl, sum_init, sum_add, sum_store) = if wide {
        ("", "", "", "")
    } else {
        (
            "__shared__ float xsum[CPR];",
            "float sx = 0.0f;",
            "sx += pair_sum(pr);",
            "xsum[ch] = sx;",
        )
    };
    // How a chunk's 32 staged values pair up: in the 4-bit decoder's order (v0, v4) (v1, v5) …
    // per word, or in K order for 8-bit codes.
    let x_pairs = if wide {
        "uint4{pack_h2_sat(v[8 * w], v[8 * w + 1]), pack_h2_sat(v[8 * w + 2], v[8 * w + 3]),
                                          pack_h2_sat(v[8 * w + 4], v[8 * w + 5]), pack_h2_sat(v[8 * w + 6], v[8 * w + 7])}"
    } else {
        "uint4{pack_h2_sat(v[8 * w], v[8 * w + 4]), pack_h2_sat(v[8 * w + 1], v[8 * w + 5]),
                                          pack_h2_sat(v[8 * w + 2], v[8 * w + 6]), pack_h2_sat(v[8 * w + 3], v[8 * w + 7])}"
    };
    let store = store("out_val(r)", "out_val(r + RPB)");
    let stage_loop = if one_pass {
        // Every thread its one chunk (past the row: zeros, for the block's sum of squares).
        "for (unsigned ch = threadIdx.x, once = 1u; once; once = 0u)"
    } else {
        "for (unsigned ch = threadIdx.x; ch < CPR; ch += TPB)"
    };
    let steps_loop = if ring == 0 {
        format!(
            "    // Rows past the output (only when OUT_N is not a multiple of RPB·TILES) read nothing.
    const bool ok0 = ROWS_EXACT || row_ok(lr), ok1 = ROWS_EXACT || row_ok(lr + 8u);
{pointers}
    float acc[4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
    // BATCH steps' loads are issued before any of them is decoded, so each lane keeps
    // 2·BATCH 16-byte loads in flight (the compiler does not hoist them that far by itself).
    for (unsigned s0 = 0; s0 < STEPS; s0 += BATCH) {{
        uint4 v0[LPG * BATCH], v1[LPG * BATCH];
        unsigned short sc0[BATCH], sc1[BATCH];
        #pragma unroll
        for (unsigned i = 0; i < LPG * BATCH; ++i) v0[i] = v1[i] = uint4{{0u, 0u, 0u, 0u}};
        #pragma unroll
        for (unsigned i = 0; i < BATCH; ++i) {{
            // Chunks past the row (only when the steps do not divide it) read nothing.
            const bool in = CHUNKS_EXACT || cbase + (s0 + i) * STRIDE < CPR;
            {pre_load}
            sc0[i] = sc1[i] = 0;
            if (ok0 && in) {{ {load0} }}
            if (ok1 && in) {{ {load1} }}
        }}
        #pragma unroll
        for (unsigned i = 0; i < BATCH; ++i) {{
            // Past the last chunk the weights are zero: any staged (finite) activation will do.
            const unsigned ch = cbase + (s0 + i) * STRIDE, chx = CHUNKS_EXACT || ch < CPR ? ch : 0u;
            const uint4* xc = xp + 4u * chx;
{products}
        }}
        p0 += {wstep}; p1 += {wstep}; q0 += {sstep}; q1 += {sstep};
    }}"
        )
    } else {
        RING_LOOP.replace("{products}", products)
    };
    b.pre_wait = super::matmul::prefetch_rows(m, ROWS, fusion.silu_gate, tiles);
    // The ring's arrays and first RING steps: with programmatic dependent launch before the
    // wait (the weights do not depend on the kernels before), so they stream in during their
    // end and this block's activation staging; without, first thing.
    let ring_setup = if ring > 0 {
        b.const_u32("RING", ring);
        let setup = RING_SETUP.replace("{row_of}", row_of);
        if b.pdl {
            b.pre_wait = format!("{setup}{}", std::mem::take(&mut b.pre_wait));
            String::new()
        } else {
            setup
        }
    } else {
        "    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;\n".to_string()
    };
    // A block leaves with none of its ring's copies in flight.
    let drain = if ring > 0 { "cp_async_wait<0>(); " } else { "" };
    let body = format!(
        "    // The activation as f16 pairs in the decoder's order: word w of chunk ch (values
    // 32ch + 8w + 0..7) as (0, 4) (1, 5) (2, 6) (3, 7), at [ch][w ^ (ch % 4)] so the 4 chunks
    // a quarter-warp reads lie in distinct banks. Values past K are zero.
    // Chunk CPR is zeros (the activation of lanes that supply none, 4-bit).
    __shared__ uint4 xh[CPR + 1][4];
    {sum_decl}
    __shared__ float part[NWARPS][{rows}];
{ring_setup}    const unsigned t = blockIdx.y;
    if (t >= ROWS) {{ {drain}return; }}
    const float* xr = x + (u64)(ROW0 + t) * W_K;
{norm}
    {stage_loop} {{
        const unsigned k0 = ch * 32u;
        float v[32];
        {x_chunk}
        {scale_x}
        if (ch < CPR) {{
            {sum_init}
            #pragma unroll
            for (unsigned w = 0; w < 4u; ++w) {{
                const uint4 pr = {x_pairs};
                xh[ch][w ^ (ch & 3u)] = pr;
                {sum_add}
            }}
            {sum_store}
        }}
    }}
    if (threadIdx.x < 4u) xh[CPR][threadIdx.x] = uint4{{0u, 0u, 0u, 0u}};
    __syncthreads();
    // This lane: weight rows lr and lr + 8 of the tile's (`g` is the norm weight), chunk c
    // of each warp step's 4.
    unsigned n0 = 0u;
    auto row_n = [&](unsigned r) -> unsigned {{ return {row_of}; }};
    auto row_ok = [&](unsigned r) -> bool {{ return n0 + r % RPB < OUT_N; }};
    const unsigned lr = lane >> 2, c = lane & 3u;
    // This lane's chunk at step s is cbase + s·STRIDE; the pointers advance one batch at a
    // time, so the loads inside a batch have constant offsets.
    const unsigned cbase = warp * 4u + c;
    const uint4* xp = &xh[0][0];
    for (unsigned tile = 0; tile < TILES; ++tile) {{
    n0 = (blockIdx.x * TILES + tile) * RPB;
    if (n0 >= OUT_N) break; // the same for the whole block
{steps_loop}
    {lane_sum}
    // Rows lr (c0) and lr + 8 (c2) from lanes c = 0.
    if (c == 0u) {{ part[warp][lr] = acc[0]; part[warp][lr + 8u] = acc[2]; }}
    __syncthreads();
    auto out_val = [&](unsigned r) -> float {{
        const unsigned n = row_n(r);
        (void)n;
        float total = 0.0f;
        for (unsigned w = 0; w < NWARPS; ++w) total += part[w][r];
        return total{plus_bias};
    }};
    for (unsigned r = threadIdx.x; r < RPB; r += TPB) {{
        const unsigned o = n0 + r;
        if (o >= OUT_N) continue;
        {store}
    }}
    __syncthreads(); // the next tile writes `part` again
    }}
    {drain}
",
        rows = ROWS,
    );
    let tpb = b.tuning.threads_per_block;
    let grid = [
        GridDim::fixed(out_n as u64, (rpb * tiles) as u64),
        GridDim::rows(1),
        GridDim::one(),
    ];
    // 32 warps per SM (8 blocks at the default 128 threads), which caps registers at 64 at any
    // block size. On an H200 (Nsight Compute, Llama-2-7B's gate/up GEMV) ptxas's 78 registers
    // under the former 16-warp bound let only 24 warps in, and the kernel waited on its loads
    // with 0.54 eligible warps per scheduler at 35% of the DRAM bandwidth; at 64 registers its
    // loop has 2% more instructions and no spills on sm_90 (sm_80: one 8-byte spill in the
    // loop of the 256-thread down projection). Left alone, ptxas gives this kernel 48
    // registers and spills in the loop.
    //
    // 4-bit codes (biased, their group sums scaled per step) hold more registers: at 64, sm_90
    // spilled 24–64 bytes inside the loop (Llama-2-7B shapes, `benches/cuda_sass_profile.sh`;
    // 3 steps a batch instead of 4 still spilled, and no longer divided K's steps), so they get
    // 80 (24 warps per SM, the occupancy measured before the bound).
    //
    // With a weight ring, shared memory bounds the blocks per SM first (a block declares up to
    // 48 KiB: ~5 on an H200's 227 KiB), so any code width gets 80 registers (8-bit codes
    // spilled at 64 on sm_80).
    let warps_per_sm = if ring > 0 {
        RING_WARPS_PER_SM
    } else {
        warps_per_sm(m)
    };
    b.min_blocks = Some((warps_per_sm as u32 * 32 / tpb).max(1));
    let helpers = format!("{F16_OPS}{}", sym_f16_decoder(&q, maxq));
    b.finish(&helpers, &body, tpb, grid)
}
