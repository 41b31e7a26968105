//! `mlcb build`, `mlcb explain`, `mlcb clean`: recipes (or build.py's flags) → the DAG → `dist/`.

use crate::cache::remote::Remote;
use crate::cache::remote_config::{self, RemoteMode};
use crate::cache::Cache;
use crate::graph::{dag, scheduler};
use crate::recipe::{self, ChatSettings, Recipe, Source, TargetSpec};
use crate::stages::BuildContext;
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// The cache folder (default: $MLCB_CACHE_DIR, else ./cache).
    #[arg(long, global = true)]
    pub cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    pub fn dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .or_else(|| std::env::var_os("MLCB_CACHE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("cache"))
    }
}

/// The shared remote cache (see README "The remote cache"). Each setting: flag, else environment,
/// else the `[cache]` table of `$MLCB_CONFIG` or `./mlcb.toml`.
#[derive(Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// Remote cache URL: s3://bucket/prefix, gs://…, az://…, file:///shared/folder, or `none`
    /// (default: $MLCB_REMOTE_CACHE, else `remote` in the config file).
    #[arg(long, value_name = "URL")]
    pub remote_cache: Option<String>,
    /// read-write: download hits and upload what was computed; read-only: never upload (untrusted
    /// builds). Default: $MLCB_REMOTE_CACHE_MODE, else the config file, else read-write.
    #[arg(long, value_enum, value_name = "MODE")]
    pub remote_cache_mode: Option<RemoteMode>,
    /// Fail (exit 3) when the remote cache cannot be reached, instead of warning and computing.
    #[arg(long)]
    pub remote_cache_required: bool,
}

