//! Scalar functions the standard library lacks, and the choice of exponential.

/// The f32 exponential of the hot ops (softmax, SiLU, sigmoid, RWKV): the platform's, which is
/// fast, or the `libm` crate's, which gives the same bits on every platform (build-time
/// calibration runs the model with it so that its codes do not depend on the machine). Ops are
/// generic over it, so the choice costs nothing per element.
pub trait Exp: Copy + Send + Sync {
    fn exp(x: f32) -> f32;
}

/// `f32::exp` (the system libm).
#[derive(Debug, Clone, Copy)]
pub struct NativeExp;

impl Exp for NativeExp {
    #[inline]
    fn exp(x: f32) -> f32 {
        x.exp()
    }
}

/// `libm::expf` (pure Rust: identical results everywhere).
#[derive(Debug, Clone, Copy)]
pub struct PortableExp;

impl Exp for PortableExp {
    #[inline]
    fn exp(x: f32) -> f32 {
        libm::expf(x)
    }
}

/// The error function, accurate to about 1e-14 (f64): Maclaurin series near 0, continued fraction
/// for erfc further out, ±1 beyond 6.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let a2 = a * a;
        let mut term = a;
        let mut sum = a;
        // At a < 2.5 the terms fall below 1e-17 of the sum before n = 60.
        for n in 1..=60 {
            let n = n as f64;
            term *= -a2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        // erfc(a) = exp(-a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + …))))), evaluated
        // from the tail.
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - libm::exp(-a * a) / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::erf;

    #[test]
    fn erf_matches_tabulated_values() {
        for (x, want) in [
            (0.0, 0.0),
            (1e-30, 1.128_379_167_095_512_6e-30),
            (0.5, 0.520_499_877_813_046_5),
            (2.499, 0.999_590_864_244_255_4),
            (1.0, 0.842_700_792_949_714_9),
            (-1.5, -0.966_105_146_475_310_7),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.0, 0.999_977_909_503_001_4),
            (4.0, 0.999_999_984_582_742_1),
            (7.0, 1.0),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-13,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }
}
