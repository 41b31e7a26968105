//! Rotary embedding and causal attention over the KV cache.
//!
//! KV cache layout (the runtime allocates it in device memory): two buffers `k` and `v`, each
//! `[max_seq_len, n_kv_heads, head_dim]`, of f16 in libraries of f16 schemes (see [`kv_f16`]),
//! else f32; the kernels' `k`/`v` arguments say which. The runtime guarantees
//! `pos + T ≤ max_seq_len`.

use super::builder::{CudaBuilder, Elem};
use super::f16_ops::F16_OPS;
use super::launch::{CudaLaunch, GridDim};

/// Rotary embedding of one pair: the rotary kernel and the decode attention that fuses it share
/// these, so both compute the same bits (the CPU forms the angle the same way). `rope_sincos`:
/// angle `pos · theta^(-2i/RD)` in f32, reduced by precise `sincosf` (not the fast intrinsic);
/// `rope_rotate`: `x[i], x[i+HALF]` turned by it ("rotate half").
const ROPE_HELPERS: &str = "__device__ __forceinline__ void rope_sincos(unsigned i, unsigned pos, float theta, float& sn, float& cs) {
    const float inv_freq = 1.0f / powf(theta, (float)(2u * i) / (float)RD);
    sincosf((float)pos * inv_freq, &sn, &cs);
}
__device__ __forceinline__ void rope_rotate(float* x, unsigned i, float sn, float cs) {
    const float x0 = x[i], x1 = x[i + HALF];
    x[i] = x0 * cs - x1 * sn;
    x[i + HALF] = x1 * cs + x0 * sn;
}
";

/// Whether a library keeps its KV cache in f16: where its scheme computes in f16 (`f16`, as for
/// the prefill GEMMs) and prefill attention is query-tiled (head_dim ≤ 128; the row-per-block
/// prefill kernel reads this call's keys straight from qkv and keeps an f32 cache). Half the
/// cache's memory, and half the bytes decode attention reads per token and key.
pub fn kv_f16(f16: bool, head_dim: usize) -> bool {
    f16 && tiled(Some(crate::codegen::wgsl::spec::Phase::Prefill), head_dim)
}

/// How the attention kernels read and write the cache: `kv_t` is its element, `kv_store` makes
/// one from an f32, `kv_load` reads one back, and `kv_load` of an f32 (a key or value of this
/// call, read from qkv) rounds it as the cache would: every key and value counts with the same
/// value whether it came from this call or an earlier one, so logits do not depend on how a
/// prompt was split into calls. f16 values saturate at ±65504 rather than becoming infinite (NaN
/// stays NaN): the rounding of `cvt.rn.satfinite`, which turns two values into a word of the
/// cache in one instruction (`pack_h2_sat`; the f16 helpers are included with these).
pub(super) fn kv_helpers(f16: bool) -> String {
    if f16 {
        format!(
            "{F16_OPS}typedef unsigned short kv_t;
__device__ __forceinline__ unsigned short kv_store(float x) {{ return (unsigned short)(pack_h2_sat(x, 0.0f) & 0xFFFFu); }}
__device__ __forceinline__ float kv_load(unsigned short h) {{ return h2f(h); }}
__device__ __forceinline__ float kv_load(float x) {{ return h2f(kv_store(x)); }}
"
        )
    } else {
        "typedef float kv_t;
__device__ __forceinline__ float kv_store(float x) { return x; }
__device__ __forceinline__ float kv_load(float x) { return x; }
"
        .to_string()
    }
}

