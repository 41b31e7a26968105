//! Row normalisations. Means are accumulated in f64 so the result does not depend on summation
//! order; the rest is f32 as Hugging Face computes it.

use rayon::prelude::*;

/// `out = x / sqrt(mean(x²) + eps) * weight` per row of `weight.len()` columns.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(o, xr)| {
            let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / cols as f64;
            let inv = 1.0 / ((ms as f32) + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(xr).zip(weight) {
                *o = (v * inv) * w;
            }
        });
}

/// `out = (x - mean) / sqrt(var + eps) * weight + bias` per row (biased variance).
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let cols = weight.len();
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .for_each(|(o, xr)| {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / ((var as f32) + eps).sqrt();
            let mean = mean as f32;
            for (j, o) in o.iter_mut().enumerate() {
                *o = (xr[j] - mean) * inv * weight[j] + bias[j];
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_by_hand() {
        // Row [3, 4]: mean square 12.5.
        let mut out = [0f32; 4];
        rms_norm(&[3.0, 4.0, 0.0, 2.0], &[1.0, 2.0], 0.0, &mut out);
        let s = 12.5f32.sqrt();
        assert!((out[0] - 3.0 / s).abs() < 1e-6 && (out[1] - 8.0 / s).abs() < 1e-6);
        let s = 2f32.sqrt();
        assert!(out[2] == 0.0 && (out[3] - 4.0 / s).abs() < 1e-6);
    }

    #[test]
    fn layer_norm_by_hand() {
        // Row [1, 3]: mean 2, var 1.
        let mut out = [0f32; 2];
        layer_norm(&[1.0, 3.0], &[2.0, 1.0], &[0.5, -0.5], 0.0, &mut out);
        assert!((out[0] - (-2.0 + 0.5)).abs() < 1e-6);
        assert!((out[1] - (1.0 - 0.5)).abs() < 1e-6);
    }
}
