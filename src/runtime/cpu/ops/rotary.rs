//! Rotary position embedding ("rotate half"), as `Op::Rotary` documents.

use rayon::prelude::*;

/// Applies RoPE in place to the q and k heads of every row of a fused qkv buffer; row `t` is at
/// position `pos + t`. Angles are computed in f32 as Hugging Face does, cos/sin rounded from f64
/// (the `libm` crate's, so the results are the same on every platform).
#[allow(clippy::too_many_arguments)]
pub fn rotary(
    qkv: &mut [f32],
    pos: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    rotary_dim: usize,
    theta: f32,
) {
    let cols = (n_q_heads + 2 * n_kv_heads) * head_dim;
    let half = rotary_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / libm::powf(theta, (2 * i) as f32 / rotary_dim as f32))
        .collect();
    qkv.par_chunks_mut(cols).enumerate().for_each(|(t, row)| {
        let p = (pos + t) as f32;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
            .iter()
            .map(|&f| {
                let a = (p * f) as f64;
                (libm::cos(a) as f32, libm::sin(a) as f32)
            })
            .unzip();
        // q heads then k heads are contiguous at the start of the row.
        for head in row[..(n_q_heads + n_kv_heads) * head_dim].chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (x0, x1) = (head[i], head[i + half]);
                head[i] = x0 * cos[i] - x1 * sin[i];
                head[i + half] = x1 * cos[i] + x0 * sin[i];
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_q_and_k_not_v() {
        // One q head, one kv head, head_dim 4, rotary_dim 2 (partial), theta 100.
        // Row 0 is at position 3: only dims 0 and 1 of q and k rotate, by angle 3 · 100^0 = 3.
        let mut qkv = vec![1.0, 2.0, 5.0, 6.0, 0.5, -1.0, 7.0, 8.0, 9.0, 9.0, 9.0, 9.0];
        rotary(&mut qkv, 3, 1, 1, 4, 2, 100.0);
        let (c, s) = (3f32.cos(), 3f32.sin());
        let want = [
            c - 2.0 * s,
            2.0 * c + s,
            5.0,
            6.0,
            0.5 * c + s,
            -c + 0.5 * s,
            7.0,
            8.0,
            9.0,
            9.0,
            9.0,
            9.0,
        ];
        for (a, b) in qkv.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{qkv:?}");
        }
    }

    #[test]
    fn frequencies_follow_theta() {
        // head_dim 4 full rotary: pair (0,2) at inv_freq 1, pair (1,3) at theta^-0.5 = 0.1.
        let mut qkv = vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        rotary(&mut qkv, 2, 1, 1, 4, 4, 100.0);
        assert!((qkv[0] - 2f32.cos()).abs() < 1e-6 && (qkv[2] - 2f32.sin()).abs() < 1e-6);
        assert!((qkv[1] - 0.2f32.cos()).abs() < 1e-6 && (qkv[3] - 0.2f32.sin()).abs() < 1e-6);
    }
}