/// In place on the q and k heads of the fused qkv buffer; `scalar` = theta. One thread per
/// (head, pair `i < rotary_dim/2`), grid y = T. The angle `(pos+t) · inv_freq` is formed in f32
/// as the CPU does; `sincosf` (not the fast intrinsic) reduces it exactly.
pub fn rotary(
    mut b: CudaBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) -> (String, CudaLaunch) {
    b.const_u32("HEADS", n_q_heads + n_kv_heads);
    b.const_u32("HD", head_dim);
    b.const_u32("HALF", rotary_dim / 2);
    b.const_u32("RD", rotary_dim);
    b.const_u32("COLS", (n_q_heads + 2 * n_kv_heads) * head_dim);
    b.activation("qkv", true, "qkv");
    b.params_scalar("theta");
    let body = "    const unsigned t = blockIdx.y;
    const unsigned idx = blockIdx.x * TPB + threadIdx.x;
    if (t >= T || idx >= HEADS * HALF) return;
    const unsigned h = idx / HALF, i = idx % HALF;
    float sn, cs;
    rope_sincos(i, POS + t, scalar, sn, cs);
    rope_rotate(qkv + (u64)t * COLS + h * HD, i, sn, cs);
";
    let tpb = b.tuning.threads_per_block;
    let grid = [
        GridDim::fixed(
            ((n_q_heads + n_kv_heads) * (rotary_dim / 2)) as u64,
            tpb as u64,
        ),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish(ROPE_HELPERS, body, tpb, grid)
}

/// What both attention kernels declare: the shape constants (kv group size, head_dim, the q, kv
/// and fused qkv widths, output dims per lane, the softmax scale) and the arguments, in the order
/// the launch JSON records (qkv, KV cache k and v, output).
pub(super) fn declare_attention(
    b: &mut CudaBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv_f16: bool,
    half_out: bool,
) {
    b.const_u32("GROUP", n_q_heads / n_kv_heads);
    b.const_u32("HD", head_dim);
    b.const_u32("QC", n_q_heads * head_dim);
    b.const_u32("KVC", n_kv_heads * head_dim);
    b.const_u32("COLS", (n_q_heads + 2 * n_kv_heads) * head_dim);
    b.const_u32("DPL", head_dim.div_ceil(32));
    b.const_f32("SCALE", 1.0 / (head_dim as f32).sqrt());
    b.activation("qkv", false, "qkv");
    let kv = if kv_f16 { Elem::F16 } else { Elem::F32 };
    b.state("k", kv, "k_cache");
    b.state("v", kv, "v_cache");
    b.activation_of("out", true, "y", half_out);
}

/// Keys each warp of [`attention`] scores per step (each sub-warp, in [`ATTEND_CHUNKED`]).
pub const DECODE_KEYS_PER_STEP: usize = 4;

/// [`attention`]'s scan: a warp's online softmax (running max `m`, sum `l`, `acc`: its lanes'
/// output dims) over keys `[jb, je)`, where `key_at(j)` and `val_at(j)` point at key j's and
/// value j's head_dim elements (in the cache, or this call's f32 rows). Each warp takes runs of
/// KU keys (`KU·warp …`, then `KU·(warp + NWARPS) …`): their loads are independent, so a step
/// waits for memory once instead of KU times (a decode step's attention is latency-bound).
/// A template rather than a generic lambda: NVRTC takes those for host code.
const ATTEND: &str = "template <class KeyAt, class ValAt>
__device__ __forceinline__ void attend(unsigned jb, unsigned je, KeyAt key_at, ValAt val_at,
        const float* q_sh, unsigned warp, unsigned lane, float& m, float& l, float (&acc)[DPL]) {
    for (unsigned j0 = jb + warp * KU; j0 < je; j0 += NWARPS * KU) {
        float s[KU];
        decltype(val_at(0u)) val[KU];
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            const unsigned j = j0 + u;
            s[u] = 0.0f;
            val[u] = nullptr;
            if (j >= je) continue;
            const auto key = key_at(j);
            val[u] = val_at(j);
            #pragma unroll
            for (unsigned r = 0; r < DPL; ++r) {
                const unsigned d = lane + 32u * r;
                if (d < HD) s[u] = fmaf(q_sh[d], kv_load(key[d]), s[u]);
            }
        }
        float mn = m;
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            // Warp-uniform: whether key j0 + u exists depends on the warp and u only.
            s[u] = j0 + u < je ? warp_sum(s[u]) * SCALE : -3.0e38f;
            mn = fmaxf(mn, s[u]);
        }
        const float corr = expf(m - mn);
        float p[KU];
        l *= corr;
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            p[u] = j0 + u < je ? expf(s[u] - mn) : 0.0f;
            l += p[u];
        }
        #pragma unroll
        for (unsigned r = 0; r < DPL; ++r) {
            const unsigned d = lane + 32u * r;
            float a = acc[r] * corr;
            #pragma unroll
            for (unsigned u = 0; u < KU; ++u)
                if (j0 + u < je && d < HD) a = fmaf(p[u], kv_load(val[u][d]), a);
            acc[r] = a;
        }
        m = mn;
    }
}
";

