//! The shared remote cache end to end: two "machines" (two workspaces, each with its own cache
//! and dist folders) share one remote. Machine A builds and uploads; machine B downloads every
//! stage instead of computing it and gets a bit-identical dist. S3 tests run against moto's server
//! on 127.0.0.1 (skipped, loudly, when `moto_server` is not installed); the `file://` tests and
//! the failure-policy tests need no server. Nothing here talks to anything but 127.0.0.1.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BUCKET: &str = "mlcb-test";

/// moto's S3 server on a free 127.0.0.1 port, with the test bucket; killed on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn moto_installed() -> bool {
    Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Moto {
    /// None (with a loud message) when moto_server is not installed.
    fn start(test: &str) -> Option<Moto> {
        if !moto_installed() {
            eprintln!(
                "\n*** SKIPPING {test}: `moto_server` is not on PATH (pip install 'moto[server]'; .ci/run installs it) ***\n"
            );
            return None;
        }
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server");
            let mut moto = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = moto.child.try_wait() {
                    break; // exited (port taken?): try another port
                }
                if let Ok((200, _)) = moto.http("PUT", &format!("/{BUCKET}"), b"") {
                    return Some(moto);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            drop(moto);
        }
        panic!("moto_server did not start on 127.0.0.1");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request (moto accepts unsigned requests). Returns (status, body).
    fn http(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut body = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    /// A signed S3 client for the test bucket (moto refuses anonymous reads of objects).
    fn client(&self) -> object_store::aws::AmazonS3 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_allow_http(true)
            .build()
            .unwrap()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let (s, key) = (self.client(), object_store::path::Path::from(key));
        rt().block_on(async move {
            match s.get(&key).await {
                Ok(g) => Some(g.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("{e}"),
            }
        })
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        use object_store::ObjectStoreExt;
        let (s, key) = (self.client(), object_store::path::Path::from(key));
        rt().block_on(s.put(&key, bytes.to_vec().into())).unwrap();
    }

    /// Keys under a prefix (ListObjectsV2, first page is enough here).
    fn keys(&self, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .http(
                "GET",
                &format!("/{BUCKET}?list-type=2&prefix={prefix}"),
                b"",
            )
            .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body).to_string();
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(String::from)
            .collect()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// `mlcb ARGS` in workspace `w`, with only our own remote-cache and AWS settings (explicit test
/// credentials, so object_store never probes a metadata service).
fn mlcb(w: &Work, args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlcb"));
    c.args(args)
        .current_dir(w.path())
        .env("MLCB_CACHE_DIR", w.cache())
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("MLCB_REMOTE") || k == "MLCB_CONFIG" {
            c.env_remove(k);
        }
    }
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mlcb")
}

/// `mlcb build RECIPE --json …` in `w`; (report, wall seconds of the whole process).
fn build(
    w: &Work,
    recipe: &Path,
    extra: &[&str],
    env: &[(&str, String)],
) -> (serde_json::Value, f64) {
    let dist = w.dist().display().to_string();
    let mut args = vec![
        "build",
        recipe.to_str().unwrap(),
        "--json",
        "--artifact-path",
        &dist,
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = mlcb(w, &args, env);
    let secs = start.elapsed().as_secs_f64();
    assert_success(&out);
    eprint!("{}", stderr(&out));
    (
        serde_json::from_slice(&out.stdout).expect("json report"),
        secs,
    )
}

fn tiny_recipe(w: &Work) -> PathBuf {
    w.recipe(
        "tiny.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu"),
    )
}

/// stage name → status, for every node of a report.
fn status_map(report: &serde_json::Value) -> BTreeMap<String, String> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every file of a dist tree: relative path → bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The two machines' dist folders hold the same files with the same bytes. With `timings_differ`
/// (a stage was computed on both), the manifests may differ only in the stages' recorded seconds.
fn assert_same_dist(a: &Work, b: &Work, timings_differ: bool) {
    let (ta, tb) = (tree(&a.dist()), tree(&b.dist()));
    assert!(ta.keys().any(|k| k.ends_with("build-manifest.json")));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "same files"
    );
    for (k, v) in &ta {
        if timings_differ && k.ends_with("build-manifest.json") {
            let strip = |bytes: &[u8]| {
                let mut m: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                for s in m["stages"].as_array_mut().unwrap() {
                    s["seconds"] = serde_json::Value::Null;
                }
                m
            };
            assert_eq!(strip(v), strip(&tb[k]), "{k} differs beyond timings");
            continue;
        }
        assert!(v == &tb[k], "{k} differs between the two machines");
    }
}

fn remote_stats(report: &serde_json::Value) -> &serde_json::Value {
    &report["remote_cache"]
}

/// Machine A builds and uploads; machine B (fresh cache) downloads every cacheable stage.
fn a_then_b(url: &str, env: &[(&str, String)]) -> (Work, Work, serde_json::Value) {
    let (a, b) = (Work::new(), Work::new());
    let (ra, ta) = build(&a, &tiny_recipe(&a), &["--remote-cache", url], env);
    let sa = status_map(&ra);
    assert!(
        sa.values().all(|s| s == "ran"),
        "A computes everything: {sa:?}"
    );
    let cacheable = sa.keys().filter(|s| *s != "link").count();
    assert_eq!(remote_stats(&ra)["uploads"], cacheable as u64, "{ra:#}");
    let (rb, tb) = build(&b, &tiny_recipe(&b), &["--remote-cache", url], env);
    let sb = status_map(&rb);
    for (stage, status) in &sb {
        let want = if stage == "link" { "ran" } else { "remote" };
        assert_eq!(status, want, "machine B, stage {stage}: {sb:?}");
    }
    let st = remote_stats(&rb);
    assert_eq!(st["hits"], cacheable as u64);
    assert_eq!(st["misses"], 0);
    assert_eq!(st["uploads"], 0, "nothing new to upload");
    assert_same_dist(&a, &b, false);
    eprintln!(
        "remote cache {url}: machine B hit rate {}/{} stages; build wall time A {ta:.2}s (report {:.2}s), B {tb:.2}s (report {:.2}s)",
        st["hits"], cacheable, ra["seconds"], rb["seconds"]
    );
    (a, b, ra)
}

#[test]
fn s3_machine_b_downloads_every_stage_with_a_bit_identical_dist() {
    let Some(moto) = Moto::start("s3_machine_b_downloads_every_stage_with_a_bit_identical_dist")
    else {
        return;
    };
    let env = [("AWS_ENDPOINT", moto.endpoint())];
    let url = format!("s3://{BUCKET}/fleet");
    a_then_b(&url, &env);
    // The layout: records and blobs under the prefix.
    let keys = moto.keys("fleet/");
    assert!(keys
        .iter()
        .any(|k| k.starts_with("fleet/records/") && k.ends_with(".json")));
    assert!(keys.iter().any(|k| k.starts_with("fleet/blobs/")));
}

#[test]
fn s3_corrupted_remote_blob_is_detected_rebuilt_and_repaired() {
    let Some(moto) = Moto::start("s3_corrupted_remote_blob_is_detected_rebuilt_and_repaired")
    else {
        return;
    };
    let env = [("AWS_ENDPOINT", moto.endpoint())];
    let url = format!("s3://{BUCKET}/corrupt");
    let a = Work::new();
    let (ra, _) = build(&a, &tiny_recipe(&a), &["--remote-cache", &url], &env);
    // Flip one byte of a quantize output on the remote, keeping its size.
    let quantize = ra["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "quantize")
        .unwrap();
    let digest = quantize["outputs"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let key = format!("corrupt/blobs/{digest}");
    let mut bytes = moto.get(&key).expect("blob uploaded by A");
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), digest);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    moto.put(&key, &bytes);

    let b = Work::new();
    let out = mlcb(
        &b,
        &[
            "build",
            tiny_recipe(&b).to_str().unwrap(),
            "--json",
            "--artifact-path",
            b.dist().to_str().unwrap(),
            "--remote-cache",
            &url,
        ],
        &env,
    );
    assert_success(&out);
    let err = stderr(&out);
    assert!(err.contains("corrupt") && err.contains(&digest), "{err}");
    let rb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sb = status_map(&rb);
    assert_eq!(
        sb["quantize"], "ran",
        "the corrupt stage is recomputed: {sb:?}"
    );
    assert_eq!(sb["load"], "remote");
    assert_eq!(remote_stats(&rb)["corrupt"], 1);
    assert_same_dist(&a, &b, true);
    // B (read-write) uploaded the good blob over the bad one.
    let repaired = moto.get(&key).unwrap();
    assert_eq!(blake3::hash(&repaired).to_hex().as_str(), digest);
    // So machine C gets everything from the remote again.
    let c = Work::new();
    let (rc, _) = build(&c, &tiny_recipe(&c), &["--remote-cache", &url], &env);
    assert_eq!(status_map(&rc)["quantize"], "remote");
    assert_same_dist(&b, &c, false);
}

#[test]
fn s3_read_only_mode_uploads_nothing() {
    let Some(moto) = Moto::start("s3_read_only_mode_uploads_nothing") else {
        return;
    };
    // Set through the environment this time.
    let env = [
        ("AWS_ENDPOINT", moto.endpoint()),
        ("MLCB_REMOTE_CACHE", format!("s3://{BUCKET}/ro")),
        ("MLCB_REMOTE_CACHE_MODE", "read-only".to_string()),
    ];
    let a = Work::new();
    let (ra, _) = build(&a, &tiny_recipe(&a), &[], &env);
    assert!(status_map(&ra).values().all(|s| s == "ran"));
    let st = remote_stats(&ra);
    assert_eq!(st["mode"], "read-only");
    assert_eq!(st["uploads"], 0);
    assert_eq!(st["blobs_uploaded"], 0);
    assert!(st["unavailable"].is_null(), "{st}");
    assert_eq!(moto.keys("ro/"), Vec::<String>::new(), "nothing uploaded");
    // A rebuild with a local hit does not publish it either.
    let (ra2, _) = build(&a, &tiny_recipe(&a), &[], &env);
    assert_eq!(remote_stats(&ra2)["uploads"], 0);
    assert_eq!(moto.keys("ro/"), Vec::<String>::new());
}

#[test]
fn file_remote_shares_stages_and_the_config_file_names_it() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("file://{}", shared.path().join("fleet-cache").display());
    // A and B by flag.
    let (_a, _b, _) = a_then_b(&url, &[]);
    // Machine C has no flag: ./mlcb.toml names the remote (read-only).
    let c = Work::new();
    std::fs::write(
        c.path().join("mlcb.toml"),
        format!("[cache]\nremote = \"{url}\"\nremote_mode = \"read-only\"\n"),
    )
    .unwrap();
    let (rc, _) = build(&c, &tiny_recipe(&c), &[], &[]);
    assert_eq!(status_map(&rc)["quantize"], "remote");
    assert_eq!(remote_stats(&rc)["mode"], "read-only");
    // The flag beats the config file: `none` switches the remote off.
    let d = Work::new();
    std::fs::copy(c.path().join("mlcb.toml"), d.path().join("mlcb.toml")).unwrap();
    let (rd, _) = build(&d, &tiny_recipe(&d), &["--remote-cache", "none"], &[]);
    assert!(rd["remote_cache"].is_null());
    assert_eq!(status_map(&rd)["quantize"], "ran");
}

