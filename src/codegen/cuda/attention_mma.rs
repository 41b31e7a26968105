//! Prefill attention on f16 tensor cores, for libraries of f16 schemes (their KV cache is f16):
//! flash attention in the manner of FlashAttention-2, with `mma.sync.m16n8k16`.
//!
//! Why: the f32 query-tiled kernel ([`super::attention::attention_tiled`]) reads both operands
//! of every multiply-add from shared memory (`q_sh`, `k_sh`), so it is bound by shared-memory
//! loads at about an eighth of the f32 units' rate; Llama-2-7B's prefill of 512 tokens spends
//! ~35 G multiply-adds in attention, several milliseconds that way (an estimate from the
//! instruction mix, not a measurement). On tensor cores each 16×8×16 product is one
//! instruction (`benches/cuda_sass_profile.sh`, head_dim 128: ~5.4 SASS instructions per mma in
//! the key-tile loop).
//!
//! - Block: 4 warps, each 16 query rows of one head (64 per block); grid `[n_q_heads,
//!   ceil(T/64)]`. A warp's queries stay in registers as mma A fragments for the whole kernel
//!   (read once from qkv, rounded to f16).
//! - Keys and values go through shared memory 64 at a time, as f16 (rows padded by 8 halves so
//!   each 8-row `ldmatrix` phase hits 32 distinct banks): earlier calls' from the cache as
//!   stored, this call's from qkv rounded exactly as the cache keeps them (`kv_store`), so a
//!   prompt's logits do not depend on how it was split into calls.
//! - Scores `S = Q·Kᵀ`: K rows are the mma's B columns (`ldmatrix`); `P·V`: the probabilities
//!   go from the S accumulators straight into A fragments (an m16n8 accumulator pair is an
//!   m16k16 A fragment's layout), V through `ldmatrix.trans`.
//! - Online softmax in f32 over each 64-key tile (running max and sum per row, in the exp2
//!   domain); a lane keeps partial sums of its own columns, reduced over its quad at the end.
//!   Causal masking only matters on tiles that cross a row's limit; a warp skips tiles past
//!   its last query's.
//! - The first query head of each kv group appends the block's rows to the cache.
//!
//! Applies where the head dimension is a multiple of 16 (k steps of the mma) up to 128 (its
//! output accumulators, 4·head_dim/8 registers per lane, and the tiles' 48 KiB).

use super::attention::{declare_attention, kv_helpers};
use super::builder::CudaBuilder;
use super::launch::{CudaLaunch, GridDim};

/// Query rows per warp (one mma row tile), warps per block, keys per shared-memory tile.
const WARP_Q: usize = 16;
const WARPS: usize = 4;
pub const MMA_TILE_Q: usize = WARP_Q * WARPS;
const TILE_KEYS: usize = 64;
pub const MMA_THREADS: u32 = (WARPS * 32) as u32;

/// Whether prefill attention of a library computing in f16 (`f16`) with `head_dim` runs on
/// tensor cores.
pub fn fits(f16: bool, head_dim: usize) -> bool {
    f16 && head_dim % 16 == 0 && (16..=128).contains(&head_dim)
}

