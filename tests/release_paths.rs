//! Path safety: names read from files (chat config, ndarray cache, manifests) never make mlcb read
//! or write outside the artifact folder; each is refused with a user error naming the value.

mod common;
use common::*;
use std::path::Path;

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn assert_user_error_naming(out: &std::process::Output, value: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
    assert!(stderr(out).contains(value), "{}", stderr(out));
}

#[test]
fn names_from_files_cannot_escape_their_folders() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q0f32", "cpu"),
    );
    assert_success(&w.build(&[&r], &[]));
    let dir = w.dist().join("tiny-llama-q0f32");
    let run = |d: &Path| {
        w.mlcb(&[
            "run",
            d.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "1",
        ])
    };
    assert_success(&run(&dir));

    // model_lib_file in the chat config.
    let chat = dir.join("params/mlc-chat-config.json");
    let original = std::fs::read(&chat).unwrap();
    edit_json(&chat, |v| {
        v["model_lib_file"] = "../../../etc/passwd".into()
    });
    assert_user_error_naming(&run(&dir), "../../../etc/passwd");
    edit_json(&chat, |v| v["model_lib_file"] = "/etc/passwd".into());
    assert_user_error_naming(&run(&dir), "/etc/passwd");
    std::fs::write(&chat, &original).unwrap();

    // dataPath in the ndarray cache.
    let cache = dir.join("params/ndarray-cache.json");
    let original = std::fs::read(&cache).unwrap();
    edit_json(&cache, |v| {
        v["records"][0]["dataPath"] = "../../x.bin".into()
    });
    assert_user_error_naming(&run(&dir), "../../x.bin");
    std::fs::write(&cache, &original).unwrap();

    // A manifest output path: verify refuses it.
    let manifest = dir.join("build-manifest.json");
    let original = std::fs::read(&manifest).unwrap();
    edit_json(&manifest, |v| {
        v["outputs"]["../../outside.bin"] = serde_json::json!({"digest": "00", "size": 1})
    });
    assert_user_error_naming(
        &w.mlcb(&["verify", dir.to_str().unwrap()]),
        "../../outside.bin",
    );
    std::fs::write(&manifest, &original).unwrap();

    // A library name in the old manifest, carried over when another target links into the folder.
    let outside = w.path().join("outside.mlcblib");
    std::fs::write(&outside, b"not ours").unwrap();
    edit_json(&manifest, |v| {
        v["libraries"]["../../outside.mlcblib"] = "vulkan".into();
        v["outputs"]["../../outside.mlcblib"] = serde_json::json!({
            "digest": blake3::hash(b"not ours").to_hex().as_str(), "size": 8
        });
    });
    let rv = w.recipe(
        "rv.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q0f32", "metal"),
    );
    assert_user_error_naming(&w.build(&[&rv], &[]), "../../outside.mlcblib");
    assert_eq!(std::fs::read(&outside).unwrap(), b"not ours");

    // A model name that is a path, in the build.py flag form.
    let out = w.build(
        &[],
        &[
            "--hf-path",
            "org/..",
            "--target",
            "cpu",
            "--quantization",
            "q0f32",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
