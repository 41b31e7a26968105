//! The device layout of the row-major matrices the tensor-core decode GEMV reads
//! ([`super::gemv_mma`]): "row blocks", chosen by the weight alone ([`row_blocks`]), declared on
//! the kernels' weight arguments (`Arg::row_blocks`), and applied by the runtime as it uploads
//! the record ([`RowBlocks::permute`]); every kernel reading such a record addresses it this way.
//!
//! Why: an `mma.sync` fragment gives the 4 lanes of a row 4 of its groups, so in the artifact's
//! row-major order one 16-byte load of a warp touches 8 rows, 8 half-filled 128-byte lines, and
//! one 2-byte scale load 8 lines more: the L1 spends ~32 wavefronts on a warp step of 1 KiB of
//! weights. (On an H200, Nsight Compute put the GEMV's L1/TEX throughput at 66% with DRAM at
//! 35%, its warps mostly waiting on those loads.) In row blocks the 32 lanes' units of one load
//! are 512 consecutive bytes (4 whole lines) and their scales 64 (one line).
//!
//! The order: rows in blocks of 8; a block's groups in runs of 4 (the last run of a row takes
//! what is left, `w` < 4 groups); a run holds, for each of a group's `units` (16-byte chunks of
//! codes, or one f16 scale), the 8 rows × `w` groups, row after row:
//!
//! ```text
//! unit h of group g = 4q + c of row n = 8b + r:
//!     b · 8·G·U  +  q · 32·U  +  (h · 8 + r) · w + c        (w = min(4, G − 4q))
//! ```
//!
//! With whole runs (`w` = 4) lane `4r + c` of a warp finds unit `h` of its row and group at
//! `h · 32 + lane` of the run: each load of the GEMV is one contiguous 512-byte (codes) or
//! 64-byte (scales) piece. Sizes do not change: the layout is a permutation of the record.

use crate::codegen::wgsl::spec::{MatrixSpec, MatrixStorage};
use crate::quant::scheme::Layout;
use serde::{Deserialize, Serialize};

/// Rows per block.
pub const BLOCK_ROWS: usize = 8;
/// Groups per run.
pub const RUN_GROUPS: usize = 4;

/// A record in row blocks: `rows` rows of `groups` groups of `units` units of `unit_bytes`
/// bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowBlocks {
    pub rows: u32,
    pub groups: u32,
    pub units: u32,
    pub unit_bytes: u32,
}

impl RowBlocks {
    /// Where unit `h` of group `g` of row `n` lies, in units.
    pub fn position(&self, n: usize, g: usize, h: usize) -> usize {
        let (gs, us) = (self.groups as usize, self.units as usize);
        let (b, r) = (n / BLOCK_ROWS, n % BLOCK_ROWS);
        let (q, c) = (g / RUN_GROUPS, g % RUN_GROUPS);
        let w = RUN_GROUPS.min(gs - RUN_GROUPS * q);
        b * BLOCK_ROWS * gs * us + q * BLOCK_ROWS * RUN_GROUPS * us + (h * BLOCK_ROWS + r) * w + c
    }

    /// Bytes of the record.
    pub fn bytes(&self) -> usize {
        self.rows as usize * self.groups as usize * self.units as usize * self.unit_bytes as usize
    }

    /// The record, stored row-major (`[rows][groups][units]`), in row blocks. `Err` when its
    /// size is not the layout's.
    pub fn permute(&self, row_major: &[u8]) -> Result<Vec<u8>, String> {
        if row_major.len() != self.bytes() || self.rows as usize % BLOCK_ROWS != 0 {
            return Err(format!(
                "{} bytes do not hold {} rows × {} groups × {} units of {} bytes in blocks of {BLOCK_ROWS} rows",
                row_major.len(),
                self.rows,
                self.groups,
                self.units,
                self.unit_bytes
            ));
        }
        use rayon::prelude::*;
        let (ub, gs, us) = (
            self.unit_bytes as usize,
            self.groups as usize,
            self.units as usize,
        );
        // A block of 8 rows is contiguous in both orders: blocks in parallel (a 7B model's
        // records are gigabytes, permuted at every session start).
        let block = BLOCK_ROWS * gs * us * ub;
        let mut out = vec![0u8; row_major.len()];
        out.par_chunks_mut(block)
            .zip(row_major.par_chunks(block))
            .for_each(|(dst, src)| {
                for (i, unit) in src.chunks_exact(ub).enumerate() {
                    let (h, g, r) = (i % us, i / us % gs, i / us / gs);
                    let p = self.position(r, g, h) * ub;
                    dst[p..p + ub].copy_from_slice(unit);
                }
            });
        Ok(out)
    }
}

