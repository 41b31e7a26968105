//! The shared remote cache: stage records and blobs in an object store (S3 and S3-compatible
//! servers, GCS, Azure, or a folder on a shared filesystem), so a fleet of release builders
//! computes each stage once.
//!
//! Layout under the URL's prefix: `records/<stage key>.json` (the [`StageRecord`], key inputs
//! included) and `blobs/<blake3 digest>`. A builder uploads a stage's blobs first and its record
//! last, so a record is only ever visible once its blobs are.
//!
//! Nothing from the remote is trusted: a record must name exactly the key and key inputs asked
//! for and well-formed digests, and each blob is downloaded into the cache's `tmp/`, hashed while
//! it streams (and cut off past its recorded size), and only renamed into the blob store when its
//! blake3 equals its name. A corrupt blob is a warning: the stage is recomputed, and in
//! read-write mode the good blob is uploaded over the bad one.
//!
//! Failure policy (a decision, see README): a remote cache only saves time, so a remote that is
//! unreachable, refuses us or errors is skipped for the rest of the build with one warning and
//! the build computes what it needs (uploads that fail are warnings too). With
//! `--remote-cache-required` (or `remote_required = true`) it is an environment error (exit 3)
//! instead. A malformed URL or unsupported scheme is a user error (exit 2) before anything runs.
//!
//! object_store is async: the remote owns a small tokio runtime of its own and stages (which run
//! on blocking threads of the scheduler's runtime) hand it one future at a time and wait for the
//! answer on a channel. HTTP connections therefore always live on the same runtime, whichever
//! scheduler runtime is current, and no stage thread ever enters a runtime itself.

use super::blobs::{is_digest, BlobStore};
use super::key::KeyInputs;
use super::remote_config::{RemoteMode, RemoteSettings, StoreKind};
use super::StageRecord;
use anyhow::{anyhow, Context, Result};
use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Serialize;
use std::collections::HashSet;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Blobs up to this size are uploaded with one PUT; larger ones in parts of this size.
const PART: usize = 16 << 20;
/// Downloads are written in blocks of at least this size.
const BLOCK: usize = 8 << 20;
/// A record is small JSON; a bigger object under `records/` is not one of ours.
const MAX_RECORD_BYTES: u64 = 4 << 20;

/// What the remote did in this build (for the `--json` report and the summary line).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RemoteStats {
    /// Stages satisfied by downloading them.
    pub hits: usize,
    /// Stages looked up and not found (or found unusable).
    pub misses: usize,
    /// Records uploaded (stages published).
    pub uploads: usize,
    pub blobs_downloaded: usize,
    pub bytes_downloaded: u64,
    pub blobs_uploaded: usize,
    pub bytes_uploaded: u64,
    /// Remote blobs or records that failed verification (each one was recomputed).
    pub corrupt: usize,
    /// Set once the remote failed: it was skipped from then on.
    pub unavailable: Option<String>,
    /// Set once an upload failed: no more uploads were tried.
    pub uploads_failed: Option<String>,
}

/// A report of the remote for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteReport {
    pub url: String,
    pub mode: &'static str,
    #[serde(flatten)]
    pub stats: RemoteStats,
}

/// A stage fetched from the remote.
pub struct RemoteHit {
    pub record: StageRecord,
    /// Wall seconds spent looking it up and downloading it.
    pub seconds: f64,
}

/// Why a blob could not be downloaded.
enum BlobFetch {
    Missing,
    Corrupt(String),
}

pub struct Remote {
    url: String,
    mode: RemoteMode,
    required: bool,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    down: AtomicBool,
    no_uploads: AtomicBool,
    stats: Mutex<RemoteStats>,
    /// Digests found corrupt on the remote in this build: uploaded again even though present.
    suspect: Mutex<HashSet<String>>,
}

impl Drop for Remote {
    fn drop(&mut self) {
        // Dropping a runtime blocks; shutting it down in the background never does, wherever the
        // last reference goes.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Retries kept short: a dead endpoint must cost seconds, not the default minutes.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(15),
    }
}

