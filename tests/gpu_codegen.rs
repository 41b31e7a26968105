//! GPU targets at build time: every fixture × every scheme × every wgpu preset builds, each
//! library carries one naga-validated kernel per distinct plan signature in the preset's language,
//! and the codegen stage is keyed by target.

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

/// (preset, library kind, language)
const GPU_TARGETS: &[(&str, &str)] = &[
    ("vulkan", "spirv"),
    ("android", "spirv"),
    ("metal", "msl"),
    ("metal_x86_64", "msl"),
    ("iphone", "msl"),
    ("webgpu", "wgsl"),
];

fn check_library(lib: &ModelLibrary, preset: &str, language: &str) {
    let want: BTreeSet<String> = plan_signatures(&lib.header.plan);
    // MSL libraries list each kernel twice: the MSL, then the WGSL it came from (for wgpu).
    let languages: &[&str] = if language == "msl" {
        &["msl", "wgsl"]
    } else {
        std::slice::from_ref(&language)
    };
    for lang in languages {
        let got: Vec<&String> = lib
            .header
            .kernels
            .iter()
            .filter(|k| k.language == *lang)
            .map(|k| &k.signature)
            .collect();
        let unique: BTreeSet<String> = got.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            unique, want,
            "{preset} {lang}: one kernel per distinct signature"
        );
        assert_eq!(
            got.len(),
            unique.len(),
            "{preset} {lang}: no duplicate kernels"
        );
    }
    assert_eq!(
        lib.header.kernels.len(),
        want.len() * languages.len(),
        "{preset}: no kernel in another language"
    );
    assert_eq!(lib.header.target.backend, "wgpu");
    // Every wgpu preset computes f16 schemes in f16 (f16 KV cache) and f32 schemes in f32.
    let f16 = lib.header.quantization.contains("f16");
    assert_eq!(
        lib.header.target.options.get("shader_f16"),
        Some(&f16.into()),
        "{preset} {}",
        lib.header.quantization
    );
    for k in &lib.header.kernels {
        let uses_f16 = k.launch["shader_f16"].as_bool().unwrap_or(false);
        assert!(!uses_f16 || f16, "{}: f16 in an f32 scheme", k.signature);
        if k.signature.contains("attention") {
            assert_eq!(
                uses_f16, f16,
                "{}: the KV cache follows the scheme",
                k.signature
            );
        }
        let bytes = lib.kernel_bytes(k);
        assert!(!bytes.is_empty());
        let launch = &k.launch;
        let bindings = launch["bindings"].as_array().expect("bindings");
        let params = launch["params"]["binding"].as_u64().unwrap() as usize;
        assert_eq!(params, bindings.len(), "params come last");
        for (i, b) in bindings.iter().enumerate() {
            assert_eq!(b["binding"].as_u64().unwrap() as usize, i);
        }
        assert_eq!(launch["workgroup_size"].as_array().unwrap().len(), 3);
        assert_eq!(launch["grid"].as_array().unwrap().len(), 3);
        match k.language.as_str() {
            "spirv" => {
                assert_eq!(
                    &bytes[..4],
                    &0x0723_0203u32.to_le_bytes(),
                    "{}",
                    k.signature
                );
                assert_eq!(bytes.len() % 4, 0);
            }
            "msl" => {
                let src = std::str::from_utf8(bytes).unwrap();
                assert!(
                    src.contains(&format!("kernel void {}(", k.entry_point)),
                    "{}: entry point {} missing",
                    k.signature,
                    k.entry_point
                );
                for i in 0..=params {
                    assert!(
                        src.contains(&format!("[[buffer({i})]]")),
                        "{}: binding {i} has no [[buffer({i})]]",
                        k.signature
                    );
                }
                let sizes = launch["msl"]["sizes_buffer"].as_u64().unwrap();
                assert!(src.contains(&format!("_buffer_sizes [[buffer({sizes})]]")));
            }
            "wgsl" => {
                let src = std::str::from_utf8(bytes).unwrap();
                assert!(src.contains(&format!("fn {}(", k.entry_point)));
                let m = naga::front::wgsl::parse_str(src).expect("parses");
                let mut caps = naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
                if uses_f16 {
                    caps |= naga::valid::Capabilities::SHADER_FLOAT16;
                }
                if launch["tuning"]["subgroups"].as_bool().unwrap_or(false) {
                    caps |= naga::valid::Capabilities::SUBGROUP;
                }
                naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
                    .validate(&m)
                    .expect("validates");
            }
            other => panic!("unexpected language {other}"),
        }
    }
}

