//! A weight matrix as the kernels see it: its stored bytes plus where each code and scale lives.
//! Decoding reads the records in place with safe little-endian reads (records need not be
//! aligned), so no dequantized copy of a matrix is ever made.

use super::WeightView;
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;
use crate::quant::scheme::{scheme, Encoding, Layout};

/// How the values of a quantized matrix are encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Codec {
    /// `w = (q - maxq) · s`, `s` in `scale_dtype`.
    Sym { maxq: f32, scale_dtype: DType },
    /// `w = q · s + min`, `s` and `min` bf16 halves of a u32.
    AsymBf16x2,
}

/// A quantized `[N, K]` matrix.
#[derive(Debug, Clone, Copy)]
pub(super) struct QMatrix<'a> {
    pub n: usize,
    pub k: usize,
    pub layout: Layout,
    pub codec: Codec,
    pub bits: u32,
    pub group: usize,
    pub per_word: usize,
    pub words_per_group: usize,
    pub n_group: usize,
    pub words_per_row: usize,
    /// Bytes of one storage word (2 for uint16, 4 for uint32).
    pub word_bytes: usize,
    pub data: &'a [u8],
    pub scales: &'a [u8],
}

/// A matrix weight of any storage.
#[derive(Debug, Clone, Copy)]
pub(super) enum Matrix<'a> {
    Raw {
        dtype: DType,
        k: usize,
        bytes: &'a [u8],
    },
    Quant(QMatrix<'a>),
}

impl<'a> Matrix<'a> {
    /// Interpret a view; `Err` says why its records do not fit its declaration.
    pub fn new(w: &WeightView<'a>) -> Result<Matrix<'a>, String> {
        let &[n, k] = w.shape else {
            return Err(format!(
                "a matrix weight must be 2-D, got shape {:?}",
                w.shape
            ));
        };
        match w.storage {
            WeightStorage::Raw { dtype } => {
                if !dtype.is_float() {
                    return Err(format!("raw matrix of dtype {dtype} is not floating point"));
                }
                expect_records(w, 1)?;
                expect_len(w.records[0], n * k * dtype.size(), "weight")?;
                Ok(Matrix::Raw {
                    dtype: *dtype,
                    k,
                    bytes: w.records[0],
                })
            }
            WeightStorage::Quantized {
                scheme: name,
                layout,
            } => {
                let s =
                    scheme(name).ok_or_else(|| format!("unknown quantization scheme {name}"))?;
                let (codec, storage) = match s.encoding {
                    Encoding::None => {
                        return Err(format!("scheme {name} does not quantize weights"))
                    }
                    Encoding::Sym { bits, storage, .. } => (
                        Codec::Sym {
                            maxq: ((1u32 << (bits - 1)) - 1) as f32,
                            scale_dtype: w.model_dtype,
                        },
                        storage,
                    ),
                    Encoding::AsymBf16x2 { storage, .. } => (Codec::AsymBf16x2, storage),
                };
                if let Codec::Sym { scale_dtype, .. } = codec {
                    if !scale_dtype.is_float() {
                        return Err(format!("model dtype {scale_dtype} is not floating point"));
                    }
                }
                let enc = s.encoding;
                let m = QMatrix {
                    n,
                    k,
                    layout: *layout,
                    codec,
                    bits: enc.bits(),
                    group: enc.group(),
                    per_word: enc.per_word(),
                    words_per_group: enc.words_per_group(),
                    n_group: enc.n_groups(k),
                    words_per_row: enc.words_per_row(k),
                    word_bytes: storage.size(),
                    data: w.records.first().copied().unwrap_or(&[]),
                    scales: w.records.get(1).copied().unwrap_or(&[]),
                };
                expect_records(w, 2)?;
                expect_len(m.data, n * m.words_per_row * m.word_bytes, "q_weight")?;
                expect_len(m.scales, n * m.n_group * m.scale_bytes(), "scale")?;
                Ok(Matrix::Quant(m))
            }
        }
    }

    /// Row `row` as the kernels multiply with it (quantized: `(q - maxq)·s` or `q·s + min`
    /// computed in f32, not rounded to the model dtype).
    pub fn decode_row(&self, row: usize, out: &mut [f32]) {
        match self {
            Matrix::Raw {
                dtype, k, bytes, ..
            } => {
                let start = row * k * dtype.size();
                read_floats(*dtype, &bytes[start..start + k * dtype.size()], out);
            }
            Matrix::Quant(q) => q.decode_row_generic(row, out),
        }
    }
}

impl QMatrix<'_> {
    /// Whether this is a symmetric `bits`-bit matrix in `layout` with groups of 32, u32 words and
    /// f16 scales: the storage the fast paths (q4_nk, q8_nk) read.
    pub fn is_sym_group32_f16(&self, bits: u32, layout: Layout) -> bool {
        self.layout == layout
            && self.bits == bits
            && self.group == 32
            && self.word_bytes == 4
            && self.codec
                == Codec::Sym {
                    maxq: ((1u32 << (bits - 1)) - 1) as f32,
                    scale_dtype: DType::F16,
                }
    }

