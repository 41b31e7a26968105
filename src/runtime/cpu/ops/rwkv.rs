//! RWKV-4 token shift and WKV recurrence (`Op::RwkvTokenShift`, `Op::RwkvWkv`).

use super::math::Exp;

/// Per-layer recurrent state, as `StateDecl::Rwkv` documents.
#[derive(Debug)]
pub struct RwkvState {
    pub att_shift: Vec<f32>,
    pub num: Vec<f32>,
    pub den: Vec<f32>,
    pub max: Vec<f32>,
    pub ffn_shift: Vec<f32>,
}

impl RwkvState {
    pub fn new(hidden: usize) -> Self {
        RwkvState {
            att_shift: vec![0.0; hidden],
            num: vec![0.0; hidden],
            den: vec![0.0; hidden],
            max: vec![-1e38; hidden],
            ffn_shift: vec![0.0; hidden],
        }
    }
}

/// `outs[i][t] = x[t] * mixes[i] + prev[t] * (1 - mixes[i])` with `prev[t] = x[t-1]` (`shift` for
/// t = 0); then `shift` ← the last row of `x`.
pub fn token_shift(x: &[f32], shift: &mut [f32], mixes: &[&[f32]], outs: &mut [Vec<f32>]) {
    let hidden = shift.len();
    for (t, row) in x.chunks_exact(hidden).enumerate() {
        let prev = if t == 0 {
            &shift[..]
        } else {
            &x[(t - 1) * hidden..t * hidden]
        };
        for (mix, out) in mixes.iter().zip(outs.iter_mut()) {
            let o = &mut out[t * hidden..(t + 1) * hidden];
            for j in 0..hidden {
                o[j] = row[j] * mix[j] + prev[j] * (1.0 - mix[j]);
            }
        }
    }
    if let Some(last) = x.chunks_exact(hidden).last() {
        shift.copy_from_slice(last);
    }
}

/// The WKV recurrence over the rows of `k` and `v`, step for step as Hugging Face
/// `rwkv_linear_attention_cpu`: `decay` is `-exp(time_decay)`.
pub fn wkv<E: Exp>(
    k: &[f32],
    v: &[f32],
    decay: &[f32],
    first: &[f32],
    s: &mut RwkvState,
    out: &mut [f32],
) {
    let hidden = decay.len();
    for (t, o) in out.chunks_exact_mut(hidden).enumerate() {
        let (kr, vr) = (
            &k[t * hidden..(t + 1) * hidden],
            &v[t * hidden..(t + 1) * hidden],
        );
        for c in 0..hidden {
            let (kc, vc) = (kr[c], vr[c]);
            let (num, den, max) = (s.num[c], s.den[c], s.max[c]);
            let ww = kc + first[c];
            let m = max.max(ww);
            let (e1, e2) = (E::exp(max - m), E::exp(ww - m));
            o[c] = (e1 * num + e2 * vc) / (e1 * den + e2);
            let ww = max + decay[c];
            let m = ww.max(kc);
            let (e1, e2) = (E::exp(ww - m), E::exp(kc - m));
            s.num[c] = e1 * num + e2 * vc;
            s.den[c] = e1 * den + e2;
            s.max[c] = m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shift_uses_state_then_previous_row() {
        let mut shift = vec![10.0, 20.0];
        let mixes: Vec<&[f32]> = vec![&[0.25, 1.0]];
        let mut outs = vec![vec![0f32; 4]];
        token_shift(&[1.0, 2.0, 3.0, 4.0], &mut shift, &mixes, &mut outs);
        assert_eq!(outs[0], vec![0.25 + 7.5, 2.0, 0.75 + 0.75, 4.0]);
        assert_eq!(shift, vec![3.0, 4.0]);
    }

    /// The WKV output is a decayed weighted average: compare with the unstabilised formula
    /// `(Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same without v)`.
    #[test]
    fn wkv_matches_the_plain_formula() {
        let (w, u) = (-0.7f64, 0.3f64);
        let k = [0.5f32, -1.0, 2.0, 0.1];
        let v = [1.0f32, 3.0, -2.0, 0.5];
        let mut s = RwkvState::new(1);
        let mut out = [0f32; 4];
        wkv::<super::super::math::PortableExp>(&k, &v, &[w as f32], &[u as f32], &mut s, &mut out);
        for t in 0..4 {
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..t {
                let e = ((t - 1 - i) as f64 * w + k[i] as f64).exp();
                num += e * v[i] as f64;
                den += e;
            }
            let e = (u + k[t] as f64).exp();
            let want = (num + e * v[t] as f64) / (den + e);
            assert!(
                (out[t] as f64 - want).abs() < 1e-5,
                "t={t}: {} vs {want}",
                out[t]
            );
        }
    }
}
