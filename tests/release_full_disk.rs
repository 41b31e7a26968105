//! Full disk: `mlcb build` with a tiny tmpfs as the cache folder, or as the artifact folder, runs
//! out of space midway. It must exit 3 (environment error) with a message that names the folder
//! and says what to do; leave no temporary files and no half-written artifact folder; and once the
//! same filesystem is given more room (remounted bigger, nothing deleted), the next build succeeds
//! with artifacts bit-identical to a clean build.
//!
//! Each scenario runs in its own mount namespace (`unshare --user --map-root-user --mount`, or
//! `unshare --mount` as root) so the test needs no privileges outside it. Where neither is
//! permitted the test says so on stderr and passes without checking anything.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCHEMES: &[&str] = &["q4f16_1", "q8f16_0"];

/// The `unshare` arguments that give a mount namespace here, if any does.
fn namespace_prefix() -> Option<Vec<&'static str>> {
    let probe = tempfile::tempdir().unwrap();
    for prefix in [
        vec!["--user", "--map-root-user", "--mount"],
        vec!["--mount"],
    ] {
        let ok = Command::new("unshare")
            .args(&prefix)
            .args([
                "sh",
                "-c",
                &format!(
                    "mount -t tmpfs -o size=64k tmpfs '{}'",
                    probe.path().display()
                ),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Some(prefix);
        }
    }
    None
}

fn recipes(work: &Work) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut ids = Vec::new();
    for q in SCHEMES {
        files.push(work.recipe(
            &format!("tiny-llama-{q}.toml"),
            &recipe_text("tiny-llama", &fixture("tiny-llama"), q, "cpu"),
        ));
        ids.push(format!("tiny-llama-{q}"));
    }
    (files, ids)
}

fn build_command(recipes: &[PathBuf], cache: &Path, dist: &Path) -> String {
    let mut c = format!("'{}' build", env!("CARGO_BIN_EXE_mlcb"));
    for r in recipes {
        c.push_str(&format!(" '{}'", r.display()));
    }
    c.push_str(&format!(
        " --cache-dir '{}' --artifact-path '{}' -j 1",
        cache.display(),
        dist.display()
    ));
    c
}

/// Bytes a folder takes on a filesystem (allocated blocks, as tmpfs counts them).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            disk_usage(&e.path()) + 4096
        } else {
            m.blocks() * 512
        };
    }
    total
}

/// A clean build on the real disk: the reference artifacts and the space each folder needs.
struct Reference {
    work: Work,
    cache_bytes: u64,
    dist_bytes: u64,
}

fn reference(recipes: &[PathBuf]) -> Reference {
    let work = Work::new();
    let out = Command::new("sh")
        .args(["-c", &build_command(recipes, &work.cache(), &work.dist())])
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_success(&out);
    Reference {
        cache_bytes: disk_usage(&work.cache()),
        dist_bytes: disk_usage(&work.dist()),
        work,
    }
}

