//! The configurations the tune stage may time for a kernel: every workgroup size WebGPU allows by
//! default, crossed with the knobs that kernel family actually reads (rows per workgroup for
//! row-major matrix-vector kernels, vector width for elementwise ones). Knobs a kernel ignores
//! stay at the preset default, so two candidates never generate the same kernel.

use super::launch::Tuning;
use super::spec::{KernelSpec, MatrixStorage, Phase};
use crate::quant::scheme::Layout;

/// The wgpu presets' default configuration (what an untuned build uses), before the preset's
/// `subgroups` choice ([`preset_default`]).
pub const DEFAULT: Tuning = Tuning {
    workgroup_size: 64,
    rows_per_workgroup: 1,
    vector_width: 4,
    max_binding_bytes: super::launch::DEFAULT_MAX_BINDING_BYTES,
    subgroups: false,
};

/// [`DEFAULT`] with the preset's choice of subgroup reductions.
pub fn preset_default(subgroups: bool) -> Tuning {
    Tuning {
        subgroups,
        ..DEFAULT
    }
}

const WORKGROUP_SIZES: [u32; 4] = [32, 64, 128, 256];
const ROWS_PER_WORKGROUP: [u32; 3] = [1, 2, 4];
const VECTOR_WIDTHS: [u32; 3] = [1, 2, 4];

/// Which knobs a kernel family reads besides the workgroup size.
fn knobs(spec: &KernelSpec) -> (bool, bool) {
    match spec {
        KernelSpec::Matmul {
            m,
            phase: Phase::Decode,
            ..
        } => {
            let nk = !matches!(m.storage, MatrixStorage::Quant(q) if q.layout == Layout::KN);
            (nk, false)
        }
        KernelSpec::SiluMul { .. } | KernelSpec::Unary { .. } | KernelSpec::Binary { .. } => {
            (false, true)
        }
        _ => (false, false),
    }
}

/// Candidate configurations for `spec`, `base` (the preset default) first; every candidate keeps
/// `base`'s subgroup choice and binding limit.
pub fn candidates(spec: &KernelSpec, base: Tuning) -> Vec<Tuning> {
    let (rows, vector) = knobs(spec);
    let rows: &[u32] = if rows {
        &ROWS_PER_WORKGROUP
    } else {
        std::slice::from_ref(&base.rows_per_workgroup)
    };
    let widths: &[u32] = if vector {
        &VECTOR_WIDTHS
    } else {
        std::slice::from_ref(&base.vector_width)
    };
    let mut out = vec![base];
    for &workgroup_size in &WORKGROUP_SIZES {
        for &rows_per_workgroup in rows {
            for &vector_width in widths {
                let t = Tuning {
                    workgroup_size,
                    rows_per_workgroup,
                    vector_width,
                    ..base
                };
                if t != base {
                    out.push(t);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dtype::DType;

    #[test]
    fn candidates_cover_the_knobs_each_family_reads() {
        let norm = KernelSpec::RmsNorm {
            cols: 64,
            weight: DType::F32,
        };
        let c = candidates(&norm, DEFAULT);
        assert_eq!(c[0], DEFAULT);
        assert_eq!(c.len(), 4, "workgroup size only");
        let add = KernelSpec::Binary {
            op: super::super::spec::Binary::Add,
            cols: 64,
        };
        assert_eq!(
            candidates(&add, DEFAULT).len(),
            12,
            "workgroup size × vector width"
        );
        assert!(candidates(&add, preset_default(true))
            .iter()
            .all(|t| t.subgroups));
        for c in [candidates(&norm, DEFAULT), candidates(&add, DEFAULT)] {
            for t in &c {
                let v = serde_json::to_value(t).unwrap();
                assert_eq!(
                    Tuning::from_record(&v).unwrap(),
                    *t,
                    "every candidate is valid"
                );
            }
            let mut dedup = c.clone();
            dedup.dedup();
            assert_eq!(dedup.len(), c.len());
        }
    }
}
