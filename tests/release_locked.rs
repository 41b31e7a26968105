//! `mlcb build --locked` and mlcb.lock: a normal build records what each source resolved to;
//! `--locked` refuses a source that changed or has no entry, naming it and the first difference.

mod common;
use common::*;
use std::path::Path;

fn copy_fixture(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn locked_build_refuses_changed_or_unlocked_sources() {
    let w = Work::new();
    copy_fixture(&fixture("tiny-llama"), &w.path().join("models/llama"));
    let r = w.recipe(
        "llama.toml",
        "quantization = \"q4f16_1\"\n[model]\nname = \"tiny-llama\"\nsource = \"models/llama\"\n[target]\npreset = \"cpu\"\n",
    );
    // No lock file yet: --locked refuses.
    let out = w.build(&[&r], &["--locked"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("mlcb.lock"), "{}", stderr(&out));
    assert!(!w.dist().join("tiny-llama-q4f16_1").exists());
    // A normal build writes the lock next to the recipe, with the folder's files.
    assert_success(&w.build(&[&r], &[]));
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.path().join("mlcb.lock")).unwrap()).unwrap();
    let entry = &lock["sources"]["path:models/llama"];
    let files: Vec<&str> = entry["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"config.json") && files.contains(&"model.safetensors"),
        "{lock}"
    );
    let config_digest = entry["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "config.json")
        .unwrap()["digest"]
        .clone();
    let config = std::fs::read(w.path().join("models/llama/config.json")).unwrap();
    assert_eq!(config_digest, blake3::hash(&config).to_hex().as_str());
    // Unchanged: --locked builds (all cached).
    let ok = w.build_json(&[&r], &["--locked"]);
    assert!(statuses(&ok).iter().all(|(_, s)| s == "cached"), "{ok}");
    // The copy's config.json changes: refused, naming the source and the file; nothing is rebuilt.
    let mut changed = config.clone();
    changed.extend_from_slice(b"\n");
    std::fs::write(w.path().join("models/llama/config.json"), &changed).unwrap();
    std::fs::remove_dir_all(w.dist()).unwrap();
    let out = w.build(&[&r], &["--locked"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("path:models/llama"), "{err}");
    assert!(err.contains("file config.json changed"), "{err}");
    assert!(
        !w.dist().exists(),
        "a refused build must not write the artifact"
    );
    // A normal build accepts the change and updates the lock; --locked passes again.
    assert_success(&w.build(&[&r], &[]));
    assert_success(&w.build(&[&r], &["--locked"]));
    // A second recipe with a source the lock does not know: refused.
    let r2 = w.recipe(
        "neox.toml",
        &recipe_text("tiny-neox", &fixture("tiny-neox"), "q4f16_1", "cpu"),
    );
    let out = w.build(&[&r, &r2], &["--locked"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no entry") && stderr(&out).contains("tiny-neox"),
        "{}",
        stderr(&out)
    );
}
