//! The cache index: a sled database of stage records, file-digest memos and the key inputs of each
//! recipe's last build (for `mlcb explain`).
//!
//! sled allows one process at a time on a database, so the index is opened only for the moment
//! of each batch of lookups or writes and closed again: concurrent `mlcb` processes take turns in
//! milliseconds instead of one waiting for the other's whole build. An open that finds the lock
//! taken retries, and says so when the wait gets long.

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Index {
    path: PathBuf,
    /// sled refuses a second open in the same process too: serialise our own threads.
    lock: Mutex<()>,
}

/// How long to wait for another process before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
const WAIT_NOTICE_AFTER: Duration = Duration::from_secs(2);

impl Index {
    pub fn new(path: &Path) -> Index {
        Index {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    /// Open the database, run `f`, flush, close.
    pub fn with<R>(&self, f: impl FnOnce(&sled::Db) -> Result<R>) -> Result<R> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let db = self.open()?;
        let out = f(&db)?;
        db.flush()
            .with_context(|| format!("flushing cache index {}", self.path.display()))?;
        Ok(out)
    }

    fn open(&self) -> Result<sled::Db> {
        let start = Instant::now();
        let mut noticed = false;
        let mut delay = Duration::from_millis(2);
        let mut recoveries = 0;
        loop {
            match sled::Config::new().path(&self.path).flush_every_ms(None).open() {
                Ok(db) => return Ok(db),
                Err(sled::Error::Io(e)) if is_lock_error(&e) => {
                    if start.elapsed() > LOCK_TIMEOUT {
                        crate::env_bail!(
                            "the cache index {} stayed locked by another mlcb process for {}s; if no mlcb is running, another program holds it",
                            self.path.display(),
                            LOCK_TIMEOUT.as_secs()
                        );
                    }
                    if !noticed && start.elapsed() > WAIT_NOTICE_AFTER {
                        tracing::warn!("waiting for the cache index {}: another mlcb process is using it", self.path.display());
                        noticed = true;
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(50));
                }
                // sled 0.34 can leave a torn snapshot or log when a process is killed mid-write
                // (spacejam/sled#1509, #1527). The index holds only derived data (records of
                // content-addressed blobs, digest memos), so start a new one: stages whose
                // records are lost run again and find their blobs already stored.
                Err(e @ sled::Error::Corruption { .. }) if recoveries < 3 => {
                    recoveries += 1;
                    tracing::warn!(
                        "the cache index {} is damaged ({e}), probably by a build that was killed; starting a new index (stages will be checked again)",
                        self.path.display()
                    );
                    self.quarantine();
                }
                Err(e) => {
                    return Err(crate::error::env(format!(
                        "cannot open the cache index {}: {e}; if it is corrupt, run `mlcb clean --cache`",
                        self.path.display()
                    )))
                }
            }
        }
    }
}

impl Index {
    /// Move a damaged database out of the way (atomically, so a concurrent process either sees
    /// the old one or none) and delete it.
    fn quarantine(&self) {
        let aside = self.path.with_extension(format!(
            "corrupt-{}-{:x}",
            std::process::id(),
            crate::cache::blobs::rand_nonce()
        ));
        if std::fs::rename(&self.path, &aside).is_ok() {
            std::fs::remove_dir_all(&aside).ok();
        }
    }
}

fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
        || e.raw_os_error() == Some(11)
        || e.to_string().contains("could not acquire lock")
}

/// Read a JSON value stored under `key`.
pub fn get_json<T: DeserializeOwned>(db: &sled::Db, key: &str) -> Result<Option<T>> {
    match db.get(key)? {
        None => Ok(None),
        // An entry this version cannot read is treated as absent (it will be rewritten).
        Some(v) => Ok(serde_json::from_slice(&v).ok()),
    }
}

pub fn put_json<T: Serialize>(db: &sled::Db, key: &str, value: &T) -> Result<()> {
    db.insert(key, serde_json::to_vec(value)?)?;
    Ok(())
}
