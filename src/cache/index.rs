//! The cache index: a sled database of stage records, file-digest memos and the key inputs of each
//! recipe's last build (for `mlcb explain`).
//!
//! sled allows one process at a time on a database, so the index stays open only while a build is
//! looking things up or recording them, and is released before any stage computes (and at the
//! end): concurrent `mlcb` processes take turns in milliseconds instead of one waiting for the
//! other's whole build, while a no-op rebuild opens it once. An open that finds the lock taken
//! retries, and says so when the wait gets long.
//!
//! The lock is our own (`index.sled.lock` beside the database, held from before sled opens it
//! until it is closed), not only sled's: sled reads and writes its `conf` file before it takes its
//! lock, so two processes creating a new index at once could see each other's half-written
//! `conf`, take it for corruption and move the other's fresh database away.

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Index {
    path: PathBuf,
    /// The open database and the lock file held while it is open, if any. sled refuses a second
    /// open in the same process too, so our own threads share this one under the mutex.
    open: Mutex<Option<(sled::Db, File)>>,
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
            db: guard.as_ref().expect("opened above").0.clone(),
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
        if let Some((db, lock)) = guard.take() {
            db.flush().ok();
            drop(db);
            drop(lock); // closing the file releases the lock
        }
    }

    /// Take the index lock (waiting for other processes), then open the database.
    fn open(&self) -> Result<(sled::Db, File)> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                crate::error::env(format!(
                    "cannot open the cache index lock {}: {e}",
                    Path::new(&lock_path).display()
                ))
            })?;
        let start = Instant::now();
        let mut noticed = false;
        let mut delay = Duration::from_millis(2);
        loop {
            match try_lock_exclusive(&lock) {
                Ok(true) => break,
                Ok(false) => self.wait_for_lock(start, &mut noticed, &mut delay)?,
                Err(e) => crate::env_bail!(
                    "cannot lock the cache index lock {}: {e}",
                    Path::new(&lock_path).display()
                ),
            }
        }
        Ok((self.open_locked()?, lock))
    }

    /// Sleep before the next try at a lock another process holds; an error after LOCK_TIMEOUT.
    fn wait_for_lock(
        &self,
        start: Instant,
        noticed: &mut bool,
        delay: &mut Duration,
    ) -> Result<()> {
        if start.elapsed() > LOCK_TIMEOUT {
            crate::env_bail!(
                "the cache index {} stayed locked by another mlcb process for {}s; if no mlcb is running, another program holds it",
                self.path.display(),
                LOCK_TIMEOUT.as_secs()
            );
        }
        if !*noticed && start.elapsed() > WAIT_NOTICE_AFTER {
            tracing::warn!(
                "waiting for the cache index {}: another mlcb process is using it",
                self.path.display()
            );
            *noticed = true;
        }
        std::thread::sleep(*delay);
        *delay = (*delay * 2).min(Duration::from_millis(50));
        Ok(())
    }

    /// Open the database; the caller holds the index lock.
    fn open_locked(&self) -> Result<sled::Db> {
        let start = Instant::now();
        let mut noticed = false;
        let mut delay = Duration::from_millis(2);
        let mut recoveries = 0;
        loop {
            match sled::Config::new().path(&self.path).flush_every_ms(None).open() {
                Ok(db) => return Ok(db),
                // Only a process that does not take our lock (an older mlcb) can hold sled's.
                Err(sled::Error::Io(e)) if is_lock_error(&e) => {
                    self.wait_for_lock(start, &mut noticed, &mut delay)?
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

/// `flock(LOCK_EX | LOCK_NB)`: Ok(false) when another open file holds it. (std's `File::try_lock`
/// needs Rust 1.89, above this crate's MSRV.) The lock goes when the file is closed.
fn try_lock_exclusive(f: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this `File` owns for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Two handles on one index (as two processes would have) take turns: the second waits for
    /// the first to release instead of failing, and then sees what the first wrote.
    #[test]
    fn a_second_opener_waits_for_the_first_and_sees_its_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("index.sled");
        let first = Index::new(&path);
        let second = Arc::new(Index::new(&path));
        let done = Arc::new(AtomicBool::new(false));
        let waiter = first
            .with(|s| {
                put_json(s, "k", &7u32)?;
                let (second, flag) = (second.clone(), done.clone());
                let waiter = std::thread::spawn(move || {
                    let v: Option<u32> = second.with(|s| get_json(s, "k")).unwrap();
                    second.release();
                    flag.store(true, Ordering::SeqCst);
                    v
                });
                std::thread::sleep(Duration::from_millis(200));
                assert!(
                    !done.load(Ordering::SeqCst),
                    "opened while the first held it"
                );
                Ok(waiter)
            })
            .unwrap();
        first.release();
        assert_eq!(waiter.join().unwrap(), Some(7));
    }
}
