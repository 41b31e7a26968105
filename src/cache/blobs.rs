//! Content-addressed blob store: `blobs/<first two hex>/<blake3 hex>`. Written through a temporary
//! file in `tmp/` and renamed into place, so a blob is either absent or complete, whatever process
//! writes it and whenever it is killed. Readers check the digest while copying out.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub struct BlobStore {
    root: PathBuf,
    tmp: PathBuf,
}

/// A blob whose bytes no longer hash to its name: evicted; the stage that made it must rerun.
#[derive(Debug)]
pub struct CorruptBlob {
    pub digest: String,
    pub path: PathBuf,
}

impl std::fmt::Display for CorruptBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cache blob {} does not match its digest {}; evicted",
            self.path.display(),
            self.digest
        )
    }
}
impl std::error::Error for CorruptBlob {}

const BUF: usize = 1 << 20;

impl BlobStore {
    pub fn new(cache_root: &Path) -> BlobStore {
        BlobStore {
            root: cache_root.join("blobs"),
            tmp: cache_root.join("tmp"),
        }
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        self.root.join(&digest[..2]).join(digest)
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_file()
    }

    /// A fresh temporary path in the cache's own filesystem (so rename is atomic).
    pub fn temp_path(&self, hint: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.tmp)
            .with_context(|| format!("creating {}", self.tmp.display()))?;
        let nonce: u64 = rand_nonce();
        Ok(self.tmp.join(format!(
            "{}-{}-{nonce:016x}.tmp",
            std::process::id(),
            sanitize(hint)
        )))
    }

    /// Move a finished file into the store (consumes it). Returns its digest and size.
    pub fn put_file(&self, file: &Path) -> Result<(String, u64)> {
        let (digest, size) = hash_file(file)?;
        let dest = self.path(&digest);
        if dest.is_file() {
            std::fs::remove_file(file).ok();
            return Ok((digest, size));
        }
        std::fs::create_dir_all(dest.parent().unwrap())
            .with_context(|| format!("creating {}", dest.display()))?;
        std::fs::rename(file, &dest)
            .with_context(|| format!("moving {} into the cache", file.display()))?;
        Ok((digest, size))
    }

    /// Move a temporary file whose blake3 the caller has just computed as `digest` (a verified
    /// download) into the store, without hashing it again.
    pub fn adopt_verified(&self, file: &Path, digest: &str) -> Result<()> {
        if !is_digest(digest) {
            anyhow::bail!("not a blob digest: {digest:?}");
        }
        let dest = self.path(digest);
        if dest.is_file() {
            std::fs::remove_file(file).ok();
            return Ok(());
        }
        std::fs::create_dir_all(dest.parent().unwrap())
            .with_context(|| format!("creating {}", dest.display()))?;
        std::fs::rename(file, &dest)
            .with_context(|| format!("moving {} into the cache", file.display()))?;
        Ok(())
    }

    /// Store bytes. Returns their digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let digest = blake3::hash(bytes).to_hex().to_string();
        let dest = self.path(&digest);
        if dest.is_file() {
            return Ok(digest);
        }
        let tmp = self.temp_path("bytes")?;
        write_synced(&tmp, bytes)?;
        std::fs::create_dir_all(dest.parent().unwrap())
            .with_context(|| format!("creating {}", dest.display()))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("moving a blob into {}", dest.display()))?;
        Ok(digest)
    }

    /// Read a small blob fully, checking its digest.
    pub fn read_verified(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading cache blob {}", path.display()))?;
        if blake3::hash(&bytes).to_hex().as_str() != digest {
            self.evict(digest);
            return Err(anyhow::Error::new(CorruptBlob {
                digest: digest.into(),
                path,
            }));
        }
        Ok(bytes)
    }

    /// Copy a blob to `dest`, hashing as it goes; a mismatch evicts the blob and fails with
    /// [`CorruptBlob`] (and removes the partial copy).
    pub fn copy_verified(&self, digest: &str, dest: &Path) -> Result<()> {
        let path = self.path(digest);
        let mut src =
            File::open(&path).with_context(|| format!("opening cache blob {}", path.display()))?;
        let mut out = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; BUF];
        loop {
            let n = src
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", dest.display()))?;
        }
        out.sync_all()
            .with_context(|| format!("syncing {}", dest.display()))?;
        if hasher.finalize().to_hex().as_str() != digest {
            drop(out);
            std::fs::remove_file(dest).ok();
            self.evict(digest);
            return Err(anyhow::Error::new(CorruptBlob {
                digest: digest.into(),
                path,
            }));
        }
        Ok(())
    }

    /// Remove this process's leftover temporary files (outputs that were moved are gone already).
    pub fn sweep_own_temp(&self) {
        let prefix = format!("{}-", std::process::id());
        if let Ok(rd) = std::fs::read_dir(&self.tmp) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let p = e.path();
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p).ok();
                    } else {
                        std::fs::remove_file(&p).ok();
                    }
                }
            }
        }
    }

    pub fn evict(&self, digest: &str) {
        let p = self.path(digest);
        tracing::warn!("cache blob {} is corrupt (digest mismatch): evicting it; the stage that made it will rerun", p.display());
        std::fs::remove_file(p).ok();
    }
}

/// A blake3 hex digest (64 lowercase hex digits): safe to use as a blob path.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// blake3 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hasher.finalize().to_hex().to_string(), size))
}

/// Write and fsync a file.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

/// A per-call unique number for temporary names (time and a counter; not for security).
pub fn rand_nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
