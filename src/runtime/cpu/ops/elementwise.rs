//! Elementwise ops. Large buffers are split into fixed chunks across threads; each element's value
//! does not depend on the split.

use super::math::{erf, Exp};
use super::PAR_MIN_ELEMS;
use rayon::prelude::*;

const CHUNK: usize = 4096;

/// `f` over every element, in parallel when there are many.
pub fn map_in_place(buf: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    if buf.len() < PAR_MIN_ELEMS {
        buf.iter_mut().for_each(|x| *x = f(*x));
    } else {
        buf.par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|x| *x = f(*x)));
    }
}

/// `out[i] = f(out[i], other[i])`.
pub fn zip_in_place(out: &mut [f32], other: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    if out.len() < PAR_MIN_ELEMS {
        out.iter_mut().zip(other).for_each(|(o, &b)| *o = f(*o, b));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(other.par_chunks(CHUNK))
            .for_each(|(o, b)| o.iter_mut().zip(b).for_each(|(o, &b)| *o = f(*o, b)));
    }
}

pub fn sigmoid<E: Exp>(x: f32) -> f32 {
    1.0 / (1.0 + E::exp(-x))
}

/// Exact GELU: `0.5 x (1 + erf(x/√2))`, erf in f64.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

pub fn relu_square(x: f32) -> f32 {
    let r = x.max(0.0);
    r * r
}

/// `out[t, j] = silu(input[t, j]) * input[t, I + j]` with `I = out cols`.
pub fn silu_mul<E: Exp>(input: &[f32], out: &mut [f32], cols: usize) {
    let work = |(o, row): (&mut [f32], &[f32])| {
        let (gate, up) = row.split_at(cols);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid::<E>(g) * u;
        }
    };
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_mut(cols)
            .zip(input.chunks(2 * cols))
            .for_each(work);
    } else {
        out.par_chunks_mut(cols)
            .zip(input.par_chunks(2 * cols))
            .for_each(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_by_hand() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-2.0) - (-0.045_500_26)).abs() < 1e-6);
        assert_eq!(relu_square(-3.0), 0.0);
        assert_eq!(relu_square(3.0), 9.0);
        let sigmoid = sigmoid::<super::super::math::NativeExp>;
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        let mut out = [0f32; 2];
        silu_mul::<super::super::math::PortableExp>(&[1.0, -1.0, 2.0, 3.0], &mut out, 2);
        assert!((out[0] - sigmoid(1.0) * 2.0).abs() < 1e-6);
        assert!((out[1] - (-sigmoid(-1.0) * 3.0)).abs() < 1e-6);
    }

    #[test]
    fn parallel_split_gives_the_same_values() {
        let n = PAR_MIN_ELEMS * 3 + 17;
        let mut a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin() * 4.0).collect();
        let want: Vec<f32> = a.iter().map(|&x| gelu(x)).collect();
        map_in_place(&mut a, gelu);
        assert_eq!(a, want);
    }
}
