//! The CPU runtime against Hugging Face transformers: build every fixture at every scheme, then
//! `mlcb logits` at every prompt position against `reference.safetensors`, and greedy continuations
//! through `mlcb run` (prefill once, then incremental decode with the KV cache / recurrent state)
//! against transformers' greedy tokens (computed by full recomputation).

mod common;
use common::logits::{greedy_args, logits_args, read_logits, reference, rel_err, run_ids};
use common::*;
use std::path::{Path, PathBuf};

/// Per-position relative error ‖a−b‖/‖b‖ (max over positions) and top-1 agreement (fraction).
fn compare(ours: &[f32], theirs: &[f32], vocab: usize) -> (f64, f64) {
    let (mut worst, mut agree, mut rows) = (0f64, 0usize, 0usize);
    for (a, b) in ours.chunks(vocab).zip(theirs.chunks(vocab)) {
        worst = worst.max(rel_err(a, b));
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0
        };
        agree += (argmax(a) == argmax(b)) as usize;
        rows += 1;
    }
    (worst, agree as f64 / rows as f64)
}

fn logits_of(w: &Work, dist: &Path, ids: &[u32]) -> Vec<f32> {
    let (args, file) = logits_args(w.path(), dist, ids, "cpu");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_success(&w.mlcb(&args));
    read_logits(&file)
}

/// Greedy generation through `mlcb run`, as token ids.
fn greedy_of(w: &Work, dist: &Path, prompt: &str, n: usize) -> (Vec<u32>, Vec<u32>) {
    let args = greedy_args(dist, prompt, n);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.mlcb(&args);
    assert_success(&out);
    run_ids(&out.stdout)
}

/// Relative-error bound per scheme. f32 and f16 bounds are the issue's. The quantized ones were
/// measured on these fixtures (worst position over the four models, ~35% margin): their random
/// Gaussian weights quantize with per-weight relative error ≈0.6% (int8), ≈8.1% (int4 sym with
/// the default mse scales; 9.7% with build.py's absmax), ≈8% (int4 asym), ≈16% (int3; 23% with
/// absmax), which two random layers amplify about 3–4× in the logits. Worst seen: int4 sym 0.33
/// (0.47 with absmax), int3 0.67 (0.88). For scale: unrelated logits would give ≈1.4.
fn bound(scheme: &str) -> f64 {
    match scheme {
        "q0f32" => 1e-4,
        "q0f16" => 1e-2,
        "q8f16_0" | "q8f16_1" => 3.5e-2,
        "q4f16_0" | "q4f16_1" => 0.45,
        "q4f32_0" | "q4f32_1" => 0.45,
        "q3f16_0" | "q3f16_1" => 0.9,
        other => panic!("no bound for {other}"),
    }
}

const SCHEMES: &[&str] = &[
    "q0f32", "q0f16", "q8f16_0", "q8f16_1", "q4f16_0", "q4f16_1", "q4f32_0", "q4f32_1", "q3f16_0",
    "q3f16_1",
];

fn check_fixture(name: &str, recipe_for: impl Fn(&str) -> String, reference_folder: &str) {
    let w = Work::new();
    let refs = reference(reference_folder);
    let recipes: Vec<PathBuf> = SCHEMES
        .iter()
        .map(|q| w.recipe(&format!("{q}.toml"), &recipe_for(q)))
        .collect();
    let paths: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    w.build_json(&paths, &[]);
    let text = serde_json::from_slice::<serde_json::Value>(
        &std::fs::read(fixture(reference_folder).join("reference.json")).unwrap(),
    )
    .unwrap();
    let mut computed: std::collections::HashMap<(&str, usize), Vec<f32>> =
        std::collections::HashMap::new();
    for q in SCHEMES {
        let dist = w.dist().join(format!("{name}-{q}"));
        let mut report = Vec::new();
        for (i, ids) in refs.input_ids.iter().enumerate() {
            let (shape, theirs) = &refs.logits[i];
            let ours = logits_of(&w, &dist, ids);
            computed.insert((q, i), ours.clone());
            assert_eq!(
                ours.len(),
                theirs.len(),
                "{name} {q}: logits shape, want {shape:?}"
            );
            let (err, top1) = compare(&ours, theirs, shape[1]);
            report.push(format!(
                "prompt {i}: max rel err {err:.2e}, top-1 {:.0}%",
                top1 * 100.0
            ));
            assert!(
                err <= bound(q),
                "{name} {q} prompt {i}: relative error {err:.3e} > {:.0e}",
                bound(q)
            );
        }
        eprintln!("{name} {q}: {}", report.join("; "));
        // `_0` (KN) and `_1` (NK) store the same values in another layout: same logits, up to
        // float reassociation in the kernels.
        if let Some(twin) = q.strip_suffix("_1").map(|s| format!("{s}_0")) {
            let twin: &str = SCHEMES.iter().find(|s| **s == twin).unwrap();
            for i in 0..refs.input_ids.len() {
                let (err, _) = compare(
                    &computed[&(*q, i)],
                    &computed[&(twin, i)],
                    refs.logits[i].0[1],
                );
                assert!(
                    err < 1e-4,
                    "{name}: {q} and {twin} differ by {err:.2e} on prompt {i}"
                );
            }
        }
        if *q == "q0f32" || *q == "q0f16" {
            for (i, p) in text["prompts"].as_array().unwrap().iter().enumerate() {
                let (prompt_ids, generated) =
                    greedy_of(&w, &dist, p["text"].as_str().unwrap(), refs.greedy[i].len());
                assert_eq!(
                    prompt_ids, refs.input_ids[i],
                    "{name}: tokenization of prompt {i}"
                );
                if *q == "q0f32" {
                    // Generation may stop early at a stop token; what it produced must match.
                    assert!(!generated.is_empty());
                    assert_eq!(
                        generated[..],
                        refs.greedy[i][..generated.len()],
                        "{name} q0f32: greedy continuation of prompt {i}"
                    );
                }
            }
        }
    }
}

