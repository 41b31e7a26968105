//! Helpers for integration tests: run the `mlcb` binary on fixture folders in temporary places.
#![allow(dead_code)]

pub mod hub_server;
pub mod logits;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// A scratch workspace: its own cache and dist folders.
pub struct Work {
    pub dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        Work {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }
    pub fn dist(&self) -> PathBuf {
        self.path().join("dist")
    }
    /// Write a recipe file into the workspace and return its path.
    pub fn recipe(&self, file: &str, text: &str) -> PathBuf {
        let p = self.path().join(file);
        std::fs::write(&p, text).unwrap();
        p
    }
    /// One recipe `TARGET.toml` of fixture `fx` at `quant` per target.
    pub fn target_recipes(&self, fx: &str, quant: &str, targets: &[&str]) -> Vec<PathBuf> {
        targets
            .iter()
            .map(|t| {
                self.recipe(
                    &format!("{t}.toml"),
                    &recipe_text(fx, &fixture(fx), quant, t),
                )
            })
            .collect()
    }
    /// `mlcb ARGS` with this workspace's cache and dist (dist via --artifact-path where the command takes it).
    pub fn mlcb(&self, args: &[&str]) -> Output {
        self.mlcb_with_env(args, &[])
    }
    /// `mlcb ARGS` with extra environment variables (the runtime's test knobs).
    pub fn mlcb_with_env(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        // lavapipe complains on stderr without an XDG_RUNTIME_DIR; any private folder will do.
        let xdg = self.path().join("xdg");
        std::fs::create_dir_all(&xdg).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_mlcb"));
        c.args(args)
            .current_dir(self.path())
            .env("MLCB_CACHE_DIR", self.cache())
            .env("XDG_RUNTIME_DIR", &xdg)
            .envs(vars.iter().copied())
            .env_remove("RUST_LOG")
            // No remote cache from the test runner's environment.
            .env_remove("MLCB_REMOTE_CACHE")
            .env_remove("MLCB_CONFIG");
        c.output().expect("run mlcb")
    }
    pub fn build(&self, recipes: &[&Path], extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec!["build".into()];
        args.extend(recipes.iter().map(|p| p.display().to_string()));
        args.extend([
            "--artifact-path".to_string(),
            self.dist().display().to_string(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.mlcb(&refs)
    }
    /// Build with `--json` and return the report.
    /// `mlcb explain RECIPE` against this work folder's dist; its stdout (the command must succeed).
    pub fn explain(&self, recipe: &Path) -> String {
        let out = self.mlcb(&[
            "explain",
            recipe.to_str().unwrap(),
            "--artifact-path",
            self.dist().to_str().unwrap(),
        ]);
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn build_json(&self, recipes: &[&Path], extra: &[&str]) -> serde_json::Value {
        let mut e = vec!["--json"];
        e.extend_from_slice(extra);
        let out = self.build(recipes, &e);
        assert_success(&out);
        serde_json::from_slice(&out.stdout).expect("json report")
    }
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "mlcb failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A recipe for a fixture folder.
pub fn recipe_text(name: &str, source: &Path, quant: &str, target: &str) -> String {
    format!(
        "quantization = \"{quant}\"\n[model]\nname = \"{name}\"\nsource = \"{}\"\n[target]\npreset = \"{target}\"\n",
        source.display()
    )
}

/// SmolLM2-135M-Instruct's Q4_1 GGUF (`scripts/fetch-smollm2.sh` puts it under dist/models;
/// `MLCB_SMOLLM2_GGUF` overrides), if present.
#[allow(dead_code)]
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = std::env::var_os("MLCB_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("dist/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.is_file().then_some(p)
}

/// Recipe text of model `name` built from the GGUF at `gguf` (`extra`: more TOML after [target]).
#[allow(dead_code)]
pub fn gguf_recipe_text(name: &str, gguf: &Path, quant: &str, target: &str, extra: &str) -> String {
    format!(
        "quantization = \"{quant}\"\n[model]\nname = \"{name}\"\nsource = {{ gguf = \"{}\" }}\n[target]\npreset = \"{target}\"\n{extra}",
        gguf.display()
    )
}

/// Recipe text of the merged Vicuna fixture pair (base + delta weights).
pub fn vicuna_recipe_text(quant: &str, target: &str) -> String {
    format!(
        "quantization = \"{quant}\"\n[model]\nname = \"tiny-vicuna\"\nsource = \"{}\"\ndelta = \"{}\"\n[target]\npreset = \"{target}\"\n",
        fixture("tiny-vicuna-base").display(),
        fixture("tiny-vicuna-delta").display()
    )
}

/// Recipe text of fixture `name` for `target`, as a function of the scheme (the Vicuna pair for
/// "tiny-vicuna").
pub fn fixture_recipe(name: &'static str, target: &'static str) -> impl Fn(&str) -> String {
    move |q| match name {
        "tiny-vicuna" => vicuna_recipe_text(q, target),
        _ => recipe_text(name, &fixture(name), q, target),
    }
}

/// Every stage of a `--json` report ran if it is in `ran`, and was cached otherwise.
pub fn assert_only_ran(report: &serde_json::Value, ran: &[&str]) {
    for (stage, status) in statuses(report) {
        let want = if ran.contains(&stage.as_str()) {
            "ran"
        } else {
            "cached"
        };
        assert_eq!(status, want, "{stage}: {report}");
    }
}

/// status of each stage in a `--json` report, by stage name (first match per stage).
pub fn statuses(report: &serde_json::Value) -> Vec<(String, String)> {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn status_of(report: &serde_json::Value, stage: &str) -> String {
    statuses(report)
        .into_iter()
        .find(|(s, _)| s == stage)
        .map(|(_, st)| st)
        .unwrap_or_default()
}

/// Every file under `dir` with its bytes' blake3, sorted (for bit-identity checks).
pub fn tree_digest(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                out.push((
                    rel,
                    blake3::hash(&std::fs::read(&p).unwrap())
                        .to_hex()
                        .to_string(),
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}
