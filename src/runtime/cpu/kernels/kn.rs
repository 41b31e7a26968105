//! Fast path for the transposed (KN) layout of every scheme that stores its linear weights so —
//! `q3f16_0` (3-bit codes, 5 to a u16, groups of 40, f16 scales), `q4f16_0` (4-bit, 8 to a u32,
//! groups of 32, f16 scales), `q4f32_0` (asymmetric 4-bit, groups of 32, a bf16 scale and min per
//! group) and `q8f16_0` (8-bit, 4 to a u32, groups of 32, f16 scales). Word `w` of rows `n..n+8`
//! is 8 consecutive words, and so are their 8 scales, so the kernel vectorises across output
//! rows: each lane is one row. Per group it computes `Σ q·x` and then `(Σ q·x - maxq·Σ x)·s`
//! (symmetric) or `min·Σ x + s·Σ q·x` (asymmetric); the sums of `x` are shared by every row.
//! A ragged last group (K not a multiple of the group) is read the same way, its codes counted.

use super::matrix::{Codec, QMatrix};
use crate::formats::dtype::DType;
use crate::quant::scheme::Layout;

/// The storage formats the SIMD kernels (AVX2, NEON) are compiled for — the scheme table's KN
/// ones: (bits, codes per word, bytes per word, words per group, asymmetric).
const FORMATS: [(u32, usize, usize, usize, bool); 4] = [
    (3, 5, 2, 8, false),
    (4, 8, 4, 4, false),
    (4, 8, 4, 4, true),
    (8, 4, 4, 8, false),
];

/// Whether `m` is stored the way this module reads.
pub(super) fn applies(m: &QMatrix) -> bool {
    let (asym, scales_ok) = match m.codec {
        Codec::Sym { scale_dtype, .. } => (false, scale_dtype == DType::F16),
        Codec::AsymBf16x2 => (true, true),
    };
    let format = (m.bits, m.per_word, m.word_bytes, m.words_per_group, asym);
    m.layout == Layout::KN && scales_ok && FORMATS.contains(&format)
}

/// `out[j] = Σ_k x[k]·w[n0 + j, k]`. Blocks of 8 rows starting at `n0` take the SIMD path, the
/// rest (and every row without SIMD) [`portable_lane`], which gives the same bits.
pub(super) fn gemv_block(m: &QMatrix, n0: usize, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), m.k);
    assert!(n0 + out.len() <= m.n);
    let maxq = match m.codec {
        Codec::Sym { maxq, .. } => maxq,
        Codec::AsymBf16x2 => 0.0,
    };
    let xsum: Vec<f32> = x.chunks(m.group).map(|c| c.iter().sum()).collect();
    let mut done = 0;
    if let Some((four_blocks, one_block)) = simd_kernels(m) {
        // Four blocks of 8 rows at a time where the rows are there, then one.
        while done + 8 <= out.len() {
            let four = done + 32 <= out.len();
            let kernel = if four { four_blocks } else { one_block };
            // SAFETY: `simd_kernels` checked the CPU's features and matched `m`'s format; the
            // kernel's index bounds are asserted inside.
            unsafe {
                kernel(
                    m.data,
                    m.scales,
                    m.n,
                    n0 + done,
                    x,
                    &xsum,
                    maxq,
                    &mut out[done..],
                )
            };
            done += if four { 32 } else { 8 };
        }
    }
    for (j, o) in out.iter_mut().enumerate().skip(done) {
        *o = portable_lane(m, n0 + j, x, &xsum, maxq);
    }
}

/// One lane of the SIMD kernels in plain code (the same operations in the same order, so the
/// same bits on every CPU): row `row`'s codes in word order, even and odd codes of a word into
/// two sums, then the group's scale (and min).
fn portable_lane(m: &QMatrix, row: usize, x: &[f32], xsum: &[f32], maxq: f32) -> f32 {
    let (k, group, per) = (m.k, m.group, m.per_word);
    let mask = (1u32 << m.bits) - 1;
    let mut total = 0f32;
    for (g, &xs) in xsum.iter().enumerate() {
        let mut acc = [0f32; 2];
        let codes = codes_in_group(g, group, k);
        for w in 0..codes.div_ceil(per) {
            let mut word = m.word(m.word_index(row, g * m.words_per_group + w));
            for j in 0..per.min(codes - w * per) {
                let c = (word & mask) as f32;
                acc[j & 1] = c.mul_add(x[g * group + w * per + j], acc[j & 1]);
                word >>= m.bits;
            }
        }
        let qx = acc[0] + acc[1];
        let (s, mn) = m.group_params(row, g);
        total = match m.codec {
            Codec::AsymBf16x2 => qx.mul_add(s, mn.mul_add(xs, total)),
            Codec::Sym { .. } => (qx - maxq * xs).mul_add(s, total),
        };
    }
    total
}

