//! RWKV-4 kernels. The RWKV state of a layer is one f32 buffer of five `hidden` vectors:
//! `[att_shift | num | den | max | ffn_shift]` (the runtime initialises max to -1e38, the rest
//! to 0). Both kernels give each channel to one invocation that walks the T rows in order, so the
//! recurrence and the state update need no synchronisation. Grid `[ceil(hidden / WG), 1, 1]`.

use super::builder::ENTRY_HEAD;
use super::builder::{Elem, KernelBuilder};
use super::launch::{GridDim, Launch};
use super::weights::declare_vector;
use crate::formats::dtype::DType;

fn grid(b: &KernelBuilder, hidden: usize) -> [GridDim; 3] {
    [
        GridDim::fixed(hidden as u64, b.tuning.workgroup_size as u64),
        GridDim::one(),
        GridDim::one(),
    ]
}

/// Token shift: `outs[i] = x · mixes[i] + prev · (1 - mixes[i])`, then the slot vector ← the last
/// row. `params.index` = the slot's vector in the state: 0 (attention) or 4 (feed-forward).
pub fn token_shift(mut b: KernelBuilder, hidden: usize, mixes: &[DType]) -> (String, Launch) {
    b.const_u32("H", hidden);
    b.activation("input", false, "x");
    for (i, d) in mixes.iter().enumerate() {
        declare_vector(
            &mut b,
            &format!("mixes[{i}]"),
            *d,
            &format!("mix{i}"),
            hidden,
        );
    }
    b.state("rwkv", "state", Elem::F32);
    for i in 0..mixes.len() {
        b.activation(&format!("outs[{i}]"), true, &format!("out{i}"));
    }
    b.params_index("state vector of the slot: 0 for Attention, 4 for FeedForward");
    let mut per_row = String::new();
    for i in 0..mixes.len() {
        per_row.push_str(&format!(
            "        out{i}[t * H + c] = v * m{i} + prev * (1.0 - m{i});\n"
        ));
    }
    let loads: String = (0..mixes.len())
        .map(|i| format!("    let m{i} = mix{i}_at(c);\n"))
        .collect();
    let body = format!(
        "@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let c = wid.x * WG + lid;
    if (c >= H) {{ return; }}
    let slot = params.index * H + c;
{loads}    var prev = state[slot];
    for (var t = 0u; t < params.t; t = t + 1u) {{
        let v = x[t * H + c];
{per_row}        prev = v;
    }}
    state[slot] = prev;
}}
",
        b.entry_point
    );
    let g = grid(&b, hidden);
    b.finish(&body, g)
}

/// The WKV recurrence exactly as the CPU (Hugging Face `rwkv_linear_attention_cpu`) orders it.
pub fn wkv(
    mut b: KernelBuilder,
    hidden: usize,
    time_decay: DType,
    time_first: DType,
) -> (String, Launch) {
    b.const_u32("H", hidden);
    b.activation("k", false, "kk");
    b.activation("v", false, "vv");
    declare_vector(&mut b, "time_decay", time_decay, "decay", hidden);
    declare_vector(&mut b, "time_first", time_first, "first", hidden);
    b.state("rwkv", "state", Elem::F32);
    b.activation("out", true, "y");
    let body = format!(
        "@compute @workgroup_size(WG)
fn {}{ENTRY_HEAD}
    let c = wid.x * WG + lid;
    if (c >= H) {{ return; }}
    let w = decay_at(c);
    let u = first_at(c);
    var num = state[H + c];
    var den = state[2u * H + c];
    var mx = state[3u * H + c];
    for (var t = 0u; t < params.t; t = t + 1u) {{
        let kc = kk[t * H + c];
        let vc = vv[t * H + c];
        let ww = kc + u;
        let m = max(mx, ww);
        let e1 = exp(mx - m);
        let e2 = exp(ww - m);
        y[t * H + c] = (e1 * num + e2 * vc) / (e1 * den + e2);
        let ww2 = mx + w;
        let m2 = max(ww2, kc);
        let f1 = exp(ww2 - m2);
        let f2 = exp(kc - m2);
        num = f1 * num + f2 * vc;
        den = f1 * den + f2;
        mx = m2;
    }}
    state[H + c] = num;
    state[2u * H + c] = den;
    state[3u * H + c] = mx;
}}
",
        b.entry_point
    );
    let g = grid(&b, hidden);
    b.finish(&body, g)
}
