//! The cuda target at build time (no GPU needed): every fixture × scheme builds for sm_80 and
//! sm_90 with fused decode steps, each library carries one NVRTC-compiled PTX kernel per distinct
//! plan signature with `.target sm_XX` and its launch description (an f16 KV cache for f16
//! schemes; sm_90 decode kernels ready for programmatic dependent launch); an arch change reruns
//! codegen only; running a CUDA artifact on a machine without a GPU fails cleanly (exit 3). Tests that need NVRTC print a
//! loud SKIP line when mlcb cannot find it (`pip install 'nvidia-cuda-nvrtc==13.0.*'`).

mod common;
use common::*;
use mlcb::codegen::signature::plan_signatures;
use mlcb::formats::model_lib::ModelLibrary;
use std::collections::BTreeSet;
use std::path::Path;

const SCHEMES: &[&str] = &[
    "q0f16", "q0f32", "q3f16_0", "q3f16_1", "q4f16_0", "q4f16_1", "q4f32_0", "q4f32_1", "q8f16_0",
    "q8f16_1",
];
const ARCHS: &[&str] = &["sm_80", "sm_90"];

fn nvrtc_or_skip(test: &str) -> bool {
    match mlcb::codegen::cuda::nvrtc::nvrtc() {
        Ok(n) => {
            eprintln!("{test}: NVRTC {} from {}", n.version(), n.origin);
            true
        }
        Err(e) => {
            eprintln!("\n*** SKIP {test}: NVRTC not found, no PTX compiled ***\n{e}\n");
            false
        }
    }
}

fn cuda_recipe(fx: &str, quant: &str, arch: &str) -> String {
    format!(
        "{}cuda_arch = \"{arch}\"\n",
        recipe_text(fx, &fixture(fx), quant, "cuda")
    )
}

fn check_library(lib: &ModelLibrary, arch: &str) {
    let want: BTreeSet<String> = plan_signatures(&lib.header.plan);
    let got: BTreeSet<String> = lib
        .header
        .kernels
        .iter()
        .map(|k| k.signature.clone())
        .collect();
    assert_eq!(got, want, "one kernel per distinct signature");
    assert_eq!(got.len(), lib.header.kernels.len(), "no duplicate kernels");
    assert_eq!(lib.header.target.backend, "cuda");
    // Decode steps fused (mlcb::codegen::fuse): a norm or an activation into a GEMV.
    let plan = &lib.header.plan;
    assert_eq!(
        plan.format_version,
        mlcb::formats::model_lib::plan::PLAN_FORMAT_VERSION
    );
    use mlcb::formats::model_lib::plan::{MatmulFusion, Op};
    let fused = |ops: &[Op], pred: fn(&MatmulFusion) -> bool| {
        ops.iter()
            .any(|op| matches!(op, Op::Matmul { fusion, .. } if pred(fusion)))
    };
    assert!(
        fused(&plan.decode, |f| f.rms_norm.is_some()
            || f.activation.is_some()
            || f.silu_gate),
        "decode not fused"
    );
    // Prefill GEMMs take the residual adds (all three architectures have them), and no norm.
    assert!(
        fused(&plan.prefill, |f| f.residual.is_some()),
        "prefill residuals not fused"
    );
    assert!(!fused(&plan.prefill, |f| f.rms_norm.is_some()));
    assert_eq!(lib.header.target.options["cuda_arch"], arch);
    assert!(lib.header.target.options["nvrtc_version"].is_string());
    assert_eq!(
        lib.header.tuning["tuned"], false,
        "cross-compiled: preset defaults"
    );
    for k in &lib.header.kernels {
        assert_eq!(k.language, "ptx", "{}", k.signature);
        let ptx = std::str::from_utf8(lib.kernel_bytes(k)).expect("PTX is text");
        assert!(
            ptx.contains(&format!(".target {arch}")),
            "{}: no .target {arch}",
            k.signature
        );
        assert!(
            ptx.contains(&format!(".visible .entry {}(", k.entry_point)),
            "{}: entry {} missing",
            k.signature,
            k.entry_point
        );
        let launch = &k.launch;
        assert_eq!(launch["arch"], arch);
        assert_eq!(launch["block"].as_array().unwrap().len(), 3);
        assert_eq!(launch["grid"].as_array().unwrap().len(), 3);
        let args = launch["args"].as_array().unwrap().len();
        // One PTX parameter per argument, plus meta, scalar and index.
        let params = ptx.matches(&format!("{}_param_", k.entry_point)).count();
        assert!(
            params > args + 2,
            "{}: {params} parameter uses for {args} args",
            k.signature
        );
        // f16 schemes keep an f16 KV cache (the fixtures' heads are at most 128 wide).
        let f16 = lib.header.plan.model_dtype == mlcb::formats::dtype::DType::F16;
        for a in launch["args"].as_array().unwrap() {
            if a["role"] == "state" && a["part"] != "rwkv" {
                let want = if f16 { "f16" } else { "f32" };
                assert_eq!(a["elem"], want, "{}", k.signature);
            }
        }
        // sm_90 decode kernels wait for the kernel before them themselves (programmatic
        // dependent launch); nothing else carries the instruction.
        let pdl = arch == "sm_90" && k.signature.starts_with("decode:");
        assert_eq!(
            launch["pdl"].as_bool().unwrap_or(false),
            pdl,
            "{}",
            k.signature
        );
        assert_eq!(ptx.contains("griddepcontrol.wait"), pdl, "{}", k.signature);
        if k.signature.starts_with("prefill:matmul") || k.signature.starts_with("prefill:logits") {
            // f16 schemes multiply on f16 tensor cores, f32 schemes with 3xTF32 products.
            let f16 = lib.header.plan.model_dtype == mlcb::formats::dtype::DType::F16;
            let mma = if f16 {
                "m16n8k16.row.col.f32.f16"
            } else {
                "m16n8k8.row.col.f32.tf32"
            };
            assert!(
                ptx.contains(&format!("mma.sync.aligned.{mma}")),
                "{}: tensor cores ({mma})",
                k.signature
            );
            assert_eq!(
                launch["block"][0],
                if f16 { 256 } else { 128 },
                "{}",
                k.signature
            );
        }
    }
}