pub fn attention_mma(
    mut b: CudaBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    half_out: bool,
) -> (String, CudaLaunch) {
    assert!(fits(true, head_dim), "head_dim {head_dim}");
    declare_attention(&mut b, n_q_heads, n_kv_heads, head_dim, true, half_out);
    b.const_u32("QT", MMA_TILE_Q);
    b.const_u32("KT", TILE_KEYS);
    b.const_u32("AT", MMA_THREADS as usize);
    b.const_u32("HDP", head_dim + 8);
    b.const_u32("KC", head_dim / 16);
    b.const_u32("DT", head_dim / 8);
    b.const_f32(
        "SCALE_LOG2",
        1.0 / (head_dim as f32).sqrt() * std::f32::consts::LOG2_E,
    );
    // The output pair (f16 when `half_out`, rounded as the GEMM reading it used to round).
    let store = if half_out {
        "*(unsigned*)(y + (u64)t * QC + h * HD + dt * 8u + 2u * c) = pack_h2_sat(v.x, v.y);"
    } else {
        "*(float2*)(y + (u64)t * QC + h * HD + dt * 8u + 2u * c) = v;"
    };
    let body = "    __shared__ __align__(16) unsigned short k_sh[KT][HDP];
    __shared__ __align__(16) unsigned short v_sh[KT][HDP];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned g = lane >> 2, c = lane & 3u;
    const float NEG_INF = __uint_as_float(0xFF800000u);
    // This lane's ldmatrix row addresses (shared window), before the tiles' constant offsets:
    // keys (matrices: keys +0 dims lo, +0 hi, +8 lo, +8 hi), values (keys lo, hi; dims +0, +8).
    const unsigned k_lane = smem_u32(&k_sh[(lane >> 4) * 8u + (lane & 7u)][((lane >> 3) & 1u) * 8u]);
    const unsigned v_lane = smem_u32(&v_sh[((lane >> 3) & 1u) * 8u + (lane & 7u)][(lane >> 4) * 8u]);
    const unsigned h = blockIdx.x, t0 = blockIdx.y * QT;
    if (t0 >= T) return;
    const unsigned t_end = t0 + QT < T ? t0 + QT : T;
    const unsigned kv_off = (h / GROUP) * HD;
    // Append this block's rows to the cache (once per kv head), 8 values at a time.
    if (h % GROUP == 0u) {
        for (unsigned u = threadIdx.x; u < (t_end - t0) * (HD / 8u); u += AT) {
            const unsigned t = t0 + u / (HD / 8u), d0 = (u % (HD / 8u)) * 8u;
            const float* row = qkv + (u64)t * COLS + QC + kv_off + d0;
            *(uint4*)(k_cache + (u64)(POS + t) * KVC + kv_off + d0) = kv8(row);
            *(uint4*)(v_cache + (u64)(POS + t) * KVC + kv_off + d0) = kv8(row + KVC);
        }
    }
    // The warp's queries (rows q0 + g and q0 + g + 8) as A fragments, one per 16 dims.
    const unsigned q0 = t0 + warp * 16u;
    const unsigned q_last = q0 + 15u < t_end - 1u ? q0 + 15u : t_end - 1u;
    unsigned qf[KC][4];
    #pragma unroll
    for (unsigned kc = 0; kc < KC; ++kc) {
        #pragma unroll
        for (unsigned i = 0; i < 4u; ++i) {
            const unsigned t = q0 + g + 8u * (i & 1u), d = kc * 16u + 2u * c + 8u * (i >> 1);
            float2 x = {0.0f, 0.0f};
            if (t < T) x = *(const float2*)(qkv + (u64)t * COLS + h * HD + d);
            qf[kc][i] = pack_h2_sat(x.x, x.y);
        }
    }
    float o[DT][4], m[2] = {-3.0e38f, -3.0e38f}, l[2] = {0.0f, 0.0f};
    #pragma unroll
    for (unsigned dt = 0; dt < DT; ++dt)
        #pragma unroll
        for (unsigned i = 0; i < 4u; ++i) o[dt][i] = 0.0f;
    // Keys 0 ..= POS + t_end - 1 (the block's last query sees them all).
    const unsigned n_keys = POS + t_end;
    for (unsigned j0 = 0; j0 < n_keys; j0 += KT) {
        __syncthreads();
        for (unsigned u = threadIdx.x; u < KT * (HD / 8u); u += AT) {
            const unsigned jj = u / (HD / 8u), d0 = (u % (HD / 8u)) * 8u, j = j0 + jj;
            uint4 kk = {0u, 0u, 0u, 0u}, vv = kk;
            if (j < POS) {
                kk = *(const uint4*)(k_cache + (u64)j * KVC + kv_off + d0);
                vv = *(const uint4*)(v_cache + (u64)j * KVC + kv_off + d0);
            } else if (j < n_keys) {
                const float* row = qkv + (u64)(j - POS) * COLS + QC + kv_off + d0;
                kk = kv8(row);
                vv = kv8(row + KVC);
            }
            *(uint4*)&k_sh[jj][d0] = kk;
            *(uint4*)&v_sh[jj][d0] = vv;
        }
        __syncthreads();
        // Warp-uniform: the warp has queries, and its last one sees key j0.
        if (q0 >= t_end || j0 > POS + q_last) continue;
        float s[KT / 8u][4];
        #pragma unroll
        for (unsigned nt = 0; nt < KT / 8u; ++nt)
            #pragma unroll
            for (unsigned i = 0; i < 4u; ++i) s[nt][i] = 0.0f;
        // ldmatrix.x4 of keys: matrices (keys nt, dims lo), (nt, hi), (nt + 1, lo), (nt + 1, hi).
        #pragma unroll
        for (unsigned kc = 0; kc < KC; ++kc)
            #pragma unroll
            for (unsigned nt = 0; nt < KT / 8u; nt += 2u) {
                unsigned kb[4];
                ldsm_x4(kb, k_lane + (nt * 8u * HDP + kc * 16u) * 2u);
                mma_f16(s[nt], qf[kc], kb);
                mma_f16(s[nt + 1u], qf[kc], kb + 2);
            }
        // s[nt][i] is row g + 8(i/2), key j0 + 8nt + 2c + i%2.
        // Masked only on a tile past the warp's first query's limit (warp-uniform). A masked
        // score is -inf: its probability is exactly 0 even in a row with no key yet.
        const bool masked = j0 + KT > POS + q0 + 1u;
        float mx[2] = {-3.0e38f, -3.0e38f};
        #pragma unroll
        for (unsigned nt = 0; nt < KT / 8u; ++nt)
            #pragma unroll
            for (unsigned i = 0; i < 4u; ++i) {
                const unsigned j = j0 + nt * 8u + 2u * c + (i & 1u), t = q0 + g + 8u * (i >> 1);
                if (masked && j > POS + t) s[nt][i] = NEG_INF;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
            }
        // The row maxima, scaled as m is (the scale is positive): p = 2^(s·SCALE_LOG2 − m), one
        // fma and one ex2 per score.
        #pragma unroll
        for (unsigned r = 0; r < 2u; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(m[r], SCALE_LOG2 * fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2)));
            const float corr = ex2(m[r] - mx[r]);
            m[r] = mx[r];
            l[r] *= corr;
            #pragma unroll
            for (unsigned dt = 0; dt < DT; ++dt) {
                o[dt][2u * r] *= corr;
                o[dt][2u * r + 1u] *= corr;
            }
        }
        #pragma unroll
        for (unsigned nt = 0; nt < KT / 8u; ++nt)
            #pragma unroll
            for (unsigned i = 0; i < 4u; ++i) {
                const float p = ex2(fmaf(s[nt][i], SCALE_LOG2, -m[i >> 1]));
                s[nt][i] = p;
                l[i >> 1] += p;
            }
        // O += P·V over 16 keys at a time; ldmatrix.x4.trans of values: matrices (keys lo,
        // dims dt), (hi, dt), (lo, dt + 1), (hi, dt + 1).
        #pragma unroll
        for (unsigned kc = 0; kc < KT / 16u; ++kc) {
            const unsigned pa[4] = {pack_h2(s[2u * kc][0], s[2u * kc][1]), pack_h2(s[2u * kc][2], s[2u * kc][3]),
                                    pack_h2(s[2u * kc + 1u][0], s[2u * kc + 1u][1]), pack_h2(s[2u * kc + 1u][2], s[2u * kc + 1u][3])};
            #pragma unroll
            for (unsigned dt = 0; dt < DT; dt += 2u) {
                unsigned vb[4];
                ldsm_x4_trans(vb, v_lane + (kc * 16u * HDP + dt * 8u) * 2u);
                mma_f16(o[dt], pa, vb);
                mma_f16(o[dt + 1u], pa, vb + 2);
            }
        }
    }
    if (q0 >= t_end) return;
    #pragma unroll
    for (unsigned r = 0; r < 2u; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    #pragma unroll
    for (unsigned r = 0; r < 2u; ++r) {
        const unsigned t = q0 + g + 8u * r;
        if (t >= t_end) continue;
        const float inv = 1.0f / l[r];
        #pragma unroll
        for (unsigned dt = 0; dt < DT; ++dt) {
            const float2 v = {o[dt][2u * r] * inv, o[dt][2u * r + 1u] * inv};
            {store}
        }
    }
"
    .replace("{store}", store);
    // Eight f32 values (16-byte aligned) as the cache keeps them (`kv_store`'s rounding, two
    // at a time): one uint4 of f16. `ex2`: 2^x in one instruction (the probabilities are
    // rounded to f16 next; the emulator's libm agrees to a few ulp).
    let helpers = "__device__ __forceinline__ uint4 kv8(const float* p) {
    const float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    const uint4 r = {pack_h2_sat(a.x, a.y), pack_h2_sat(a.z, a.w), pack_h2_sat(b.x, b.y), pack_h2_sat(b.z, b.w)};
    return r;
}
#ifndef MLCB_EMULATE
__device__ __forceinline__ float ex2(float x) { float y; asm(\"ex2.approx.ftz.f32 %0, %1;\" : \"=f\"(y) : \"f\"(x)); return y; }
#else
inline float ex2(float x) { return exp2f(x); }
#endif
";
    let grid = [
        GridDim::fixed(n_q_heads as u64, 1),
        GridDim::tokens(MMA_TILE_Q as u64),
        GridDim::one(),
    ];
    let shared = format!("{}{helpers}", kv_helpers(true));
    b.finish(&shared, &body, MMA_THREADS, grid)
}