/// Run `script` in a new mount namespace where `mount_point` is a tmpfs of `kib` KiB.
fn in_namespace(prefix: &[&str], mount_point: &Path, kib: u64, script: &str) -> Output {
    let full = format!(
        "set -u\nmount -t tmpfs -o size={kib}k tmpfs '{}' || exit 97\n{script}",
        mount_point.display()
    );
    Command::new("unshare")
        .args(prefix)
        .args(["sh", "-c", &full])
        .env_remove("MLCB_CACHE_DIR")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// What both scenarios start from: a mount namespace to run in, the recipes in a work folder, a
/// clean reference build, `out/` for what the namespace's script leaves, and the build command
/// over the work folder's cache and dist. `None` (after saying so) where no namespace is allowed.
struct Setup {
    prefix: Vec<&'static str>,
    w: Work,
    ids: Vec<String>,
    reference: Reference,
    out_dir: PathBuf,
    build: String,
}

fn setup(test: &str) -> Option<Setup> {
    let Some(prefix) = namespace_prefix() else {
        eprintln!(
            "SKIPPED {test}: cannot create a mount namespace here (unshare/mount not permitted)"
        );
        return None;
    };
    let w = Work::new();
    let (recipes, ids) = recipes(&w);
    let reference = reference(&recipes);
    std::fs::create_dir_all(w.cache()).unwrap();
    std::fs::create_dir_all(w.dist()).unwrap();
    let out_dir = w.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let build = build_command(&recipes, &w.cache(), &w.dist());
    Some(Setup {
        prefix,
        w,
        ids,
        reference,
        out_dir,
        build,
    })
}

/// The build whose outputs the script wrote under `{step}.rc/.err` succeeded.
fn assert_step_succeeded(out_dir: &Path, step: &str) {
    assert_eq!(
        read(&out_dir.join(format!("{step}.rc"))).trim(),
        "0",
        "{}",
        read(&out_dir.join(format!("{step}.err")))
    );
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The artifacts under `dist` equal the reference's, file by file (the manifest: same artifact
/// digest and outputs; its timings differ).
fn assert_identical(dist: &Path, reference: &Path, ids: &[String]) {
    for id in ids {
        let strip = |d: &Path| -> Vec<(String, String)> {
            tree_digest(&d.join(id))
                .into_iter()
                .filter(|(p, _)| p != "build-manifest.json")
                .collect()
        };
        assert_eq!(
            strip(dist),
            strip(reference),
            "{id} differs from a clean build"
        );
        let m = |d: &Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join(id).join("build-manifest.json")).unwrap())
                .unwrap()
        };
        let (a, b) = (m(dist), m(reference));
        assert_eq!(a["artifact_digest"], b["artifact_digest"], "{id}");
        assert_eq!(a["outputs"], b["outputs"], "{id}");
    }
}

/// Every entry of a dist root is a finished artifact (its manifest's files all present with their
/// sizes); no temporary folder of a build is left.
fn assert_only_whole_artifacts(dist: &Path) {
    for e in std::fs::read_dir(dist).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.') && !name.contains(".tmp"),
            "temporary entry {name} left in {}",
            dist.display()
        );
        let dir = e.path();
        let bytes = std::fs::read(dir.join("build-manifest.json"))
            .unwrap_or_else(|err| panic!("{} is half-written: no manifest ({err})", dir.display()));
        let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        for (p, o) in m["outputs"].as_object().unwrap() {
            let len = std::fs::metadata(dir.join(p))
                .unwrap_or_else(|err| panic!("{}: {p} missing ({err})", dir.display()))
                .len();
            assert_eq!(Some(len), o["size"].as_u64(), "{}: {p}", dir.display());
        }
    }
}

