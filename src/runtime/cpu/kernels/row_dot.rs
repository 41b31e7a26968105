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
        let (wb, sb) = self.nk_row_sizes();
        (
            &self.data[row * wb..(row + 1) * wb],
            &self.scales[row * sb..(row + 1) * sb],
        )
    }

    /// Bytes of one row's codes and of its scales, for NK storage.
    fn nk_row_sizes(&self) -> (usize, usize) {
        (
            self.words_per_row * self.word_bytes,
            self.n_group * self.scale_bytes(),
        )
    }
}

/// Bytes ahead of the row being multiplied that the row kernels ask the CPU to fetch: the rows
/// are streamed once per token, and the hardware prefetcher alone leaves the loads stalling.
const PREFETCH_AHEAD: usize = 2048;

/// Rows of `m` (NK) that [`PREFETCH_AHEAD`] bytes of codes span, at least one.
pub(super) fn rows_ahead(m: &QMatrix) -> usize {
    rows_in_prefetch(m.nk_row_sizes().0)
}

/// Rows of `row_bytes` bytes that [`PREFETCH_AHEAD`] spans, at least one.
fn rows_in_prefetch(row_bytes: usize) -> usize {
    (PREFETCH_AHEAD / row_bytes.max(1)).max(1)
}

/// Hints the CPU to fetch row `row`'s codes and scales (NK; nothing past the last row).
#[inline]
pub(super) fn prefetch_row(m: &QMatrix, row: usize) {
    let (wb, sb) = m.nk_row_sizes();
    prefetch(m.data, row * wb, wb);
    prefetch(m.scales, row * sb, sb);
}

/// For raw float rows of `row_bytes` bytes (`q0f16`, `q0f32`): hints the CPU to fetch the row
/// [`PREFETCH_AHEAD`] bytes after row `row` (+11% on q0f16's decode).
#[inline]
pub(super) fn prefetch_raw_row(bytes: &[u8], row_bytes: usize, row: usize) {
    prefetch(
        bytes,
        (row + rows_in_prefetch(row_bytes)) * row_bytes,
        row_bytes,
    );
}

/// Hints the CPU to fetch `bytes[start..start + len]` (clipped to `bytes`) into cache.
#[inline]
fn prefetch(bytes: &[u8], start: usize, len: usize) {
    let end = (start + len).min(bytes.len());
    let mut p = start;
    while p < end {
        // SAFETY: `p` indexes `bytes`.
        prefetch_line(unsafe { bytes.as_ptr().add(p) });
        p += 64;
    }
    if start < end {
        // The last line, in case the range does not start on a line boundary.
        // SAFETY: as above, `end - 1` indexes `bytes`.
        prefetch_line(unsafe { bytes.as_ptr().add(end - 1) });
    }
}

/// Hints the CPU to fetch the cache line holding `p` (a hint: it never faults; a no-op where
/// the architecture has no kernel that uses it).
#[inline(always)]
pub(super) fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing back.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    super::neon::prefetch(p);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// `out[j] = Σ_k x[k]·w[n0 + j, k]` with `kernels` for the full groups and the generic decoder
/// for a ragged last group.
pub(super) fn gemv_rows(m: &QMatrix, kernels: &RowDotFns, n0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), m.k);
    gemv_rows_over(m, kernels, n0, x, m.k / 32, out);
    for (j, o) in out.iter_mut().enumerate() {
        *o += m.ragged_tail_dot(n0 + j, x);
    }
}

/// `out[j]` = `kernels` over the first `groups` groups of row `n0 + j`, with `kx` the
/// activations as the kernels read them (a format may permute or extend them), prefetching the
/// rows ahead.
pub(super) fn gemv_rows_over(
    m: &QMatrix,
    kernels: &RowDotFns,
    n0: usize,
    kx: &[f32],
    groups: usize,
    out: &mut [f32],
) {
    assert!(groups <= m.n_group);
    let row_dot = kernels.pick();
    let ahead = rows_ahead(m);
    for (j, o) in out.iter_mut().enumerate() {
        prefetch_row(m, n0 + j + ahead);
        let (data, scales) = m.nk_row_bytes(n0 + j);
        // SAFETY: `pick` returned a kernel whose CPU features are present; the row slices hold
        // `n_group >= groups` groups of codes and scales (record sizes were checked when the
        // view was built); each kernel asserts what it needs of `kx`.
        *o = unsafe { row_dot(data, scales, kx, groups) };
    }
}
