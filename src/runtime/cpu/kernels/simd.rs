//! CPU feature detection and f32 dot products (AVX2+FMA on x86-64, portable elsewhere; the
//! portable loops use independent lanes so LLVM vectorises them with NEON on aarch64). The
//! quantized and f16 kernels have hand-written NEON versions in their own modules.

/// Whether the AVX2 + FMA + F16C kernels can run on this CPU (detected once; cheap to call).
/// Setting `MLCB_NO_SIMD` in the environment forces the portable kernels (for debugging).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(super) fn has_avx2() -> bool {
    #[cfg(test)]
    if FORCE_PORTABLE.with(|f| f.get()) {
        return false;
    }
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("MLCB_NO_SIMD").is_none()
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(test)]
thread_local! {
    /// Tests set this on a one-thread pool to exercise the portable kernels on an AVX2 machine.
    pub(super) static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the NEON kernels can run (always on aarch64 Linux/macOS; detected to be safe).
/// `MLCB_NO_SIMD` forces the portable kernels, as on x86-64.
#[cfg(target_arch = "aarch64")]
#[inline]
pub(super) fn has_neon() -> bool {
    #[cfg(test)]
    if FORCE_PORTABLE.with(|f| f.get()) {
        return false;
    }
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var_os("MLCB_NO_SIMD").is_none()
            && std::arch::is_aarch64_feature_detected!("neon")
    })
}

/// `Σ a[i]·b[i]`.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are equal.
        return unsafe { avx2::dot(a, b) };
    }
    dot_portable(a, b)
}

/// `[Σ w0·x, Σ w1·x, Σ w2·x, Σ w3·x]`: four weight rows against one activation row, so each
/// load of `x` is used four times.
pub(super) fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    for r in &w {
        assert_eq!(r.len(), x.len());
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; all lengths are equal.
        return unsafe { avx2::dot4(w, x) };
    }
    [
        dot_single_lane_group(w[0], x),
        dot_single_lane_group(w[1], x),
        dot_single_lane_group(w[2], x),
        dot_single_lane_group(w[3], x),
    ]
}

/// `out[c][r] = Σ w[r]·x[c]`: four weight rows against three activation rows (twelve
/// accumulators, so each load feeds three or four FMAs). Every value is computed exactly as
/// [`dot4`] computes it, so callers may mix the two freely.
pub(super) fn dot4x3(w: [&[f32]; 4], x: [&[f32]; 3]) -> [[f32; 4]; 3] {
    let n = x[0].len();
    for r in w.iter().chain(&x) {
        assert_eq!(r.len(), n);
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA; all lengths are equal.
        return unsafe { avx2::dot4x3(w, x) };
    }
    [dot4(w, x[0]), dot4(w, x[1]), dot4(w, x[2])]
}

/// [`avx2::dot`]'s exact order without SIMD intrinsics: four groups of eight lanes over blocks of
/// 32, the remaining blocks of 8 into the first group, `(g0 + g1) + (g2 + g3)` lane by lane, the
/// AVX2 horizontal sum, then the tail by FMAs. FMA is exact, so this gives the same bits as the
/// AVX2 kernel (and LLVM vectorises it with NEON on aarch64).
pub(super) fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() / 32 * 32;
    let mut lanes = DotLanes::default();
    lanes.blocks(&a[..whole], &b[..whole]);
    lanes.finish(&a[whole..], &b[whole..])
}

/// [`dot_portable`]'s accumulators, for callers that produce the operands a piece at a time
/// (`f16_raw` converts its weights in chunks): [`Self::blocks`] takes whole blocks of 32, any
/// number of times, then [`Self::finish`] the last fewer than 32 values.
#[derive(Default)]
pub(super) struct DotLanes {
    acc: [[f32; 8]; 4],
}

impl DotLanes {
    /// Adds `a·b` for whole blocks of 32 (`a.len()` a multiple of 32).
    pub(super) fn blocks(&mut self, a: &[f32], b: &[f32]) {
        debug_assert_eq!(a.len() % 32, 0);
        for (wa, wb) in a.chunks_exact(32).zip(b.chunks_exact(32)) {
            for (j, g) in self.acc.iter_mut().enumerate() {
                for (l, gl) in g.iter_mut().enumerate() {
                    *gl = wa[8 * j + l].mul_add(wb[8 * j + l], *gl);
                }
            }
        }
    }

