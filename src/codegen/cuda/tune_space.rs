//! The configurations the tune stage may time for a CUDA kernel: threads per block for every
//! kernel, crossed with rows per block for the f32 decode GEMV over row-major (NK) weights, with
//! runs of 16-row mma tiles per block for the tensor-core decode GEMV (the same knob) and with
//! key splits for decode attention, the only kernels that read them; the tensor-core GEMV is
//! also timed with its weights streamed through a `cp.async` ring. The f16 prefill GEMM's
//! threads pick one of its two warp tilings, crossed with its rows: how many K steps ahead it
//! fetches the activation tile (registers one ahead, or a `cp.async` ring two ahead); the
//! 3xTF32 GEMM and the query-tiled attention of prefill have fixed blocks, so they have one
//! candidate (the f16 GEMM's wgmma staging, `rows_per_block` 4 in sm_90 libraries, is not one
//! until it has been measured on a GPU: a pinned tuning file selects it). Knobs a kernel
//! ignores stay at its default, so no two candidates differ only in them (where the ring cannot
//! apply — an f32 activation — two of the GEMM's candidates generate the same kernel: the tune
//! stage times that kernel once).

use super::launch::CudaTuning;
use crate::codegen::wgsl::spec::{KernelSpec, MatrixStorage, Phase};
use crate::quant::scheme::Layout;

/// The preset default for a signature whose kernel is `spec` (what an untuned build uses):
/// prefill GEMMs 256 threads (their block); f32 decode GEMVs 4 rows per block of 4 warps (128
/// threads cover the 128 16-byte chunks of a 4096-wide q4 row; each activation chunk is loaded
/// once for the 4 rows), the tensor-core GEMV one run of 16 rows per block and enough warps for
/// [`GEMV_WARPS_PER_SM`] ([`gemv_mma_threads`]); decode attention splits each head's keys over
/// [`DEFAULT_KV_SPLITS`] blocks; everything else 256 threads.
pub fn default_for(signature: &str, spec: &KernelSpec) -> CudaTuning {
    if signature.contains("matmul") || signature.contains("logits") {
        // The tensor-core GEMV reads rows_per_block as its runs of mma rows.
        let (threads_per_block, rows_per_block) = match spec {
            KernelSpec::Matmul {
                m,
                phase: Phase::Decode,
                fusion,
                ..
            } if super::gemv_mma::fits(m) => {
                let threads = gemv_mma_threads(m, fusion.silu_gate);
                (threads, gemv_mma_runs(m, fusion.silu_gate, threads))
            }
            // The prefill GEMMs' block: the f16 one reads 128 as its 64×64 warp tiles
            // (`gemm_f16::WarpTiles`) and rows 2 as its activation ring (`gemm_f16::x_ring`),
            // the tune stage's other candidates; the f32 one is fixed.
            KernelSpec::Matmul {
                phase: Phase::Prefill,
                ..
            } => (256, 1),
            _ => (128, 4),
        };
        CudaTuning {
            threads_per_block,
            rows_per_block,
            kv_splits: 1,
            weight_ring: 0,
        }
    } else {
        CudaTuning {
            threads_per_block: 256,
            rows_per_block: 1,
            kv_splits: if signature.starts_with("decode:attention[") {
                DEFAULT_KV_SPLITS
            } else {
                1
            },
            weight_ring: 0,
        }
    }
}

/// Warps per SM an untuned tensor-core GEMV's grid should supply on a GPU of [`TYPICAL_SMS`]
/// SMs: each lane keeps 8 16-byte loads in flight, and an H200 needs ~55 KB in flight per SM
/// (its bandwidth per SM times a loaded DRAM latency of ~1.5 µs), i.e. ~12 warps.
pub const GEMV_WARPS_PER_SM: usize = 12;
/// SMs of the GPUs the cuda presets aim at (H100/H200: 132; A100: 108).
const TYPICAL_SMS: usize = 132;