    /// Whether this is an asymmetric `bits`-bit matrix in `layout` with groups of 32, u32 words and
    /// a bf16 scale and min per group (`q4f32_*`): the storage `q4_asym_nk` reads.
    pub fn is_asym_bf16x2_group32(&self, bits: u32, layout: Layout) -> bool {
        self.layout == layout
            && self.bits == bits
            && self.group == 32
            && self.word_bytes == 4
            && self.codec == Codec::AsymBf16x2
    }

    /// Bytes of one group's scale record: an f16/bf16/f32 scale, or a bf16 scale and min.
    pub fn scale_bytes(&self) -> usize {
        match self.codec {
            Codec::Sym { scale_dtype, .. } => scale_dtype.size(),
            Codec::AsymBf16x2 => 4,
        }
    }

    /// Storage word `i` of `q_weight`.
    #[inline]
    pub fn word(&self, i: usize) -> u32 {
        let b = self.data;
        if self.word_bytes == 2 {
            u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32
        } else {
            u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
        }
    }

    #[inline]
    pub fn word_index(&self, row: usize, w: usize) -> usize {
        match self.layout {
            Layout::NK => row * self.words_per_row + w,
            Layout::KN => w * self.n + row,
        }
    }

    #[inline]
    pub fn scale_index(&self, row: usize, g: usize) -> usize {
        match self.layout {
            Layout::NK => row * self.n_group + g,
            Layout::KN => g * self.n + row,
        }
    }

    /// The scale of group `g` of `row`, and (asym) its min.
    #[inline]
    pub fn group_params(&self, row: usize, g: usize) -> (f32, f32) {
        let i = self.scale_index(row, g);
        match self.codec {
            Codec::Sym { scale_dtype, .. } => (read_float(scale_dtype, self.scales, i), 0.0),
            Codec::AsymBf16x2 => bf16x2_scale_min(self.scales, i),
        }
    }

    /// Decode any encoding and layout, one code at a time (the reference path; fast paths live
    /// in their own modules).
    pub fn decode_row_generic(&self, row: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        // The widths of the scheme table, with their codes and bytes per word as constants: the
        // word loop unrolls and reads a row-major row's words without per-word index checks
        // (~2.5× faster decode than `decode_group`'s, the same values).
        match (self.bits, self.per_word, self.word_bytes) {
            (3, 5, 2) => self.decode_row_as::<3, 5, 2>(row, out),
            (4, 8, 4) => self.decode_row_as::<4, 8, 4>(row, out),
            (8, 4, 4) => self.decode_row_as::<8, 4, 4>(row, out),
            _ => {
                for g in 0..self.n_group {
                    let start = g * self.group;
                    let len = (self.k - start).min(self.group);
                    self.decode_group(row, g, &mut out[start..start + len]);
                }
            }
        }
    }

    /// [`Self::decode_row_generic`] for `BITS`-bit codes, `PER` to a word of `WB` bytes.
    fn decode_row_as<const BITS: u32, const PER: usize, const WB: usize>(
        &self,
        row: usize,
        out: &mut [f32],
    ) {
        let words_of_row = self.words_per_row * WB;
        for g in 0..self.n_group {
            let start = g * self.group;
            let len = (self.k - start).min(self.group);
            let (s, mn) = self.group_params(row, g);
            let out = &mut out[start..start + len];
            let whole = len / PER * PER;
            let base = g * self.words_per_group;
            let (full, tail) = out.split_at_mut(whole);
            match self.layout {
                Layout::NK => {
                    let words = &self.data[row * words_of_row + base * WB..][..whole / PER * WB];
                    for (chunk, w) in full.chunks_exact_mut(PER).zip(words.chunks_exact(WB)) {
                        let word = if WB == 2 {
                            u16::from_le_bytes([w[0], w[1]]) as u32
                        } else {
                            u32::from_le_bytes([w[0], w[1], w[2], w[3]])
                        };
                        self.put_codes::<BITS>(word, chunk, s, mn);
                    }
                }
                Layout::KN => {
                    for (wi, chunk) in full.chunks_exact_mut(PER).enumerate() {
                        let word = self.word(self.word_index(row, base + wi));
                        self.put_codes::<BITS>(word, chunk, s, mn);
                    }
                }
            }
            if !tail.is_empty() {
                // The group's last, partial word (K not a multiple of the codes per word).
                let word = self.word(self.word_index(row, base + whole / PER));
                self.put_codes::<BITS>(word, tail, s, mn);
            }
        }
    }

