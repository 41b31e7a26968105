//! Driving the per-row dot product of one row-major (NK) group-32 storage format over a range of
//! rows: the instruction set is chosen once per call, and each format module supplies only its
//! kernels ([`RowDotFns`]).

use super::matrix::QMatrix;

/// `Σ` over the first `groups` full groups of one row: `data` holds the row's codes, `scales`
/// its scales, `x` the activations. Unsafe because SIMD variants need their CPU features.
pub(super) type RowDot = unsafe fn(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32;

/// One format's row kernels, by instruction set.
pub(super) struct RowDotFns {
    #[cfg(target_arch = "x86_64")]
    pub avx2: RowDot,
    #[cfg(target_arch = "aarch64")]
    pub neon: RowDot,
    pub portable: fn(data: &[u8], scales: &[u8], x: &[f32], groups: usize) -> f32,
}

impl RowDotFns {
    /// The fastest kernel this CPU can run.
    pub(super) fn pick(&self) -> RowDot {
        #[cfg(target_arch = "x86_64")]
        if super::simd::has_avx2() {
            return self.avx2;
        }
        #[cfg(target_arch = "aarch64")]
        if super::simd::has_neon() {
            return self.neon;
        }
        self.portable
    }
}

impl<'a> QMatrix<'a> {
    /// The bytes of one row's codes and of its scales, for NK storage.
    pub fn nk_row_bytes(&self, row: usize) -> (&'a [u8], &'a [u8]) {
        let wb = self.words_per_row * self.word_bytes;
        let sb = self.n_group * self.scale_bytes();
        (
            &self.data[row * wb..(row + 1) * wb],
            &self.scales[row * sb..(row + 1) * sb],
        )
    }
}

/// `out[j] = Σ_k x[k]·w[n0 + j, k]` with `kernels` for the full groups and the generic decoder
/// for a ragged last group.
pub(super) fn gemv_rows(m: &QMatrix, kernels: &RowDotFns, n0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), m.k);
    let full = m.k / 32;
    let row_dot = kernels.pick();
    for (j, o) in out.iter_mut().enumerate() {
        let (data, scales) = m.nk_row_bytes(n0 + j);
        // SAFETY: `pick` returned a kernel whose CPU features are present; the row slices hold
        // `full` whole groups of codes and scales (record sizes were checked when the view was
        // built) and `x` has K ≥ 32·full values.
        let body = unsafe { row_dot(data, scales, x, full) };
        *o = body + m.ragged_tail_dot(n0 + j, x);
    }
}