/// How [`attention`] splits a warp over keys where a key row is a whole number of 16-byte chunks
/// and at most 32 of them (`head_dim · element size`): lanes in groups of `lanes_per_key` (the
/// chunks per key rounded up to a power of two; lanes past the last chunk idle), each lane one
/// 16-byte chunk of `elems_per_chunk` values, so a warp reads `32 / lanes_per_key` whole keys and
/// values per load instruction. Where it does not fit, one lane per dimension (`lane + 32r`,
/// 2- or 4-byte loads, [`ATTEND`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkedKeys {
    pub elems_per_chunk: usize,
    pub chunks_per_key: usize,
    pub lanes_per_key: usize,
}

impl ChunkedKeys {
    pub fn fits(head_dim: usize, kv_f16: bool) -> Option<ChunkedKeys> {
        let es = if kv_f16 { 2 } else { 4 };
        let bytes = head_dim * es;
        if head_dim == 0 || bytes % 16 != 0 || bytes / 16 > 32 {
            return None;
        }
        let chunks_per_key = bytes / 16;
        Some(ChunkedKeys {
            elems_per_chunk: 16 / es,
            chunks_per_key,
            lanes_per_key: chunks_per_key.next_power_of_two(),
        })
    }
}

/// Loads of one lane's chunk of a key or value row as f32 (`in`: else zeros): `load_chunk` of a
/// cache row (one 16-byte load), and of an f32 row of this call (qkv, or the rotated key in
/// shared memory) rounded as the cache keeps it (`kv_load`). With an f32 cache both are the same
/// 16-byte load.
fn chunk_loaders(kv_f16: bool) -> &'static str {
    if kv_f16 {
        "__device__ __forceinline__ void load_chunk(const unsigned short* p, unsigned cl, bool in, float (&x)[EPC]) {
    const uint4 w = in ? *reinterpret_cast<const uint4*>(p + cl * EPC) : uint4{0u, 0u, 0u, 0u};
    const unsigned u[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (unsigned i = 0; i < 4u; ++i) {
        x[2u * i] = h2f((unsigned short)(u[i] & 0xFFFFu));
        x[2u * i + 1u] = h2f((unsigned short)(u[i] >> 16));
    }
}
__device__ __forceinline__ void load_chunk(const float* p, unsigned cl, bool in, float (&x)[EPC]) {
    #pragma unroll
    for (unsigned e = 0; e < EPC; ++e) x[e] = in ? kv_load(p[cl * EPC + e]) : 0.0f;
}
"
    } else {
        "__device__ __forceinline__ void load_chunk(const float* p, unsigned cl, bool in, float (&x)[EPC]) {
    const float4 w = in ? *reinterpret_cast<const float4*>(p + cl * EPC) : float4{0.0f, 0.0f, 0.0f, 0.0f};
    x[0] = w.x; x[1] = w.y; x[2] = w.z; x[3] = w.w;
}
"
    }
}

/// [`ATTEND`] over whole 16-byte chunks ([`ChunkedKeys`]): sub-warp `sub` (lanes
/// `sub · LPK …`) scores keys `j0 + u · KPW + sub`, lane `cl` holding chunk `cl` of the query
/// (`qr`) and accumulating chunk `cl` of the output (`acc`). All KU keys' and values' loads of a
/// step are issued before any is used; a score is summed over its sub-warp's lanes, and the
/// running max is the warp's (so the sub-warps' sums `l` and `acc` add at the end, each lane of
/// a sub-warp holding the same `l`).
const ATTEND_CHUNKED: &str = "template <class KeyAt, class ValAt>
__device__ __forceinline__ void attend_chunked(unsigned jb, unsigned je, KeyAt key_at, ValAt val_at,
        const float (&qr)[EPC], unsigned warp, unsigned sub, unsigned cl, float& m, float& l, float (&acc)[EPC]) {
    for (unsigned j0 = jb + warp * (KPW * KU); j0 < je; j0 += NWARPS * KPW * KU) {
        float kx[KU][EPC], vx[KU][EPC];
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            const unsigned j = j0 + u * KPW + sub;
            const bool in = j < je && cl < CPK;
            load_chunk(key_at(in ? j : jb), cl, in, kx[u]);
            load_chunk(val_at(in ? j : jb), cl, in, vx[u]);
        }
        float s[KU];
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            float d = 0.0f;
            #pragma unroll
            for (unsigned e = 0; e < EPC; ++e) d = fmaf(qr[e], kx[u][e], d);
            s[u] = d;
        }
        #pragma unroll
        for (unsigned o = LPK / 2u; o > 0u; o >>= 1)
            #pragma unroll
            for (unsigned u = 0; u < KU; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
        float mn = m;
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            s[u] = j0 + u * KPW + sub < je ? s[u] * SCALE : -3.0e38f;
            mn = fmaxf(mn, s[u]);
        }
        #pragma unroll
        for (unsigned o = LPK; o < 32u; o <<= 1) mn = fmaxf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
        const float corr = expf(m - mn);
        float p[KU];
        l *= corr;
        #pragma unroll
        for (unsigned u = 0; u < KU; ++u) {
            p[u] = j0 + u * KPW + sub < je ? expf(s[u] - mn) : 0.0f;
            l += p[u];
        }
        #pragma unroll
        for (unsigned e = 0; e < EPC; ++e) {
            float a = acc[e] * corr;
            #pragma unroll
            for (unsigned u = 0; u < KU; ++u) a = fmaf(p[u], vx[u][e], a);
            acc[e] = a;
        }
        m = mn;
    }
}
";

