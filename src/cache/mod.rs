//! The content-addressed cache: stage records keyed by [`key::KeyInputs`], blobs by blake3 digest,
//! file digests memoised by (path, size, mtime, inode) so a no-op rebuild reads no weight bytes.
//!
//! Layout under the cache folder (default `./cache`, `MLCB_CACHE_DIR`, `--cache-dir`):
//! `index.sled/` (the sled index), `blobs/xx/<digest>`, `tmp/` (temporary files, same filesystem),
//! `sources/` (hub and git downloads).
//!
//! A shared remote cache ([`remote`], configured by [`remote_config`]) sits behind the local one:
//! stages are looked up locally, then remotely, then computed and uploaded.

pub mod blobs;
pub mod index;
pub mod key;
pub mod remote;
pub mod remote_config;
pub mod stale;
pub mod tuning_db;

use anyhow::{Context, Result};
use blobs::BlobStore;
use index::{get_json, put_json, Index};
use key::KeyInputs;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One output file of a stage, stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRef {
    pub digest: String,
    pub size: u64,
}

/// What a finished stage left in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    pub key: String,
    pub inputs: KeyInputs,
    /// Output name → blob.
    pub outputs: BTreeMap<String, OutputRef>,
    /// Wall seconds the stage took when it ran.
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileMemo {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    digest: String,
}

pub struct Cache {
    pub root: PathBuf,
    pub blobs: BlobStore,
    pub index: Index,
}