/// A SIMD kernel over blocks of 8 rows: `(data, scales, n_rows, n, x, xsum, maxq, out)`, see
/// `avx2::lanes`.
type Lanes = unsafe fn(&[u8], &[u8], usize, usize, &[f32], &[f32], f32, &mut [f32]);

/// The SIMD kernels for `m`'s format that this CPU runs, taking 4 blocks and 1 block of 8 rows.
fn simd_kernels(m: &QMatrix) -> Option<(Lanes, Lanes)> {
    // Both instruction sets have a `lanes` of the same parameters.
    macro_rules! pick {
        ($isa:ident) => {
            match (m.bits, m.codec) {
                (3, Codec::Sym { .. }) => (
                    $isa::lanes::<3, 5, 2, 8, false, 4> as Lanes,
                    $isa::lanes::<3, 5, 2, 8, false, 1> as Lanes,
                ),
                (4, Codec::Sym { .. }) => (
                    $isa::lanes::<4, 8, 4, 4, false, 4>,
                    $isa::lanes::<4, 8, 4, 4, false, 1>,
                ),
                (4, Codec::AsymBf16x2) => (
                    $isa::lanes::<4, 8, 4, 4, true, 4>,
                    $isa::lanes::<4, 8, 4, 4, true, 1>,
                ),
                (8, Codec::Sym { .. }) => (
                    $isa::lanes::<8, 4, 4, 8, false, 4>,
                    $isa::lanes::<8, 4, 4, 8, false, 1>,
                ),
                _ => unreachable!("`applies` admits only the scheme table's formats"),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        return Some(pick!(avx2));
    }
    #[cfg(target_arch = "aarch64")]
    if super::simd::has_neon() {
        return Some(pick!(neon));
    }
    let _ = m;
    None
}

/// What a `lanes` kernel over rows `n..n+rows` of a KN matrix of `n_rows` rows reads, checked
/// against the slices it is given: returns `(word_rows, scale_bytes)` for `K = x_len`.
#[allow(clippy::too_many_arguments)]
fn lanes_geometry<const PER: usize, const WB: usize, const WPG: usize, const ASYM: bool>(
    data: &[u8],
    scales: &[u8],
    n_rows: usize,
    n: usize,
    rows: usize,
    x_len: usize,
    xsum_len: usize,
    out_len: usize,
) -> (usize, usize) {
    let (groups, word_rows) = (x_len.div_ceil(WPG * PER), x_len.div_ceil(PER));
    let scale_bytes = if ASYM { 4 } else { 2 };
    assert!(n + rows <= n_rows && xsum_len == groups && out_len >= rows);
    // The last word read is word ceil(K / PER) - 1 of row n + rows - 1 (KN: word w of row r at
    // w·N + r), the last scale group groups - 1 of that row.
    assert!(data.len() >= WB * word_rows * n_rows);
    assert!(scales.len() >= scale_bytes * groups * n_rows);
    (word_rows, scale_bytes)
}

/// Codes in group `g` of `group` over `K = k`: `group` but in a ragged last group, so the full
/// groups' loops keep their constant trip counts.
#[inline(always)]
fn codes_in_group(g: usize, group: usize, k: usize) -> usize {
    group.min(k - g * group)
}

/// Word rows ahead of the one being read whose bytes the KN kernels (these and `int8_act_kn`'s)
/// ask the CPU to fetch: the hardware prefetcher does not follow KN's jumps between word rows,
/// and without the hint each word row waited on its cache misses (SmolLM2 decode, 2 threads,
/// AVX2: q8f16_0 72 → ~120 tok/s, q4f16_0 180 → ~230, q3f16_0 69 → ~100; 8 word rows ahead gave
/// ~100/226 on the first two, 32 gave ~105/213).
const PREFETCH_ROWS: usize = 24;

/// Hints the CPU to fetch the `len` bytes at `at + PREFETCH_ROWS·stride`: the same lanes
/// [`PREFETCH_ROWS`] word rows on, if word row `r + PREFETCH_ROWS` is below `word_rows`.
///
/// # Safety
/// `at` points into word row `r` of a KN matrix whose `word_rows` word rows lie `stride` bytes
/// apart (so the pointer arithmetic stays inside it).
#[inline(always)]
pub(super) unsafe fn prefetch_ahead(
    at: *const u8,
    stride: usize,
    r: usize,
    word_rows: usize,
    len: usize,
) {
    if r + PREFETCH_ROWS < word_rows {
        let ahead = at.add(PREFETCH_ROWS * stride);
        for b in (0..len).step_by(64) {
            super::row_dot::prefetch_line(ahead.add(b));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{codes_in_group, lanes_geometry, prefetch_ahead};
    use std::arch::x86_64::*;

    /// `Σ_k x[k]·w[n + l, k]` for the `8·B` lanes `l` (`B` registers of 8 rows): `BITS`-bit
    /// codes, `PER` to a word of `WB` bytes, `WPG` words to a group of `WPG·PER` codes (a ragged
    /// last group has as many words as its codes need); `xsum[g]` is the sum of group `g`'s
    /// activations. `ASYM`: each scale is a u32 of a bf16 scale (low half) and min (high half);
    /// else an f16 scale and `w = (q - maxq)·s`. Several blocks share each broadcast of `x` and
    /// read `8·B` contiguous words of a word row; every lane's operations are the same for any
    /// `B`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available (every index bound is asserted).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lanes<
        const BITS: i32,
        const PER: usize,
        const WB: usize,
        const WPG: usize,
        const ASYM: bool,
        const B: usize,
    >(
        data: &[u8],
        scales: &[u8],
        n_rows: usize,
        n: usize,
        x: &[f32],
        xsum: &[f32],
        maxq: f32,
        out: &mut [f32],
    ) {
        let (k, group) = (x.len(), WPG * PER);
        let (word_rows, scale_bytes) = lanes_geometry::<PER, WB, WPG, ASYM>(
            data,
            scales,
            n_rows,
            n,
            8 * B,
            k,
            xsum.len(),
            out.len(),
        );
        let mask = _mm256_set1_epi32((1 << BITS) - 1);
        let mut total = [_mm256_setzero_ps(); B];
        for (g, &xs) in xsum.iter().enumerate() {
            let mut acc = [[_mm256_setzero_ps(); 2]; B];
            let codes = codes_in_group(g, group, k);
            for w in 0..WPG {
                if w * PER >= codes {
                    break;
                }
                let r = g * WPG + w;
                let at = data.as_ptr().add(WB * (r * n_rows + n));
                prefetch_ahead(at, WB * n_rows, r, word_rows, 8 * B * WB);
                let mut words = [_mm256_setzero_si256(); B];
                for (b, v) in words.iter_mut().enumerate() {
                    let p = at.add(8 * WB * b);
                    *v = if WB == 2 {
                        _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))
                    } else {
                        _mm256_loadu_si256(p as *const __m256i)
                    };
                }
                let xp = x.as_ptr().add(g * group + w * PER);
                for j in 0..PER.min(codes - w * PER) {
                    let xv = _mm256_broadcast_ss(&*xp.add(j));
                    for (v, a) in words.iter_mut().zip(acc.iter_mut()) {
                        let c = _mm256_cvtepi32_ps(_mm256_and_si256(*v, mask));
                        a[j & 1] = _mm256_fmadd_ps(c, xv, a[j & 1]);
                        *v = _mm256_srli_epi32::<BITS>(*v);
                    }
                }
            }
            for (b, (a, tot)) in acc.iter().zip(total.iter_mut()).enumerate() {
                let qx = _mm256_add_ps(a[0], a[1]);
                let sp = scales.as_ptr().add(scale_bytes * (g * n_rows + n + 8 * b));
                if ASYM {
                    let sm = _mm256_loadu_si256(sp as *const __m256i);
                    let s = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(sm));
                    let mn = _mm256_castsi256_ps(_mm256_and_si256(sm, _mm256_set1_epi32(-65536)));
                    *tot = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs), *tot);
                    *tot = _mm256_fmadd_ps(qx, s, *tot);
                } else {
                    let s = _mm256_cvtph_ps(_mm_loadu_si128(sp as *const __m128i));
                    let gs = _mm256_sub_ps(qx, _mm256_set1_ps(maxq * xs));
                    *tot = _mm256_fmadd_ps(gs, s, *tot);
                }
            }
        }
        for (b, tot) in total.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * b), *tot);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::neon::f16x4;
    use super::{codes_in_group, lanes_geometry, prefetch_ahead};
    use std::arch::aarch64::*;

    /// `avx2::lanes` with each 8-lane register as two NEON registers (lanes 0–3, 4–7) and every
    /// lane's operations the same, so both give the same bits.
    ///
    /// # Safety
    /// NEON must be available (every index bound is asserted).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn lanes<
        const BITS: i32,
        const PER: usize,
        const WB: usize,
        const WPG: usize,
        const ASYM: bool,
        const B: usize,
    >(
        data: &[u8],
        scales: &[u8],
        n_rows: usize,
        n: usize,
        x: &[f32],
        xsum: &[f32],
        maxq: f32,
        out: &mut [f32],
    ) {
        let (k, group) = (x.len(), WPG * PER);
        let (word_rows, scale_bytes) = lanes_geometry::<PER, WB, WPG, ASYM>(
            data,
            scales,
            n_rows,
            n,
            8 * B,
            k,
            xsum.len(),
            out.len(),
        );
        let mask = vdupq_n_u32((1 << BITS) - 1);
        let zero = vdupq_n_f32(0.0);
        let mut total = [[zero; 2]; B];
        for (g, &xs) in xsum.iter().enumerate() {
            // acc[block][code parity][half]
            let mut acc = [[[zero; 2]; 2]; B];
            let codes = codes_in_group(g, group, k);
            for w in 0..WPG {
                if w * PER >= codes {
                    break;
                }
                let r = g * WPG + w;
                let at = data.as_ptr().add(WB * (r * n_rows + n));
                prefetch_ahead(at, WB * n_rows, r, word_rows, 8 * B * WB);
                let mut words = [[vdupq_n_u32(0); 2]; B];
                for (b, v) in words.iter_mut().enumerate() {
                    let p = at.add(8 * WB * b);
                    *v = if WB == 2 {
                        let h = vreinterpretq_u16_u8(vld1q_u8(p));
                        [vmovl_u16(vget_low_u16(h)), vmovl_high_u16(h)]
                    } else {
                        [
                            vreinterpretq_u32_u8(vld1q_u8(p)),
                            vreinterpretq_u32_u8(vld1q_u8(p.add(16))),
                        ]
                    };
                }
                let xp = x.as_ptr().add(g * group + w * PER);
                for j in 0..PER.min(codes - w * PER) {
                    let xv = vdupq_n_f32(*xp.add(j));
                    for (v, a) in words.iter_mut().zip(acc.iter_mut()) {
                        for h in 0..2 {
                            let c = vcvtq_f32_u32(vandq_u32(v[h], mask));
                            a[j & 1][h] = vfmaq_f32(a[j & 1][h], c, xv);
                            v[h] = vshrq_n_u32::<BITS>(v[h]);
                        }
                    }
                }
            }
            for (b, (a, tot)) in acc.iter().zip(total.iter_mut()).enumerate() {
                for h in 0..2 {
                    let qx = vaddq_f32(a[0][h], a[1][h]);
                    let sp = scales
                        .as_ptr()
                        .add(scale_bytes * (g * n_rows + n + 8 * b + 4 * h));
                    if ASYM {
                        let sm = vreinterpretq_u32_u8(vld1q_u8(sp));
                        let s = vreinterpretq_f32_u32(vshlq_n_u32::<16>(sm));
                        let mn = vreinterpretq_f32_u32(vandq_u32(sm, vdupq_n_u32(0xFFFF_0000)));
                        tot[h] = vfmaq_f32(tot[h], mn, vdupq_n_f32(xs));
                        tot[h] = vfmaq_f32(tot[h], qx, s);
                    } else {
                        let gs = vsubq_f32(qx, vdupq_n_f32(maxq * xs));
                        tot[h] = vfmaq_f32(tot[h], gs, f16x4(sp));
                    }
                }
            }
        }
        for (b, tot) in total.iter().enumerate() {
            vst1q_f32(out.as_mut_ptr().add(8 * b), tot[0]);
            vst1q_f32(out.as_mut_ptr().add(8 * b + 4), tot[1]);
        }
    }
}