/// C statements declaring `begin` and `end`, a block of [`attention`]'s run of keys over a
/// context of `n_ctx` keys, cut at `limit`: with `split`, run `blockIdx.y` of
/// `ceil(n_ctx / SPLITS)` keys (empty for the last splits of a short context); else all,
/// `[0, limit)`. Each line starts with `indent`.
fn key_run(
    split: bool,
    n_ctx: &str,
    limit: &str,
    (begin, end): (&str, &str),
    indent: &str,
) -> String {
    if split {
        format!(
            "{indent}const unsigned chunk = ({n_ctx} + SPLITS - 1u) / SPLITS;
{indent}const unsigned {begin} = blockIdx.y * chunk < {limit} ? blockIdx.y * chunk : {limit};
{indent}const unsigned {end} = {begin} + chunk < {limit} ? {begin} + chunk : {limit};"
        )
    } else {
        format!("{indent}const unsigned {begin} = 0u, {end} = {limit};")
    }
}

/// Statements for [`CudaBuilder::pre_wait`] of decode attention (`T = 1`): the block's cached
/// keys and values (its split's run of the positions before `POS`, its kv head's row of each)
/// into L2, while the qkv projection before it still runs. They do not depend on that kernel:
/// earlier calls wrote them, and `meta` is written by a copy ordered before the call's first
/// kernel, which every kernel of the call starts after. The key scan then waits on L2 rather
/// than DRAM. Each row's lines are prefetched from its start (the last at its last byte, so
/// no address leaves the row).
fn prefetch_cached_keys(head_dim: usize, kv_f16: bool, split: bool) -> String {
    let row_bytes = head_dim * if kv_f16 { 2 } else { 4 };
    // Lines a row can touch: one more where it need not start on a 128-byte line.
    let lines = row_bytes.div_ceil(128) + usize::from(row_bytes % 128 != 0);
    // The body's run of keys ([`key_run`]) for `n_ctx = pos + 1`, cut at the cached ones.
    let range = key_run(split, "pos + 1u", "pos", ("jb", "je"), "        ");
    format!(
        "    // Before waiting for the kernel before: this block's cached keys and values into L2.
    {{
        const unsigned pos = meta[1];
{range}
        const unsigned kv_off = (blockIdx.x / GROUP) * HD;
        for (unsigned i = threadIdx.x; i < (je - jb) * {per_key}u; i += TPB) {{
            const unsigned j = jb + i / {per_key}u, line = i % {lines}u;
            const kv_t* row = ((i / {lines}u) % 2u == 0u ? k_cache : v_cache) + (u64)j * KVC + kv_off;
            const unsigned at = line * 128u < {row_bytes}u ? line * 128u : {row_bytes}u - 1u;
            prefetch_l2(reinterpret_cast<const char*>(row) + at);
        }}
    }}
",
        per_key = 2 * lines,
    )
}

/// Bytes of [`attention`]'s scratch with `splits` key splits: one arrival counter per query head
/// (padded to 16 bytes), then per (head, split) the partial result `[max, sum, out[head_dim]]`.
pub fn split_scratch_bytes(n_q_heads: usize, head_dim: usize, splits: usize) -> u64 {
    (4 * (n_q_heads.next_multiple_of(4) + n_q_heads * splits * (head_dim + 2))) as u64
}