/// One `mlcb build` per fixture: 10 schemes × 6 GPU presets, sharing fetch/load/quantize.
fn build_fixture(fx: &str) {
    let w = Work::new();
    let mut recipes = Vec::new();
    for q in SCHEMES {
        for (t, _) in GPU_TARGETS {
            recipes.push(w.recipe(
                &format!("{fx}-{q}-{t}.toml"),
                &recipe_text(fx, &fixture(fx), q, t),
            ));
        }
    }
    let refs: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    let report = w.build_json(&refs, &["-j", "2"]);
    let quantizes = statuses(&report)
        .iter()
        .filter(|(s, _)| s == "quantize")
        .count();
    assert_eq!(
        quantizes,
        SCHEMES.len(),
        "quantize is shared by the targets"
    );
    for q in SCHEMES {
        let id = format!("{fx}-{q}");
        for (t, lang) in GPU_TARGETS {
            let path = w.dist().join(&id).join(format!("{id}-{t}.mlcblib"));
            let lib = ModelLibrary::read(&path).unwrap();
            assert_eq!(lib.header.target.name, *t);
            check_library(&lib, t, lang);
        }
    }
}

#[test]
fn tiny_llama_builds_for_every_gpu_target_and_scheme() {
    build_fixture("tiny-llama");
}

#[test]
fn tiny_neox_builds_for_every_gpu_target_and_scheme() {
    build_fixture("tiny-neox");
}

#[test]
fn tiny_rwkv_builds_for_every_gpu_target_and_scheme() {
    build_fixture("tiny-rwkv");
}

