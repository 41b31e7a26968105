//! Where each code and scale of a quantized `[N, K]` matrix lives in its records.

use crate::quant::scheme::{Encoding, Layout};

/// The shape of the packed data of one quantized matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub k: usize,
    pub bits: u32,
    pub group: usize,
    pub per_word: usize,
    pub words_per_group: usize,
    pub n_group: usize,
    pub words_per_row: usize,
    pub layout: Layout,
}

impl Geometry {
    pub fn new(encoding: &Encoding, layout: Layout, n: usize, k: usize) -> Geometry {
        Geometry {
            n,
            k,
            bits: encoding.bits(),
            group: encoding.group(),
            per_word: encoding.per_word(),
            words_per_group: encoding.words_per_group(),
            n_group: encoding.n_groups(k),
            words_per_row: encoding.words_per_row(k),
            layout,
        }
    }

    /// Shape of the `q_weight` record.
    pub fn weight_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::NK => vec![self.n, self.words_per_row],
            Layout::KN => vec![self.words_per_row, self.n],
        }
    }

    /// Shape of the scale record (`q_scale` or `q_scale_min`).
    pub fn scale_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::NK => vec![self.n, self.n_group],
            Layout::KN => vec![self.n_group, self.n],
        }
    }

    /// Index of word `w` (along K) of row `row` in the `q_weight` record.
    pub fn word_index(&self, row: usize, w: usize) -> usize {
        match self.layout {
            Layout::NK => row * self.words_per_row + w,
            Layout::KN => w * self.n + row,
        }
    }

    /// Index of the scale of group `g` of row `row` in the scale record.
    pub fn scale_index(&self, row: usize, g: usize) -> usize {
        match self.layout {
            Layout::NK => row * self.n_group + g,
            Layout::KN => g * self.n + row,
        }
    }

    /// Valid positions (< K) of group `g`.
    pub fn group_len(&self, g: usize) -> usize {
        (self.k - g * self.group).min(self.group)
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose<T: Copy + Default>(data: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}
