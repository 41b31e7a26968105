//! A real pretrained model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF (fetched by
//! `scripts/fetch-smollm2.sh`, which `.ci/run` calls) built at four schemes; greedy decoding of
//! "The capital of France is" must continue with " Paris", and the chat template must answer
//! "What is the capital of France?" sensibly. q4f16_1 is built twice: rounded to nearest, and with
//! GPTQ calibration, which must say " Paris" and be closer to q0f32 on a paragraph it never saw.

mod common;
use common::logits::{greedy_args, logits_args, read_logits, run_ids};
use common::*;
use std::path::PathBuf;

#[test]
fn smollm2_says_paris() {
    let Some(model) = smollm2_gguf() else {
        eprintln!("skipped: SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh (CI does)");
        return;
    };
    let w = Work::new();
    let schemes = ["q0f32", "q0f16", "q8f16_1", "q4f32_1", "q4f16_1"];
    let recipes: Vec<PathBuf> = schemes
        .iter()
        .map(|q| {
            w.recipe(
                &format!("{q}.toml"),
                &gguf_recipe_text("smollm2", &model, q, "cpu", ""),
            )
        })
        .collect();
    let mut recipes = recipes;
    // The calibrated model for the CPU and for Vulkan: one quantize stage, one dist folder with
    // both libraries.
    for target in ["cpu", "vulkan"] {
        recipes.push(w.recipe(
            &format!("gptq-{target}.toml"),
            &gguf_recipe_text(
                "smollm2-gptq",
                &model,
                "q4f16_1",
                target,
                "[calibration]\nmethod = \"gptq\"\n",
            ),
        ));
    }
    let refs: Vec<&std::path::Path> = recipes.iter().map(|p| p.as_path()).collect();
    w.build_json(&refs, &[]);
    let dists: Vec<(String, PathBuf)> = schemes
        .iter()
        .map(|q| (q.to_string(), w.dist().join(format!("smollm2-{q}"))))
        .chain([(
            "q4f16_1 + GPTQ".to_string(),
            w.dist().join("smollm2-gptq-q4f16_1"),
        )])
        .collect();
    for (q, dist) in &dists {
        let out = greedy_paris(&w, dist, None);
        let text = reported_text(&out, q);
        if q == "q4f16_1" {
            // Requantizing Q4_1 weights to the symmetric int4 grid by rounding to nearest costs
            // ~7.8% relative weight error with mse scales (q4f32_1, asymmetric like Q4_1, costs
            // 0.4%), and the tied embedding (Q8_0 in the GGUF) goes to int4 too; at that noise
            // this 135M model's greedy answer is not " Paris". GPTQ (below) is the remedy; the
            // plain artifact must still build and generate.
            assert!(!text.is_empty(), "{q}: no text generated");
            continue;
        }
        assert!(
            text.starts_with(" Paris"),
            "{q}: greedy continuation was {text:?}"
        );
    }
    // The same artifact through the wgpu runtime (lavapipe here): the same tokens as the CPU.
    let gptq = &dists[5].1;
    let out = greedy_paris(&w, gptq, Some("wgpu"));
    if out.status.code() == Some(3) && stderr(&out).contains("no wgpu adapter found") {
        eprintln!(
            "SKIPPED the Vulkan run: no wgpu adapter (install mesa-vulkan-drivers for lavapipe)"
        );
    } else {
        let text = reported_text(&out, "q4f16_1 + GPTQ through Vulkan");
        assert!(text.starts_with(" Paris"), "through Vulkan: {text:?}");
        let cpu = greedy_paris(&w, gptq, None);
        assert_success(&cpu);
        assert_eq!(
            run_ids(&out.stdout),
            run_ids(&cpu.stdout),
            "wgpu vs cpu tokens"
        );
    }

    // GPTQ's codes follow the model's activations: on a paragraph absent from the calibration
    // text, its distribution is much closer to q0f32's than round-to-nearest's (mean KL 0.20 vs
    // 0.56 when measured).
    let paragraph = "The history of the bicycle begins in the early nineteenth century, when \
        inventors in Europe built wooden machines that riders pushed along with their feet. \
        Pedals attached to the front wheel came later, and the chain drive that powers modern \
        bicycles was added near the end of the century. Question: Why do leaves change colour in \
        autumn? Answer: As the days get shorter, trees stop making chlorophyll.";
    let reference = &dists[0].1;
    let args = greedy_args(reference, paragraph, 1);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = w.mlcb(&args);
    assert_success(&out);
    let (ids, _) = run_ids(&out.stdout);
    let logits = |dist: &PathBuf, tag: &str| {
        let (args, file) = logits_args(w.path(), dist, &ids, tag);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_success(&w.mlcb(&args));
        read_logits(&file)
    };
    let full = logits(reference, "f32");
    let kl = |dist: &PathBuf, tag: &str| mean_kl(&full, &logits(dist, tag), ids.len());
    let (rtn, gptq) = (kl(&dists[4].1, "rtn"), kl(&dists[5].1, "gptq"));
    eprintln!(
        "mean KL to q0f32 over {} tokens: q4f16_1 {rtn:.3}, with GPTQ {gptq:.3}",
        ids.len()
    );
    assert!(gptq < 0.7 * rtn, "GPTQ KL {gptq} vs round-to-nearest {rtn}");

    // The chat template embedded in the GGUF (ChatML), through `mlcb chat` with piped stdin.
    let dist = w.dist().join("smollm2-q8f16_1");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .args([
            "chat",
            dist.to_str().unwrap(),
            "--greedy",
            "--max-tokens",
            "40",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_success(&out);
    let reply = String::from_utf8_lossy(&out.stdout);
    eprintln!("chat reply: {reply}");
    assert!(reply.contains("Paris"), "chat reply: {reply}");
}

/// Mean over positions of KL(p ‖ q) for logits `[rows, vocab]`.
/// `mlcb run --greedy --json` of "The capital of France is" for 4 tokens (on `device`, if given).
fn greedy_paris(w: &Work, dist: &std::path::Path, device: Option<&str>) -> std::process::Output {
    let mut args = greedy_args(dist, "The capital of France is", 4);
    if let Some(d) = device {
        args.extend(["--device".to_string(), d.to_string()]);
    }
    w.mlcb(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The generated text of a successful `mlcb run --json`, said on stderr with its decode speed.
fn reported_text(out: &std::process::Output, label: &str) -> String {
    assert_success(out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["text"].as_str().unwrap().to_string();
    eprintln!(
        "{label}: {text:?} ({:.2} tok/s decode)",
        v["timings"]["decode_tok_s"].as_f64().unwrap_or(0.0)
    );
    text
}

fn mean_kl(p: &[f32], q: &[f32], rows: usize) -> f64 {
    let vocab = p.len() / rows;
    let log_softmax = |v: &[f32]| {
        let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let z = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        v.iter().map(|&x| x as f64 - m - z).collect::<Vec<f64>>()
    };
    p.chunks(vocab)
        .zip(q.chunks(vocab))
        .map(|(a, b)| {
            let (la, lb) = (log_softmax(a), log_softmax(b));
            la.iter()
                .zip(&lb)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>()
        })
        .sum::<f64>()
        / rows as f64
}