/// Threads per block of an untuned tensor-core GEMV: 4 warps, or more where its grid (16 rows
/// per block, 8 with a silu gate) is too small to give [`GEMV_WARPS_PER_SM`] — Llama-2-7B's
/// attention output and down projections (4096 rows: 256 blocks) get 8 — but no more warps than
/// the row's groups of 32 codes give work (4 per warp and step), and at most 16.
pub fn gemv_mma_threads(m: &crate::codegen::wgsl::spec::MatrixSpec, silu_gate: bool) -> u32 {
    use super::gemv_mma::{rows_per_block, GROUPS_PER_WARP_STEP};
    let blocks = (if silu_gate { m.n / 2 } else { m.n })
        .div_ceil(rows_per_block(silu_gate))
        .max(1);
    let groups = match m.storage {
        MatrixStorage::Quant(q) => q.n_group,
        MatrixStorage::Raw(_) => unreachable!("the tensor-core GEMV takes quantized weights"),
    };
    let want = (GEMV_WARPS_PER_SM * TYPICAL_SMS).div_ceil(blocks);
    // Powers of two (the candidate space's): the largest not past the groups' work.
    let work = (groups / GROUPS_PER_WARP_STEP).max(1);
    let cap = 1usize << (usize::BITS - 1 - work.leading_zeros());
    let warps = want.next_power_of_two().min(16).min(cap);
    (warps.max(4) as u32) * 32
}

/// Runs of mma rows per block of an untuned tensor-core GEMV: 2 where one per block would take
/// more than one wave of blocks on a GPU of [`TYPICAL_SMS`] SMs (as many as its register bound
/// lets in, [`super::gemv_mma::warps_per_sm`]), else 1. On an H200 Llama-2-7B's gate/up GEMV
/// (1376 blocks of 4 warps, 1.74 waves at 24 warps per SM) ran in 27.98 µs with 2 runs and
/// 31.11 with 1 (the tune stage's timings, cold L2): the second, partial wave left SMs idle.
pub fn gemv_mma_runs(
    m: &crate::codegen::wgsl::spec::MatrixSpec,
    silu_gate: bool,
    threads: u32,
) -> u32 {
    use super::gemv_mma::rows_per_block;
    let blocks = (if silu_gate { m.n / 2 } else { m.n }).div_ceil(rows_per_block(silu_gate));
    let per_sm = (super::gemv_mma::warps_per_sm(m) / (threads as usize / 32)).max(1);
    if blocks > TYPICAL_SMS * per_sm {
        2
    } else {
        1
    }
}

/// Which candidate space this is, part of the tuning database's key: a record measured over
/// another space is measured again. 1: threads × rows; 2: × `kv_splits`; 3: the tensor-core
/// decode GEMV (q4 NK weights of f16 schemes) has no rows knob. 4: nor for q8 NK weights
/// (q8f16_1), which it now takes. 5: the tensor-core GEMV has a rows knob again (its runs of
/// mma rows per block), decode attention is timed at 64 and 512 keys, and kernels are timed
/// with their buffers out of the L2 cache (`runtime::cuda::timer`), as a forward pass runs
/// them; earlier records were timed from L2. 6: a prefill GEMM's `threads_per_block` means its
/// warp tiling (128: 64×64, `gemm_f16::WarpTiles`), and its default is 256 (records of 128
/// measured before would now pick the other tiling). 7: the f16 prefill GEMM's two warp tilings
/// and its activation ring (`gemm_f16::x_ring`) are candidates, and prefill matmuls are timed at
/// a 512-token prompt too (`runtime::cuda::timer`; a 16-token call fills a sixteenth of a
/// block's rows). 8: the tensor-core decode GEMV's weight ring (`CudaTuning::weight_ring`) is
/// a candidate at 4 of its blocks ([`ring_candidates`]).
pub const SPACE_VERSION: u32 = 8;

/// Blocks per query head of an untuned decode attention: a 32-head model (Llama-2-7B) gets 256
/// blocks, two per SM of a 132-SM GPU, and a 256-token context 32 keys per block (one step of
/// 8 warps × 4 keys) instead of 8 steps for one block.
pub const DEFAULT_KV_SPLITS: u32 = 8;

const THREADS: [u32; 4] = [64, 128, 256, 512];
const ROWS: [u32; 4] = [1, 2, 4, 8];
const KV_SPLITS: [u32; 6] = [1, 2, 4, 8, 16, 32];

/// Which knobs `spec`'s kernel (signature `signature`) reads: the threads and rows values it
/// tells apart (none: the knob is off), and whether it reads key splits.
struct Knobs {
    threads: &'static [u32],
    rows: &'static [u32],
    kv_splits: bool,
}

