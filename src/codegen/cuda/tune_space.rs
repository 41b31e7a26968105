//! The configurations the tune stage may time for a CUDA kernel: threads per block for every
//! kernel, crossed with rows per block for the decode GEMV over row-major (NK) weights, the only
//! kernel that reads it. The tensor-core GEMMs and the query-tiled attention of prefill have
//! fixed blocks, so they have one candidate. Knobs a kernel ignores stay at its default, so no two
//! candidates generate the same kernel.

use super::launch::CudaTuning;
use crate::codegen::wgsl::spec::{KernelSpec, MatrixStorage, Phase};
use crate::quant::scheme::Layout;

/// The preset default for a signature (what an untuned build uses): decode GEMVs run 4 rows per
/// block of 4 warps (128 threads cover the 128 16-byte chunks of a 4096-wide q4 row; each
/// activation chunk is loaded once for the 4 rows); everything else 256 threads.
pub fn default_for(signature: &str) -> CudaTuning {
    if signature.contains("matmul") || signature.contains("logits") {
        CudaTuning {
            threads_per_block: 128,
            rows_per_block: 4,
        }
    } else {
        CudaTuning {
            threads_per_block: 256,
            rows_per_block: 1,
        }
    }
}

const THREADS: [u32; 4] = [64, 128, 256, 512];
const ROWS: [u32; 4] = [1, 2, 4, 8];

/// Which knobs `spec`'s kernel (signature `signature`) reads: (threads per block, rows per block).
fn knobs(signature: &str, spec: &KernelSpec) -> (bool, bool) {
    match spec {
        KernelSpec::Matmul {
            phase: Phase::Prefill,
            ..
        } => (false, false),
        // The query-tiled prefill attention has a fixed block.
        KernelSpec::Attention { head_dim, .. }
            if super::attention::tiled(super::phase_of(signature), *head_dim) =>
        {
            (false, false)
        }
        KernelSpec::Matmul {
            m,
            phase: Phase::Decode,
            ..
        } => {
            let nk = !matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
            (true, nk)
        }
        _ => (true, false),
    }
}

/// Candidate configurations for `spec` (signature `signature`), the default first. Some may not
/// generate for every shape (attention's shared memory grows with the warps): the tune stage
/// skips those.
pub fn candidates(signature: &str, spec: &KernelSpec) -> Vec<CudaTuning> {
    let default = default_for(signature);
    let (threads, rows) = knobs(signature, spec);
    let threads: &[u32] = if threads {
        &THREADS
    } else {
        std::slice::from_ref(&default.threads_per_block)
    };
    let rows: &[u32] = if rows {
        &ROWS
    } else {
        std::slice::from_ref(&default.rows_per_block)
    };
    let mut out = vec![default];
    for &threads_per_block in threads {
        for &rows_per_block in rows {
            let t = CudaTuning {
                threads_per_block,
                rows_per_block,
            };
            if t != default {
                out.push(t);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codegen::wgsl::spec::specs_by_signature;

    #[test]
    fn candidates_cover_the_knobs_each_kernel_reads() {
        let arch = crate::model::by_name("llama").unwrap();
        let config = arch
            .parse_config(&crate::model::testing::read_config("tiny-llama"))
            .unwrap();
        let scheme = crate::quant::scheme::scheme("q4f16_1").unwrap();
        let plan = arch.lower(&config, scheme, 32).unwrap();
        let specs = specs_by_signature(&plan).unwrap();
        let mut seen_gemv = false;
        for (sig, spec) in &specs {
            let c = candidates(sig, spec);
            assert_eq!(c[0], default_for(sig), "{sig}");
            let mut dedup = c.clone();
            dedup.sort_by_key(|t| (t.threads_per_block, t.rows_per_block));
            dedup.dedup();
            assert_eq!(dedup.len(), c.len(), "{sig}: duplicates");
            for t in &c {
                let v = serde_json::to_value(t).unwrap();
                assert_eq!(CudaTuning::from_record(&v).unwrap(), *t, "{sig}: invalid");
            }
            match spec {
                KernelSpec::Matmul {
                    phase: Phase::Prefill,
                    ..
                } => assert_eq!(c.len(), 1, "{sig}"),
                KernelSpec::Matmul {
                    phase: Phase::Decode,
                    ..
                } => {
                    assert_eq!(c.len(), 16, "{sig}");
                    seen_gemv = true;
                }
                KernelSpec::Attention { .. } if sig.starts_with("prefill:") => {
                    assert_eq!(c.len(), 1, "{sig}")
                }
                _ => assert_eq!(c.len(), 4, "{sig}"),
            }
        }
        assert!(seen_gemv);
    }
}