    /// The first `out.len()` codes of `word`, decoded with scale `s` (and, asym, min `mn`).
    #[inline(always)]
    fn put_codes<const BITS: u32>(&self, word: u32, out: &mut [f32], s: f32, mn: f32) {
        let mask = (1u32 << BITS) - 1;
        // Codes are below 256: the i32 conversion is exact (and cheaper than u32's).
        let code = |i: usize| (word >> (BITS * i as u32) & mask) as i32 as f32;
        match self.codec {
            Codec::Sym { maxq, .. } => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = (code(i) - maxq) * s;
                }
            }
            Codec::AsymBf16x2 => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = code(i) * s + mn;
                }
            }
        }
    }

    /// Group `g` of `row` (`out.len()` = its valid positions), one storage word at a time.
    pub fn decode_group(&self, row: usize, g: usize, out: &mut [f32]) {
        let mask = (1u32 << self.bits) - 1;
        let (s, mn) = self.group_params(row, g);
        let base = g * self.words_per_group;
        for (wi, chunk) in out.chunks_mut(self.per_word).enumerate() {
            let mut word = self.word(self.word_index(row, base + wi));
            match self.codec {
                Codec::Sym { maxq, .. } => {
                    for o in chunk {
                        *o = ((word & mask) as f32 - maxq) * s;
                        word >>= self.bits;
                    }
                }
                Codec::AsymBf16x2 => {
                    for o in chunk {
                        *o = (word & mask) as f32 * s + mn;
                        word >>= self.bits;
                    }
                }
            }
        }
    }

    /// `Σ x[p]·w[row, p]` over the ragged last group, if K is not a multiple of the group.
    pub fn ragged_tail_dot(&self, row: usize, x: &[f32]) -> f32 {
        let full = self.k / self.group;
        if full == self.n_group {
            return 0.0;
        }
        let start = full * self.group;
        let mut stack = [0f32; 64];
        let mut heap = Vec::new();
        let tail = if self.k - start <= 64 {
            &mut stack[..self.k - start]
        } else {
            heap.resize(self.k - start, 0.0);
            &mut heap[..]
        };
        self.decode_group(row, full, tail);
        tail.iter()
            .zip(&x[start..])
            .fold(0.0, |s, (w, x)| w.mul_add(*x, s))
    }

    /// The decoded value as the artifact defines it (sym: rounded to the model dtype).
    pub fn round_to_model(&self, v: f32) -> f32 {
        match self.codec {
            Codec::Sym {
                scale_dtype: DType::F16,
                ..
            } => half::f16::from_f32(v).to_f32(),
            Codec::Sym {
                scale_dtype: DType::BF16,
                ..
            } => half::bf16::from_f32(v).to_f32(),
            _ => v,
        }
    }
}

fn expect_records(w: &WeightView, want: usize) -> Result<(), String> {
    if w.records.len() != want {
        return Err(format!(
            "expected {want} record(s), got {}",
            w.records.len()
        ));
    }
    Ok(())
}

fn expect_len(bytes: &[u8], want: usize, what: &str) -> Result<(), String> {
    if bytes.len() != want {
        return Err(format!(
            "{what} record has {} bytes, expected {want}",
            bytes.len()
        ));
    }
    Ok(())
}

/// Scale `g` of a row's little-endian f16 scales.
#[inline]
pub(super) fn f16_scale(scales: &[u8], g: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]])).to_f32()
}

/// Scale and min `i` of little-endian `q_scale_min` words (bf16 scale low, bf16 min high).
#[inline]
pub(super) fn bf16x2_scale_min(scales: &[u8], i: usize) -> (f32, f32) {
    let b = &scales[4 * i..4 * i + 4];
    crate::quant::unpack_scale_min(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Element `i` of a little-endian float array.
#[inline]
pub(super) fn read_float(dtype: DType, b: &[u8], i: usize) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32(),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16),
        other => unreachable!("float read of dtype {other} (rejected when the view was built)"),
    }
}

/// A whole little-endian float array into `out`.
pub(super) fn read_floats(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::F16 => {
            // half converts slices with F16C / NEON where the CPU has it.
            use half::slice::HalfFloatSliceExt;
            let mut buf = [half::f16::ZERO; 256];
            for (o, b) in out.chunks_mut(256).zip(bytes.chunks(512)) {
                let h = &mut buf[..o.len()];
                for (d, c) in h.iter_mut().zip(b.chunks_exact(2)) {
                    *d = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
                }
                h.convert_to_f32_slice(o);
            }
        }
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        other => unreachable!("float read of dtype {other} (rejected when the view was built)"),
    }
}