/// Connect quickly or give up; a request may take long in total (a blob may be gigabytes), but a
/// transfer that stalls for a minute fails. Applied key by key so the client settings the
/// builders read from the environment (e.g. `AWS_ALLOW_HTTP`) are kept.
const CLIENT_SETTINGS: &[(object_store::ClientConfigKey, &str)] = &[
    (object_store::ClientConfigKey::ConnectTimeout, "5s"),
    (object_store::ClientConfigKey::Timeout, "6h"),
    (object_store::ClientConfigKey::ReadTimeout, "60s"),
];

#[cfg(test)]
fn client_options() -> object_store::ClientOptions {
    CLIENT_SETTINGS
        .iter()
        .fold(object_store::ClientOptions::new(), |o, (k, v)| {
            o.with_config(*k, *v)
        })
}

impl Remote {
    /// Build the store client for `settings` (no network). A URL the store's builder rejects is
    /// a user error. Credentials and endpoints come only from the environment (and, for GCS and
    /// Azure, the standard credential files their builders read): `from_env()` of each builder.
    pub fn open(settings: &RemoteSettings) -> Result<Remote> {
        let url = &settings.url;
        let text = url.text.as_str();
        let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match url.kind {
            StoreKind::S3 => CLIENT_SETTINGS
                .iter()
                .fold(
                    object_store::aws::AmazonS3Builder::from_env().with_url(text),
                    |b, (k, v)| b.with_config(object_store::aws::AmazonS3ConfigKey::Client(*k), *v),
                )
                .with_retry(retry_config())
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
            StoreKind::Gcs => CLIENT_SETTINGS
                .iter()
                .fold(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(text),
                    |b, (k, v)| b.with_config(object_store::gcp::GoogleConfigKey::Client(*k), *v),
                )
                .with_retry(retry_config())
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
            StoreKind::Azure => CLIENT_SETTINGS
                .iter()
                .fold(
                    object_store::azure::MicrosoftAzureBuilder::from_env().with_url(text),
                    |b, (k, v)| b.with_config(object_store::azure::AzureConfigKey::Client(*k), *v),
                )
                .with_retry(retry_config())
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
            StoreKind::Folder => {
                let dir = url.folder.as_deref().expect("file URLs have a folder");
                std::fs::create_dir_all(dir).map_err(|e| {
                    crate::error::env(format!(
                        "cannot create the remote cache folder {} ({text}): {e}",
                        dir.display()
                    ))
                })?;
                object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            }
        };
        let store = built.map_err(|e| {
            crate::error::user(format!(
                "cannot set up the remote cache {text}: {e}; check the URL and the store's environment variables (e.g. AWS_REGION, AWS_ENDPOINT for S3)"
            ))
        })?;
        Remote::with_store(store, &url.prefix, text, settings.mode, settings.required)
    }