impl Cache {
    pub fn open(root: &Path) -> Result<Cache> {
        std::fs::create_dir_all(root).map_err(|e| {
            crate::error::env(format!(
                "cannot create the cache folder {}: {e}",
                root.display()
            ))
        })?;
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()))?;
        Ok(Cache {
            blobs: BlobStore::new(&root),
            index: Index::new(&root.join("index.sled")),
            root,
        })
    }

    /// The record for `key`, if every output blob is still present.
    pub fn lookup(&self, key: &str) -> Result<Option<StageRecord>> {
        let rec: Option<StageRecord> = self
            .index
            .with(|db| get_json(db, &format!("stage/{key}")))?;
        // A digest names a blob path: only well-formed ones count (a damaged index is a miss).
        Ok(rec.filter(|r| {
            r.outputs
                .values()
                .all(|o| blobs::is_digest(&o.digest) && self.blobs.contains(&o.digest))
        }))
    }

    /// The record for `key` (if every output blob is present), and in the same index session note
    /// `inputs` as the last key inputs of each scope that recorded something else.
    pub fn lookup_for(
        &self,
        key: &str,
        inputs: &KeyInputs,
        scopes: &[String],
    ) -> Result<Option<StageRecord>> {
        self.index.with(|db| {
            let rec: Option<StageRecord> = get_json(db, &format!("stage/{key}"))?;
            let rec = rec.filter(|r| r.outputs.values().all(|o| self.blobs.contains(&o.digest)));
            if rec.is_some() {
                for s in scopes {
                    let last = format!("last/{s}");
                    if get_json::<KeyInputs>(db, &last)?.as_ref() != Some(inputs) {
                        put_json(db, &last, inputs)?;
                    }
                }
            }
            Ok(rec)
        })
    }

    /// Note `inputs` as the last key inputs of each scope (one index session; writes only changes).
    pub fn mark_scopes(&self, inputs: &KeyInputs, scopes: &[String]) -> Result<()> {
        self.index.with(|db| {
            for s in scopes {
                let last = format!("last/{s}");
                if get_json::<KeyInputs>(db, &last)?.as_ref() != Some(inputs) {
                    put_json(db, &last, inputs)?;
                }
            }
            Ok(())
        })
    }

    pub fn store(&self, rec: &StageRecord, scope: Option<&str>) -> Result<()> {
        self.index.with(|db| {
            put_json(db, &format!("stage/{}", rec.key), rec)?;
            if let Some(s) = scope {
                put_json(db, &format!("last/{s}"), &rec.inputs)?;
            }
            Ok(())
        })
    }

    /// The key inputs of the last build of `scope` (a recipe's stage), for `mlcb explain`.
    pub fn last_inputs(&self, scope: &str) -> Result<Option<KeyInputs>> {
        self.index.with(|db| get_json(db, &format!("last/{scope}")))
    }

    /// Digests of files, from the memo when (path, size, mtime, inode) is unchanged, else by reading.
    pub fn file_digests(&self, paths: &[PathBuf]) -> Result<Vec<(String, u64)>> {
        let metas: Vec<(String, std::fs::Metadata)> = paths
            .iter()
            .map(|p| {
                let abs = p
                    .canonicalize()
                    .with_context(|| format!("resolving {}", p.display()))?;
                let m = std::fs::metadata(&abs)
                    .with_context(|| format!("reading {}", abs.display()))?;
                Ok((abs.display().to_string(), m))
            })
            .collect::<Result<_>>()?;
        let memos: Vec<Option<FileMemo>> = self.index.with(|db| {
            metas
                .iter()
                .map(|(p, _)| get_json(db, &format!("file/{p}")))
                .collect()
        })?;
        let mut out = Vec::with_capacity(paths.len());
        let mut fresh = Vec::new();
        for ((path, m), memo) in metas.iter().zip(memos) {
            let now = FileMemo {
                size: m.size(),
                mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
                inode: m.ino(),
                digest: String::new(),
            };
            match memo {
                Some(old)
                    if FileMemo {
                        digest: String::new(),
                        ..old.clone()
                    } == now =>
                {
                    out.push((old.digest, now.size))
                }
                _ => {
                    let (digest, size) = blobs::hash_file(Path::new(path))?;
                    fresh.push((
                        path.clone(),
                        FileMemo {
                            digest: digest.clone(),
                            ..now
                        },
                    ));
                    out.push((digest, size));
                }
            }
        }
        if !fresh.is_empty() {
            self.index.with(|db| {
                fresh
                    .iter()
                    .try_for_each(|(p, m)| put_json(db, &format!("file/{p}"), m))
            })?;
        }
        Ok(out)
    }

    /// Remove everything in the cache.
    pub fn clear(root: &Path) -> Result<()> {
        if root.exists() {
            std::fs::remove_dir_all(root)
                .with_context(|| format!("removing the cache {}", root.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_missing_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = cache.blobs.put_bytes(b"hello").unwrap();
        let inputs = KeyInputs::new("s", 1).with("a", "b");
        let rec = StageRecord {
            key: inputs.key(),
            inputs: inputs.clone(),
            outputs: [(
                "out".to_string(),
                OutputRef {
                    digest: d.clone(),
                    size: 5,
                },
            )]
            .into(),
            seconds: 0.1,
        };
        cache.store(&rec, Some("r/s")).unwrap();
        assert_eq!(cache.lookup(&rec.key).unwrap(), Some(rec.clone()));
        assert_eq!(cache.last_inputs("r/s").unwrap(), Some(inputs));
        std::fs::remove_file(cache.blobs.path(&d)).unwrap();
        assert_eq!(cache.lookup(&rec.key).unwrap(), None);
    }

    #[test]
    fn corrupt_blob_is_detected_and_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = cache.blobs.put_bytes(b"payload").unwrap();
        std::fs::write(cache.blobs.path(&d), b"tampered").unwrap();
        let err = cache
            .blobs
            .copy_verified(&d, &dir.path().join("out"))
            .unwrap_err();
        assert!(err.downcast_ref::<blobs::CorruptBlob>().is_some());
        assert!(!cache.blobs.contains(&d));
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn file_memo_avoids_rehash_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        let f = dir.path().join("w.bin");
        std::fs::write(&f, b"abc").unwrap();
        let a = cache.file_digests(std::slice::from_ref(&f)).unwrap();
        assert_eq!(a[0].0, blake3::hash(b"abc").to_hex().to_string());
        std::fs::write(&f, b"abcd").unwrap();
        let b = cache.file_digests(std::slice::from_ref(&f)).unwrap();
        assert_eq!(b[0].0, blake3::hash(b"abcd").to_hex().to_string());
    }
}