fn knobs(signature: &str, spec: &KernelSpec) -> Knobs {
    let (threads, rows, kv_splits): (&'static [u32], &'static [u32], bool) = match spec {
        // The f16 GEMM's threads choose its warp tiling (its two blocks), its rows how far ahead
        // it fetches the activation tile; the 3xTF32 one has a fixed block.
        KernelSpec::Matmul {
            m,
            phase: Phase::Prefill,
            ..
        } if super::gemm_f16::runs(m) => (
            &super::gemm_f16::TILING_THREADS,
            &super::gemm_f16::STAGING_ROWS,
            false,
        ),
        KernelSpec::Matmul {
            phase: Phase::Prefill,
            ..
        } => (&[], &[], false),
        // The query-tiled prefill attention has a fixed block.
        KernelSpec::Attention { head_dim, .. }
            if super::attention::tiled(super::phase_of(signature), *head_dim) =>
        {
            (&[], &[], false)
        }
        KernelSpec::Attention { .. } => (
            &THREADS,
            &[],
            super::phase_of(signature) == Some(Phase::Decode),
        ),
        KernelSpec::Matmul {
            m,
            phase: Phase::Decode,
            ..
        } => {
            // The f32 GEMV takes rows per block over row-major weights; the tensor-core one
            // (either layout) its runs of the mma's 16 rows.
            let nk = !matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
            let rows: &'static [u32] = if nk || super::gemv_mma::fits(m) {
                &ROWS
            } else {
                &[]
            };
            (&THREADS, rows, false)
        }
        _ => (&THREADS, &[], false),
    };
    Knobs {
        threads,
        rows,
        kv_splits,
    }
}

/// Candidate configurations for `spec` (signature `signature`), the default first. Some may not
/// generate for every shape (attention's shared memory grows with the warps): the tune stage
/// skips those.
pub fn candidates(signature: &str, spec: &KernelSpec) -> Vec<CudaTuning> {
    let default = default_for(signature, spec);
    let k = knobs(signature, spec);
    // A knob's values, or its default where the kernel does not read it.
    let values = |all: &'static [u32], default: u32| -> Vec<u32> {
        if all.is_empty() {
            vec![default]
        } else {
            all.to_vec()
        }
    };
    let threads = values(k.threads, default.threads_per_block);
    let rows = values(k.rows, default.rows_per_block);
    let splits = values(
        if k.kv_splits { &KV_SPLITS } else { &[] },
        default.kv_splits,
    );
    let mut out = vec![default];
    for &threads_per_block in &threads {
        for &rows_per_block in &rows {
            for &kv_splits in &splits {
                let t = CudaTuning {
                    threads_per_block,
                    rows_per_block,
                    kv_splits,
                    weight_ring: 0,
                };
                if t != default {
                    out.push(t);
                }
            }
        }
    }
    out.extend(ring_candidates(spec));
    out
}

/// Threads × runs of mma rows the tensor-core GEMV is timed at with its weight ring: the
/// blocks the register candidates favour on Llama-2-7B's shapes (4 or 8 warps, 1 or 2 runs),
/// not the whole cross (each candidate is a kernel compiled and timed on the GPU).
const RING_THREADS: [u32; 2] = [128, 256];
const RING_RUNS: [u32; 2] = [1, 2];

/// The tensor-core decode GEMV's weight-ring candidates ([`super::gemv_mma::ring_depth`], as
/// deep as shared memory allows up to [`super::gemv_mma::MAX_RING`]), where its matrix takes
/// one and the ring fits the block.
fn ring_candidates(spec: &KernelSpec) -> Vec<CudaTuning> {
    use super::gemv_mma::{ring_depth, MAX_RING};
    let KernelSpec::Matmul {
        m,
        phase: Phase::Decode,
        fusion,
        ..
    } = spec
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // ring_depth is 0 where the matrix takes no ring (not the tensor-core GEMV's row blocks).
    for threads_per_block in RING_THREADS {
        let warps = threads_per_block as usize / 32;
        if ring_depth(m, MAX_RING as u32, warps, fusion.rms_norm.is_some()) == 0 {
            continue;
        }
        for rows_per_block in RING_RUNS {
            out.push(CudaTuning {
                threads_per_block,
                rows_per_block,
                kv_splits: 1,
                weight_ring: MAX_RING as u32,
            });
        }
    }
    out
}

