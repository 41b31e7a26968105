//! Rotary embedding and causal attention over the KV cache.
//!
//! KV cache layout (the runtime allocates it): two buffers `k` and `v`, each
//! `[max_seq_len, n_kv_heads, head_dim]`, f32, or f16 in f16 libraries (the binding's `elem`).
//! The runtime guarantees `pos + T ≤ max_seq_len`.

use super::builder::ENTRY_HEAD;
use super::builder::{reduce, Elem, KernelBuilder};
use super::launch::{GridDim, Launch};

/// In place on the q and k heads of the fused qkv buffer; `params.scalar` = theta. One
/// invocation per (head, pair `i < rotary_dim/2`), grid y = T. The angle `(pos+t) · inv_freq`
/// is formed in f32 as the CPU does, then reduced to [-π, π] (two-constant Cody–Waite) because GPU
/// sin/cos are only accurate near zero.
pub fn rotary(
    mut b: KernelBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
) -> (String, Launch) {
    b.const_u32("HEADS", n_q_heads + n_kv_heads);
    b.const_u32("HD", head_dim);
    b.const_u32("HALF", rotary_dim / 2);
    b.const_u32("RD", rotary_dim);
    b.const_u32("COLS", (n_q_heads + 2 * n_kv_heads) * head_dim);
    b.activation("qkv", true, "qkv");
    b.params_scalar("theta");
    let body = format!(
        "const TWO_PI_HI: f32 = 6.28125;
const TWO_PI_LO: f32 = 0.0019353071795864769;
const INV_TWO_PI: f32 = 0.15915494309189535;

@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let t = wid.y;
    let idx = wid.x * WG + lid;
    if (t >= params.t || idx >= HEADS * HALF) {{ return; }}
    let h = idx / HALF;
    let i = idx % HALF;
    let inv_freq = 1.0 / pow(params.scalar, f32(2u * i) / f32(RD));
    let a = f32(params.pos + t) * inv_freq;
    let m = round(a * INV_TWO_PI);
    let r = (a - m * TWO_PI_HI) - m * TWO_PI_LO;
    let cs = cos(r);
    let sn = sin(r);
    let base = t * COLS + h * HD;
    let x0 = qkv[base + i];
    let x1 = qkv[base + i + HALF];
    qkv[base + i] = x0 * cs - x1 * sn;
    qkv[base + i + HALF] = x1 * cs + x0 * sn;
}}
",
        b.entry_point
    );
    let grid = [
        GridDim::fixed(
            ((n_q_heads + n_kv_heads) * (rotary_dim / 2)) as u64,
            b.tuning.workgroup_size as u64,
        ),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}

