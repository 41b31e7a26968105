//! Strided tensor views over a storage: bounds checks and the contiguous copy.
//!
//! A torch tensor is `(storage, offset, shape, strides)`, offset and strides counted in elements.
//! Most state-dict tensors are plain row-major views and are read in place; a transposed, sliced
//! or broadcast view is gathered into a fresh row-major buffer.

/// Layout of one tensor inside its storage, all counts in elements.
#[derive(Debug, Clone, PartialEq)]
pub struct StridedLayout {
    pub offset: u64,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
    pub elem_size: u64,
}

impl StridedLayout {
    /// Number of elements, or None on overflow.
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }

    /// One past the last storage element the view touches (`offset` for an empty view), or None
    /// on overflow.
    pub fn storage_end(&self) -> Option<u64> {
        if self.shape.contains(&0) {
            return Some(self.offset);
        }
        let mut last = self.offset;
        for (&d, &s) in self.shape.iter().zip(&self.strides) {
            last = last.checked_add((d - 1).checked_mul(s)?)?;
        }
        last.checked_add(1)
    }

    /// Whether the view is row-major contiguous (strides of size-1 dimensions do not matter).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1u64;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }

    /// Gather the view from `storage` (the storage's bytes) into row-major order. The caller has
    /// checked `storage_end() * elem_size <= storage.len()` and that the result size is sane.
    pub fn gather(&self, storage: &[u8]) -> Vec<u8> {
        let es = self.elem_size as usize;
        let numel = self.numel().unwrap_or(0) as usize;
        let mut out = Vec::with_capacity(numel * es);
        if numel == 0 {
            return out;
        }
        if self.shape.is_empty() {
            let o = self.offset as usize * es;
            out.extend_from_slice(&storage[o..o + es]);
            return out;
        }
        let rank = self.shape.len();
        let inner = self.shape[rank - 1] as usize;
        let inner_stride = self.strides[rank - 1] as usize;
        let mut index = vec![0u64; rank - 1];
        loop {
            let base: u64 = self.offset
                + index
                    .iter()
                    .zip(&self.strides)
                    .map(|(&i, &s)| i * s)
                    .sum::<u64>();
            let base = base as usize;
            for j in 0..inner {
                let o = (base + j * inner_stride) * es;
                out.extend_from_slice(&storage[o..o + es]);
            }
            // Advance the outer index like an odometer.
            let mut dim = rank - 1;
            loop {
                if dim == 0 {
                    return out;
                }
                dim -= 1;
                index[dim] += 1;
                if index[dim] < self.shape[dim] {
                    break;
                }
                index[dim] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(offset: u64, shape: &[u64], strides: &[u64]) -> StridedLayout {
        StridedLayout {
            offset,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            elem_size: 1,
        }
    }

    #[test]
    fn contiguity() {
        assert!(layout(0, &[2, 3], &[3, 1]).is_contiguous());
        assert!(layout(5, &[1, 3], &[99, 1]).is_contiguous());
        assert!(!layout(0, &[2, 3], &[1, 2]).is_contiguous());
        assert!(layout(0, &[], &[]).is_contiguous());
    }

    #[test]
    fn storage_end_counts_the_last_element() {
        assert_eq!(layout(2, &[2, 3], &[3, 1]).storage_end(), Some(8));
        assert_eq!(layout(2, &[2, 3], &[1, 2]).storage_end(), Some(8));
        assert_eq!(layout(7, &[0, 3], &[3, 1]).storage_end(), Some(7));
        assert_eq!(layout(0, &[4], &[0]).storage_end(), Some(1));
        assert_eq!(layout(0, &[u64::MAX], &[2]).storage_end(), None);
    }

    #[test]
    fn gather_transposed_offset_view() {
        // storage 0..12; view = rows of a 3x4 matrix starting at element 1, transposed: shape
        // [3, 2], strides [1, 4] → [[1,5],[2,6],[3,7]].
        let storage: Vec<u8> = (0..12).collect();
        let v = layout(1, &[3, 2], &[1, 4]);
        assert_eq!(v.gather(&storage), vec![1, 5, 2, 6, 3, 7]);
        // Broadcast view: stride 0.
        let v = layout(3, &[2, 2], &[0, 1]);
        assert_eq!(v.gather(&storage), vec![3, 4, 3, 4]);
        // Scalar.
        assert_eq!(layout(9, &[], &[]).gather(&storage), vec![9]);
    }

    #[test]
    fn gather_respects_element_size() {
        let storage: Vec<u8> = (0..8).collect();
        let v = StridedLayout {
            offset: 1,
            shape: vec![2],
            strides: vec![2],
            elem_size: 2,
        };
        // elements 1 and 3 of a u16 storage.
        assert_eq!(v.gather(&storage), vec![2, 3, 6, 7]);
    }
}