/// One `mlcb build` per fixture: 10 schemes × 2 archs, sharing fetch/load/quantize/tune.
fn build_fixture(fx: &str) {
    if !nvrtc_or_skip(&format!("{fx} cuda build")) {
        return;
    }
    let w = Work::new();
    let mut recipes = Vec::new();
    for q in SCHEMES {
        for a in ARCHS {
            recipes.push(w.recipe(&format!("{fx}-{q}-{a}.toml"), &cuda_recipe(fx, q, a)));
        }
    }
    let refs: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    // Two archs of one scheme share a dist folder: build them in two rounds.
    let first: Vec<&Path> = refs.iter().step_by(2).copied().collect();
    let second: Vec<&Path> = refs.iter().skip(1).step_by(2).copied().collect();
    for (round, arch) in [(first, "sm_80"), (second, "sm_90")] {
        let report = w.build_json(&round, &["-j", "2"]);
        let ran: Vec<(String, String)> = statuses(&report);
        if arch == "sm_90" {
            for (stage, status) in &ran {
                if ["fetch", "load", "quantize", "tune"].contains(&stage.as_str()) {
                    assert_eq!(status, "cached", "{stage} reran for an arch change");
                }
            }
        }
        for q in SCHEMES {
            let id = format!("{fx}-{q}");
            let path = w.dist().join(&id).join(format!("{id}-cuda.mlcblib"));
            let lib = ModelLibrary::read(&path).unwrap();
            check_library(&lib, arch);
        }
    }
}

#[test]
fn tiny_llama_compiles_to_ptx_for_every_scheme_and_arch() {
    build_fixture("tiny-llama");
}

#[test]
fn tiny_neox_compiles_to_ptx_for_every_scheme_and_arch() {
    build_fixture("tiny-neox");
}

#[test]
fn tiny_rwkv_compiles_to_ptx_for_every_scheme_and_arch() {
    build_fixture("tiny-rwkv");
}

fn codegen_status(report: &serde_json::Value) -> Vec<(String, String)> {
    statuses(report)
}

