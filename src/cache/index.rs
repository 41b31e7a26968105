//! The cache index: a sled database of stage records, file-digest memos and the key inputs of each
//! recipe's last build (for `mlcb explain`).
//!
//! sled allows one process at a time on a database, so the index stays open only while a build is
//! looking things up or recording them, and is released before any stage computes (and at the
//! end): concurrent `mlcb` processes take turns in milliseconds instead of one waiting for the
//! other's whole build, while a no-op rebuild opens it once. An open that finds the lock taken
//! retries, and says so when the wait gets long.

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Index {
    path: PathBuf,
    /// The open database, if any. sled refuses a second open in the same process too, so our own
    /// threads share this one under the mutex.
    open: Mutex<Option<sled::Db>>,
}

/// How long to wait for another process before giving up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
const WAIT_NOTICE_AFTER: Duration = Duration::from_secs(2);

impl Index {
    pub fn new(path: &Path) -> Index {
        Index {
            path: path.to_path_buf(),
            open: Mutex::new(None),
        }
    }

    /// Open the database, run `f`, flush, close. A full disk is an environment error naming the
    /// index (sled writes its log on open, insert and flush).
    pub fn with<R>(&self, f: impl FnOnce(&IndexSession) -> Result<R>) -> Result<R> {
        self.with_inner(f).map_err(|e| {
            crate::error::explain_no_space(e, "the cache index", &self.path, "--cache-dir")
        })
    }

    fn with_inner<R>(&self, f: impl FnOnce(&IndexSession) -> Result<R>) -> Result<R> {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let session = IndexSession {
            db: guard.as_ref().expect("opened above").clone(),
            dirty: std::cell::Cell::new(false),
        };
        let out = f(&session)?;
        if session.dirty.get() {
            session
                .db
                .flush()
                .with_context(|| format!("flushing cache index {}", self.path.display()))?;
        }
        Ok(out)
    }

    /// Close the database so other processes can use it (before long work, and at the end).
    pub fn release(&self) {
        let mut guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.take() {
            db.flush().ok();
        }
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
                // A full disk is not corruption: `with` explains it (no `mlcb clean` advice).
                Err(sled::Error::Io(e))
                    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) =>
                {
                    return Err(anyhow::Error::new(e)
                        .context(format!("cannot open the cache index {}", self.path.display())))
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

/// One open of the index: JSON values by key; remembers whether anything was written.
pub struct IndexSession {
    db: sled::Db,
    dirty: std::cell::Cell<bool>,
}

/// Read a JSON value stored under `key`.
pub fn get_json<T: DeserializeOwned>(s: &IndexSession, key: &str) -> Result<Option<T>> {
    match s.db.get(key).map_err(sled_error)? {
        None => Ok(None),
        // An entry this version cannot read is treated as absent (it will be rewritten).
        Some(v) => Ok(serde_json::from_slice(&v).ok()),
    }
}

pub fn put_json<T: Serialize>(s: &IndexSession, key: &str, value: &T) -> Result<()> {
    s.db.insert(key, serde_json::to_vec(value)?)
        .map_err(sled_error)?;
    s.dirty.set(true);
    Ok(())
}

/// sled's I/O failures (disk full, permissions) are the machine's, not mlcb's: environment errors.
fn sled_error(e: sled::Error) -> anyhow::Error {
    match e {
        sled::Error::Io(io) => crate::error::env(format!("cache index I/O error: {io}")),
        other => anyhow::Error::new(other),
    }
}