    /// A remote over any object store (tests use an in-memory one).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
        mode: RemoteMode,
        required: bool,
    ) -> Result<Remote> {
        // reqwest is built without a TLS crypto provider of its own (no aws-lc): use ring. main()
        // installs it too; this covers library callers. Err = one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mlcb-remote")
            .enable_all()
            .build()
            .map_err(|e| {
                crate::error::env(format!("cannot start the remote cache runtime: {e}"))
            })?;
        Ok(Remote {
            url: url.to_string(),
            mode,
            required,
            store,
            prefix: prefix.trim_matches('/').to_string(),
            rt: Some(rt),
            down: AtomicBool::new(false),
            no_uploads: AtomicBool::new(false),
            stats: Mutex::new(RemoteStats::default()),
            suspect: Mutex::new(HashSet::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn mode(&self) -> RemoteMode {
        self.mode
    }

    pub fn report(&self) -> RemoteReport {
        RemoteReport {
            url: self.url.clone(),
            mode: self.mode.name(),
            stats: self.stats().clone(),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, RemoteStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key_path(&self, rest: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(rest)
        } else {
            StorePath::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn record_path(&self, key: &str) -> StorePath {
        self.key_path(&format!("records/{key}.json"))
    }

    fn blob_path(&self, digest: &str) -> StorePath {
        self.key_path(&format!("blobs/{digest}"))
    }

    /// Run a future on the remote's runtime and wait for it (called from stage threads).
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let rt = self.rt.as_ref().expect("runtime present until drop");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| anyhow!("the remote cache task for {} ended early", self.url))
    }

    /// A remote failure: with `required`, an environment error naming the URL; else a warning
    /// (once) and the remote is skipped for the rest of the build.
    fn fail(&self, what: &str, err: &dyn std::fmt::Display) -> Result<()> {
        let msg = format!("remote cache {}: {what}: {err}", self.url);
        if self.required {
            return Err(crate::error::env(format!(
                "{msg}; the remote cache is required (--remote-cache-required): check the endpoint, network and credentials"
            )));
        }
        if !self.down.swap(true, Ordering::SeqCst) {
            eprintln!(
                "warning: {msg}; continuing without the remote cache (stages are computed locally)"
            );
            self.stats().unavailable = Some(msg);
        }
        Ok(())
    }

    fn fail_upload(&self, what: &str, err: &dyn std::fmt::Display) -> Result<()> {
        let msg = format!("remote cache {}: {what}: {err}", self.url);
        if self.required {
            return Err(crate::error::env(format!(
                "{msg}; the remote cache is required (--remote-cache-required)"
            )));
        }
        if !self.no_uploads.swap(true, Ordering::SeqCst) {
            eprintln!("warning: {msg}; no more uploads in this build (the build itself goes on)");
            self.stats().uploads_failed = Some(msg);
        }
        Ok(())
    }

    fn corrupt(&self, what: String) {
        eprintln!("warning: {what}");
        self.stats().corrupt += 1;
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Look `key` up on the remote and download its blobs into `blobs` (verified). `Ok(None)`: a
    /// miss (absent, unusable, or the remote is down); the caller computes the stage. `Err` only
    /// when the remote is required and failed, or the local cache cannot be written.
    pub fn fetch(
        &self,
        blobs: &BlobStore,
        key: &str,
        inputs: &KeyInputs,
    ) -> Result<Option<RemoteHit>> {
        if self.is_down() {
            return Ok(None);
        }
        let start = Instant::now();
        let Some(record) = self.fetch_record(key, inputs)? else {
            self.stats().misses += 1;
            return Ok(None);
        };
        for (name, out) in &record.outputs {
            if blobs.contains(&out.digest) {
                continue;
            }
            match self.fetch_blob(blobs, &out.digest, out.size)? {
                Ok(()) => {}
                Err(BlobFetch::Missing) => {
                    if !self.is_down() {
                        tracing::warn!(
                            "remote cache {}: record {key} names blob {} ({name}), which is missing; computing the stage",
                            self.url, out.digest
                        );
                    }
                    self.stats().misses += 1;
                    return Ok(None);
                }
                Err(BlobFetch::Corrupt(why)) => {
                    self.corrupt(format!(
                        "remote cache {}: blob {} (output `{name}` of stage {}) is corrupt: {why}; recomputing the stage{}",
                        self.url,
                        out.digest,
                        record.inputs.stage,
                        if self.mode == RemoteMode::ReadWrite {
                            " and uploading the good blob"
                        } else {
                            ""
                        }
                    ));
                    self.suspect
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(out.digest.clone());
                    self.stats().misses += 1;
                    return Ok(None);
                }
            }
        }
        self.stats().hits += 1;
        Ok(Some(RemoteHit {
            record,
            seconds: start.elapsed().as_secs_f64(),
        }))
    }

    /// The record for `key`, checked against the key inputs asked for.
    fn fetch_record(&self, key: &str, inputs: &KeyInputs) -> Result<Option<StageRecord>> {
        let (store, path) = (self.store.clone(), self.record_path(key));
        let got = self.block(async move {
            let r = store.get(&path).await?;
            if r.meta.size > MAX_RECORD_BYTES {
                return Ok(Err(r.meta.size));
            }
            r.bytes().await.map(|b| Ok(b.to_vec()))
        })?;
        let bytes = match got {
            Ok(Ok(b)) => b,
            Ok(Err(size)) => {
                self.corrupt(format!(
                    "remote cache {}: record {key} is {size} bytes, not a stage record; recomputing the stage",
                    self.url
                ));
                return Ok(None);
            }
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                self.fail(&format!("reading record {key}"), &e)?;
                return Ok(None);
            }
        };
        match check_record(&bytes, key, inputs) {
            Ok(r) => Ok(Some(r)),
            Err(why) => {
                self.corrupt(format!(
                    "remote cache {}: record {key} is unusable ({why}); recomputing the stage",
                    self.url
                ));
                Ok(None)
            }
        }
    }

    /// Download one blob to the cache's tmp/, verifying size and digest, then rename it in.
    /// Outer `Err`: required remote failed or local disk error. Inner: missing or corrupt.
    fn fetch_blob(
        &self,
        blobs: &BlobStore,
        digest: &str,
        size: u64,
    ) -> Result<std::result::Result<(), BlobFetch>> {
        let (store, path) = (self.store.clone(), self.blob_path(digest));
        let got = self.block(async move { store.get(&path).await })?;
        let res = match got {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(Err(BlobFetch::Missing)),
            Err(e) => {
                self.fail(&format!("reading blob {digest}"), &e)?;
                return Ok(Err(BlobFetch::Missing));
            }
        };
        if res.meta.size != size {
            return Ok(Err(BlobFetch::Corrupt(format!(
                "the remote object has {} bytes, the record says {size}",
                res.meta.size
            ))));
        }
        let tmp = blobs.temp_path("remote")?;
        let result = self.stream_to(res.into_stream(), &tmp, size, digest);
        match result {
            Ok(Ok(())) => {
                blobs.adopt_verified(&tmp, digest)?;
                let mut s = self.stats();
                s.blobs_downloaded += 1;
                s.bytes_downloaded += size;
                Ok(Ok(()))
            }
            other => {
                std::fs::remove_file(&tmp).ok();
                other
            }
        }
    }

    fn stream_to(
        &self,
        mut stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
        tmp: &Path,
        size: u64,
        digest: &str,
    ) -> Result<std::result::Result<(), BlobFetch>> {
        let mut file = File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut written = 0u64;
        loop {
            // Gather at least BLOCK bytes per round trip to the runtime.
            let (s, block) = self.block(async move {
                let mut buf: Vec<u8> = Vec::new();
                while buf.len() < BLOCK {
                    match stream.next().await {
                        Some(Ok(b)) => buf.extend_from_slice(&b),
                        Some(Err(e)) => return (stream, Err(e)),
                        None => break,
                    }
                }
                (stream, Ok(buf))
            })?;
            stream = s;
            let buf = match block {
                Ok(b) => b,
                Err(e) => {
                    self.fail(&format!("downloading blob {digest}"), &e)?;
                    return Ok(Err(BlobFetch::Missing));
                }
            };
            if buf.is_empty() {
                break;
            }
            written += buf.len() as u64;
            if written > size {
                return Ok(Err(BlobFetch::Corrupt(format!(
                    "the download ran past the recorded {size} bytes"
                ))));
            }
            hasher.update(&buf);
            file.write_all(&buf)
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        let got = hasher.finalize().to_hex().to_string();
        if written != size || got != digest {
            return Ok(Err(BlobFetch::Corrupt(format!(
                "downloaded {written} bytes hashing to {got}"
            ))));
        }
        Ok(Ok(()))
    }

    /// Upload a computed stage: its blobs (skipping ones already there, unless found corrupt in
    /// this build), then its record. Read-only mode and a remote that failed do nothing.
    /// `Err` only when the remote is required.
    pub fn publish(&self, blobs: &BlobStore, record: &StageRecord) -> Result<()> {
        if self.mode == RemoteMode::ReadOnly
            || self.is_down()
            || self.no_uploads.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        for out in record.outputs.values() {
            let force = self
                .suspect
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&out.digest);
            match self.upload_blob(blobs, &out.digest, out.size, force) {
                Ok(true) => {
                    let mut s = self.stats();
                    s.blobs_uploaded += 1;
                    s.bytes_uploaded += out.size;
                }
                Ok(false) => {}
                Err(e) => {
                    return self
                        .fail_upload(&format!("uploading blob {}", out.digest), &format!("{e:#}"))
                }
            }
            if force {
                self.suspect
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&out.digest);
            }
        }
        let json = serde_json::to_vec_pretty(record)?;
        let (store, path) = (self.store.clone(), self.record_path(&record.key));
        match self.block(async move { store.put(&path, PutPayload::from(json)).await })? {
            Ok(_) => {
                self.stats().uploads += 1;
                Ok(())
            }
            Err(e) => self.fail_upload(&format!("uploading record {}", record.key), &e),
        }
    }

    /// Publish a stage this build found in its local cache, if the remote lacks its record (a
    /// builder that had it before the remote was configured still shares it).
    pub fn publish_if_missing(&self, blobs: &BlobStore, record: &StageRecord) -> Result<()> {
        if self.mode == RemoteMode::ReadOnly
            || self.is_down()
            || self.no_uploads.load(Ordering::SeqCst)
        {
            return Ok(());
        }
        let (store, path) = (self.store.clone(), self.record_path(&record.key));
        match self.block(async move { store.head(&path).await })? {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => self.publish(blobs, record),
            Err(e) => self.fail(&format!("checking record {}", record.key), &e),
        }
    }

    /// Upload one local blob (verified while read). `Ok(false)`: already on the remote.
    fn upload_blob(&self, blobs: &BlobStore, digest: &str, size: u64, force: bool) -> Result<bool> {
        let path = self.blob_path(digest);
        if !force {
            let (store, p) = (self.store.clone(), path.clone());
            match self.block(async move { store.head(&p).await })? {
                Ok(meta) if meta.size == size => return Ok(false),
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let local = blobs.path(digest);
        let mut file = File::open(&local)
            .with_context(|| format!("opening cache blob {}", local.display()))?;
        let mut hasher = blake3::Hasher::new();
        if size as usize <= PART {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes)
                .with_context(|| format!("reading {}", local.display()))?;
            hasher.update(&bytes);
            check_local(&hasher, digest, &local)?;
            let store = self.store.clone();
            self.block(async move { store.put(&path, PutPayload::from(bytes)).await })??;
            return Ok(true);
        }
        let store = self.store.clone();
        let p = path.clone();
        let upload = self.block(async move { store.put_multipart(&p).await })??;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; PART];
        loop {
            let n = read_full(&mut file, &mut buf)
                .with_context(|| format!("reading {}", local.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            {
                // `write` spawns the part upload: it must run inside the remote's runtime.
                let _in_rt = self.rt.as_ref().expect("runtime present").enter();
                w.write(&buf[..n]);
            }
            let (w2, r) = self.block(async move {
                let r = w.wait_for_capacity(4).await;
                (w, r)
            })?;
            w = w2;
            if let Err(e) = r {
                self.block(async move { w.abort().await }).ok();
                return Err(e.into());
            }
        }
        if let Err(e) = check_local(&hasher, digest, &local) {
            self.block(async move { w.abort().await }).ok();
            return Err(e);
        }
        self.block(async move { w.finish().await })??;
        Ok(true)
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// A local blob about to be uploaded must still match its name (never spread a corrupt one).
fn check_local(hasher: &blake3::Hasher, digest: &str, path: &Path) -> Result<()> {
    if hasher.finalize().to_hex().as_str() != digest {
        return Err(anyhow::Error::new(super::blobs::CorruptBlob {
            digest: digest.to_string(),
            path: path.to_path_buf(),
        }));
    }
    Ok(())
}

/// Parse a remote record and check it is the one asked for.
fn check_record(bytes: &[u8], key: &str, inputs: &KeyInputs) -> Result<StageRecord, String> {
    let rec: StageRecord =
        serde_json::from_slice(bytes).map_err(|e| format!("not a stage record: {e}"))?;
    if rec.key != key {
        return Err(format!("it names key {}", rec.key));
    }
    if &rec.inputs != inputs || rec.inputs.key() != key {
        return Err("its key inputs differ from this stage's".into());
    }
    if let Some((name, o)) = rec.outputs.iter().find(|(_, o)| !is_digest(&o.digest)) {
        return Err(format!(
            "output `{name}` has a malformed digest {:?}",
            o.digest
        ));
    }
    if !rec.seconds.is_finite() || rec.seconds < 0.0 {
        return Err(format!("its time {} is not a duration", rec.seconds));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::OutputRef;
    use crate::error::{class_of, ErrorClass};
    use object_store::memory::InMemory;

    /// A local blob store holding `payloads`, and the record of a stage that made them.
    fn stage(dir: &Path, payloads: &[&[u8]]) -> (BlobStore, StageRecord) {
        let blobs = BlobStore::new(dir);
        let inputs = KeyInputs::new("quantize", 1).with("weights", "w1");
        let outputs = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let digest = blobs.put_bytes(p).unwrap();
                (
                    format!("out{i}"),
                    OutputRef {
                        digest,
                        size: p.len() as u64,
                    },
                )
            })
            .collect();
        let rec = StageRecord {
            key: inputs.key(),
            inputs,
            outputs,
            seconds: 1.5,
        };
        (blobs, rec)
    }

    fn remote(store: &Arc<InMemory>, mode: RemoteMode) -> Remote {
        Remote::with_store(
            store.clone(),
            "fleet/v1/",
            "memory:///fleet/v1",
            mode,
            false,
        )
        .unwrap()
    }

    fn get(r: &Remote, path: StorePath) -> Option<Vec<u8>> {
        let store = r.store.clone();
        r.block(async move {
            match store.get(&path).await {
                Ok(g) => Some(g.bytes().await.unwrap().to_vec()),
                Err(_) => None,
            }
        })
        .unwrap()
    }

    fn put(r: &Remote, path: StorePath, bytes: Vec<u8>) {
        let store = r.store.clone();
        r.block(async move { store.put(&path, PutPayload::from(bytes)).await })
            .unwrap()
            .unwrap();
    }

    #[test]
    fn publish_then_fetch_into_a_fresh_cache() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let big: Vec<u8> = (0..PART + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let (blobs_a, rec) = stage(a.path(), &[b"tokenizer", &big]);
        let store = Arc::new(InMemory::new());
        let ra = remote(&store, RemoteMode::ReadWrite);
        ra.publish(&blobs_a, &rec).unwrap();
        let s = ra.report().stats;
        assert_eq!((s.uploads, s.blobs_uploaded), (1, 2));
        assert_eq!(s.bytes_uploaded, 9 + big.len() as u64);
        // The layout under the prefix.
        let json = get(
            &ra,
            StorePath::from(format!("fleet/v1/records/{}.json", rec.key)),
        )
        .unwrap();
        assert_eq!(serde_json::from_slice::<StageRecord>(&json).unwrap(), rec);
        let d = &rec.outputs["out1"].digest;
        assert_eq!(
            get(&ra, StorePath::from(format!("fleet/v1/blobs/{d}"))).unwrap(),
            big
        );
        // Publishing again uploads the record only (blobs are there).
        ra.publish(&blobs_a, &rec).unwrap();
        assert_eq!(ra.report().stats.blobs_uploaded, 2);

        let blobs_b = BlobStore::new(b.path());
        let rb = remote(&store, RemoteMode::ReadOnly);
        let hit = rb.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().unwrap();
        assert_eq!(hit.record, rec);
        for o in rec.outputs.values() {
            assert_eq!(
                blobs_b.read_verified(&o.digest).unwrap().len() as u64,
                o.size
            );
        }
        let s = rb.report().stats;
        assert_eq!((s.hits, s.misses, s.blobs_downloaded), (1, 0, 2));
        // Unknown key: a miss.
        let other = KeyInputs::new("quantize", 1).with("weights", "w2");
        assert!(rb.fetch(&blobs_b, &other.key(), &other).unwrap().is_none());
        assert_eq!(rb.report().stats.misses, 1);
    }

    #[test]
    fn corrupt_remote_blob_is_refused_then_repaired_by_a_read_write_builder() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (blobs_a, rec) = stage(a.path(), &[b"good weights"]);
        let store = Arc::new(InMemory::new());
        let ra = remote(&store, RemoteMode::ReadWrite);
        ra.publish(&blobs_a, &rec).unwrap();
        let d = rec.outputs["out0"].digest.clone();
        let blob = StorePath::from(format!("fleet/v1/blobs/{d}"));
        put(&ra, blob.clone(), b"evil weights".to_vec()); // same size, other bytes

        let blobs_b = BlobStore::new(b.path());
        let rb = remote(&store, RemoteMode::ReadWrite);
        assert!(rb.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().is_none());
        assert!(
            !blobs_b.contains(&d),
            "a corrupt download must not enter the cache"
        );
        let tmp_left = std::fs::read_dir(b.path().join("tmp"))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(tmp_left, 0, "the partial download is removed");
        assert_eq!(rb.report().stats.corrupt, 1);
        // B recomputes the stage (same bytes) and publishes: the bad blob is overwritten even
        // though one of the right size is present.
        blobs_b.put_bytes(b"good weights").unwrap();
        rb.publish(&blobs_b, &rec).unwrap();
        assert_eq!(get(&rb, blob).unwrap(), b"good weights");
        let c = tempfile::tempdir().unwrap();
        let blobs_c = BlobStore::new(c.path());
        assert!(rb.fetch(&blobs_c, &rec.key, &rec.inputs).unwrap().is_some());
    }

    #[test]
    fn wrong_size_and_mismatched_records_are_misses() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (blobs_a, rec) = stage(a.path(), &[b"abc"]);
        let store = Arc::new(InMemory::new());
        let r = remote(&store, RemoteMode::ReadWrite);
        r.publish(&blobs_a, &rec).unwrap();
        let blobs_b = BlobStore::new(b.path());
        // A longer blob than recorded.
        let d = &rec.outputs["out0"].digest;
        put(
            &r,
            StorePath::from(format!("fleet/v1/blobs/{d}")),
            b"abcd".to_vec(),
        );
        assert!(r.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().is_none());
        assert_eq!(r.report().stats.corrupt, 1);
        // A record stored under this key whose inputs are another stage's.
        let mut forged = rec.clone();
        forged.inputs = forged.inputs.clone().with("weights", "w9");
        let rp = StorePath::from(format!("fleet/v1/records/{}.json", rec.key));
        put(&r, rp.clone(), serde_json::to_vec(&forged).unwrap());
        assert!(r.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().is_none());
        // A record with a digest that is not a digest (it would name a path).
        let mut bad = rec.clone();
        bad.outputs.get_mut("out0").unwrap().digest = "../../etc/passwd".into();
        put(&r, rp.clone(), serde_json::to_vec(&bad).unwrap());
        assert!(r.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().is_none());
        // Not JSON.
        put(&r, rp, b"\x00garbage".to_vec());
        assert!(r.fetch(&blobs_b, &rec.key, &rec.inputs).unwrap().is_none());
        assert_eq!(r.report().stats.corrupt, 4);
        assert_eq!(r.report().stats.hits, 0);
    }

    #[test]
    fn read_only_mode_uploads_nothing() {
        let a = tempfile::tempdir().unwrap();
        let (blobs_a, rec) = stage(a.path(), &[b"x"]);
        let store = Arc::new(InMemory::new());
        let r = remote(&store, RemoteMode::ReadOnly);
        r.publish(&blobs_a, &rec).unwrap();
        r.publish_if_missing(&blobs_a, &rec).unwrap();
        assert_eq!(r.report().stats.uploads, 0);
        let rw = remote(&store, RemoteMode::ReadWrite);
        assert!(get(&rw, rw.record_path(&rec.key)).is_none());
        // publish_if_missing in read-write mode does upload.
        rw.publish_if_missing(&blobs_a, &rec).unwrap();
        assert!(get(&rw, rw.record_path(&rec.key)).is_some());
    }

    #[test]
    fn local_corrupt_blob_is_never_uploaded() {
        let a = tempfile::tempdir().unwrap();
        let (blobs_a, rec) = stage(a.path(), &[b"payload"]);
        std::fs::write(blobs_a.path(&rec.outputs["out0"].digest), b"tampere").unwrap();
        let store = Arc::new(InMemory::new());
        let r = remote(&store, RemoteMode::ReadWrite);
        r.publish(&blobs_a, &rec).unwrap();
        assert!(get(&r, r.record_path(&rec.key)).is_none());
        assert!(r.report().stats.uploads_failed.is_some());
    }

    /// An S3 endpoint nobody listens on: explicit credentials (no metadata-service probe), only
    /// 127.0.0.1.
    fn dead_s3(required: bool) -> Remote {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // Client options first: they carry allow_http, which must come after.
        let store = object_store::aws::AmazonS3Builder::new()
            .with_client_options(client_options())
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_bucket_name("b")
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_allow_http(true)
            .with_retry(retry_config())
            .build()
            .unwrap();
        Remote::with_store(
            Arc::new(store),
            "p",
            "s3://b/p",
            RemoteMode::ReadWrite,
            required,
        )
        .unwrap()
    }

    #[test]
    fn dead_endpoint_is_skipped_quickly_or_fails_when_required() {
        let a = tempfile::tempdir().unwrap();
        let (blobs, rec) = stage(a.path(), &[b"x"]);
        let r = dead_s3(false);
        let start = Instant::now();
        assert!(r.fetch(&blobs, &rec.key, &rec.inputs).unwrap().is_none());
        assert!(r.is_down());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let why = r.report().stats.unavailable.unwrap();
        assert!(why.contains("s3://b/p"), "{why}");
        assert!(
            !why.contains("builder error"),
            "must reach the connect: {why}"
        );
        // Once down, no more attempts (instant), and publishing is a no-op.
        let t = Instant::now();
        assert!(r.fetch(&blobs, &rec.key, &rec.inputs).unwrap().is_none());
        r.publish(&blobs, &rec).unwrap();
        assert!(t.elapsed() < Duration::from_millis(200));

        let r = dead_s3(true);
        let e = r.fetch(&blobs, &rec.key, &rec.inputs).err().unwrap();
        assert_eq!(class_of(&e), ErrorClass::Environment);
        assert!(e.to_string().contains("s3://b/p"), "{e}");
    }

    #[test]
    fn file_url_opens_a_folder_store() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared/cache");
        let url = format!("file://{}", shared.display());
        let settings = RemoteSettings {
            url: super::super::remote_config::RemoteUrl::parse(&url).unwrap(),
            mode: RemoteMode::ReadWrite,
            required: false,
        };
        let r = Remote::open(&settings).unwrap();
        let (blobs, rec) = stage(&dir.path().join("a"), &[b"hello"]);
        r.publish(&blobs, &rec).unwrap();
        assert!(shared.join(format!("records/{}.json", rec.key)).is_file());
        let d = &rec.outputs["out0"].digest;
        assert_eq!(
            std::fs::read(shared.join(format!("blobs/{d}"))).unwrap(),
            b"hello"
        );
    }
}