/// One block per (query head, row t). The first query head of each kv group appends row t's k
/// and v to the cache. Keys and values of this call's rows are read from qkv itself (rounded as
/// the cache keeps them, `kv_load`), earlier ones from the cache, so no block reads a cache slot
/// another one writes. The warps run an online softmax ([`ATTEND`], runs of
/// [`DECODE_KEYS_PER_STEP`] keys per warp and step, `ceil(head_dim/32)` output dims per lane)
/// over the cached keys, then this call's; their partial results merge in shared memory. Scores
/// use warp-shuffle dot products over head_dim. Where a key row is a whole number of 16-byte
/// chunks, at most 32 ([`ChunkedKeys`]: every f16 head_dim that is a multiple of 8 up to 256,
/// f32 up to 128), a warp scores several keys at once, a lane per chunk, with 16-byte loads
/// ([`ATTEND_CHUNKED`]): Llama-2-7B's f16 head of 128 is 16 lanes, so one load instruction of a
/// warp reads two whole keys, where one lane per dimension took 8 two-byte loads per key and lane.
/// Decode, and prefill of head dims the query-tiled kernel cannot hold.
///
/// With `rotary_dim` (decode only, `T = 1`: the one key of this call is the block's own row),
/// the block rotates its query and its kv head's new key in shared memory as [`rotary`] does
/// (`scalar` = theta) and appends the rotated key: the rotary kernel and its pass over qkv are
/// saved.
///
/// With `splits > 1` (decode only: flash-decoding) a head's keys are cut into `splits` runs of
/// `ceil(n_ctx / splits)`, one block each (grid `[heads, splits]`): one block per head leaves most
/// SMs idle and walks a long context one step after another, each step waiting on memory. Each
/// block writes its unnormalised partial result to the scratch ([`split_scratch_bytes`]), then
/// counts itself in with an atomic; the block that arrives last merges the `splits` partials in
/// split order (so the result does not depend on which block is last), writes the output and
/// puts the counter back to zero for the next launch. Only split 0 appends to the cache.
pub fn attention(
    mut b: CudaBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: Option<usize>,
    splits: usize,
    kv_f16: bool,
) -> (String, CudaLaunch) {
    declare_attention(&mut b, n_q_heads, n_kv_heads, head_dim, kv_f16, false);
    b.const_u32("KU", DECODE_KEYS_PER_STEP);
    let chunked = ChunkedKeys::fits(head_dim, kv_f16);
    if let Some(c) = chunked {
        b.const_u32("EPC", c.elems_per_chunk);
        b.const_u32("CPK", c.chunks_per_key);
        b.const_u32("LPK", c.lanes_per_key);
        b.const_u32("KPW", 32 / c.lanes_per_key);
    }
    let split = splits > 1;
    if split {
        b.const_u32("SPLITS", splits);
        b.const_u32("CNT", n_q_heads.next_multiple_of(4));
        b.scratch(split_scratch_bytes(n_q_heads, head_dim, splits), "scratch");
    }
    let appends = if split {
        "h % GROUP == 0u && blockIdx.y == 0u"
    } else {
        "h % GROUP == 0u"
    };
    let (load, new_key) = match rotary_dim {
        None => (
            format!(
                "    if ({appends}) {{
        for (unsigned d = threadIdx.x; d < HD; d += TPB) {{
            k_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(qkv_t[QC + kv_off + d]);
            v_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(qkv_t[QC + KVC + kv_off + d]);
        }}
    }}
    for (unsigned d = threadIdx.x; d < HD; d += TPB) q_sh[d] = qkv_t[h * HD + d];
    __syncthreads();"
            ),
            "qkv + (u64)(j - POS) * COLS + QC + kv_off",
        ),
        Some(rd) => {
            b.const_u32("HALF", rd / 2);
            b.const_u32("RD", rd);
            b.params_scalar("theta");
            (
                format!(
                    "    __shared__ __align__(16) float k_sh[HD];
    for (unsigned d = threadIdx.x; d < HD; d += TPB) {{
        q_sh[d] = qkv_t[h * HD + d];
        k_sh[d] = qkv_t[QC + kv_off + d];
    }}
    __syncthreads();
    for (unsigned i = threadIdx.x; i < HALF; i += TPB) {{
        float sn, cs;
        rope_sincos(i, POS + t, scalar, sn, cs);
        rope_rotate(q_sh, i, sn, cs);
        rope_rotate(k_sh, i, sn, cs);
    }}
    __syncthreads();
    if ({appends}) {{
        for (unsigned d = threadIdx.x; d < HD; d += TPB) {{
            k_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(k_sh[d]);
            v_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(qkv_t[QC + KVC + kv_off + d]);
        }}
    }}"
                ),
                "k_sh",
            )
        }
    };
    if b.pdl {
        b.pre_wait = prefetch_cached_keys(head_dim, kv_f16, split);
    }
    let run = key_run(split, "n_ctx", "n_ctx", ("j_begin", "j_end"), "    ");
    let (rows, range) = if split {
        (
            "const unsigned h = blockIdx.x, t = 0u;",
            format!(
                "    // This block's run of keys (empty for the last splits of a short context).\n{run}"
            ),
        )
    } else {
        (
            "const unsigned h = blockIdx.x, t = blockIdx.y;
    if (t >= T) return;",
            run,
        )
    };
    let store = if split {
        "    // This split's partial result, then the last block to arrive merges all of them.
    float* part = scratch + CNT + (h * SPLITS + blockIdx.y) * (HD + 2u);
    if (threadIdx.x == 0u) { part[0] = mx; part[1] = total; }
    for (unsigned d = threadIdx.x; d < HD; d += TPB) {
        float o = 0.0f;
        for (unsigned w = 0; w < NWARPS; ++w) o += acc_sh[w][d] * expf(m_sh[w] - mx);
        part[2u + d] = o;
    }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    unsigned* count = reinterpret_cast<unsigned*>(scratch);
    if (threadIdx.x == 0u) last = atomicAdd(count + h, 1u) == SPLITS - 1u;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Volatile: the other blocks' partials must come from L2, not a stale L1 line.
    const volatile float* parts = scratch + CNT + h * SPLITS * (HD + 2u);
    float gm = -3.0e38f;
    for (unsigned s = 0; s < SPLITS; ++s) gm = fmaxf(gm, parts[s * (HD + 2u)]);
    float gl = 0.0f;
    for (unsigned s = 0; s < SPLITS; ++s) gl += parts[s * (HD + 2u) + 1u] * expf(parts[s * (HD + 2u)] - gm);
    for (unsigned d = threadIdx.x; d < HD; d += TPB) {
        float o = 0.0f;
        for (unsigned s = 0; s < SPLITS; ++s)
            o += parts[s * (HD + 2u) + 2u + d] * expf(parts[s * (HD + 2u)] - gm);
        y[h * HD + d] = o / gl;
    }
    if (threadIdx.x == 0u) count[h] = 0u;
"
    } else {
        "    for (unsigned d = threadIdx.x; d < HD; d += TPB) {
        float o = 0.0f;
        for (unsigned w = 0; w < NWARPS; ++w) o += acc_sh[w][d] * expf(m_sh[w] - mx);
        y[(u64)t * QC + h * HD + d] = o / total;
    }
