//! tune: the kernel configuration records codegen uses, keyed by kernel signature and device.
//!
//! Here: each target preset's defaults, or a tuning file the recipe pins (records there override
//! the defaults for the signatures they name). Measured tuning on a matching device comes with the
//! GPU targets; until then the records say `"tuned": false`, and so does the manifest.

use super::{cached_or_run, temp_output, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::model_lib::plan::Plan;
use crate::recipe::TargetSpec;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// 2: the CUDA architecture is no longer a key input (preset defaults do not depend on it, so an
/// arch change rebuilds codegen only; measured records come in a pinned tuning file).
pub const VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningRecords {
    /// "preset-defaults:<target>" or the device the records were measured on.
    pub device: String,
    pub tuned: bool,
    /// Signature → configuration.
    pub records: BTreeMap<String, serde_json::Value>,
}

/// The preset's default configuration for a signature.
fn default_config(target: &TargetSpec, signature: &str) -> serde_json::Value {
    match target.preset.backend {
        // The CPU kernels split matrix rows into tasks for the thread pool.
        "cpu" => serde_json::json!({ "rows_per_task": 64 }),
        // The CUDA kernels' launch shape (`codegen::cuda::launch::CudaTuning`): decode GEMVs run
        // 4 rows per block of 4 warps (128 threads cover the 128 16-byte chunks of a 4096-wide
        // q4 row; each activation chunk is loaded once for the 4 rows).
        "cuda" => {
            if signature.contains("matmul") || signature.contains("logits") {
                serde_json::json!({ "threads_per_block": 128, "rows_per_block": 4 })
            } else {
                serde_json::json!({ "threads_per_block": 256, "rows_per_block": 1 })
            }
        }
        _ => {
            serde_json::json!({ "workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 4 })
        }
    }
}

pub fn run(
    ctx: &BuildContext,
    plan: &Plan,
    target: &TargetSpec,
    tuning_file: Option<&Path>,
    scope: &[String],
) -> Result<StageOutput> {
    let signatures = crate::codegen::signature::plan_signatures(plan);
    let sig_digest = blake3::hash(serde_json::to_string(&signatures)?.as_bytes())
        .to_hex()
        .to_string();
    let pinned = match tuning_file {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| {
                crate::error::user(format!("cannot read the tuning file {}: {e}", p.display()))
            })?;
            let recs: TuningRecords = serde_json::from_slice(&bytes).map_err(|e| {
                crate::error::user(format!("{} is not a tuning-records file: {e}", p.display()))
            })?;
            Some((blake3::hash(&bytes).to_hex().to_string(), recs))
        }
        None => None,
    };
    let inputs = KeyInputs::new("tune", VERSION)
        .with("signatures", &sig_digest)
        .with("target", target.preset.name)
        .with(
            "tuning_file",
            pinned.as_ref().map(|(d, _)| d.as_str()).unwrap_or("-"),
        );
    cached_or_run(ctx, inputs, scope, || {
        let mut records = BTreeMap::new();
        for s in &signatures {
            records.insert(s.clone(), default_config(target, s));
        }
        let (device, tuned) = match &pinned {
            Some((_, p)) => {
                for (s, v) in &p.records {
                    if records.contains_key(s) {
                        records.insert(s.clone(), v.clone());
                    }
                }
                (p.device.clone(), p.tuned)
            }
            None => (format!("preset-defaults:{}", target.preset.name), false),
        };
        let recs = TuningRecords {
            device,
            tuned,
            records,
        };
        Ok(BTreeMap::from([(
            "tuning.json".to_string(),
            temp_output(ctx, "tuning", &serde_json::to_vec_pretty(&recs)?)?,
        )]))
    })
}