fn assert_explained(stderr: &str, rc: &str, what: &str, place: &Path, flag: &str) {
    assert_eq!(
        rc.trim(),
        "3",
        "exit code (3 = environment error); stderr:\n{stderr}"
    );
    let want = format!("no space left on the disk holding {what}");
    assert!(stderr.contains(&want), "message lacks `{want}`:\n{stderr}");
    assert!(
        stderr.contains(&place.display().to_string()),
        "message does not name {}:\n{stderr}",
        place.display()
    );
    assert!(
        stderr.contains("free some space") && stderr.contains(flag),
        "message does not say what to do:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn full_cache_disk_is_an_environment_error_and_the_cache_stays_usable() {
    let Some(s) = setup("full_cache_disk") else {
        return;
    };
    let (prefix, w, ids, reference, out_dir, build) =
        (s.prefix, s.w, s.ids, s.reference, s.out_dir, s.build);
    let (cache, dist) = (w.cache(), w.dist());
    // Half of what a clean build leaves in the cache: the first stages fit, later ones do not.
    let kib = reference.cache_bytes / 2 / 1024;
    let o = out_dir.display();
    let script = format!(
        "{build} >'{o}/small.out' 2>'{o}/small.err'; echo $? >'{o}/small.rc'\n\
         ls -A '{c}/tmp' >'{o}/tmp-after-failure' 2>/dev/null\n\
         find '{c}/blobs' -type f | wc -l >'{o}/blobs-after-failure'\n\
         mount -o remount,size=64m '{c}' || exit 98\n\
         {build} >'{o}/big.out' 2>'{o}/big.err'; echo $? >'{o}/big.rc'\n\
         ls -A '{c}/tmp' >'{o}/tmp-after-success' 2>/dev/null\n\
         {build} --json >'{o}/again.json' 2>'{o}/again.err'; echo $? >'{o}/again.rc'\n",
        c = cache.display()
    );
    let ns = in_namespace(&prefix, &cache, kib, &script);
    assert_success(&ns);
    let small_err = read(&out_dir.join("small.err"));
    // The message names the cache (its data or its index) and the flag that moves it.
    assert_explained(
        &small_err,
        &read(&out_dir.join("small.rc")),
        "the cache",
        &cache,
        "--cache-dir",
    );
    // Some stages had stored their outputs before the disk filled: the failure was midway.
    let blobs: usize = read(&out_dir.join("blobs-after-failure"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        blobs > 0,
        "nothing was stored before the disk filled:\n{small_err}"
    );
    assert_eq!(
        read(&out_dir.join("tmp-after-failure")),
        "",
        "temporary files left in the cache"
    );
    assert_only_whole_artifacts(&dist);
    // The same cache, with room now: the build succeeds and gives a clean build's artifacts.
    assert_step_succeeded(&out_dir, "big");
    assert_eq!(read(&out_dir.join("tmp-after-success")), "");
    assert_only_whole_artifacts(&dist);
    assert_identical(&dist, &reference.work.dist(), &ids);
    // And the cache it left is whole: a third build finds every stage cached.
    assert_step_succeeded(&out_dir, "again");
    let report: serde_json::Value =
        serde_json::from_str(&read(&out_dir.join("again.json"))).unwrap();
    for (stage, status) in statuses(&report) {
        assert_eq!(status, "cached", "{stage} reran on a complete cache");
    }
}

#[test]
fn full_artifact_disk_is_an_environment_error_and_leaves_no_half_artifact() {
    let Some(s) = setup("full_artifact_disk") else {
        return;
    };
    let (prefix, w, ids, reference, out_dir, build) =
        (s.prefix, s.w, s.ids, s.reference, s.out_dir, s.build);
    let (cache, dist) = (w.cache(), w.dist());
    // Room for about one of the two artifacts: the second link runs out midway.
    let kib = reference.dist_bytes * 3 / 4 / 1024;
    std::fs::create_dir_all(out_dir.join("after-failure")).unwrap();
    std::fs::create_dir_all(out_dir.join("final")).unwrap();
    let o = out_dir.display();
    let d = dist.display();
    // The tmpfs vanishes with the namespace: copy what it holds out at each step.
    let script = format!(
        "{build} >'{o}/small.out' 2>'{o}/small.err'; echo $? >'{o}/small.rc'\n\
         cp -a '{d}/.' '{o}/after-failure/'\n\
         ls -A '{c}/tmp' >'{o}/tmp-after-failure' 2>/dev/null\n\
         mount -o remount,size=64m '{d}' || exit 98\n\
         {build} >'{o}/big.out' 2>'{o}/big.err'; echo $? >'{o}/big.rc'\n\
         cp -a '{d}/.' '{o}/final/'\n",
        c = cache.display()
    );
    let ns = in_namespace(&prefix, &dist, kib, &script);
    assert_success(&ns);
    let small_err = read(&out_dir.join("small.err"));
    assert_explained(
        &small_err,
        &read(&out_dir.join("small.rc")),
        "the artifact folder",
        &dist,
        "--artifact-path",
    );
    // Nothing half-written and no temporary folder in the dist root; no temp files in the cache.
    assert_only_whole_artifacts(&out_dir.join("after-failure"));
    assert_eq!(
        read(&out_dir.join("tmp-after-failure")),
        "",
        "temporary files left in the cache"
    );
    // With room, the same dist root and cache give a clean build's artifacts.
    assert_step_succeeded(&out_dir, "big");
    assert_only_whole_artifacts(&out_dir.join("final"));
    assert_identical(&out_dir.join("final"), &reference.work.dist(), &ids);
}
