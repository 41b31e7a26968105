//! Bad input gets a clear error, exit code 2, no panic and no partial output.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Copy a fixture folder so a test can break it.
fn copy_fixture(w: &Work, name: &str) -> PathBuf {
    let dst = w.path().join(format!("models/{name}"));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// The build fails with exit 2, the message contains every `needle`, and no dist folder exists.
fn expect_user_error(w: &Work, recipe: &Path, needles: &[&str]) {
    let out = w.build(&[recipe], &[]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, got {:?}:\n{err}",
        out.status.code()
    );
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in:\n{err}");
    }
    if w.dist().exists() {
        let left: Vec<_> = std::fs::read_dir(w.dist())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.iter().all(|n| n == "models"),
            "partial output left: {left:?}"
        );
    }
}

#[test]
fn malformed_toml() {
    let w = Work::new();
    let r = w.recipe("bad.toml", "quantization = \"q4f16_1\n[model]\n");
    expect_user_error(&w, &r, &["bad.toml:1:"]);
}

#[test]
fn unknown_key_target_and_quantization() {
    let w = Work::new();
    let good = recipe_text("m", &fixture("tiny-llama"), "q4f16_1", "cpu");
    let r = w.recipe("k.toml", &format!("colour = \"red\"\n{good}"));
    expect_user_error(&w, &r, &["k.toml:1:1", "colour"]);
    let r = w.recipe("t.toml", &good.replace("\"cpu\"", "\"tpu\""));
    expect_user_error(&w, &r, &["t.toml:", "unknown target `tpu`", "vulkan"]);
    let r = w.recipe("q.toml", &good.replace("q4f16_1", "q2f16"));
    expect_user_error(&w, &r, &["q.toml:1:16", "q4f16_1"]);
}

#[test]
fn nonsense_max_seq_len() {
    let w = Work::new();
    let r = w.recipe(
        "m.toml",
        &format!(
            "max_seq_len = 0\n{}",
            recipe_text("m", &fixture("tiny-llama"), "q4f16_1", "cpu")
        ),
    );
    expect_user_error(&w, &r, &["m.toml:1:15", "max_seq_len"]);
    let out = w.build(
        &[],
        &[
            "--model",
            fixture("tiny-llama").to_str().unwrap(),
            "--max-seq-len",
            "-7",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn missing_model_folder() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("m", &w.path().join("nowhere"), "q4f16_1", "cpu"),
    );
    expect_user_error(&w, &r, &["nowhere", "not found"]);
    let out = w.build(&[], &["--model", "no-such-model"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("models/no-such-model"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_invalid_or_unsupported_config() {
    let w = Work::new();
    let d = copy_fixture(&w, "tiny-llama");
    std::fs::remove_file(d.join("config.json")).unwrap();
    let r = w.recipe("r.toml", &recipe_text("m", &d, "q4f16_1", "cpu"));
    expect_user_error(&w, &r, &["config.json"]);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    expect_user_error(&w, &r, &["config.json", "not valid JSON"]);
    std::fs::write(d.join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
    expect_user_error(&w, &r, &["bert", "llama", "gpt_neox", "rwkv"]);
}

#[test]
fn lfs_pointer_instead_of_weights() {
    let w = Work::new();
    let d = copy_fixture(&w, "tiny-llama");
    std::fs::write(
        d.join("model.safetensors"),
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3478176\n",
    )
    .unwrap();
    let r = w.recipe("r.toml", &recipe_text("m", &d, "q4f16_1", "cpu"));
    expect_user_error(&w, &r, &["Git LFS pointer", "git lfs"]);
}

#[test]
fn truncated_safetensors_and_pickle() {
    let w = Work::new();
    let d = copy_fixture(&w, "tiny-llama");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let r = w.recipe("r.toml", &recipe_text("m", &d, "q4f16_1", "cpu"));
    expect_user_error(&w, &r, &["model.safetensors"]);
    let d = copy_fixture(&w, "tiny-neox");
    let bytes = std::fs::read(d.join("pytorch_model.bin")).unwrap();
    std::fs::write(d.join("pytorch_model.bin"), &bytes[..bytes.len() / 2]).unwrap();
    let r = w.recipe("n.toml", &recipe_text("n", &d, "q4f16_1", "cpu"));
    expect_user_error(&w, &r, &["pytorch_model.bin"]);
}

/// Rewrite a safetensors file through `edit` (which may drop or reshape tensors).
fn rewrite_safetensors(
    path: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, t) in st.tensors() {
        if let Some((shape, data)) = edit(&name, t.shape().to_vec(), t.data().to_vec()) {
            kept.push((name, t.dtype(), shape, data));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let w = Work::new();
    let d = copy_fixture(&w, "tiny-llama");
    rewrite_safetensors(&d.join("model.safetensors"), |n, s, b| {
        (n != "model.layers.1.mlp.up_proj.weight").then_some((s, b))
    });
    let r = w.recipe("r.toml", &recipe_text("m", &d, "q4f16_1", "cpu"));
    expect_user_error(&w, &r, &["model.layers.1.mlp.up_proj.weight", "missing"]);
}

#[test]
fn delta_shape_mismatch_names_both_shapes() {
    let w = Work::new();
    let d = copy_fixture(&w, "tiny-vicuna-delta");
    rewrite_safetensors(&d.join("model.safetensors"), |n, s, b| {
        if n == "model.layers.0.self_attn.o_proj.weight" {
            Some((vec![s[0] / 2, s[1]], b[..b.len() / 2].to_vec()))
        } else {
            Some((s, b))
        }
    });
    let r = w.recipe(
        "v.toml",
        &format!(
            "quantization = \"q4f16_1\"\n[model]\nname = \"v\"\nsource = \"{}\"\ndelta = \"{}\"\n[target]\npreset = \"cpu\"\n",
            fixture("tiny-vicuna-base").display(),
            d.display()
        ),
    );
    expect_user_error(
        &w,
        &r,
        &[
            "model.layers.0.self_attn.o_proj.weight",
            "[256, 256]",
            "[128, 256]",
        ],
    );
}
