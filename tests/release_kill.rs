//! Crash safety: `mlcb build` killed with SIGKILL at seeded random moments spread over a whole
//! build. While it runs and after the kill, no `dist/<id>` is ever seen half-written; the next
//! build succeeds, cleans up the leftovers and gives artifacts bit-identical to a clean build.
//!
//! Half the trials use a fresh cache (kills land inside fetch/load/quantize/link of a cold build),
//! half a cache shared by every trial of the same recipe set (kills land in lookups, index writes
//! and link of a warm build). Set MLCB_KILL_SEED to replay another sequence of delays.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TRIALS: usize = 30;

/// A recipe set: several schemes of one model in one DAG, so a build lasts long enough for kills
/// to land inside its stages.
struct Set {
    recipes: Vec<PathBuf>,
    ids: Vec<String>,
}

fn make_set(dir: &Path, name: &str, source: &str, delta: Option<&str>, schemes: &[&str]) -> Set {
    std::fs::create_dir_all(dir).unwrap();
    let mut recipes = Vec::new();
    let mut ids = Vec::new();
    for q in schemes {
        let mut text = format!(
            "quantization = \"{q}\"\n[model]\nname = \"{name}\"\nsource = \"{}\"\n",
            fixture(source).display()
        );
        if let Some(d) = delta {
            text.push_str(&format!("delta = \"{}\"\n", fixture(d).display()));
        }
        text.push_str("[target]\npreset = \"cpu\"\n");
        let p = dir.join(format!("{name}-{q}.toml"));
        std::fs::write(&p, text).unwrap();
        recipes.push(p);
        ids.push(format!("{name}-{q}"));
    }
    Set { recipes, ids }
}

fn command(set: &Set, cache: &Path, dist: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlcb"));
    c.arg("build")
        .args(&set.recipes)
        .args(["--artifact-path".as_ref(), dist.as_os_str()])
        .args(["--cache-dir".as_ref(), cache.as_os_str()])
        .args(["-j", "2"])
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Build and return its duration and whether it found the cache index damaged (and recovered).
fn build_ok(set: &Set, cache: &Path, dist: &Path) -> (Duration, bool) {
    let t = Instant::now();
    let out = command(set, cache, dist).output().unwrap();
    assert_success(&out);
    (t.elapsed(), stderr(&out).contains("is damaged"))
}

/// `dir` is absent, or complete: its manifest lists files that all exist with the right sizes.
fn whole_or_absent(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let bytes = std::fs::read(dir.join("build-manifest.json"))
        .map_err(|e| format!("{} exists without a readable manifest: {e}", dir.display()))?;
    let m: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: manifest is not JSON: {e}", dir.display()))?;
    for (p, o) in m["outputs"].as_object().ok_or("manifest has no outputs")? {
        let len = std::fs::metadata(dir.join(p))
            .map_err(|e| format!("{}: {p} listed but unreadable: {e}", dir.display()))?
            .len();
        if Some(len) != o["size"].as_u64() {
            return Err(format!(
                "{}: {p} has {len} bytes, manifest says {}",
                dir.display(),
                o["size"]
            ));
        }
    }
    Ok(())
}

/// A small deterministic generator (splitmix64) for the kill delays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn kill(child: &mut Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
}