/// The row-block layouts of a matrix's codes and scales, when the tensor-core decode GEMV reads
/// it ([`super::gemv_mma::fits`]: sym codes with f16 scales, groups of 32 in 16-byte chunks)
/// and it is row-major with rows in whole pairs of blocks (the GEMV's 16-row tiles, or a silu
/// gate's 8 gate and 8 up rows). A function of the matrix alone: the prefill GEMM and the
/// embedding lookup of the same weight decide the same.
pub fn row_blocks(m: &MatrixSpec) -> Option<(RowBlocks, RowBlocks)> {
    let MatrixStorage::Quant(q) = m.storage else {
        return None;
    };
    if !super::gemv_mma::fits(m) || q.layout != Layout::NK || m.n % (2 * BLOCK_ROWS) != 0 {
        return None;
    }
    let rows = m.n as u32;
    let groups = q.n_group as u32;
    Some((
        RowBlocks {
            rows,
            groups,
            units: (q.words_per_group / 4) as u32,
            unit_bytes: 16,
        },
        RowBlocks {
            rows,
            groups,
            units: 1,
            unit_bytes: 2,
        },
    ))
}

/// The lambda `row_block_unit(n, g, h, G, U)`: [`RowBlocks::position`] in CUDA C.
pub const ROW_BLOCK_UNIT: &str = "auto row_block_unit = [&](unsigned n, unsigned g, unsigned h, unsigned groups, unsigned units) -> u64 {
        const unsigned q = g >> 2, c = g & 3u, w = groups - 4u * q < 4u ? groups - 4u * q : 4u;
        return (u64)(n >> 3) * 8u * groups * units + (u64)q * 32u * units + (h * 8u + (n & 7u)) * w + c;
    };";

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> Vec<RowBlocks> {
        let mut v = Vec::new();
        for rows in [8, 16, 48] {
            for groups in [1, 3, 4, 8, 10, 22] {
                for (units, unit_bytes) in [(1, 16), (2, 16), (1, 2)] {
                    v.push(RowBlocks {
                        rows,
                        groups,
                        units,
                        unit_bytes,
                    });
                }
            }
        }
        v
    }

    #[test]
    fn row_blocks_are_a_permutation() {
        for l in layouts() {
            let mut seen = vec![false; l.bytes() / l.unit_bytes as usize];
            for n in 0..l.rows as usize {
                for g in 0..l.groups as usize {
                    for h in 0..l.units as usize {
                        let p = l.position(n, g, h);
                        assert!(!seen[p], "{l:?}: ({n}, {g}, {h}) lands on a taken unit {p}");
                        seen[p] = true;
                    }
                }
            }
        }
    }

    #[test]
    fn a_warp_finds_whole_runs_in_consecutive_units() {
        // Lane 4r + c: unit h of group 4q + c of row 8b + r at run start + h·32 + lane.
        let l = RowBlocks {
            rows: 32,
            groups: 8,
            units: 2,
            unit_bytes: 16,
        };
        for b in 0..4 {
            for q in 0..2 {
                let start = l.position(8 * b, 4 * q, 0);
                for lane in 0..32 {
                    for h in 0..2 {
                        assert_eq!(
                            l.position(8 * b + lane / 4, 4 * q + lane % 4, h),
                            start + h * 32 + lane
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn permute_moves_every_unit_to_its_position_and_checks_the_size() {
        let l = RowBlocks {
            rows: 16,
            groups: 10,
            units: 2,
            unit_bytes: 16,
        };
        let src: Vec<u8> = (0..l.bytes()).map(|i| (i * 7 + i / 251) as u8).collect();
        let out = l.permute(&src).unwrap();
        for n in 0..16 {
            for g in 0..10 {
                for h in 0..2 {
                    let from = ((n * 10 + g) * 2 + h) * 16;
                    let to = l.position(n, g, h) * 16;
                    assert_eq!(out[to..to + 16], src[from..from + 16]);
                }
            }
        }
        assert!(l.permute(&src[1..]).is_err());
    }
}
