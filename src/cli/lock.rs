//! `mlcb.lock`: what every recipe source resolved to (revision and file digests, the fetch stage's
//! `files.json`), next to the first recipe. A normal build writes or updates it; `--locked` refuses
//! to build when a source resolves differently or has no entry, naming the source and the first
//! difference.
//!
//! Local sources inside the lock file's folder are recorded by relative path (`path:models/x`), so
//! a checked-in lock file works from any checkout location.

use crate::graph::dag::{BuildGraph, NodeSpec};
use crate::recipe::Source;
use crate::stages::fetch::FileList;
use crate::stages::{BuildContext, StageOutput};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "mlcb.lock";
const LOCK_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockFile {
    pub version: u32,
    /// Source key → what it resolved to.
    pub sources: BTreeMap<String, FileList>,
}

/// Where the lock file of a build lives: next to the first recipe, else in the current folder
/// (build.py's flag form).
pub fn lock_path(recipe_files: &[PathBuf]) -> PathBuf {
    match recipe_files.first().and_then(|r| r.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(LOCK_FILE),
        _ => PathBuf::from(LOCK_FILE),
    }
}

/// The name a source has in the lock file.
pub fn source_key(source: &Source, lock_dir: &Path) -> String {
    let local = |p: &Path| {
        let abs = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let base = lock_dir
            .canonicalize()
            .unwrap_or_else(|_| lock_dir.to_path_buf());
        match abs.strip_prefix(&base) {
            Ok(rel) if !rel.as_os_str().is_empty() => format!("path:{}", rel.display()),
            _ => format!("path:{}", abs.display()),
        }
    };
    match source {
        Source::Local(p) => local(p),
        Source::Gguf(p) => format!("gguf:{}", local(p).trim_start_matches("path:")),
        other => other.describe(),
    }
}

