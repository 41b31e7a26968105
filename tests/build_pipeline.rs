//! The build pipeline end to end: the `mlcb` binary on the fixture folders.

mod common;
use common::*;
use std::path::Path;

const SCHEMES: &[&str] = &[
    "q0f16", "q0f32", "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q4f32_0", "q4f32_1", "q8f16_0",
    "q8f16_1",
];

/// The artifact is complete and its manifest matches every file.
fn check_artifact(dist: &Path, local_id: &str, target_kind: &str) -> serde_json::Value {
    let dir = dist.join(local_id);
    for f in [
        "params/ndarray-cache.json",
        "params/mlc-chat-config.json",
        "params/tokenizer.json",
        "params/tokenizer_config.json",
        "build-manifest.json",
    ] {
        assert!(dir.join(f).is_file(), "{} missing", dir.join(f).display());
    }
    assert!(dir
        .join(format!("{local_id}-{target_kind}.mlcblib"))
        .is_file());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("build-manifest.json")).unwrap()).unwrap();
    for (path, o) in manifest["outputs"].as_object().unwrap() {
        let bytes = std::fs::read(dir.join(path)).unwrap();
        assert_eq!(
            blake3::hash(&bytes).to_hex().as_str(),
            o["digest"].as_str().unwrap(),
            "{path}"
        );
    }
    let cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("params/ndarray-cache.json")).unwrap())
            .unwrap();
    for shard in cache["records"].as_array().unwrap() {
        let bytes =
            std::fs::read(dir.join("params").join(shard["dataPath"].as_str().unwrap())).unwrap();
        assert_eq!(bytes.len() as u64, shard["nbytes"].as_u64().unwrap());
    }
    let chat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("params/mlc-chat-config.json")).unwrap())
            .unwrap();
    assert_eq!(chat["local_id"], local_id);
    assert_eq!(
        chat["tokenizer_files"],
        serde_json::json!(["tokenizer.json"])
    );
    manifest
}

#[test]
fn every_architecture_and_scheme_builds() {
    let w = Work::new();
    let mut recipes = Vec::new();
    for fx in ["tiny-llama", "tiny-neox", "tiny-rwkv"] {
        for q in SCHEMES {
            recipes.push(w.recipe(
                &format!("{fx}-{q}.toml"),
                &recipe_text(fx, &fixture(fx), q, "cpu"),
            ));
        }
    }
    let refs: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    let report = w.build_json(&refs, &["-j", "2"]);
    // One fetch and one load per model, shared by its ten recipes.
    let fetches = statuses(&report)
        .iter()
        .filter(|(s, _)| s == "fetch")
        .count();
    assert_eq!(fetches, 3, "the fetch of each model must be shared");
    for fx in ["tiny-llama", "tiny-neox", "tiny-rwkv"] {
        for q in SCHEMES {
            check_artifact(&w.dist(), &format!("{fx}-{q}"), "cpu");
        }
    }
}

#[test]
fn vicuna_delta_pair_builds_and_merges() {
    let w = Work::new();
    let r = w.recipe("v.toml", &vicuna_recipe_text("q0f32", "cpu"));
    let report = w.build_json(&[&r], &[]);
    assert_eq!(status_of(&report, "delta-merge"), "ran");
    let m = check_artifact(&w.dist(), "tiny-vicuna-q0f32", "cpu");
    assert_eq!(m["sources"].as_array().unwrap().len(), 2);
}

