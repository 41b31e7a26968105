//! The tuning database: kernel configurations measured on a device, kept in the cache folder so
//! later builds (of this or any model with the same kernel signatures) reuse them instead of
//! measuring again. One JSON file per device, `tuning/<device digest>.json`, keyed by kernel
//! signature. Updates hold an exclusive `flock` on a sibling lock file and replace the file by
//! rename, so concurrent builds never lose each other's records or read a half-written file.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// One measured signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedRecord {
    /// The fastest configuration (the tune stage's record format).
    pub config: serde_json::Value,
    /// Its measured seconds per dispatch.
    pub seconds: f64,
    /// How many configurations were timed.
    pub candidates: usize,
    /// How many were not timed because their results were not the default configuration's
    /// (`codegen::tune_check`; each one an mlcb bug, reported when it was measured).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: usize,
    /// Whether the candidates' results were checked before they were timed: records an mlcb
    /// without that check measured are measured again (one of them could be a wrong kernel).
    #[serde(default)]
    pub checked: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct DbFile {
    device: String,
    records: BTreeMap<String, TunedRecord>,
}

/// The records of one device.
pub struct TuningDb {
    path: PathBuf,
    device: String,
}

impl TuningDb {
    /// The database of `device` (vendor, device, driver, …) under the cache folder `cache_root`.
    pub fn open(cache_root: &Path, device: &str) -> TuningDb {
        let digest = blake3::hash(device.as_bytes()).to_hex();
        TuningDb {
            path: cache_root
                .join("tuning")
                .join(format!("{}.json", &digest[..32])),
            device: device.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record (empty when nothing was measured on this device yet). A damaged file is
    /// treated as empty with a warning: it only costs a re-measurement.
    pub fn load(&self) -> Result<BTreeMap<String, TunedRecord>> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => {
                return Err(crate::error::env(format!(
                    "cannot read the tuning database {}: {e}",
                    self.path.display()
                )))
            }
        };
        match serde_json::from_slice::<DbFile>(&bytes) {
            Ok(f) if f.device == self.device => Ok(f.records),
            Ok(f) => {
                tracing::warn!(
                    "tuning database {} belongs to device {:?}, not {:?}; ignoring it",
                    self.path.display(),
                    f.device,
                    self.device
                );
                Ok(BTreeMap::new())
            }
            Err(e) => {
                tracing::warn!(
                    "tuning database {} is damaged ({e}); its kernels will be measured again",
                    self.path.display()
                );
                Ok(BTreeMap::new())
            }
        }
    }

    /// Adds (or replaces) `records`, keeping what other processes stored meanwhile.
    pub fn insert(&self, records: &BTreeMap<String, TunedRecord>) -> Result<()> {
        let dir = self.path.parent().expect("the database lives in a folder");
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::error::env(format!("cannot create {}: {e}", dir.display())))?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a file descriptor we own; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(crate::error::env(format!(
                "cannot lock {}: {}",
                lock_path.display(),
                std::io::Error::last_os_error()
            )));
        }
        let mut all = self.load()?;
        all.extend(records.iter().map(|(k, v)| (k.clone(), v.clone())));
        let file = DbFile {
            device: self.device.clone(),
            records: all,
        };
        let tmp = self
            .path
            .with_extension(format!("{}.tmp", std::process::id()));
        crate::cache::blobs::write_synced(&tmp, &serde_json::to_vec_pretty(&file)?)?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            crate::error::env(format!("cannot update {}: {e}", self.path.display()))
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(wg: u64, seconds: f64) -> TunedRecord {
        TunedRecord {
            config: serde_json::json!({ "workgroup_size": wg }),
            seconds,
            candidates: 4,
            refused: 0,
            checked: true,
        }
    }

    #[test]
    fn records_persist_per_device_and_merge() {
        let tmp = tempfile::tempdir().unwrap();
        let a = TuningDb::open(tmp.path(), "vulkan:llvmpipe:mesa 22.3.6");
        let b = TuningDb::open(tmp.path(), "vulkan:other:1.0");
        assert_ne!(a.path(), b.path());
        assert!(a.load().unwrap().is_empty());
        a.insert(&BTreeMap::from([("decode:add[8]".into(), rec(64, 1e-5))]))
            .unwrap();
        a.insert(&BTreeMap::from([("decode:mul[8]".into(), rec(128, 2e-5))]))
            .unwrap();
        let got = a.load().unwrap();
        assert_eq!(got.len(), 2, "the second insert keeps the first record");
        assert_eq!(got["decode:add[8]"], rec(64, 1e-5));
        assert!(b.load().unwrap().is_empty(), "other devices see nothing");
    }

    #[test]
    fn a_damaged_database_costs_a_remeasurement_not_a_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let db = TuningDb::open(tmp.path(), "dev");
        std::fs::create_dir_all(db.path().parent().unwrap()).unwrap();
        std::fs::write(db.path(), b"{not json").unwrap();
        assert!(db.load().unwrap().is_empty());
        db.insert(&BTreeMap::from([("s".into(), rec(32, 1.0))]))
            .unwrap();
        assert_eq!(db.load().unwrap().len(), 1);
    }
}
