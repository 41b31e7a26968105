//! `erf` for WGSL, which has none: a Taylor series for |x| < 1 and Abramowitz & Stegun 7.1.26
//! (|error| ≤ 1.5e-7) above, both evaluated in f32. The WGSL text is generated from the same
//! coefficients [`erf_f32`] uses, and the tests check [`erf_f32`] against erf to < 1e-6.

use super::builder::f32_lit;

/// Taylor terms used below 1: `erf(x) = x · Σ c_n x^(2n)`, `c_n = 2/√π · (-1)^n / (n! (2n+1))`.
const TAYLOR_TERMS: usize = 12;
/// A&S 7.1.26: `erf(x) = 1 - (a1 t + … + a5 t⁵) e^(-x²)`, `t = 1 / (1 + p x)`, x ≥ 0.
const AS_P: f32 = 0.327_591_1;
const AS_A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_72,
    1.421_413_8,
    -1.453_152,
    1.061_405_4,
];

fn taylor() -> [f32; TAYLOR_TERMS] {
    let mut c = [0f32; TAYLOR_TERMS];
    let mut fact = 1f64;
    for (n, c) in c.iter_mut().enumerate() {
        if n > 0 {
            fact *= n as f64;
        }
        let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
        *c = (std::f64::consts::FRAC_2_SQRT_PI * sign / (fact * (2 * n + 1) as f64)) as f32;
    }
    c
}

/// The approximation as the WGSL computes it (f32 arithmetic, same evaluation order).
pub fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let r = if a < 1.0 {
        let z = a * a;
        let c = taylor();
        let mut p = c[TAYLOR_TERMS - 1];
        for &ci in c[..TAYLOR_TERMS - 1].iter().rev() {
            p = p * z + ci;
        }
        a * p
    } else {
        let t = 1.0 / (1.0 + AS_P * a);
        let mut p = AS_A[4];
        for &ai in AS_A[..4].iter().rev() {
            p = p * t + ai;
        }
        1.0 - (p * t) * (-a * a).exp()
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// WGSL `fn erf_approx(x: f32) -> f32`.
pub fn wgsl() -> String {
    let c = taylor();
    let mut taylor_horner = f32_lit(c[TAYLOR_TERMS - 1]);
    for &ci in c[..TAYLOR_TERMS - 1].iter().rev() {
        taylor_horner = format!("({taylor_horner} * z + {})", f32_lit(ci));
    }
    let mut as_horner = f32_lit(AS_A[4]);
    for &ai in AS_A[..4].iter().rev() {
        as_horner = format!("({as_horner} * t + {})", f32_lit(ai));
    }
    format!(
        "fn erf_approx(x: f32) -> f32 {{
    let a = abs(x);
    var r = 0.0;
    if (a < 1.0) {{
        let z = a * a;
        r = a * {taylor_horner};
    }} else {{
        let t = 1.0 / (1.0 + {} * a);
        r = 1.0 - ({as_horner} * t) * exp(-a * a);
    }}
    return select(r, -r, x < 0.0);
}}
",
        f32_lit(AS_P)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf in f64 by its Taylor series (|x| ≤ 3: ~1e-12).
    fn erf_ref(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    }

    #[test]
    fn reference_is_right() {
        for (x, want) in [
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
        ] {
            assert!((erf_ref(x) - want).abs() < 1e-12, "{x}");
        }
    }

    #[test]
    fn error_below_1e6_everywhere() {
        let mut worst = 0f64;
        for i in -30_000..=30_000 {
            let x = i as f32 / 10_000.0;
            let e = (erf_f32(x) as f64 - erf_ref(x as f64)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 1e-6, "max |error| {worst}");
        // Beyond 3: tabulated (Python math.erf).
        for (x, want) in [
            (3.5f32, 0.999_999_256_901_627_6f64),
            (4.0, 0.999_999_984_582_742_1),
            (5.0, 0.999_999_999_998_462_6),
            (-4.0, -0.999_999_984_582_742_1),
        ] {
            assert!((erf_f32(x) as f64 - want).abs() < 1e-6, "{x}");
        }
    }

    #[test]
    fn wgsl_uses_the_same_coefficients() {
        let src = wgsl();
        for c in taylor() {
            assert!(src.contains(&f32_lit(c)), "{c} missing from {src}");
        }
        for a in AS_A {
            assert!(src.contains(&f32_lit(a)));
        }
        assert!(src.contains(&f32_lit(AS_P)));
    }
}