    /// The sum, with the last `a.len() < 32` products: blocks of 8 into the first group, the
    /// groups combined, the AVX2 horizontal sum, then the rest one at a time.
    pub(super) fn finish(mut self, a: &[f32], b: &[f32]) -> f32 {
        debug_assert!(a.len() < 32 && a.len() == b.len());
        let whole = a.len() / 8 * 8;
        for (wa, wb) in a[..whole].chunks_exact(8).zip(b.chunks_exact(8)) {
            for (l, gl) in self.acc[0].iter_mut().enumerate() {
                *gl = wa[l].mul_add(wb[l], *gl);
            }
        }
        let acc = &self.acc;
        let v: [f32; 8] =
            std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let mut s = hsum8(&v);
        for (x, y) in a[whole..].iter().zip(&b[whole..]) {
            s = x.mul_add(*y, s);
        }
        s
    }
}

/// One row against one activation the way [`dot4`] computes each of its four: a single 8-lane
/// accumulator, the AVX2 horizontal sum, then the tail by FMAs.
fn dot_single_lane_group(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = hsum8(&acc);
    for (x, y) in ta.iter().zip(tb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// The lanes of two 8-lane accumulators added, then summed as the AVX2 kernels end:
/// `hsum(a + b)`.
#[inline]
pub(super) fn hsum8_of_sum(a: &[f32; 8], b: &[f32; 8]) -> f32 {
    hsum8(&std::array::from_fn(|l| a[l] + b[l]))
}

/// The group step of the AVX2 NK row kernels (`q4_nk`, `q8_nk`) in plain code, for 32 codes `q`
/// (position order) against `x[..32]`, scale `s`: lane `l` adds
/// `((q[l]·x[l] ⊕ q[8+l]·x[8+l]) + (q[16+l]·x[16+l] ⊕ q[24+l]·x[24+l]))·s`, `⊕` fused, the AVX2
/// kernels' operations in their order.
#[inline]
pub(super) fn nk_group_lanes(q: &[f32; 32], x: &[f32], s: f32, total: &mut [f32; 8]) {
    for l in 0..8 {
        let a = q[8 + l].mul_add(x[8 + l], q[l] * x[l]);
        let b = q[24 + l].mul_add(x[24 + l], q[16 + l] * x[16 + l]);
        total[l] = (a + b).mul_add(s, total[l]);
    }
}

/// Sum of 8 lanes in the same order as the AVX2 horizontal sum.
#[inline]
pub(super) fn hsum8(a: &[f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let d = [q[0] + q[2], q[1] + q[3]];
    d[0] + d[1]
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 lanes: (lo + hi) halves, then pairs, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let s = _mm_add_ss(d, _mm_shuffle_ps(d, d, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2 and FMA must be available; `a.len() == b.len()`.
    ///
    /// Exactly [`super::dot_portable`]'s operations (four 8-lane accumulators over blocks of 32,
    /// the rest into the first, the same combination and horizontal sum, the tail by scalar
    /// FMAs), so both give the same bits: FMA is exact, so `mul_add` on any CPU rounds as
    /// `vfmadd` does.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *acc =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(v);
        while i < n {
            s = a[i].mul_add(b[i], s);
            i += 1;
        }
        s
    }

    /// # Safety
    /// AVX2 and FMA must be available; every `w[r].len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let px = x.as_ptr();
        let pw = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(px.add(i));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(pw[r].add(i)), xv, acc[r]);
            }
            i += 8;
        }
        let mut out = [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])];
        while i < n {
            for r in 0..4 {
                out[r] = w[r][i].mul_add(x[i], out[r]);
            }
            i += 1;
        }
        out
    }

    /// # Safety
    /// AVX2 and FMA must be available; every `w[r]` and `x[c]` has the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4x3(w: [&[f32]; 4], x: [&[f32]; 3]) -> [[f32; 4]; 3] {
        let n = x[0].len();
        let px = [x[0].as_ptr(), x[1].as_ptr(), x[2].as_ptr()];
        let pw = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut acc = [[_mm256_setzero_ps(); 4]; 3];
        let mut i = 0;
        while i + 8 <= n {
            let xv = [
                _mm256_loadu_ps(px[0].add(i)),
                _mm256_loadu_ps(px[1].add(i)),
                _mm256_loadu_ps(px[2].add(i)),
            ];
            for r in 0..4 {
                let wv = _mm256_loadu_ps(pw[r].add(i));
                for c in 0..3 {
                    acc[c][r] = _mm256_fmadd_ps(wv, xv[c], acc[c][r]);
                }
            }
            i += 8;
        }
        let mut out = [[0f32; 4]; 3];
        for c in 0..3 {
            for r in 0..4 {
                let mut s = hsum(acc[c][r]);
                for p in i..n {
                    s = w[r][p].mul_add(x[c][p], s);
                }
                out[c][r] = s;
            }
        }
        out
    }
}