#[test]
fn an_arch_change_reruns_codegen_only_and_the_key_names_nvrtc() {
    if !nvrtc_or_skip("arch change") {
        return;
    }
    let w = Work::new();
    let fx = "tiny-llama";
    let r80 = w.recipe("a.toml", &cuda_recipe(fx, "q4f16_1", "sm_80"));
    let first = codegen_status(&w.build_json(&[&r80], &[]));
    assert!(first.iter().any(|(s, st)| s == "codegen" && st == "ran"));
    // The same recipe again: everything cached.
    let again = codegen_status(&w.build_json(&[&r80], &[]));
    assert!(
        again.iter().all(|(s, st)| st == "cached" || s == "link"),
        "{again:?}"
    );
    // --cuda-arch overrides the recipe: codegen reruns, nothing before it does.
    let report = w.build_json(&[&r80], &["--cuda-arch", "sm_90"]);
    for (stage, status) in codegen_status(&report) {
        match stage.as_str() {
            "codegen" => assert_eq!(status, "ran"),
            "link" => {}
            other => assert_eq!(status, "cached", "{other} reran for an arch change"),
        }
    }
    let id = "tiny-llama-q4f16_1";
    let lib = ModelLibrary::read(&w.dist().join(id).join(format!("{id}-cuda.mlcblib"))).unwrap();
    check_library(&lib, "sm_90");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.dist().join(id).join("build-manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(
        manifest.to_string().contains("untuned")
            || manifest.to_string().contains("\"tuned\":false"),
        "the manifest says the kernels are untuned: {manifest}"
    );
    // --debug-dump writes each kernel's PTX and CUDA C.
    w.build_json(&[&r80], &["--debug-dump"]);
    let kdir = w.dist().join(id).join("debug/kernels/cuda");
    let cu = std::fs::read_dir(&kdir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "cu")
        })
        .count();
    assert_eq!(cu, lib.header.kernels.len());
}

#[test]
fn running_a_cuda_artifact_without_a_gpu_fails_cleanly() {
    if !nvrtc_or_skip("run without a GPU") {
        return;
    }
    let w = Work::new();
    let fx = "tiny-llama";
    let r = w.recipe("a.toml", &cuda_recipe(fx, "q4f16_1", "sm_80"));
    w.build_json(&[&r], &[]);
    let dir = w.dist().join("tiny-llama-q4f16_1");
    let out_file = w.path().join("logits.safetensors");
    let out = w.mlcb(&[
        "logits",
        dir.to_str().unwrap(),
        "--input-ids",
        "1,2,3",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    let err = stderr(&out);
    if mlcb::runtime::cuda::driver::driver_present() {
        eprintln!(
            "a CUDA driver is present: the run may succeed ({:?}): {err}",
            out.status.code()
        );
        assert!(
            out.status.success() || out.status.code() == Some(3),
            "with a driver the run succeeds or fails as an environment error: {err}"
        );
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(3),
        "no GPU is an environment error: {err}"
    );
    assert!(
        err.contains("no CUDA driver") && err.contains("--device cpu"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The CPU still runs the same artifact, its fused decode steps included.
    for decode in [false, true] {
        let mut args = vec![
            "logits",
            dir.to_str().unwrap(),
            "--input-ids",
            "1,2,3",
            "--out",
            out_file.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        if decode {
            args.push("--decode");
        }
        assert_success(&w.mlcb(&args));
    }
}

#[test]
fn without_nvrtc_a_cuda_build_says_how_to_get_it() {
    let w = Work::new();
    let fx = "tiny-llama";
    let r = w.recipe("a.toml", &cuda_recipe(fx, "q4f16_1", "sm_80"));
    let mut args: Vec<String> = vec!["build".into(), r.display().to_string()];
    args.extend([
        "--artifact-path".to_string(),
        w.dist().display().to_string(),
    ]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mlcb"))
        .args(&args)
        .current_dir(w.path())
        .env("MLCB_CACHE_DIR", w.cache())
        // Hide every place NVRTC could come from.
        .env("LD_LIBRARY_PATH", w.path())
        .env("MLCB_NVRTC", w.path().join("nothing-here"))
        .env("PATH", w.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    if out.status.success() {
        eprintln!("SKIP: NVRTC is on the loader's default search path; cannot hide it");
        return;
    }
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("pip install 'nvidia-cuda-nvrtc==13.0.*'"),
        "{err}"
    );
    assert!(
        err.contains("MLCB_NVRTC") && err.contains("nothing-here"),
        "{err}"
    );
}