#[test]
fn build_py_flag_form() {
    let w = Work::new();
    // --model PATH
    let out = w.build(
        &[],
        &[
            "--model",
            fixture("tiny-llama").to_str().unwrap(),
            "--target",
            "cpu",
            "--quantization",
            "q4f16_1",
        ],
    );
    assert_success(&out);
    check_artifact(&w.dist(), "tiny-llama-q4f16_1", "cpu");
    // --model NAME looks in <artifact-path>/models/NAME (a symlink is followed).
    std::fs::create_dir_all(w.dist().join("models")).unwrap();
    std::os::unix::fs::symlink(fixture("tiny-neox"), w.dist().join("models/tiny-neox")).unwrap();
    let out = w.build(
        &[],
        &[
            "--model",
            "tiny-neox",
            "--target",
            "cpu",
            "--quantization",
            "q8f16_1",
            "--max-seq-len",
            "128",
            "--debug-dump",
        ],
    );
    assert_success(&out);
    check_artifact(&w.dist(), "tiny-neox-q8f16_1", "cpu");
    assert!(w
        .dist()
        .join("tiny-neox-q8f16_1/debug/plan-cpu.txt")
        .is_file());
    let chat: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            w.dist()
                .join("tiny-neox-q8f16_1/params/mlc-chat-config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(chat["max_window_size"], 128);
    // --use-cache=0 parses as build.py's int flag.
    let out = w.build(
        &[],
        &[
            "--model",
            "tiny-neox",
            "--target",
            "cpu",
            "--quantization",
            "q8f16_1",
            "--use-cache=0",
            "--max-seq-len",
            "128",
        ],
    );
    assert_success(&out);
}

#[test]
fn cache_hits_target_change_chat_change_and_use_cache_0() {
    let w = Work::new();
    let base = recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu");
    let r = w.recipe("r.toml", &base);
    let first = w.build_json(&[&r], &[]);
    assert!(statuses(&first).iter().all(|(_, s)| s == "ran"), "{first}");
    // No-op rebuild: everything cached.
    let again = w.build_json(&[&r], &[]);
    assert!(
        statuses(&again).iter().all(|(_, s)| s == "cached"),
        "{again}"
    );
    let digest = tree_digest(&w.dist().join("tiny-llama-q4f16_1"));
    // Changing only the target: no refetch, no requantize.
    let rv = w.recipe("rv.toml", &base.replace("\"cpu\"", "\"vulkan\""));
    let t = w.build_json(&[&rv], &[]);
    for s in ["fetch", "load", "quantize"] {
        assert_eq!(status_of(&t, s), "cached", "{s} after a target change: {t}");
    }
    for s in ["tune", "codegen", "link"] {
        assert_eq!(status_of(&t, s), "ran", "{s} after a target change: {t}");
    }
    // Rebuilding the cpu recipe now finds everything current, its library included.
    let back = w.build_json(&[&r], &[]);
    assert!(statuses(&back).iter().all(|(_, s)| s == "cached"), "{back}");
    // Both libraries now live side by side.
    assert!(w
        .dist()
        .join("tiny-llama-q4f16_1/tiny-llama-q4f16_1-vulkan.mlcblib")
        .is_file());
    assert!(w
        .dist()
        .join("tiny-llama-q4f16_1/tiny-llama-q4f16_1-cpu.mlcblib")
        .is_file());
    // Changing only chat settings: only link reruns.
    let rc = w.recipe("rc.toml", &format!("{base}[chat]\ntemperature = 0.2\n"));
    let c = w.build_json(&[&rc], &[]);
    for (s, st) in statuses(&c) {
        assert_eq!(st, if s == "link" { "ran" } else { "cached" }, "{s}: {c}");
    }
    let text = w.explain(&r);
    assert!(
        text.contains("chat_config"),
        "explain must name the changed input:\n{text}"
    );
    // --use-cache=0 reruns every stage, with the same result.
    let r0 = w.build_json(&[&r], &["--use-cache=0"]);
    assert!(statuses(&r0).iter().all(|(_, s)| s == "ran"), "{r0}");
    // Every file of the first build is rebuilt bit-identical (the manifest differs: timings, and the
    // vulkan library kept alongside).
    let now = tree_digest(&w.dist().join("tiny-llama-q4f16_1"));
    for entry in digest.iter().filter(|(p, _)| p != "build-manifest.json") {
        assert!(now.contains(entry), "{entry:?} changed after --use-cache=0");
    }
}

/// `quantization_scales` is a quantize-key input for symmetric schemes only: switching to
/// build.py's absmax rule requantizes (and relinks) with different bits; `explain` names it; an
/// asymmetric scheme, which has no scale rule, stays cached.
#[test]
fn scale_rule_change_requantizes_symmetric_schemes_only() {
    let w = Work::new();
    let sym = recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu");
    let asym = recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f32_1", "cpu");
    let (r, ra) = (w.recipe("r.toml", &sym), w.recipe("ra.toml", &asym));
    w.build_json(&[&r, &ra], &[]);
    let params =
        |id: &str| std::fs::read(w.dist().join(id).join("params/params_shard_0.bin")).unwrap();
    let mse = params("tiny-llama-q4f16_1");
    let asym_before = params("tiny-llama-q4f32_1");
    let absmax = format!("quantization_scales = \"absmax\"\n{sym}");
    let rb = w.recipe("rb.toml", &absmax);
    let text = w.explain(&rb);
    assert!(
        text.lines()
            .any(|l| l.starts_with("quantize") && l.contains("scales: mse → absmax")),
        "explain must name the scale rule:\n{text}"
    );
    let b = w.build_json(&[&rb], &[]);
    assert_only_ran(&b, &["quantize", "link"]);
    assert_ne!(
        params("tiny-llama-q4f16_1"),
        mse,
        "absmax must give other bits"
    );
    // The flag overrides the recipe; on the asymmetric scheme it changes nothing.
    let a = w.build_json(&[&ra], &["--quantization-scales", "absmax"]);
    assert!(statuses(&a).iter().all(|(_, s)| s == "cached"), "{a}");
    assert_eq!(params("tiny-llama-q4f32_1"), asym_before);
    // A misspelt rule is a user error pointing at the recipe line.
    let bad = w.recipe(
        "bad.toml",
        &format!("quantization_scales = \"best\"\n{sym}"),
    );
    let out = w.mlcb(&["build", bad.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:1:") && err.contains("mse, absmax"),
        "{err}"
    );
}

#[test]
fn corrupted_blob_is_detected_evicted_and_rebuilt() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-rwkv", &fixture("tiny-rwkv"), "q4f16_1", "cpu"),
    );
    let first = w.build_json(&[&r], &[]);
    let dist = w.dist().join("tiny-rwkv-q4f16_1");
    let before = std::fs::read(dist.join("params/params_shard_0.bin")).unwrap();
    // Corrupt the cached shard blob, and remove the dist so link must read it.
    let q = first["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "quantize")
        .unwrap();
    let digest = q["outputs"]["params/params_shard_0.bin"].as_str().unwrap();
    let blob = w.cache().join("blobs").join(&digest[..2]).join(digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    std::fs::remove_dir_all(&dist).unwrap();
    let out = w.build(&[&r], &[]);
    assert_success(&out);
    assert!(
        stderr(&out).contains("does not match its digest"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(dist.join("params/params_shard_0.bin")).unwrap(),
        before
    );
}

#[test]
fn two_concurrent_builds_share_one_cache() {
    let w = Work::new();
    let a = w.recipe(
        "a.toml",
        &recipe_text("tiny-neox", &fixture("tiny-neox"), "q4f16_1", "cpu"),
    );
    let b = w.recipe(
        "b.toml",
        &recipe_text("tiny-neox", &fixture("tiny-neox"), "q4f16_1", "vulkan"),
    );
    let spawn = |r: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mlcb"))
            .args([
                "build",
                r.to_str().unwrap(),
                "--artifact-path",
                w.dist().to_str().unwrap(),
            ])
            .env("MLCB_CACHE_DIR", w.cache())
            .output()
    };
    let (oa, ob) = std::thread::scope(|s| {
        let ha = s.spawn(|| spawn(&a).unwrap());
        let hb = s.spawn(|| spawn(&b).unwrap());
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_success(&oa);
    assert_success(&ob);
    // Both targets share one dist folder; whichever linked last may not have seen the other's
    // library, so only link may rerun, and the folder must be whole.
    let again = w.build_json(&[&a], &[]);
    check_artifact(&w.dist(), "tiny-neox-q4f16_1", "cpu");
    assert!(
        statuses(&again)
            .iter()
            .all(|(st, s)| s == "cached" || st == "link"),
        "{again}"
    );
}

#[test]
fn dry_run_prints_keys_and_runs_nothing() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q8f16_1", "cpu"),
    );
    let out = w.build(&[&r], &["--dry-run"]);
    assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("would run"), "{text}");
    assert!(!w.dist().join("tiny-llama-q8f16_1").exists());
    w.build_json(&[&r], &[]);
    let out = w.build(&[&r], &["--dry-run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .all(|l| l.starts_with("cached")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn clean_removes_dist_and_cache() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q0f16", "cpu"),
    );
    w.build_json(&[&r], &[]);
    assert_success(&w.mlcb(&[
        "clean",
        r.to_str().unwrap(),
        "--artifact-path",
        w.dist().to_str().unwrap(),
    ]));
    assert!(!w.dist().join("tiny-llama-q0f16").exists());
    assert_success(&w.mlcb(&["clean", "--cache"]));
    assert!(!w.cache().exists());
}

#[test]
fn standalone_quantize_matches_the_artifact_encoding() {
    let w = Work::new();
    let out_file = w.path().join("q.safetensors");
    let out = w.mlcb(&[
        "quantize",
        "--quantization",
        "q4f16_1",
        fixture("tiny-llama/model.safetensors").to_str().unwrap(),
        out_file.to_str().unwrap(),
    ]);
    assert_success(&out);
    let bytes = std::fs::read(&out_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let qw = st.tensor("model.layers.0.mlp.down_proj.q_weight").unwrap();
    assert_eq!(qw.dtype(), safetensors::Dtype::U32);
    assert_eq!(qw.shape(), &[256, 704 / 8]);
    let qs = st.tensor("model.layers.0.mlp.down_proj.q_scale").unwrap();
    assert_eq!(
        (qs.dtype(), qs.shape()),
        (safetensors::Dtype::F16, &[256usize, 22][..])
    );
    let norm = st.tensor("model.layers.0.input_layernorm.weight").unwrap();
    assert_eq!(norm.dtype(), safetensors::Dtype::F16);
    assert!(st.tensor("model.embed_tokens.q_weight").is_ok());
}