"
    };
    // The warp's scan: its registers, the two runs of keys (cached, then this call's), and its
    // partial output into acc_sh.
    let (regs, scan_args, partial) = match chunked {
        Some(_) => (
            "    const unsigned sub = lane / LPK, cl = lane % LPK;
    float qr[EPC];
    #pragma unroll
    for (unsigned e = 0; e < EPC; ++e) qr[e] = cl < CPK ? q_sh[cl * EPC + e] : 0.0f;
    float m = -3.0e38f, l = 0.0f, acc[EPC];
    #pragma unroll
    for (unsigned e = 0; e < EPC; ++e) acc[e] = 0.0f;",
            ("attend_chunked", "qr, warp, sub, cl, m, l, acc"),
            "    // The sub-warps share the warp's running max: their sums add.
    #pragma unroll
    for (unsigned o = LPK; o < 32u; o <<= 1) {
        l += __shfl_xor_sync(0xffffffffu, l, o);
        #pragma unroll
        for (unsigned e = 0; e < EPC; ++e) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    }
    if (sub == 0u && cl < CPK) {
        #pragma unroll
        for (unsigned e = 0; e < EPC; ++e) acc_sh[warp][cl * EPC + e] = acc[e];
    }",
        ),
        None => (
            "    float m = -3.0e38f, l = 0.0f, acc[DPL];
    #pragma unroll
    for (unsigned r = 0; r < DPL; ++r) acc[r] = 0.0f;",
            ("attend", "q_sh, warp, lane, m, l, acc"),
            "    #pragma unroll
    for (unsigned r = 0; r < DPL; ++r) {
        const unsigned d = lane + 32u * r;
        if (d < HD) acc_sh[warp][d] = acc[r];
    }",
        ),
    };
    let (scan, args) = scan_args;
    let body = format!(
        "    __shared__ float q_sh[HD];
    __shared__ float m_sh[NWARPS], l_sh[NWARPS];
    __shared__ float acc_sh[NWARPS][HD];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    {rows}
    const unsigned kv_off = (h / GROUP) * HD;
    const float* qkv_t = qkv + (u64)t * COLS;
{load}
    const unsigned n_ctx = POS + t + 1u;
{range}
{regs}
    // Cached keys, then this call's.
    {scan}(j_begin, j_end < POS ? j_end : POS,
           [&](unsigned j) {{ return k_cache + (u64)j * KVC + kv_off; }},
           [&](unsigned j) {{ return v_cache + (u64)j * KVC + kv_off; }},
           {args});
    {scan}(j_begin > POS ? j_begin : POS, j_end,
           [&](unsigned j) {{ return {new_key}; }},
           [&](unsigned j) {{ return qkv + (u64)(j - POS) * COLS + QC + KVC + kv_off; }},
           {args});
{partial}
    if (lane == 0u) {{ m_sh[warp] = m; l_sh[warp] = l; }}
    __syncthreads();
    float mx = -3.0e38f;
    for (unsigned w = 0; w < NWARPS; ++w) mx = fmaxf(mx, m_sh[w]);
    float total = 0.0f;
    for (unsigned w = 0; w < NWARPS; ++w) total += l_sh[w] * expf(m_sh[w] - mx);
{store}"
    );
    let tpb = b.tuning.threads_per_block;
    let grid = [
        GridDim::fixed(n_q_heads as u64, 1),
        if split {
            GridDim::fixed(splits as u64, 1)
        } else {
            GridDim::tokens(1)
        },
        GridDim::one(),
    ];
    let mut shared = kv_helpers(kv_f16);
    if chunked.is_some() {
        shared.push_str(chunk_loaders(kv_f16));
        shared.push_str(ATTEND_CHUNKED);
    } else {
        shared.push_str(ATTEND);
    }
    if rotary_dim.is_some() {
        shared.push_str(ROPE_HELPERS);
    }
    b.finish(&shared, &body, tpb, grid)
}