impl RemoteArgs {
    /// Resolve and open the remote cache, if one is configured (no network yet).
    pub fn open(&self) -> Result<Option<Arc<Remote>>> {
        let flags = remote_config::RemoteFlags {
            url: self.remote_cache.clone(),
            mode: self.remote_cache_mode,
            required: self.remote_cache_required,
        };
        match remote_config::from_process(&flags)? {
            Some(settings) => Ok(Some(Arc::new(Remote::open(&settings)?))),
            None => Ok(None),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BuildArgs {
    /// Recipe files; all are built in one DAG.
    pub recipes: Vec<PathBuf>,
    /// build.py form: a model name (looked up in <artifact-path>/models/NAME), a folder or a .gguf file.
    #[arg(long)]
    pub model: Option<String>,
    /// build.py form: a Hugging Face repository ORG/NAME to fetch.
    #[arg(long)]
    pub hf_path: Option<String>,
    /// build.py form: the target preset.
    #[arg(long)]
    pub target: Option<String>,
    /// build.py form: the quantization scheme (default q4f16_1).
    #[arg(long)]
    pub quantization: Option<String>,
    /// How symmetric schemes pick group scales: `mse` (default: least error) or `absmax`
    /// (build.py's rule, bit-identical weights). Also overrides `quantization_scales` of recipes.
    #[arg(long, value_parser = ["mse", "absmax"])]
    pub quantization_scales: Option<String>,
    /// Quantize with GPTQ codes computed from calibration text (`gptq`) or round to nearest
    /// (`none`). Also overrides the `[calibration]` table of recipes.
    #[arg(long, value_parser = ["gptq", "none"])]
    pub calibration: Option<String>,
    /// The calibration text file (implies `--calibration gptq`; default: the built-in text).
    #[arg(long)]
    pub calibration_text: Option<PathBuf>,
    /// build.py form: the context size (-1: the model's own).
    #[arg(long, allow_hyphen_values = true)]
    pub max_seq_len: Option<i64>,
    /// The CUDA architecture (sm_80, sm_86, sm_89, sm_90; default: the recipe's, else sm_80).
    /// Also overrides `cuda_arch` of recipe files.
    #[arg(long)]
    pub cuda_arch: Option<String>,
    /// wgpu targets: `off` keeps f16 schemes' kernels in f32 arithmetic with an f32 KV cache, for
    /// devices without shader-f16 (default: the preset's choice, `on` for every wgpu preset).
    /// Also overrides `shader_f16` of recipe files.
    #[arg(long, value_parser = ["on", "off"])]
    pub shader_f16: Option<String>,
    /// build.py form: llvm-mingw for Windows cross builds (recorded in the target options).
    #[arg(long)]
    pub llvm_mingw: Option<PathBuf>,
    /// Where `<model>-<quant>/` folders go.
    #[arg(long, default_value = "dist")]
    pub artifact_path: PathBuf,
    /// 0: rebuild every stage and overwrite its cache entries.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub use_cache: u8,
    /// Add `debug/` with the plan in readable form.
    #[arg(long)]
    pub debug_dump: bool,
    /// Print the DAG with each stage's key and whether it would run; run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a machine-readable report on stdout at the end.
    #[arg(long)]
    pub json: bool,
    /// Refuse to build unless every source resolves exactly as recorded in mlcb.lock (next to
    /// the first recipe); without it, a build writes or updates mlcb.lock.
    #[arg(long)]
    pub locked: bool,
    /// Kernel tuning: `off` (preset defaults, identical on every machine), `cached` (records
    /// measured earlier on this machine's matching device), `on` (also measure what is missing).
    #[arg(long, value_enum, default_value_t = crate::stages::tune::TuneMode::Off)]
    pub tune: crate::stages::tune::TuneMode,
    /// Run at most N stages at once.
    #[arg(short = 'j', long, default_value_t = 2)]
    pub jobs: usize,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// The recipes a command names: files, or one recipe made from build.py's flags.
pub fn recipes_from(args: &BuildArgs) -> Result<Vec<Recipe>> {
    let flag_form = args.model.is_some() || args.hf_path.is_some();
    if !args.recipes.is_empty() && flag_form {
        crate::user_bail!("give recipe files or --model/--hf-path, not both");
    }
    if !flag_form {
        if args.recipes.is_empty() {
            crate::user_bail!("nothing to build: give recipe files (e.g. `mlcb build recipes/tiny-llama-cpu.toml`) or --model NAME");
        }
        if args.target.is_some() || args.quantization.is_some() || args.max_seq_len.is_some() {
            crate::user_bail!("--target, --quantization and --max-seq-len go with --model; with recipe files, set them in the recipe");
        }
        let mut recipes: Vec<Recipe> = args
            .recipes
            .iter()
            .map(|p| recipe::load(p))
            .collect::<Result<_>>()?;
        // --cuda-arch overrides the recipes' cuda_arch (every recipe must target cuda).
        if let Some(a) = &args.cuda_arch {
            for r in &mut recipes {
                if r.target.preset.name != "cuda"
                    || !recipe::targets::CUDA_ARCHS.contains(&a.as_str())
                {
                    crate::user_bail!(
                        "--cuda-arch {a} needs recipes for the cuda target ({} targets {}) and one of {}",
                        r.origin,
                        r.target.preset.name,
                        recipe::targets::CUDA_ARCHS.join(", ")
                    );
                }
                r.target.cuda_arch = Some(a.clone());
            }
        }
        for r in &mut recipes {
            r.target.shader_f16 = shader_f16_flag(args, &r.target, &r.origin)?;
            r.scale_rule = scale_rule_flag(args).unwrap_or(r.scale_rule);
            r.calibration = calibration_flags(args, r.calibration.take())?;
        }
        return Ok(recipes);
    }
    Ok(vec![recipe_from_flags(args)?])
}

/// `--shader-f16` applied over a target's own setting; only wgpu targets take it.
fn shader_f16_flag(args: &BuildArgs, target: &TargetSpec, origin: &str) -> Result<bool> {
    match args.shader_f16.as_deref() {
        None => Ok(target.shader_f16),
        Some(v) => recipe::targets::shader_f16_for(target.preset, Some(v == "on"))
            .map_err(|m| crate::error::user(format!("--shader-f16 for {origin}: {m}"))),
    }
}

/// `--calibration` / `--calibration-text` applied over a recipe's own setting.
fn calibration_flags(
    args: &BuildArgs,
    recipe: Option<crate::quant::calibration::Calibration>,
) -> Result<Option<crate::quant::calibration::Calibration>> {
    let mut c = match args.calibration.as_deref() {
        Some("none") => {
            if args.calibration_text.is_some() {
                crate::user_bail!("--calibration-text needs --calibration gptq, not none");
            }
            return Ok(None);
        }
        Some(_) => Some(recipe.unwrap_or_default()),
        None => recipe,
    };
    if let Some(t) = &args.calibration_text {
        if !t.is_file() {
            crate::user_bail!("--calibration-text {} is not a file", t.display());
        }
        c.get_or_insert_with(Default::default).text_file = Some(t.clone());
    }
    Ok(c)
}

fn scale_rule_flag(args: &BuildArgs) -> Option<crate::quant::ScaleRule> {
    // clap's value_parser already limited the names.
    args.quantization_scales
        .as_deref()
        .and_then(crate::quant::ScaleRule::from_name)
}

fn recipe_from_flags(args: &BuildArgs) -> Result<Recipe> {
    let models = args.artifact_path.join("models");
    let (name, source) = match (&args.hf_path, &args.model) {
        (Some(hf), model) => {
            let base = hf.rsplit('/').next().unwrap_or(hf).to_string();
            if hf.split('/').count() != 2 {
                crate::user_bail!("--hf-path {hf} must look like ORG/NAME");
            }
            if let Some(m) = model {
                if m != &base {
                    crate::user_bail!(
                        "--model {m} must equal the basename of --hf-path ({base}), as in build.py"
                    );
                }
            }
            (
                base,
                Source::Hub {
                    repo: hf.clone(),
                    revision: "main".into(),
                },
            )
        }
        (None, Some(m)) => {
            let p = Path::new(m);
            let is_path = m.contains('/') || p.exists();
            let path = if is_path {
                p.to_path_buf()
            } else {
                models.join(m)
            };
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| m.clone());
            if m.ends_with(".gguf") {
                (stem, Source::Gguf(path))
            } else {
                let name = path
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| m.clone());
                (name, Source::Local(path))
            }
        }
        (None, None) => unreachable!("flag form needs --model or --hf-path"),
    };
    // Same rule as recipes: the name becomes the dist folder name.
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
        crate::user_bail!(
            "model name {name:?} must be a plain folder name (no `/`, not starting with `.`)"
        );
    }
    let target_name = args.target.as_deref().unwrap_or("cpu");
    let preset = recipe::targets::target(target_name).ok_or_else(|| {
        crate::error::user(format!(
            "unknown --target {target_name}; valid: {}",
            recipe::targets::target_names().join(", ")
        ))
    })?;
    let qname = args.quantization.as_deref().unwrap_or("q4f16_1");
    let quantization = crate::quant::scheme::scheme(qname).ok_or_else(|| {
        crate::error::user(format!(
            "unknown --quantization {qname}; valid: {}",
            crate::quant::scheme::scheme_names().join(", ")
        ))
    })?;
    let max_seq_len = match args.max_seq_len {
        None | Some(-1) => None,
        Some(n) if n <= 0 || n as u64 > recipe::MAX_SEQ_LEN_LIMIT as u64 => {
            crate::user_bail!(
                "--max-seq-len {n} must be between 1 and {} (or -1 for the model's own)",
                recipe::MAX_SEQ_LEN_LIMIT
            )
        }
        Some(n) => Some(n as usize),
    };
    if let Some(a) = &args.cuda_arch {
        if preset.name != "cuda" || !recipe::targets::CUDA_ARCHS.contains(&a.as_str()) {
            crate::user_bail!(
                "--cuda-arch {a} needs --target cuda and one of {}",
                recipe::targets::CUDA_ARCHS.join(", ")
            );
        }
    }
    let mut target = TargetSpec {
        preset,
        cuda_arch: args
            .cuda_arch
            .clone()
            .or_else(|| preset.default_cuda_arch.map(String::from)),
        llvm_mingw: args.llvm_mingw.clone(),
        shader_f16: preset.shader_f16,
    };
    target.shader_f16 = shader_f16_flag(args, &target, "the command line")?;
    Ok(Recipe {
        origin: "command line".into(),
        model_name: name,
        source,
        delta: None,
        architecture: None,
        target,
        quantization,
        scale_rule: scale_rule_flag(args).unwrap_or_default(),
        calibration: calibration_flags(args, None)?,
        max_seq_len,
        chat: ChatSettings::default(),
        tuning_file: None,
    })
}

fn context(args: &BuildArgs, probe: bool) -> Result<BuildContext> {
    let progress = indicatif::MultiProgress::new();
    if args.json || probe {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    Ok(BuildContext {
        cache: Arc::new(Cache::open(&args.cache.dir())?),
        dist_root: args.artifact_path.clone(),
        use_cache: args.use_cache == 1,
        debug_dump: args.debug_dump,
        probe,
        progress,
        tune_mode: args.tune,
        timer_factory: crate::runtime::timer_for_target,
        remote: args.remote.open()?,
    })
}

pub fn execute(args: BuildArgs) -> Result<()> {
    let recipes = recipes_from(&args)?;
    let probe = args.dry_run;
    let ctx = Arc::new(context(&args, probe)?);
    let start = std::time::Instant::now();
    let graph = Arc::new(dag::build(recipes)?);
    let lock_path = super::lock::lock_path(&args.recipes);
    if !probe {
        crate::cache::stale::sweep_build_leftovers(&ctx.cache.root, &ctx.dist_root);
        if args.locked {
            super::lock::check_locked(&ctx, &graph, &lock_path)?;
        }
    }
    // A corrupt blob found while linking has been evicted: run again so its stage rebuilds.
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        match scheduler::run(ctx.clone(), graph.clone(), args.jobs) {
            Err(e)
                if attempts < 3
                    && e.chain().any(|c| {
                        c.downcast_ref::<crate::cache::blobs::CorruptBlob>()
                            .is_some()
                    }) =>
            {
                tracing::warn!("{e:#}; rebuilding what it came from");
                eprintln!(
                    "warning: {}",
                    e.chain()
                        .find_map(|c| c.downcast_ref::<crate::cache::blobs::CorruptBlob>())
                        .unwrap()
                );
            }
            other => break other,
        }
    };
    // Also after a failure (a full disk, a bad input): no temporary files of ours stay behind.
    ctx.cache.index.release();
    ctx.cache.blobs.sweep_own_temp();
    let result = result?;
    if !probe && !args.locked {
        super::lock::update(&ctx, &graph, &result.outputs, &lock_path)?;
    }
    let total = start.elapsed().as_secs_f64();
    let artifacts: Vec<String> = graph
        .graph
        .node_indices()
        .filter(|n| matches!(graph.graph[*n].spec, dag::NodeSpec::Link { .. }))
        .filter_map(|n| {
            result
                .outputs
                .get(&n)
                .and_then(|o| o.local.get("dist"))
                .map(|p| p.display().to_string())
        })
        .collect();
    let remote = ctx.remote.as_ref().filter(|_| !probe).map(|r| r.report());
    if args.json {
        let report = serde_json::json!({ "stages": result.reports, "artifacts": artifacts, "seconds": total, "dry_run": probe, "remote_cache": remote });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_summary(&result.reports, probe, false);
    if let Some(r) = &remote {
        eprintln!(
            "remote cache {} ({}): {} stage(s) downloaded ({:.1} MiB), {} missing, {} uploaded ({:.1} MiB){}",
            r.url,
            r.mode,
            r.stats.hits,
            r.stats.bytes_downloaded as f64 / (1u64 << 20) as f64,
            r.stats.misses,
            r.stats.uploads,
            r.stats.bytes_uploaded as f64 / (1u64 << 20) as f64,
            if r.stats.unavailable.is_some() {
                "; unavailable, skipped"
            } else {
                ""
            }
        );
    }
    if !probe {
        for a in &artifacts {
            eprintln!("built {a} in {total:.2}s");
        }
    }
    Ok(())
}

fn print_summary(reports: &[scheduler::NodeReport], probe: bool, explain: bool) {
    for r in reports {
        let key = r.key.as_deref().map(|k| &k[..12]).unwrap_or("?");
        if probe {
            println!(
                "{:<10} {:<12} {:<44} {}",
                r.status,
                key,
                r.label,
                if explain {
                    r.changes.join("; ")
                } else {
                    String::new()
                }
            );
        } else {
            eprintln!("{:<8} {:>7.2}s  {}", r.status, r.seconds, r.label);
        }
    }
}

/// `mlcb explain`: for each stage that would run, which key input changed since the last build.
pub fn explain(args: BuildArgs) -> Result<()> {
    let recipes = recipes_from(&args)?;
    let ctx = Arc::new(context(&args, true)?);
    let graph = Arc::new(dag::build(recipes)?);
    let result = scheduler::run(ctx.clone(), graph, args.jobs)?;
    ctx.cache.index.release();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result.reports)?);
        return Ok(());
    }
    for r in &result.reports {
        match r.status.as_str() {
            "cached" => println!("{:<40} up to date", r.label),
            "would run" => println!("{:<40} would run: {}", r.label, r.changes.join("; ")),
            _ => println!("{:<40} would run: {}", r.label, r.changes.join("; ")),
        }
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct CleanArgs {
    /// Recipes whose dist outputs to remove.
    pub recipes: Vec<PathBuf>,
    /// Empty the cache.
    #[arg(long)]
    pub cache: bool,
    #[arg(long, default_value = "dist")]
    pub artifact_path: PathBuf,
    #[command(flatten)]
    pub cache_dir: CacheArgs,
}

pub fn clean(args: CleanArgs) -> Result<()> {
    if args.recipes.is_empty() && !args.cache {
        crate::user_bail!("say what to clean: recipe files (their dist outputs) and/or --cache");
    }
    for p in &args.recipes {
        let r = recipe::load(p)?;
        let dir = crate::stages::link::dist_dir(&args.artifact_path, &r);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| crate::error::env(format!("cannot remove {}: {e}", dir.display())))?;
            eprintln!("removed {}", dir.display());
        }
    }
    if args.cache {
        let dir = args.cache_dir.dir();
        Cache::clear(&dir)?;
        eprintln!("emptied the cache {}", dir.display());
    }
    Ok(())
}
