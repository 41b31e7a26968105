//! Causal multi-head attention over a growing KV cache (`Op::Attention`).

use super::math::Exp;
use crate::runtime::cpu::kernels;
use rayon::prelude::*;

/// Keys and values of one layer for the positions processed so far, `[len, n_kv_heads·head_dim]`
/// each. Grows as tokens arrive, so memory follows use rather than `max_seq_len`.
#[derive(Debug, Default)]
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Appends the k and v of the `T` rows of `qkv` (at positions `pos..pos+T`) to `cache`, then writes
/// `softmax(q·kᵀ/√head_dim)·v` over positions `0..=pos+t` for every row `t` and query head into
/// `out` (`[T, n_q_heads·head_dim]`). Each (row, head) is one task, computed in a fixed order.
pub fn attention<E: Exp>(
    qkv: &[f32],
    pos: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    cache: &mut KvCache,
    out: &mut [f32],
) {
    let q_cols = n_q_heads * head_dim;
    let kv_cols = n_kv_heads * head_dim;
    let cols = q_cols + 2 * kv_cols;
    debug_assert_eq!(cache.k.len(), pos * kv_cols);
    cache.k.truncate(pos * kv_cols);
    cache.v.truncate(pos * kv_cols);
    for row in qkv.chunks_exact(cols) {
        cache.k.extend_from_slice(&row[q_cols..q_cols + kv_cols]);
        cache.v.extend_from_slice(&row[q_cols + kv_cols..]);
    }
    let group = n_q_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (keys, values) = (&cache.k, &cache.v);
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(task, o)| {
            let (t, h) = (task / n_q_heads, task % n_q_heads);
            let q = &qkv[t * cols + h * head_dim..t * cols + (h + 1) * head_dim];
            let kv_off = (h / group) * head_dim;
            let n_ctx = pos + t + 1;
            let mut scores: Vec<f32> = (0..n_ctx)
                .map(|j| {
                    let k = &keys[j * kv_cols + kv_off..j * kv_cols + kv_off + head_dim];
                    kernels::dot(q, k) * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = E::exp(*s - max);
                sum += *s;
            }
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let w = p / sum;
                let v = &values[j * kv_cols + kv_off..j * kv_cols + kv_off + head_dim];
                for (o, &x) in o.iter_mut().zip(v) {
                    *o += w * x;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_gqa_by_hand() {
        // 2 query heads sharing 1 kv head, head_dim 1; two tokens in one call.
        // Row layout [q0, q1, k, v].
        let qkv = [1.0, 0.0, 0.0, 10.0, 2.0, -1.0, 1.0, 20.0];
        let mut cache = KvCache::default();
        let mut out = [0f32; 4];
        attention::<super::super::math::NativeExp>(&qkv, 0, 2, 1, 1, &mut cache, &mut out);
        // Row 0 sees only position 0: both heads give v0 = 10.
        assert_eq!(&out[..2], &[10.0, 10.0]);
        // Row 1, head 0: scores [2·0, 2·1] → weights softmax([0, 2]).
        let w1 = 2f32.exp() / (1.0 + 2f32.exp());
        assert!((out[2] - (10.0 * (1.0 - w1) + 20.0 * w1)).abs() < 1e-5);
        // Row 1, head 1: scores [0, -1].
        let w1 = (-1f32).exp() / (1.0 + (-1f32).exp());
        assert!((out[3] - (10.0 * (1.0 - w1) + 20.0 * w1)).abs() < 1e-5);
        assert_eq!(cache.k, vec![0.0, 1.0]);
        assert_eq!(cache.v, vec![10.0, 20.0]);
    }

    #[test]
    fn incremental_equals_batched() {
        let qkv: Vec<f32> = (0..5 * 12)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        // 2 q heads, 1 kv head, head_dim 3 → 12 cols.
        let mut full = vec![0f32; 5 * 6];
        attention::<super::super::math::NativeExp>(
            &qkv,
            0,
            2,
            1,
            3,
            &mut KvCache::default(),
            &mut full,
        );
        let mut cache = KvCache::default();
        let mut step = vec![0f32; 5 * 6];
        for t in 0..5 {
            attention::<super::super::math::PortableExp>(
                &qkv[t * 12..(t + 1) * 12],
                t,
                2,
                1,
                3,
                &mut cache,
                &mut step[t * 6..(t + 1) * 6],
            );
        }
        for (a, b) in full.iter().zip(&step) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
