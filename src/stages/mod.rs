//! The stages of a build, one file each. A stage is a node of the build DAG with static parameters;
//! once its upstream nodes are done it states its key inputs ([`KeyInputs`]), and either finds a
//! record for that key in the cache or runs and stores its outputs as blobs.
//!
//! fetch → load → (delta-merge) → quantize ─┐
//!                 └→ tune → codegen ───────┴→ link

pub mod calibration;
pub mod codegen;
pub mod delta_merge;
pub mod fetch;
pub mod fetch_remote;
pub mod link;
pub mod load;
pub mod quantize;
pub mod tune;
pub mod weights;

use crate::cache::key::KeyInputs;
use crate::cache::remote::Remote;
use crate::cache::{Cache, OutputRef, StageRecord};
use anyhow::Result;
use indicatif::MultiProgress;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything a stage may use besides its upstream results.
pub struct BuildContext {
    pub cache: Arc<Cache>,
    /// Where `<model>-<quant>/` folders go (`--artifact-path`, default `dist`).
    pub dist_root: PathBuf,
    /// `--use-cache=0`: ignore cache hits and overwrite the entries.
    pub use_cache: bool,
    pub debug_dump: bool,
    /// `--dry-run` / `explain`: compute keys and look them up, never run a stage.
    pub probe: bool,
    pub progress: MultiProgress,
    /// `--tune`: may the tune stage use or take measurements on a local device.
    pub tune_mode: tune::TuneMode,
    /// Opens a timer on a local device matching a target (the wgpu runtime's, or a test's).
    pub timer_factory: tune::TimerFactory,
    /// The shared remote cache, if one is configured: looked up after the local cache, and what
    /// this build computes is uploaded to it (read-write mode). Never consulted in probe mode.
    pub remote: Option<Arc<Remote>>,
}

/// In probe mode: this stage would run. `key` is None when it cannot be known without running
/// (a remote source).
#[derive(Debug)]
pub struct WouldRun {
    pub key: Option<String>,
    pub inputs: Option<KeyInputs>,
}

impl std::fmt::Display for WouldRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "would run")
    }
}
impl std::error::Error for WouldRun {}

/// The result of a finished stage, as its dependents see it.
#[derive(Debug, Clone, Serialize)]
pub struct StageOutput {
    pub key: String,
    pub cached: bool,
    /// Some(wall seconds of the lookup and download) when the outputs came from the remote cache
    /// (then `cached` is true too and `seconds` is the time the stage took where it ran).
    pub remote_seconds: Option<f64>,
    pub seconds: f64,
    pub outputs: BTreeMap<String, OutputRef>,
    /// Paths valid for this process only (a source folder, a blob path); never part of a key.
    #[serde(skip)]
    pub local: BTreeMap<String, PathBuf>,
    /// The key inputs, for reports and `explain`.
    pub inputs: KeyInputs,
}

impl StageOutput {
    /// The digest dependents put in their keys: over output names and digests, not paths.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        for (name, o) in &self.outputs {
            h.update(name.as_bytes());
            h.update(&[0]);
            h.update(o.digest.as_bytes());
            h.update(&[0]);
        }
        h.finalize().to_hex().to_string()
    }

    pub fn output(&self, name: &str) -> Result<&OutputRef> {
        self.outputs.get(name).ok_or_else(|| {
            anyhow::anyhow!("stage output `{name}` missing (cache key {})", self.key)
        })
    }

    pub fn record(&self) -> StageRecord {
        StageRecord {
            key: self.key.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            seconds: self.seconds,
        }
    }
}

/// Run `compute` unless the cache holds a record for `inputs` (and `--use-cache=0` is off):
/// the local cache first, then the remote one (whose blobs are downloaded and verified into the
/// local cache). `compute` returns output name → finished file to move into the blob store; what
/// it computed is uploaded to the remote in read-write mode (as is a local hit the remote lacks).
pub fn cached_or_run(
    ctx: &BuildContext,
    inputs: KeyInputs,
    scope: &[String],
    compute: impl FnOnce() -> Result<BTreeMap<String, PathBuf>>,
) -> Result<StageOutput> {
    let key = inputs.key();
    let remote = ctx.remote.as_deref().filter(|_| !ctx.probe);
    if ctx.use_cache {
        if let Some(rec) = ctx.cache.lookup_for(&key, &inputs, scope)? {
            if let Some(r) = remote {
                ctx.cache.index.release();
                r.publish_if_missing(&ctx.cache.blobs, &rec)?;
            }
            return Ok(StageOutput {
                key,
                cached: true,
                remote_seconds: None,
                seconds: rec.seconds,
                outputs: rec.outputs,
                local: BTreeMap::new(),
                inputs,
            });
        }
        if let Some(r) = remote {
            // Downloads can take long: let other mlcb processes use the index meanwhile.
            ctx.cache.index.release();
            if let Some(hit) = r.fetch(&ctx.cache.blobs, &key, &inputs)? {
                ctx.cache.store(&hit.record, None)?;
                ctx.cache.mark_scopes(&inputs, scope)?;
                return Ok(StageOutput {
                    key,
                    cached: true,
                    remote_seconds: Some(hit.seconds),
                    seconds: hit.record.seconds,
                    outputs: hit.record.outputs,
                    local: BTreeMap::new(),
                    inputs,
                });
            }
        }
    }
    if ctx.probe {
        return Err(anyhow::Error::new(WouldRun {
            key: Some(key),
            inputs: Some(inputs),
        }));
    }
    // Let other mlcb processes use the index while this stage computes.
    ctx.cache.index.release();
    let start = std::time::Instant::now();
    // Stages write their outputs into the cache's tmp/ before they become blobs: a full disk
    // there is the cache folder's, whatever writer (shards, safetensors, JSON) hit it.
    let stored = (|| {
        let files = compute()?;
        let mut outputs = BTreeMap::new();
        for (name, path) in files {
            let (digest, size) = ctx.cache.blobs.put_file(&path)?;
            outputs.insert(name, OutputRef { digest, size });
        }
        let out = StageOutput {
            key,
            cached: false,
            remote_seconds: None,
            seconds: start.elapsed().as_secs_f64(),
            outputs,
            local: BTreeMap::new(),
            inputs,
        };
        ctx.cache.store(&out.record(), None)?;
        ctx.cache.mark_scopes(&out.inputs, scope)?;
        Ok(out)
    })();
    let out = stored.map_err(|e| {
        crate::error::explain_no_space(e, "the cache folder", &ctx.cache.root, "--cache-dir")
    })?;
    if let Some(r) = remote {
        ctx.cache.index.release();
        r.publish(&ctx.cache.blobs, &out.record())?;
    }
    Ok(out)
}

/// Write bytes to a fresh temporary file in the cache (for a stage output).
pub fn temp_output(ctx: &BuildContext, hint: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = ctx.cache.blobs.temp_path(hint)?;
    crate::cache::blobs::write_synced(&p, bytes)?;
    Ok(p)
}