/// Query rows per block and keys per shared-memory tile of [`attention_tiled`], and its threads.
pub const TILE_Q: usize = 16;
pub const TILE_K: usize = 32;
pub const TILE_THREADS: u32 = 128;

/// Static shared memory of [`attention_tiled`]: the key tile (rows padded by one float so each
/// lane's row starts in another bank), the value tile and the block's queries.
fn tiled_shared_bytes(head_dim: usize) -> usize {
    4 * (TILE_K * (head_dim + 1) + TILE_K * head_dim + TILE_Q * head_dim)
}

/// Whether the attention kernel of a call with `phase` is [`attention_tiled`]: prefill, when its
/// tiles fit the 48 KiB of static shared memory (head_dim ≤ 128); else [`attention`].
pub fn tiled(phase: Option<crate::codegen::wgsl::spec::Phase>, head_dim: usize) -> bool {
    phase == Some(crate::codegen::wgsl::spec::Phase::Prefill)
        && tiled_shared_bytes(head_dim) <= 48 << 10
}

/// Prefill attention: one block per (query head, TILE_Q consecutive rows), so each key and value
/// is read from global memory once per TILE_Q queries instead of once per query (prefill of T
/// rows reads O(T²/TILE_Q) instead of O(T²) vectors). Keys and values go through shared memory
/// TILE_K at a time; lane `j` scores key `j` of the tile against each of its warp's queries
/// (TILE_Q / 4 per warp), and the online softmax (running max and sum, f32) advances one tile at a
/// time; a query skips tiles entirely past its causal limit. The first query head of each kv
/// group appends the block's rows to the cache; as in [`attention`], this call's keys and values
/// are read from qkv (rounded as the cache keeps them), earlier ones from the cache.
pub fn attention_tiled(
    mut b: CudaBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv_f16: bool,
) -> (String, CudaLaunch) {
    declare_attention(&mut b, n_q_heads, n_kv_heads, head_dim, kv_f16, false);
    b.const_u32("QT", TILE_Q);
    b.const_u32("KT", TILE_K);
    b.const_u32("AT", TILE_THREADS as usize);
    b.const_u32("QPW", TILE_Q / (TILE_THREADS as usize / 32));
    let body = "    __shared__ float k_sh[KT][HD + 1];
    __shared__ float v_sh[KT][HD];
    __shared__ float q_sh[QT][HD];
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    const unsigned h = blockIdx.x, t0 = blockIdx.y * QT;
    if (t0 >= T) return;
    const unsigned t_end = t0 + QT < T ? t0 + QT : T;
    const unsigned kv_off = (h / GROUP) * HD;
    if (h % GROUP == 0u) {
        for (unsigned i = threadIdx.x; i < (t_end - t0) * HD; i += AT) {
            const unsigned t = t0 + i / HD, d = i % HD;
            const float* row = qkv + (u64)t * COLS;
            k_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(row[QC + kv_off + d]);
            v_cache[(u64)(POS + t) * KVC + kv_off + d] = kv_store(row[QC + KVC + kv_off + d]);
        }
    }
    for (unsigned i = threadIdx.x; i < QT * HD; i += AT) {
        const unsigned t = t0 + i / HD, d = i % HD;
        q_sh[i / HD][d] = t < T ? qkv[(u64)t * COLS + h * HD + d] : 0.0f;
    }
    float m[QPW], l[QPW], acc[QPW][DPL];
    #pragma unroll
    for (unsigned qi = 0; qi < QPW; ++qi) {
        m[qi] = -3.0e38f; l[qi] = 0.0f;
        #pragma unroll
        for (unsigned r = 0; r < DPL; ++r) acc[qi][r] = 0.0f;
    }
    // Keys 0 ..= POS + t_end - 1 (the block's last query sees them all).
    const unsigned n_keys = POS + t_end;
    for (unsigned j0 = 0; j0 < n_keys; j0 += KT) {
        __syncthreads();
        for (unsigned i = threadIdx.x; i < KT * HD; i += AT) {
            const unsigned jj = i / HD, d = i % HD, j = j0 + jj;
            float kv = 0.0f, vv = 0.0f;
            if (j < n_keys) {
                if (j < POS) {
                    kv = kv_load(k_cache[(u64)j * KVC + kv_off + d]);
                    vv = kv_load(v_cache[(u64)j * KVC + kv_off + d]);
                } else {
                    const float* row = qkv + (u64)(j - POS) * COLS;
                    kv = kv_load(row[QC + kv_off + d]);
                    vv = kv_load(row[QC + KVC + kv_off + d]);
                }
            }
            k_sh[jj][d] = kv;
            v_sh[jj][d] = vv;
        }
        __syncthreads();
        #pragma unroll
        for (unsigned qi = 0; qi < QPW; ++qi) {
            const unsigned ql = warp * QPW + qi, t = t0 + ql;
            // Warp-uniform: the query exists and sees at least key j0.
            if (t >= t_end || j0 > POS + t) continue;
            const unsigned j = j0 + lane;
            float s = -3.0e38f;
            if (j <= POS + t) {
                float dot = 0.0f;
                for (unsigned d = 0; d < HD; ++d) dot = fmaf(q_sh[ql][d], k_sh[lane][d], dot);
                s = dot * SCALE;
            }
            const float mn = fmaxf(m[qi], warp_max(s));
            const float corr = expf(m[qi] - mn);
            const float p = j <= POS + t ? expf(s - mn) : 0.0f;
            l[qi] = l[qi] * corr + warp_sum(p);
            #pragma unroll
            for (unsigned r = 0; r < DPL; ++r) acc[qi][r] *= corr;
            for (unsigned jj = 0; jj < KT; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                #pragma unroll
                for (unsigned r = 0; r < DPL; ++r) {
                    const unsigned d = lane + 32u * r;
                    if (d < HD) acc[qi][r] = fmaf(pj, v_sh[jj][d], acc[qi][r]);
                }
            }
            m[qi] = mn;
        }
    }
    #pragma unroll
    for (unsigned qi = 0; qi < QPW; ++qi) {
        const unsigned t = t0 + warp * QPW + qi;
        if (t >= t_end) continue;
        #pragma unroll
        for (unsigned r = 0; r < DPL; ++r) {
            const unsigned d = lane + 32u * r;
            if (d < HD) y[(u64)t * QC + h * HD + d] = acc[qi][r] / l[qi];
        }
    }
";
    let grid = [
        GridDim::fixed(n_q_heads as u64, 1),
        GridDim::tokens(TILE_Q as u64),
        GridDim::one(),
    ];
    b.finish(&kv_helpers(kv_f16), body, TILE_THREADS, grid)
}