fn codegen_keys(report: &serde_json::Value) -> Vec<(String, String, String)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stage"] == "codegen")
        .map(|s| {
            (
                s["label"].as_str().unwrap().to_string(),
                s["key"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn codegen_is_keyed_by_target_and_stable_across_builds() {
    let w = Work::new();
    let fx = "tiny-llama";
    let recipes = w.target_recipes(fx, "q4f16_1", &["cpu", "vulkan", "metal", "webgpu"]);
    let refs: Vec<&Path> = recipes.iter().map(|p| p.as_path()).collect();
    let first = codegen_keys(&w.build_json(&refs, &["--debug-dump"]));
    assert_eq!(first.len(), 4);
    let keys: BTreeSet<&String> = first.iter().map(|(_, k, _)| k).collect();
    assert_eq!(
        keys.len(),
        4,
        "each target has its own codegen key: {first:?}"
    );
    assert!(first.iter().all(|(_, _, s)| s == "ran"));
    // The CPU library stays kernel-free; --debug-dump wrote every GPU kernel.
    // (Checked before the rebuild without --debug-dump replaces the folder.)
    let id = "tiny-llama-q4f16_1";
    let dir = w.dist().join(id);
    let cpu = ModelLibrary::read(&dir.join(format!("{id}-cpu.mlcblib"))).unwrap();
    assert!(cpu.header.kernels.is_empty() && cpu.blobs.is_empty());
    for t in ["vulkan", "metal", "webgpu"] {
        let lib = ModelLibrary::read(&dir.join(format!("{id}-{t}.mlcblib"))).unwrap();
        let kdir = dir.join("debug/kernels").join(t);
        for (n, k) in lib.header.kernels.iter().enumerate() {
            let ext = match k.language.as_str() {
                "spirv" => "spv",
                "msl" => "metal",
                _ => "wgsl",
            };
            let op = k
                .signature
                .split(':')
                .nth(1)
                .unwrap()
                .split('[')
                .next()
                .unwrap();
            let f = kdir.join(format!("{n}-{op}.{ext}"));
            assert_eq!(
                std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())),
                lib.kernel_bytes(k)
            );
            // An MSL kernel's WGSL is its twin's file (the library carries it), written once.
            let twin = match k.language.as_str() {
                "msl" => {
                    assert!(!kdir.join(format!("{n}-{op}.wgsl")).exists(), "{n}: twice");
                    lib.header
                        .kernels
                        .iter()
                        .position(|w| w.language == "wgsl" && w.signature == k.signature)
                        .unwrap()
                }
                _ => n,
            };
            let wgsl = std::fs::read_to_string(kdir.join(format!("{twin}-{op}.wgsl"))).unwrap();
            assert!(wgsl.contains("@compute"));
            // The WGSL is regenerated as the library's kernels were: in f16 for this f16 scheme.
            let f16 = k.launch["shader_f16"].as_bool().unwrap_or(false);
            assert_eq!(wgsl.starts_with("enable f16;"), f16, "{}", k.signature);
            assert_eq!(
                f16,
                op == "attention"
                    || k.signature.starts_with("prefill:matmul")
                    || k.signature.starts_with("prefill:logits"),
                "{}",
                k.signature
            );
        }
    }
    assert!(!dir.join("debug/kernels/cpu").exists());
    let second = codegen_keys(&w.build_json(&refs, &[]));
    for ((l1, k1, _), (l2, k2, s2)) in first.iter().zip(&second) {
        assert_eq!((l1, k1), (l2, k2), "the key is stable");
        assert_eq!(s2, "cached", "{l2}");
    }
}

#[test]
fn pinned_tuning_records_shape_the_kernels_and_bad_ones_are_user_errors() {
    let w = Work::new();
    let fx = "tiny-llama";
    let sig = "decode:rms_norm[256]";
    let tuning = |wg: u32| {
        serde_json::json!({
            "device": "test", "tuned": true,
            "records": { sig: {"workgroup_size": wg, "rows_per_workgroup": 1, "vector_width": 4} }
        })
        .to_string()
    };
    // tuning_file is a top-level recipe key (relative to the recipe).
    let recipe = |file: &str| {
        recipe_text(fx, &fixture(fx), "q4f16_1", "webgpu").replacen(
            "[model]",
            &format!("tuning_file = \"{file}\"\n[model]"),
            1,
        )
    };
    std::fs::write(w.path().join("good.json"), tuning(128)).unwrap();
    std::fs::write(w.path().join("bad.json"), tuning(48)).unwrap();
    let good = w.recipe("good.toml", &recipe("good.json"));
    w.build_json(&[&good], &[]);
    let id = "tiny-llama-q4f16_1";
    let lib = ModelLibrary::read(&w.dist().join(id).join(format!("{id}-webgpu.mlcblib"))).unwrap();
    let k = lib
        .header
        .kernels
        .iter()
        .find(|k| k.signature == sig)
        .unwrap();
    assert_eq!(k.launch["workgroup_size"][0], 128);
    let src = std::str::from_utf8(lib.kernel_bytes(k)).unwrap();
    assert!(src.contains("const WG: u32 = 128u;"), "{src}");
    let other = lib
        .header
        .kernels
        .iter()
        .find(|k| k.signature == "prefill:rms_norm[256]")
        .unwrap();
    assert_eq!(other.launch["workgroup_size"][0], 64, "preset default");

    let bad = w.recipe("bad.toml", &recipe("bad.json"));
    let out = w.build(&[&bad], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad tuning record is a user error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(sig) && err.contains("workgroup_size 48"),
        "{err}"
    );
}