/// One workgroup per (query head, row t): appends row t's k and v to the cache (the first query
/// head of each kv group writes), then `softmax(q·kᵀ/√d)·v` over positions `0..=pos+t`. Keys and
/// values of this call's rows are read from qkv itself, earlier ones from the cache, so no
/// workgroup reads a cache slot another one writes. Two passes over the keys: the max score (tree
/// reduction), then tiles of WG positions whose weights `exp(s - max)` go through workgroup memory
/// while each invocation accumulates its `ceil(head_dim / WG)` output dims.
pub fn attention(
    mut b: KernelBuilder,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> (String, Launch) {
    let wg = b.tuning.workgroup_size as usize;
    b.const_u32("NQ", n_q_heads);
    b.const_u32("GROUP", n_q_heads / n_kv_heads);
    b.const_u32("HD", head_dim);
    b.const_u32("QC", n_q_heads * head_dim);
    b.const_u32("KVC", n_kv_heads * head_dim);
    b.const_u32("COLS", (n_q_heads + 2 * n_kv_heads) * head_dim);
    b.const_u32("DPT", head_dim.div_ceil(wg));
    b.const_f32("SCALE", 1.0 / (head_dim as f32).sqrt());
    b.activation("qkv", false, "qkv");
    // An f16 cache: stored rounded, and the call's own rows are rounded alike when read from qkv,
    // so a position's key is the same value whether this call or an earlier one wrote it.
    let f16 = b.use_f16();
    let elem = if f16 { Elem::F16 } else { Elem::F32 };
    b.state("k", "k_cache", elem);
    b.state("v", "v_cache", elem);
    b.activation("out", true, "y");
    let (store, load, fresh) = if f16 {
        ("to_h", "f32", "f32(to_h")
    } else {
        ("", "", "(")
    };
    b.helper(&format!(
        "fn key_at(j: u32, kv_off: u32, d: u32) -> f32 {{
    if (j < params.pos) {{ return {load}(k_cache[j * KVC + kv_off + d]); }}
    return {fresh}(qkv[(j - params.pos) * COLS + QC + kv_off + d]));
}}
fn value_at(j: u32, kv_off: u32, d: u32) -> f32 {{
    if (j < params.pos) {{ return {load}(v_cache[j * KVC + kv_off + d]); }}
    return {fresh}(qkv[(j - params.pos) * COLS + QC + KVC + kv_off + d]));
}}
fn kv_store(v: f32) -> {} {{ return {store}(v); }}",
        if f16 { "f16" } else { "f32" }
    ));
    let body = format!(
        "var<workgroup> q_sh: array<f32, HD>;
var<workgroup> p_sh: array<f32, WG>;
var<workgroup> red: array<f32, WG>;

fn score(j: u32, kv_off: u32) -> f32 {{
    var s = 0.0;
    for (var d = 0u; d < HD; d = d + 1u) {{
        s = s + q_sh[d] * key_at(j, kv_off, d);
    }}
    return s * SCALE;
}}

@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let h = wid.x;
    let t = wid.y;
    if (h >= NQ || t >= params.t) {{ return; }}
    let kv_off = (h / GROUP) * HD;
    let pos = params.pos;
    if (h % GROUP == 0u) {{
        for (var d = lid; d < HD; d = d + WG) {{
            k_cache[(pos + t) * KVC + kv_off + d] = kv_store(qkv[t * COLS + QC + kv_off + d]);
            v_cache[(pos + t) * KVC + kv_off + d] = kv_store(qkv[t * COLS + QC + KVC + kv_off + d]);
        }}
    }}
    for (var d = lid; d < HD; d = d + WG) {{
        q_sh[d] = qkv[t * COLS + h * HD + d];
    }}
    workgroupBarrier();
    let n_ctx = pos + t + 1u;
    var m = -3.0e38;
    for (var j = lid; j < n_ctx; j = j + WG) {{
        m = max(m, score(j, kv_off));
    }}
{}    var acc: array<f32, DPT>;
    var l = 0.0;
    for (var j0 = 0u; j0 < n_ctx; j0 = j0 + WG) {{
        let j = j0 + lid;
        var p = 0.0;
        if (j < n_ctx) {{ p = exp(score(j, kv_off) - mx); }}
        p_sh[lid] = p;
        workgroupBarrier();
        let cnt = min(WG, n_ctx - j0);
        for (var i = 0u; i < cnt; i = i + 1u) {{
            let pi = p_sh[i];
            l = l + pi;
            for (var r = 0u; r < DPT; r = r + 1u) {{
                let d = lid + r * WG;
                if (d < HD) {{ acc[r] = acc[r] + pi * value_at(j0 + i, kv_off, d); }}
            }}
        }}
        workgroupBarrier();
    }}
    for (var r = 0u; r < DPT; r = r + 1u) {{
        let d = lid + r * WG;
        if (d < HD) {{ y[t * QC + h * HD + d] = acc[r] / l; }}
    }}
}}
",
        b.entry_point,
        reduce(b.tuning.subgroups, "m", "mx", "max")
    );
    let grid = [
        GridDim::fixed(n_q_heads as u64, 1),
        GridDim::tokens(1),
        GridDim::one(),
    ];
    b.finish(&body, grid)
}