/// The preset default of every signature of `plan`: the records of an untuned build.
#[cfg(test)]
pub fn default_records(
    plan: &crate::formats::model_lib::plan::Plan,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    crate::codegen::wgsl::spec::specs_by_signature(plan)
        .expect("the plan's kernels have specs")
        .into_iter()
        .map(|(s, spec)| {
            let t = serde_json::to_value(default_for(&s, &spec)).expect("a tuning serialises");
            (s, t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::wgsl::spec::specs_by_signature;

    #[test]
    fn candidates_cover_the_knobs_each_kernel_reads() {
        for scheme in ["q4f16_1", "q4f32_1"] {
            candidates_of(scheme);
        }
    }

    fn candidates_of(scheme: &str) {
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", scheme, 32);
        let specs = specs_by_signature(&plan).unwrap();
        let (mut seen_gemv, mut seen_decode_attention, mut seen_ring) = (false, false, false);
        for (sig, spec) in &specs {
            let c = candidates(sig, spec);
            assert_eq!(c[0], default_for(sig, spec), "{sig}");
            let mut dedup = c.clone();
            dedup.sort_by_key(|t| {
                (
                    t.threads_per_block,
                    t.rows_per_block,
                    t.kv_splits,
                    t.weight_ring,
                )
            });
            dedup.dedup();
            assert_eq!(dedup.len(), c.len(), "{sig}: duplicates");
            for t in &c {
                let v = serde_json::to_value(t).unwrap();
                assert_eq!(CudaTuning::from_record(&v).unwrap(), *t, "{sig}: invalid");
            }
            match spec {
                // f16 schemes: the f16 GEMM's two warp tilings; f32: the 3xTF32 GEMM's block.
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                } if scheme.contains("f16") => {
                    use super::super::gemm_f16::{WarpTiles, X_RING_AHEAD};
                    let kinds: Vec<_> = c
                        .iter()
                        .map(|t| {
                            (
                                WarpTiles::for_threads(t.threads_per_block),
                                t.rows_per_block,
                            )
                        })
                        .collect();
                    assert_eq!(
                        kinds,
                        [
                            (WarpTiles::Wide, 1),
                            (WarpTiles::Wide, X_RING_AHEAD),
                            (WarpTiles::Square, 1),
                            (WarpTiles::Square, X_RING_AHEAD)
                        ],
                        "{sig}"
                    );
                }
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                } => assert_eq!(c.len(), 1, "{sig}"),
                KernelSpec::Matmul {
                    m,
                    phase: Phase::Decode,
                    ..
                } => {
                    // Threads × rows (the tensor-core GEMV's runs of mma rows), but for the
                    // f32 GEMV over K-major words (a lane per row); then the tensor-core
                    // GEMV's weight-ring candidates where its matrix is in whole runs.
                    use super::super::gemv_mma::{fits, ring_applies, MAX_RING};
                    let km = matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
                    let n = if km && !fits(m) { 4 } else { 16 };
                    let rings = if ring_applies(m) { 4 } else { 0 };
                    assert_eq!(c.len(), n + rings, "{sig}");
                    assert!(c[..n].iter().all(|t| t.weight_ring == 0), "{sig}");
                    assert!(
                        c[n..].iter().all(|t| t.weight_ring == MAX_RING as u32),
                        "{sig}"
                    );
                    seen_ring |= rings > 0;
                    seen_gemv = true;
                }
                KernelSpec::Attention { .. } if sig.starts_with("prefill:") => {
                    assert_eq!(c.len(), 1, "{sig}")
                }
                KernelSpec::Attention { .. } => {
                    assert_eq!(c.len(), 24, "{sig}");
                    assert_eq!(c[0].kv_splits, DEFAULT_KV_SPLITS, "{sig}");
                    seen_decode_attention = true;
                }
                _ => {
                    assert_eq!(c.len(), 4, "{sig}");
                    assert!(c.iter().all(|t| t.kv_splits == 1), "{sig}");
                }
            }
        }
        assert!(seen_gemv && seen_decode_attention);
        assert_eq!(
            seen_ring,
            scheme == "q4f16_1",
            "{scheme}: weight-ring candidates"
        );
    }
}