pub fn read(path: &Path) -> Result<Option<LockFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(crate::error::env(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let lock: LockFile = serde_json::from_slice(&bytes).map_err(|e| {
        crate::error::user(format!(
            "{} is not a valid mlcb lock file: {e}; delete it and build without --locked to write a new one",
            path.display()
        ))
    })?;
    if lock.version != LOCK_VERSION {
        crate::user_bail!(
            "{} has lock format version {} (this mlcb writes {LOCK_VERSION}); rebuild without --locked to rewrite it",
            path.display(),
            lock.version
        );
    }
    Ok(Some(lock))
}

/// Write atomically (temporary file + rename) so a killed build never leaves half a lock file.
pub fn write(path: &Path, lock: &LockFile) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{LOCK_FILE}.tmp-{}-{:x}",
        std::process::id(),
        crate::cache::blobs::rand_nonce()
    ));
    let mut bytes = serde_json::to_vec_pretty(lock)?;
    bytes.push(b'\n');
    crate::cache::blobs::write_synced(&tmp, &bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The first way `now` differs from `locked`, in words.
pub fn first_difference(locked: &FileList, now: &FileList) -> Option<String> {
    if locked.revision != now.revision {
        return Some(format!(
            "revision {} is locked, it now resolves to {}",
            locked.revision.as_deref().unwrap_or("(none)"),
            now.revision.as_deref().unwrap_or("(none)")
        ));
    }
    if locked.kind != now.kind {
        return Some(format!(
            "kind {} is locked, it is now {}",
            locked.kind, now.kind
        ));
    }
    let old: BTreeMap<&str, _> = locked.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let new: BTreeMap<&str, _> = now.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let names: std::collections::BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
    for n in names {
        match (old.get(n), new.get(n)) {
            (Some(a), Some(b)) if a.digest == b.digest && a.size == b.size => {}
            (Some(a), Some(b)) => {
                return Some(format!(
                    "file {n} changed (locked: {} bytes, blake3 {}; now: {} bytes, blake3 {})",
                    a.size, a.digest, b.size, b.digest
                ))
            }
            (Some(_), None) => return Some(format!("file {n} is locked but no longer present")),
            (None, Some(_)) => return Some(format!("file {n} is new (not in the lock file)")),
            (None, None) => {}
        }
    }
    None
}

/// The fetch nodes of a graph: (source, node).
fn fetch_nodes(g: &BuildGraph) -> Vec<(&Source, petgraph::graph::NodeIndex)> {
    g.graph
        .node_indices()
        .filter_map(|n| match &g.graph[n].spec {
            NodeSpec::Fetch { source } => Some((source, n)),
            _ => None,
        })
        .collect()
}

fn file_list(ctx: &BuildContext, fetch: &StageOutput) -> Result<FileList> {
    let bytes = ctx
        .cache
        .blobs
        .read_verified(&fetch.output("files.json")?.digest)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// `--locked`: resolve every source now (the fetch stage, cached) and compare with the lock file;
/// a user error names the first source that differs or has no entry.
pub fn check_locked(ctx: &BuildContext, g: &BuildGraph, lock_path: &Path) -> Result<()> {
    let lock = read(lock_path)?.ok_or_else(|| {
        crate::error::user(format!(
            "--locked: there is no lock file {}; build once without --locked to write it",
            lock_path.display()
        ))
    })?;
    let lock_dir = lock_path.parent().unwrap_or(Path::new("."));
    for (source, _) in fetch_nodes(g) {
        let key = source_key(source, lock_dir);
        let Some(locked) = lock.sources.get(&key) else {
            crate::user_bail!(
                "--locked: source {key} has no entry in {}; build without --locked to add it",
                lock_path.display()
            );
        };
        let out = crate::stages::fetch::run(ctx, source, &[])?;
        let now = file_list(ctx, &out)?;
        if let Some(diff) = first_difference(locked, &now) {
            crate::user_bail!(
                "--locked: source {key} does not match {}: {diff}; build without --locked to accept the change",
                lock_path.display()
            );
        }
    }
    Ok(())
}

/// After a build: record what each source of the graph resolved to (other entries are kept).
pub fn update(
    ctx: &BuildContext,
    g: &BuildGraph,
    outputs: &std::collections::HashMap<petgraph::graph::NodeIndex, StageOutput>,
    lock_path: &Path,
) -> Result<()> {
    let mut lock = match read(lock_path) {
        Ok(Some(l)) => l,
        // An unreadable or old lock file is replaced by a normal build.
        _ => LockFile {
            version: LOCK_VERSION,
            sources: BTreeMap::new(),
        },
    };
    let before = lock.clone();
    let lock_dir = lock_path.parent().unwrap_or(Path::new("."));
    for (source, node) in fetch_nodes(g) {
        if let Some(out) = outputs.get(&node) {
            lock.sources
                .insert(source_key(source, lock_dir), file_list(ctx, out)?);
        }
    }
    if lock != before || !lock_path.exists() {
        write(lock_path, &lock)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::fetch::FileEntry;

    fn list(rev: Option<&str>, files: &[(&str, &str)]) -> FileList {
        FileList {
            kind: "hub".into(),
            revision: rev.map(String::from),
            files: files
                .iter()
                .map(|(p, d)| FileEntry {
                    path: p.to_string(),
                    digest: d.to_string(),
                    size: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn differences_name_the_revision_or_first_file() {
        let a = list(Some("abc"), &[("config.json", "1"), ("w.bin", "2")]);
        assert_eq!(first_difference(&a, &a), None);
        let r = first_difference(&a, &list(Some("def"), &[])).unwrap();
        assert!(r.contains("abc") && r.contains("def"), "{r}");
        let f = first_difference(
            &a,
            &list(Some("abc"), &[("config.json", "9"), ("w.bin", "3")]),
        )
        .unwrap();
        assert!(f.starts_with("file config.json changed"), "{f}");
        let gone = first_difference(&a, &list(Some("abc"), &[("config.json", "1")])).unwrap();
        assert!(
            gone.contains("w.bin") && gone.contains("no longer"),
            "{gone}"
        );
    }

    #[test]
    fn local_sources_are_keyed_relative_to_the_lock_folder() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("m")).unwrap();
        let k = source_key(&Source::Local(d.path().join("m")), d.path());
        assert_eq!(k, "path:m");
        let hub = Source::Hub {
            repo: "a/b".into(),
            revision: "main".into(),
        };
        assert_eq!(source_key(&hub, d.path()), "hf://a/b@main");
    }

    #[test]
    fn lock_file_roundtrip_and_bad_version() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(LOCK_FILE);
        assert_eq!(read(&p).unwrap(), None);
        let l = LockFile {
            version: LOCK_VERSION,
            sources: BTreeMap::from([("s".to_string(), list(None, &[("a", "1")]))]),
        };
        write(&p, &l).unwrap();
        assert_eq!(read(&p).unwrap(), Some(l));
        std::fs::write(&p, r#"{"version": 99, "sources": {}}"#).unwrap();
        let e = read(&p).unwrap_err();
        assert_eq!(crate::error::class_of(&e).exit_code(), 2);
    }
}
