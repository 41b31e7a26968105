//! Remote sources: the Hugging Face hub (a local server on 127.0.0.1 via HF_ENDPOINT) and git.

mod common;
use common::*;
use std::process::Command;

#[test]
fn hub_source_downloads_through_hf_endpoint_and_records_the_commit() {
    let w = Work::new();
    let hub = hub_server::start("acme/tiny-llama", fixture("tiny-llama"));
    let r = w.recipe(
        "h.toml",
        "quantization = \"q4f16_1\"\n[model]\nname = \"tiny-llama\"\nsource = { hf = \"acme/tiny-llama\" }\n[target]\npreset = \"cpu\"\n",
    );
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_mlcb"))
            .args([
                "build",
                r.to_str().unwrap(),
                "--json",
                "--artifact-path",
                w.dist().to_str().unwrap(),
            ])
            .env("MLCB_CACHE_DIR", w.cache())
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HOME", w.path().join("hf-home"))
            .output()
            .unwrap()
    };
    let out = run();
    assert_success(&out);
    assert!(hub.downloads.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.dist().join("tiny-llama-q4f16_1/build-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["sources"][0]["revision"], hub_server::COMMIT);
    assert_eq!(manifest["sources"][0]["kind"], "hub");
    // The same weights as the local folder give the same parameters.
    let local = w.recipe(
        "l.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu"),
    );
    let report = w.build_json(&[&local], &[]);
    assert_eq!(status_of(&report, "quantize"), "cached", "{report}");
    // Unknown repository: an environment error, exit 3.
    let bad = w.recipe(
        "b.toml",
        &std::fs::read_to_string(&r)
            .unwrap()
            .replace("acme/tiny-llama", "acme/nope"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .args([
            "build",
            bad.to_str().unwrap(),
            "--artifact-path",
            w.dist().to_str().unwrap(),
        ])
        .env("MLCB_CACHE_DIR", w.cache())
        .env("HF_ENDPOINT", &hub.endpoint)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("acme/nope"), "{}", stderr(&out));
}

#[test]
fn git_source_is_cloned_and_its_commit_recorded() {
    let w = Work::new();
    let repo = w.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    for e in std::fs::read_dir(fixture("tiny-rwkv")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), repo.join(e.file_name())).unwrap();
    }
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .current_dir(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    git(&["init", "-q"]);
    git(&["-c", "user.email=t@t", "-c", "user.name=t", "add", "."]);
    git(&[
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-qm",
        "model",
    ]);
    let commit = git(&["rev-parse", "HEAD"]);
    let r = w.recipe(
        "g.toml",
        &format!(
            "quantization = \"q8f16_1\"\n[model]\nname = \"tiny-rwkv\"\nsource = {{ git = \"file://{}\", rev = \"{commit}\" }}\n[target]\npreset = \"cpu\"\n",
            repo.display()
        ),
    );
    let report = w.build_json(&[&r], &[]);
    assert_eq!(status_of(&report, "fetch"), "ran");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.dist().join("tiny-rwkv-q8f16_1/build-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["sources"][0]["revision"], commit.as_str());
}
