//! `mlcb verify DIST_DIR`: check a built artifact against its build-manifest.json.
//!
//! Every file listed in `outputs` is hashed again; `artifact_digest` is recomputed from the
//! listed outputs; files in the folder that the manifest does not list are reported as extra.
//! Exit 0 when everything matches, else a user error (exit 2) that names what differs, so scripts
//! can tell a damaged artifact from a crash.

use crate::cache::blobs::hash_file;
use crate::cache::OutputRef;
use crate::stages::link::{digest_outputs, Manifest, MANIFEST};
use anyhow::Result;
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The artifact folder, e.g. dist/tiny-llama-q4f16_1.
    pub dist_dir: PathBuf,
    /// Print the report as JSON on stdout (the exit code still says whether it matched).
    #[arg(long)]
    pub json: bool,
}

/// A listed file whose bytes differ from the manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Changed {
    pub path: String,
    pub expected: OutputRef,
    pub actual: OutputRef,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub checked: usize,
    pub missing: Vec<String>,
    pub changed: Vec<Changed>,
    pub extra: Vec<String>,
    /// The manifest's `artifact_digest` and the one recomputed from its `outputs`.
    pub artifact_digest: String,
    pub recomputed_digest: String,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.changed.is_empty()
            && self.extra.is_empty()
            && self.artifact_digest == self.recomputed_digest
    }

    /// One line per problem.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.missing {
            out.push(format!("missing: {m}"));
        }
        for c in &self.changed {
            out.push(format!(
                "changed: {} (expected {} bytes, blake3 {}; found {} bytes, blake3 {})",
                c.path, c.expected.size, c.expected.digest, c.actual.size, c.actual.digest
            ));
        }
        for e in &self.extra {
            out.push(format!("unexpected file: {e}"));
        }
        if self.artifact_digest != self.recomputed_digest {
            out.push(format!(
                "artifact_digest {} does not match the listed outputs ({})",
                self.artifact_digest, self.recomputed_digest
            ));
        }
        out
    }
}

/// Read the manifest of `dir`: a user error when it is absent or unreadable.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| {
        crate::error::user(format!(
            "{} cannot be read ({e}): is {} an mlcb artifact folder?",
            path.display(),
            dir.display()
        ))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        crate::error::user(format!(
            "{} is not a valid build manifest: {e}",
            path.display()
        ))
    })
}

/// Compare `dir` with its manifest. Errors only when the manifest itself is unusable.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport> {
    if !dir.is_dir() {
        crate::user_bail!("{} is not a folder", dir.display());
    }
    let manifest = read_manifest(dir)?;
    for p in manifest.outputs.keys() {
        crate::safe_path::check_relative(p, "manifest output path")?;
    }
    let mut missing = Vec::new();
    let mut changed = Vec::new();
    for (p, expected) in &manifest.outputs {
        let file = dir.join(p);
        // A listed path must be a regular file (a symlink could point anywhere).
        match std::fs::symlink_metadata(&file) {
            Ok(m) if m.is_file() => {}
            _ => {
                missing.push(p.clone());
                continue;
            }
        }
        let (digest, size) = hash_file(&file)?;
        if digest != expected.digest || size != expected.size {
            changed.push(Changed {
                path: p.clone(),
                expected: expected.clone(),
                actual: OutputRef { digest, size },
            });
        }
    }
    let mut present = Vec::new();
    list_files(dir, dir, &mut present)?;
    let extra = present
        .into_iter()
        .filter(|p| p != MANIFEST && !manifest.outputs.contains_key(p))
        .collect();
    Ok(VerifyReport {
        dir: dir.to_path_buf(),
        checked: manifest.outputs.len(),
        missing,
        changed,
        extra,
        recomputed_digest: digest_outputs(&manifest.outputs),
        artifact_digest: manifest.artifact_digest,
    })
}

/// Every non-directory entry under `dir`, as `/`-separated paths relative to `base`, sorted.
fn list_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| crate::error::env(format!("cannot list {}: {e}", dir.display())))?;
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir {
            list_files(base, &p, out)?;
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
    }
    Ok(())
}

pub fn execute(args: VerifyArgs) -> Result<()> {
    let report = verify_dir(&args.dist_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    if report.ok() {
        if !args.json {
            println!(
                "ok: {} files match {} (artifact_digest {})",
                report.checked,
                args.dist_dir.join(MANIFEST).display(),
                report.artifact_digest
            );
        }
        return Ok(());
    }
    let problems = report.problems();
    crate::user_bail!(
        "{} does not match its {MANIFEST} ({} problem{}):\n  {}\nrebuild it with `mlcb build` (a damaged file is replaced from the cache)",
        args.dist_dir.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        problems.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A hand-made artifact folder with a manifest written the way link writes it.
    fn artifact(dir: &Path) {
        std::fs::create_dir_all(dir.join("params")).unwrap();
        let files: [(&str, &[u8]); 2] = [("params/a.bin", b"abc"), ("lib.mlcblib", b"xyz!")];
        let mut outputs = BTreeMap::new();
        for (p, b) in files {
            std::fs::write(dir.join(p), b).unwrap();
            outputs.insert(
                p.to_string(),
                OutputRef {
                    digest: blake3::hash(b).to_hex().to_string(),
                    size: b.len() as u64,
                },
            );
        }
        let m = serde_json::json!({
            "mlcb_version": "0", "local_id": "x", "link_key": "k",
            "artifact_digest": digest_outputs(&outputs), "outputs": outputs,
            "libraries": {}, "recipe": null, "sources": [], "stages": [], "tuned": false
        });
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn intact_folder_verifies() {
        let d = tempfile::tempdir().unwrap();
        artifact(d.path());
        let r = verify_dir(d.path()).unwrap();
        assert!(r.ok(), "{:?}", r.problems());
        assert_eq!(r.checked, 2);
    }

    #[test]
    fn reports_changed_missing_and_extra() {
        let d = tempfile::tempdir().unwrap();
        artifact(d.path());
        std::fs::write(d.path().join("params/a.bin"), b"abd").unwrap();
        std::fs::remove_file(d.path().join("lib.mlcblib")).unwrap();
        std::fs::write(d.path().join("params/stray"), b"").unwrap();
        let r = verify_dir(d.path()).unwrap();
        assert_eq!(r.missing, vec!["lib.mlcblib".to_string()]);
        assert_eq!(r.changed.len(), 1);
        assert_eq!(r.changed[0].path, "params/a.bin");
        assert_eq!(
            r.changed[0].actual.digest,
            blake3::hash(b"abd").to_hex().to_string()
        );
        assert_eq!(r.extra, vec!["params/stray".to_string()]);
        assert!(!r.ok());
        let e = execute(VerifyArgs {
            dist_dir: d.path().to_path_buf(),
            json: false,
        })
        .unwrap_err();
        assert_eq!(crate::error::class_of(&e).exit_code(), 2);
        assert!(e.to_string().contains("changed: params/a.bin"), "{e}");
    }

    #[test]
    fn tampered_artifact_digest_and_escaping_paths_are_caught() {
        let d = tempfile::tempdir().unwrap();
        artifact(d.path());
        let mp = d.path().join(MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m["artifact_digest"] = "00".into();
        std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
        let r = verify_dir(d.path()).unwrap();
        assert!(!r.ok());
        assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
        m["outputs"]["../outside"] = serde_json::json!({"digest": "00", "size": 1});
        std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
        let e = verify_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("../outside"), "{e}");
    }
}