fn without_manifest(dir: &Path) -> Vec<(String, String)> {
    tree_digest(dir)
        .into_iter()
        .filter(|(p, _)| p != "build-manifest.json")
        .collect()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("build-manifest.json")).unwrap()).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn killed_builds_never_leave_half_artifacts_and_recover_bit_identical() {
    let test_start = Instant::now();
    let w = Work::new();
    let sets = [
        make_set(
            &w.path().join("llama"),
            "tiny-llama",
            "tiny-llama",
            None,
            &["q4f16_1", "q3f16_1", "q8f16_0", "q0f32", "q4f32_0"],
        ),
        make_set(
            &w.path().join("rwkv"),
            "tiny-rwkv",
            "tiny-rwkv",
            None,
            &["q4f16_0", "q8f16_1", "q0f16", "q3f16_0"],
        ),
        make_set(
            &w.path().join("vicuna"),
            "tiny-vicuna",
            "tiny-vicuna-base",
            Some("tiny-vicuna-delta"),
            &["q4f16_1", "q0f32", "q8f16_0"],
        ),
    ];
    // Reference builds (clean cache, clean dist); their durations scale the kill delays.
    let mut durations = Vec::new();
    for (i, s) in sets.iter().enumerate() {
        let (d, _) = build_ok(
            s,
            &w.path().join(format!("ref-cache-{i}")),
            &w.path().join(format!("ref-dist-{i}")),
        );
        durations.push(d);
    }
    // A warm build (every stage cached, fresh dist: link only) scales the shared-cache trials.
    let warm: Vec<Duration> = sets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            build_ok(
                s,
                &w.path().join(format!("ref-cache-{i}")),
                &w.path().join(format!("warm-dist-{i}")),
            )
            .0
        })
        .collect();
    let seed: u64 = std::env::var("MLCB_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261128);
    let mut rng = Rng(seed);
    let (mut killed_mid_build, mut finished_first, mut polls, mut leftovers) = (0, 0, 0u64, 0);
    let mut index_recoveries = 0;
    for trial in 0..TRIALS {
        let si = trial % sets.len();
        let set = &sets[si];
        let shared = trial % 2 == 1;
        let cache = if shared {
            w.path().join(format!("shared-cache-{si}"))
        } else {
            w.path().join(format!("cache-{trial}"))
        };
        let dist = w.path().join(format!("dist-{trial}"));
        // Spread over the whole build (cold, or warm for the shared cache), and a little past its end.
        let scale = if shared { warm[si] } else { durations[si] };
        let delay = scale.mul_f64(1.1 * rng.unit());
        let ctx = format!(
            "trial {trial} (seed {seed}, set {si}, shared cache {shared}, kill after {delay:?})"
        );
        let mut child = command(set, &cache, &dist).spawn().unwrap();
        let start = Instant::now();
        let mut exited = None;
        while start.elapsed() < delay {
            if let Some(st) = child.try_wait().unwrap() {
                exited = Some(st);
                break;
            }
            for id in &set.ids {
                polls += 1;
                if let Err(e) = whole_or_absent(&dist.join(id)) {
                    kill(&mut child);
                    child.wait().ok();
                    panic!("{ctx}: while building: {e}");
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match exited {
            Some(st) => {
                assert!(st.success(), "{ctx}: the build failed by itself");
                finished_first += 1;
            }
            None => {
                kill(&mut child);
                let st = child.wait().unwrap();
                if st.success() {
                    finished_first += 1;
                } else {
                    killed_mid_build += 1;
                }
            }
        }
        for id in &set.ids {
            if let Err(e) = whole_or_absent(&dist.join(id)) {
                panic!("{ctx}: after the kill: {e}");
            }
        }
        leftovers += names(&cache.join("tmp")).len()
            + names(&dist)
                .iter()
                .filter(|n| n.starts_with('.') && n.contains(".tmp-"))
                .count();
        // The next build succeeds, sweeps the dead build's temporaries and matches the reference.
        if build_ok(set, &cache, &dist).1 {
            index_recoveries += 1;
        }
        for id in &set.ids {
            let got = dist.join(id);
            let reference = w.path().join(format!("ref-dist-{si}")).join(id);
            assert_eq!(
                without_manifest(&got),
                without_manifest(&reference),
                "{ctx}: {id} differs from the clean build"
            );
            let (mg, mr) = (manifest(&got), manifest(&reference));
            assert_eq!(mg["artifact_digest"], mr["artifact_digest"], "{ctx}: {id}");
            assert_eq!(mg["outputs"], mr["outputs"], "{ctx}: {id}");
        }
        let mut expected = set.ids.clone();
        expected.sort();
        assert_eq!(
            names(&dist),
            expected,
            "{ctx}: leftovers in the dist folder"
        );
        assert_eq!(
            names(&cache.join("tmp")),
            Vec::<String>::new(),
            "{ctx}: leftovers in the cache's tmp folder"
        );
        if !shared {
            std::fs::remove_dir_all(&cache).ok();
        }
        std::fs::remove_dir_all(&dist).ok();
    }
    eprintln!(
        "kill trials: {TRIALS} run, {killed_mid_build} killed mid-build, {finished_first} finished before the kill, all recovered; {leftovers} temporaries left by killed builds and swept; {index_recoveries} damaged cache indexes rebuilt; {polls} dist polls; cold builds {durations:?}, warm {warm:?}; {:.1}s in all",
        test_start.elapsed().as_secs_f64()
    );
    assert!(
        killed_mid_build >= TRIALS / 2,
        "too few kills landed inside a build ({killed_mid_build} of {TRIALS})"
    );
}
