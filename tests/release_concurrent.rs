//! Concurrent builds: four `mlcb build` processes started together on one cache folder, with
//! overlapping recipes (the same model at two quantizations and two targets, a delta-merged model
//! in two of them, two processes with identical recipe lists writing the same dist folder), all
//! succeed, and every artifact is bit-identical to a sequential clean build of the same recipes.
//!
//! The sled index admits one process at a time; mlcb holds it only for lookups and records and
//! retries a taken lock (src/cache/index.rs), blobs are renamed into place, and links swap whole
//! folders, so the processes take turns without failing or mixing outputs. Rounds on a cold cache
//! race on every stage; a round on the warm cache races on lookups and links.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const COLD_ROUNDS: usize = 3;

/// One process: its recipe files and its dist folder name.
struct Job {
    recipes: Vec<PathBuf>,
    ids: Vec<String>,
    dist: &'static str,
}

fn write_recipes(dir: &Path) -> Vec<Job> {
    let recipe = |file: &str, text: String| -> PathBuf {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        p
    };
    let llama_q4 = recipe(
        "llama-q4-cpu.toml",
        recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu"),
    );
    let llama_q8 = recipe(
        "llama-q8-cpu.toml",
        recipe_text("tiny-llama", &fixture("tiny-llama"), "q8f16_0", "cpu"),
    );
    let llama_q4_vk = recipe(
        "llama-q4-vulkan.toml",
        recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "vulkan"),
    );
    let neox = recipe(
        "neox-q4-cpu.toml",
        recipe_text("tiny-neox", &fixture("tiny-neox"), "q4f16_1", "cpu"),
    );
    let vicuna = recipe("vicuna-q4-cpu.toml", vicuna_recipe_text("q4f16_1", "cpu"));
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        // Two identical processes sharing one dist folder: both link the same folders.
        Job {
            recipes: vec![llama_q4.clone(), neox.clone()],
            ids: ids(&["tiny-llama-q4f16_1", "tiny-neox-q4f16_1"]),
            dist: "dist-shared",
        },
        Job {
            recipes: vec![llama_q4.clone(), neox.clone()],
            ids: ids(&["tiny-llama-q4f16_1", "tiny-neox-q4f16_1"]),
            dist: "dist-shared",
        },
        // The same model at another quantization, plus the first's, plus a delta merge.
        Job {
            recipes: vec![llama_q8, llama_q4, vicuna.clone()],
            ids: ids(&[
                "tiny-llama-q8f16_0",
                "tiny-llama-q4f16_1",
                "tiny-vicuna-q4f16_1",
            ]),
            dist: "dist-3",
        },
        // The same model and quantization for another target (shares fetch/load/quantize), in
        // its own dist folder: a vulkan library next to a cpu one would depend on link order.
        Job {
            recipes: vec![llama_q4_vk, neox, vicuna],
            ids: ids(&[
                "tiny-llama-q4f16_1",
                "tiny-neox-q4f16_1",
                "tiny-vicuna-q4f16_1",
            ]),
            dist: "dist-4",
        },
    ]
}

fn command(job: &Job, cache: &Path, dist: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlcb"));
    c.arg("build")
        .args(&job.recipes)
        .args(["--artifact-path".as_ref(), dist.as_os_str()])
        .args(["--cache-dir".as_ref(), cache.as_os_str()])
        .args(["-j", "2"])
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Artifact content without the manifest's timings: (file, blake3) pairs plus the manifest's
/// artifact digest and outputs.
fn artifact(dir: &Path) -> (Vec<(String, String)>, serde_json::Value, serde_json::Value) {
    let files = tree_digest(dir)
        .into_iter()
        .filter(|(p, _)| p != "build-manifest.json")
        .collect();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("build-manifest.json")).unwrap()).unwrap();
    (files, m["artifact_digest"].clone(), m["outputs"].clone())
}

fn no_leftovers(cache: &Path, dists: &[PathBuf]) {
    let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(tmp.is_empty(), "temporary files left in the cache: {tmp:?}");
    for d in dists {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with('.'),
                "temporary folder {name} left in {}",
                d.display()
            );
        }
    }
}

#[test]
fn four_builds_on_one_cache_succeed_with_identical_outputs() {
    let w = Work::new();
    let jobs = write_recipes(w.path());
    // References: each process's recipes built alone, each with a fresh cache.
    let mut reference = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let dist = w.path().join(format!("ref-{i}"));
        let out = command(job, &w.path().join(format!("ref-cache-{i}")), &dist)
            .output()
            .unwrap();
        assert_success(&out);
        reference.push(dist);
    }
    // Rounds: fresh cache and dists (cold), then the last cache again with fresh dists (warm).
    for round in 0..=COLD_ROUNDS {
        let cache = w
            .path()
            .join(format!("cache-{}", round.min(COLD_ROUNDS - 1)));
        let root = w.path().join(format!("round-{round}"));
        let children: Vec<Child> = jobs
            .iter()
            .map(|job| command(job, &cache, &root.join(job.dist)).spawn().unwrap())
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: process {i} failed ({:?}):\n{}",
                out.status.code(),
                stderr(&out)
            );
        }
        for (job, refdist) in jobs.iter().zip(&reference) {
            for id in &job.ids {
                assert_eq!(
                    artifact(&root.join(job.dist).join(id)),
                    artifact(&refdist.join(id)),
                    "round {round}: {}/{id} differs from a sequential clean build",
                    job.dist
                );
            }
        }
        let dists: Vec<PathBuf> = ["dist-shared", "dist-3", "dist-4"]
            .iter()
            .map(|d| root.join(d))
            .collect();
        no_leftovers(&cache, &dists);
    }
    // The cache the processes shared is whole: a build of everything finds every stage cached.
    let all: Vec<&Path> = jobs
        .iter()
        .flat_map(|j| j.recipes.iter().map(PathBuf::as_path))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .arg("build")
        .args(&all)
        .arg("--json")
        .args([
            "--artifact-path".as_ref(),
            w.path().join("check").as_os_str(),
        ])
        .args([
            "--cache-dir".as_ref(),
            w.path()
                .join(format!("cache-{}", COLD_ROUNDS - 1))
                .as_os_str(),
        ])
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_success(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (stage, status) in statuses(&report) {
        if stage != "link" {
            assert_eq!(status, "cached", "{stage} reran on the shared cache");
        }
    }
}
