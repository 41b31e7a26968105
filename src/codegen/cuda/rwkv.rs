//! RWKV-4 kernels. The RWKV state of a layer is one f32 device buffer of five `hidden` vectors:
//! `[att_shift | num | den | max | ffn_shift]` (the runtime initialises max to -1e38, the rest to
//! 0). Both kernels give each channel to one thread that walks the T rows in order, so the
//! recurrence and the state update need no synchronisation. Grid `[ceil(hidden / TPB), 1, 1]`.

use super::builder::{CudaBuilder, Elem};
use super::launch::{CudaLaunch, GridDim};
use super::weights::declare_vector;
use crate::formats::dtype::DType;

fn grid(b: &CudaBuilder, hidden: usize) -> [GridDim; 3] {
    [
        GridDim::fixed(hidden as u64, b.tuning.threads_per_block as u64),
        GridDim::one(),
        GridDim::one(),
    ]
}

/// Token shift: `outs[i] = x · mixes[i] + prev · (1 - mixes[i])`, then the slot vector ← the last
/// row. `index` = the slot's vector in the state: 0 (attention) or 4 (feed-forward).
pub fn token_shift(mut b: CudaBuilder, hidden: usize, mixes: &[DType]) -> (String, CudaLaunch) {
    b.const_u32("H", hidden);
    b.activation("input", false, "x");
    for (i, d) in mixes.iter().enumerate() {
        declare_vector(&mut b, &format!("mixes[{i}]"), *d, &format!("mix{i}"));
    }
    b.state("rwkv", Elem::F32, "state");
    for i in 0..mixes.len() {
        b.activation(&format!("outs[{i}]"), true, &format!("out{i}"));
    }
    b.params_index("state vector of the slot: 0 for Attention, 4 for FeedForward");
    let loads: String = (0..mixes.len())
        .map(|i| format!("    const float m{i} = mix{i}_at(c);\n"))
        .collect();
    let per_row: String = (0..mixes.len())
        .map(|i| format!("        out{i}[(u64)t * H + c] = v * m{i} + prev * (1.0f - m{i});\n"))
        .collect();
    let body = format!(
        "    const unsigned c = blockIdx.x * TPB + threadIdx.x;
    if (c >= H) return;
    const u64 slot = (u64)index * H + c;
{loads}    float prev = state[slot];
    for (unsigned t = 0; t < T; ++t) {{
        const float v = x[(u64)t * H + c];
{per_row}        prev = v;
    }}
    state[slot] = prev;
"
    );
    let g = grid(&b, hidden);
    let tpb = b.tuning.threads_per_block;
    b.finish("", &body, tpb, g)
}

/// The WKV recurrence exactly as the CPU (Hugging Face `rwkv_linear_attention_cpu`) orders it.
pub fn wkv(
    mut b: CudaBuilder,
    hidden: usize,
    time_decay: DType,
    time_first: DType,
) -> (String, CudaLaunch) {
    b.const_u32("H", hidden);
    b.activation("k", false, "kk");
    b.activation("v", false, "vv");
    declare_vector(&mut b, "time_decay", time_decay, "decay");
    declare_vector(&mut b, "time_first", time_first, "first");
    b.state("rwkv", Elem::F32, "state");
    b.activation("out", true, "y");
    let body = "    const unsigned c = blockIdx.x * TPB + threadIdx.x;
    if (c >= H) return;
    const float w = decay_at(c), u = first_at(c);
    float num = state[H + c], den = state[2u * H + c], mx = state[3u * H + c];
    for (unsigned t = 0; t < T; ++t) {
        const float kc = kk[(u64)t * H + c], vc = vv[(u64)t * H + c];
        const float ww = kc + u;
        const float m = fmaxf(mx, ww);
        const float e1 = expf(mx - m), e2 = expf(ww - m);
        y[(u64)t * H + c] = (e1 * num + e2 * vc) / (e1 * den + e2);
        const float ww2 = mx + w;
        const float m2 = fmaxf(ww2, kc);
        const float f1 = expf(ww2 - m2), f2 = expf(kc - m2);
        num = f1 * num + f2 * vc;
        den = f1 * den + f2;
        mx = m2;
    }
    state[H + c] = num;
    state[2u * H + c] = den;
    state[3u * H + c] = mx;
";
    let g = grid(&b, hidden);
    let tpb = b.tuning.threads_per_block;
    b.finish("", body, tpb, g)
}
