//! Reproducible builds: two clean builds of every fixture recipe with different thread counts,
//! cache folders and working directories give bit-identical artifacts (the manifest aside, which
//! carries timings); `mlcb verify` passes on both and fails after one flipped byte.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCHEMES: &[&str] = &["q4f16_1", "q8f16_0", "q3f16_0"];

/// Every fixture recipe at every scheme, written into `dir`; returns (recipe files, local ids).
fn recipes(dir: &Path) -> (Vec<PathBuf>, Vec<String>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = Vec::new();
    let mut ids = Vec::new();
    for q in SCHEMES {
        for fx in ["tiny-llama", "tiny-neox", "tiny-rwkv"] {
            let p = dir.join(format!("{fx}-{q}.toml"));
            std::fs::write(&p, recipe_text(fx, &fixture(fx), q, "cpu")).unwrap();
            files.push(p);
            ids.push(format!("{fx}-{q}"));
        }
        let p = dir.join(format!("vicuna-{q}.toml"));
        std::fs::write(&p, vicuna_recipe_text(q, "cpu")).unwrap();
        files.push(p);
        ids.push(format!("tiny-vicuna-{q}"));
    }
    (files, ids)
}

fn build(cwd: &Path, recipes: &[PathBuf], cache: &Path, dist: &Path, threads: &str) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .arg("build")
        .args(recipes)
        .args(["--artifact-path".as_ref(), dist.as_os_str()])
        .args(["--cache-dir".as_ref(), cache.as_os_str()])
        .args(["-j", threads])
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", threads)
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_success(&out);
    out
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("build-manifest.json")).unwrap()).unwrap()
}

fn verify(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .arg("verify")
        .arg(dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn two_clean_builds_are_bit_identical_and_verify() {
    let a = Work::new();
    let b = Work::new();
    // Build A: one thread everywhere, recipes and cwd at the workspace root, relative dist path.
    let (ra, ids) = recipes(&a.path().join("recipes"));
    build(
        a.path(),
        &ra,
        &a.path().join("cache-a"),
        Path::new("out"),
        "1",
    );
    // Build B: two threads, another cache name, recipes and cwd one folder deeper, absolute dist.
    let cwd_b = b.path().join("deeper/work");
    let (rb, _) = recipes(&cwd_b);
    let dist_b = b.path().join("dist-b");
    build(&cwd_b, &rb, &b.path().join("c2"), &dist_b, "2");
    let dist_a = a.path().join("out");
    assert_eq!(ids.len(), 4 * SCHEMES.len());
    for id in &ids {
        let (da, db) = (dist_a.join(id), dist_b.join(id));
        let ta: Vec<_> = tree_digest(&da)
            .into_iter()
            .filter(|(p, _)| p != "build-manifest.json")
            .collect();
        let tb: Vec<_> = tree_digest(&db)
            .into_iter()
            .filter(|(p, _)| p != "build-manifest.json")
            .collect();
        assert!(ta.len() >= 5, "{id}: {ta:?}");
        assert_eq!(ta, tb, "{id}: the two builds differ");
        let (ma, mb) = (manifest(&da), manifest(&db));
        assert_eq!(ma["artifact_digest"], mb["artifact_digest"], "{id}");
        assert_eq!(ma["outputs"], mb["outputs"], "{id}");
        // The manifest lists exactly the files of the folder.
        let listed: Vec<&String> = ma["outputs"].as_object().unwrap().keys().collect();
        let present: Vec<&String> = ta.iter().map(|(p, _)| p).collect();
        assert_eq!(listed, present, "{id}");
        for d in [&da, &db] {
            let v = verify(d);
            assert_success(&v);
            assert!(String::from_utf8_lossy(&v.stdout).starts_with("ok:"));
        }
    }
    // One flipped byte in a shard: verify fails with a user error naming the file.
    let shard = dist_a.join(&ids[0]).join("params/params_shard_0.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let v = verify(&dist_a.join(&ids[0]));
    assert_eq!(v.status.code(), Some(2), "{}", stderr(&v));
    assert!(
        stderr(&v).contains("changed: params/params_shard_0.bin"),
        "{}",
        stderr(&v)
    );
    // A stray file and a missing one are named too; --json reports them.
    std::fs::write(dist_b.join(&ids[1]).join("params/stray.bin"), b"x").unwrap();
    std::fs::remove_file(dist_b.join(&ids[1]).join("params/tokenizer.json")).unwrap();
    let v = Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .args(["verify", "--json"])
        .arg(dist_b.join(&ids[1]))
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(2));
    let report: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(
        report["missing"],
        serde_json::json!(["params/tokenizer.json"])
    );
    assert_eq!(report["extra"], serde_json::json!(["params/stray.bin"]));
    assert!(stderr(&v).contains("unexpected file: params/stray.bin"));
}