#[test]
fn unreachable_remote_warns_and_builds_unless_required() {
    // A port nobody listens on, on 127.0.0.1.
    let env = [("AWS_ENDPOINT", format!("http://127.0.0.1:{}", free_port()))];
    let url = "s3://nobody-home/p";
    let a = Work::new();
    let start = Instant::now();
    let (ra, _) = build(&a, &tiny_recipe(&a), &["--remote-cache", url], &env);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "a dead remote must cost seconds, took {:?}",
        start.elapsed()
    );
    assert!(status_map(&ra).values().all(|s| s == "ran"));
    let why = remote_stats(&ra)["unavailable"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.contains(url), "{why}");

    let b = Work::new();
    let recipe = tiny_recipe(&b);
    let out = mlcb(
        &b,
        &[
            "build",
            recipe.to_str().unwrap(),
            "--artifact-path",
            b.dist().to_str().unwrap(),
            "--remote-cache",
            url,
            "--remote-cache-required",
        ],
        &env,
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(url), "{}", stderr(&out));
}

#[test]
fn malformed_remote_url_is_a_user_error() {
    let w = Work::new();
    let recipe = tiny_recipe(&w);
    for bad in ["ftp://host/x", "not a url", "s3:///no-bucket"] {
        let out = mlcb(
            &w,
            &["build", recipe.to_str().unwrap(), "--remote-cache", bad],
            &[],
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("s3, s3a, gs") && err.contains("--remote-cache"),
            "{err}"
        );
    }
    // A broken config file is a user error too.
    std::fs::write(
        w.path().join("mlcb.toml"),
        "[cache]\nremote_url = \"s3://b\"\n",
    )
    .unwrap();
    let out = mlcb(&w, &["build", recipe.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("mlcb.toml"), "{}", stderr(&out));
}