#[test]
fn llama_gqa_matches_transformers() {
    check_fixture(
        "tiny-llama",
        fixture_recipe("tiny-llama", "cpu"),
        "tiny-llama",
    );
}

#[test]
fn gpt_neox_matches_transformers() {
    check_fixture("tiny-neox", fixture_recipe("tiny-neox", "cpu"), "tiny-neox");
}

#[test]
fn rwkv_matches_transformers() {
    check_fixture("tiny-rwkv", fixture_recipe("tiny-rwkv", "cpu"), "tiny-rwkv");
}

#[test]
fn merged_vicuna_matches_transformers() {
    check_fixture(
        "tiny-vicuna",
        fixture_recipe("tiny-vicuna", "cpu"),
        "tiny-vicuna-delta",
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let w = Work::new();
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "cpu"),
    );
    w.build_json(&[&r], &[]);
    let dist = w.dist().join("tiny-llama-q4f16_1");
    let sample = |seed: &str| {
        let out = w.mlcb(&[
            "run",
            dist.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--seed",
            seed,
            "--max-tokens",
            "16",
            "--json",
        ]);
        assert_success(&out);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generated_ids"].clone()
    };
    assert_eq!(sample("7"), sample("7"));
    assert_ne!(
        sample("7"),
        sample("8"),
        "different seeds should (almost surely) differ on a random model"
    );
}

/// `--threads` changes the pool, not the results: the same logits (prefill and token-by-token
/// decode) to the bit and the same greedy tokens at 1 and 3 threads, for a KN scheme with int8
/// decode and a row-major 3-bit one.
#[test]
fn results_do_not_depend_on_threads() {
    let w = Work::new();
    let schemes = ["q4f16_0", "q3f16_1"];
    let recipes: Vec<PathBuf> = schemes
        .iter()
        .map(|q| {
            let text = recipe_text("tiny-llama", &fixture("tiny-llama"), q, "cpu");
            w.recipe(&format!("{q}.toml"), &text)
        })
        .collect();
    let paths: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    w.build_json(&paths, &[]);
    for q in schemes {
        let dist = w.dist().join(format!("tiny-llama-{q}"));
        let d = dist.to_str().unwrap();
        let ids = "1,5,9,300,42,7,7,100";
        let logits = |threads: &str, decode: bool| {
            let file = w.path().join(format!("{q}-{threads}-{decode}.safetensors"));
            let mut args = vec!["logits", d, "--input-ids", ids, "--threads", threads];
            args.extend(["--out", file.to_str().unwrap()]);
            if decode {
                args.push("--decode");
            }
            assert_success(&w.mlcb(&args));
            std::fs::read(&file).unwrap()
        };
        for decode in [false, true] {
            assert!(
                logits("1", decode) == logits("3", decode),
                "{q} decode={decode}: logits differ between 1 and 3 threads"
            );
        }
        let greedy = |threads: &str| {
            let args = ["run", d, "--prompt", "Once upon a time", "--greedy"];
            let out = w.mlcb(
                &[
                    &args[..],
                    &["--max-tokens", "12", "--json", "--threads", threads],
                ]
                .concat(),
            );
            assert_success(&out);
            run_ids(&out.stdout)
        };
        assert_eq!(greedy("1"), greedy("3"), "{q}: greedy tokens");
    }
}

#[test]
fn runtime_errors_are_clean() {
    let w = Work::new();
    let out = w.mlcb(&[
        "run",
        w.path().join("missing").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let r = w.recipe(
        "r.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q0f16", "cpu"),
    );
    w.build_json(&[&r], &[]);
    let dist = w.dist().join("tiny-llama-q0f16");
    let out = w.mlcb(&[
        "logits",
        dist.to_str().unwrap(),
        "--input-ids",
        "1,99999",
        "--out",
        w.path().join("x.safetensors").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
    let out = w.mlcb(&[
        "run",
        dist.to_str().unwrap(),
        "--prompt",
        "x",
        "--device",
        "cuda",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
