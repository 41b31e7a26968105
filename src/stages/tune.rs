//! tune: the kernel configuration records codegen uses, keyed by kernel signature and device.
//!
//! Where each record comes from, in order:
//! 1. a tuning file the recipe pins (`tuning_file`): its records, for the signatures it names;
//! 2. with `--tune=cached|on` and a local device that matches the target (a [`KernelTimer`] from
//!    the context's factory): the tuning database of that device (`cache/tuning/`); with
//!    `--tune=on`, signatures it lacks are measured now — every candidate configuration of
//!    `codegen::wgsl::tune_space` (wgpu targets: generated and validated by naga) or
//!    `codegen::cuda::tune_space` (cuda, on a GPU of the target's architecture: generated and
//!    compiled by NVRTC) is timed, the fastest kept and stored;
//! 3. the target preset's defaults.
//!
//! `tuned` is true only when every signature's record was measured on the device (now or by an
//! earlier build), and the manifest repeats it. `--tune=off` (the default) gives the same records
//! on every machine, as a reproducible release build needs; measured records depend on the device
//! by design, and the stage key includes them, so a build on another device rebuilds codegen.
//! Tuning never changes what a kernel computes beyond floating-point reassociation, and the
//! measurement checks it: each candidate first runs once on fixed inputs, and one whose results
//! are not the default configuration's is reported and not timed (`codegen::tune_check`).

use super::{cached_or_run, temp_output, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::cache::tuning_db::{TunedRecord, TuningDb};
use crate::codegen::cuda::half_activations::HalfIo;
use crate::codegen::tune::TimedKernel;
use crate::codegen::tune_check::disagreement;
use crate::codegen::wgsl::spec::KernelSpec;
use crate::formats::model_lib::plan::Plan;
use crate::recipe::TargetSpec;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// 2: the CUDA architecture is no longer a key input (preset defaults do not depend on it, so an
/// arch change rebuilds codegen only; measured records come in a pinned tuning file). 3: cuda
/// records carry `kv_splits` (decode attention's default is 8 blocks per head). 4: the default
/// threads of a cuda tensor-core decode GEMV follow its grid (`tune_space::gemv_mma_threads`).
/// 5: its default `rows_per_block` is 1 (its runs of 16 rows per block, now a knob). 6: 2 where
/// one run per block would take more than a wave of blocks (`tune_space::gemv_mma_runs`). 7: a
/// cuda prefill matmul's default threads are its block's, 256 (128 picks the f16 GEMM's 64×64
/// warp tiles, `gemm_f16::WarpTiles`).
pub const VERSION: u32 = 7;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningRecords {
    /// "preset-defaults:<target>", a pinned file's device, or the device measured on.
    pub device: String,
    pub tuned: bool,
    /// Signature → configuration.
    pub records: BTreeMap<String, serde_json::Value>,
}

/// `--tune`: whether the build may use or take measurements on a local device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TuneMode {
    /// Preset defaults (or a pinned file): the same records on every machine.
    #[default]
    Off,
    /// Records already in the device's tuning database; measure nothing.
    Cached,
    /// Like `cached`, and measure the signatures the database lacks.
    On,
}

pub use crate::codegen::tune::{KernelTimer, TimerFactory};

/// One device's measurements at a time: timing two kernels at once would disturb both.
static MEASURE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The preset's default configuration for a signature; `spec`, its kernel, is needed for cuda.
fn default_config(
    target: &TargetSpec,
    signature: &str,
    spec: Option<&KernelSpec>,
) -> Result<serde_json::Value> {
    Ok(match target.preset.backend {
        // The CPU kernels split matrix rows into tasks for the thread pool.
        "cpu" => serde_json::json!({ "rows_per_task": 64 }),
        "cuda" => {
            let spec = spec.ok_or_else(|| {
                anyhow::anyhow!("signature {signature} has no kernel spec (an mlcb bug)")
            })?;
            serde_json::to_value(crate::codegen::cuda::tune_space::default_for(
                signature, spec,
            ))
            .expect("a tuning serialises")
        }
        _ => serde_json::to_value(crate::codegen::wgsl::tune_space::preset_default(
            target.preset.subgroups,
        ))
        .expect("a tuning serialises"),
    })
}

/// Times every candidate of `spec` on `timer` (for the target's kernel language) and returns the
/// fastest.
fn measure(
    timer: &mut dyn KernelTimer,
    target: &TargetSpec,
    f16: bool,
    half: HalfIo,
    signature: &str,
    spec: &KernelSpec,
) -> Result<TunedRecord> {
    if target.preset.backend == "cuda" {
        let arch = cuda_arch(target);
        let candidates = crate::codegen::cuda::tune_space::candidates(signature, spec);
        let mut generated = std::collections::HashSet::new();
        fastest(timer, signature, spec, &candidates, |t| {
            // A candidate the shape cannot take (attention's shared memory) is skipped, and so
            // is one whose kernel an earlier candidate generated (a knob this instance of the
            // kernel cannot use: the f16 GEMM's activation ring over an f32 activation).
            let Ok(kernel) = crate::codegen::cuda::generate(signature, spec, *t, arch, f16, half)
            else {
                return Ok(None);
            };
            if !generated.insert(blake3::hash(kernel.source.as_bytes())) {
                tracing::debug!("tune {signature}: {t:?}: the kernel of an earlier candidate");
                return Ok(None);
            }
            let ptx = crate::codegen::cuda::compile(&kernel)?;
            Ok(Some(Candidate::Cuda(kernel, ptx)))
        })
    } else {
        let base = crate::codegen::wgsl::tune_space::preset_default(target.preset.subgroups);
        let candidates = crate::codegen::wgsl::tune_space::candidates(spec, base);
        fastest(timer, signature, spec, &candidates, |t| {
            let kernel = crate::codegen::wgsl::generate(signature, spec, *t, f16)?;
            crate::codegen::gpu::validate(&kernel)?;
            Ok(Some(Candidate::Wgsl(kernel)))
        })
    }
}

/// A candidate configuration's kernel, as the timer loads it.
enum Candidate {
    /// The kernel and its PTX.
    Cuda(crate::codegen::cuda::CudaKernel, Vec<u8>),
    Wgsl(crate::codegen::wgsl::WgslKernel),
}

impl Candidate {
    fn timed(&self) -> TimedKernel<'_> {
        match self {
            Candidate::Cuda(kernel, ptx) => TimedKernel::Cuda { kernel, ptx },
            Candidate::Wgsl(kernel) => TimedKernel::Wgsl(kernel),
        }
    }
}

/// The fastest of the candidates `generate` gives a kernel for (`None`: skipped; the first, the
/// default, must generate). Each one runs first on the probe inputs: one whose results are not
/// the default's ([`disagreement`]) is reported and not timed.
fn fastest<T: Serialize + std::fmt::Debug>(
    timer: &mut dyn KernelTimer,
    signature: &str,
    spec: &KernelSpec,
    candidates: &[T],
    mut generate: impl FnMut(&T) -> Result<Option<Candidate>>,
) -> Result<TunedRecord> {
    let mut best: Option<(f64, &T)> = None;
    let mut default_results = None;
    let (mut timed, mut refused) = (0, 0);
    for (i, t) in candidates.iter().enumerate() {
        let Some(kernel) = generate(t)? else {
            if i == 0 {
                anyhow::bail!("kernel {signature}: the default configuration {t:?} does not generate (an mlcb bug)");
            }
            continue;
        };
        let results = timer.probe(kernel.timed(), spec)?;
        match &default_results {
            None => default_results = Some(results),
            Some(reference) => {
                if let Some(why) = disagreement(reference, &results) {
                    eprintln!(
                        "tune: kernel {signature}: the configuration {t:?} computes other results \
                         than the default one ({why}); it is not used. This is an mlcb bug: \
                         please report it with this line and the GPU's name."
                    );
                    refused += 1;
                    continue;
                }
            }
        }
        let s = timer.time(kernel.timed(), spec)?;
        if !s.is_finite() || s < 0.0 {
            anyhow::bail!("timing kernel {signature} with {t:?} gave {s} s");
        }
        tracing::debug!("tune {signature}: {t:?}: {:.2} µs", s * 1e6);
        timed += 1;
        // Strictly faster only: ties keep the earlier (default-first) candidate.
        if best.is_none_or(|(b, _)| s < b) {
            best = Some((s, t));
        }
    }
    let (seconds, t) = best.ok_or_else(|| anyhow::anyhow!("kernel {signature}: no candidate"))?;
    Ok(TunedRecord {
        config: serde_json::to_value(t)?,
        seconds,
        candidates: timed,
        refused,
        checked: true,
    })
}

/// Records from the device's database, measuring what it lacks when `mode` is `On` (kernels in
/// f16 where `f16`). `None` when no local device matches the target.
fn device_records(
    ctx: &BuildContext,
    plan: &Plan,
    target: &TargetSpec,
    f16: bool,
    signatures: &[String],
) -> Result<Option<(String, BTreeMap<String, TunedRecord>)>> {
    if ctx.tune_mode == TuneMode::Off || !matches!(target.preset.backend, "wgpu" | "cuda") {
        return Ok(None);
    }
    let _guard = MEASURE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Which cuda kernels hold activations in f16 (their records are kept apart).
    let half_io = match target.preset.backend {
        "cuda" => crate::codegen::cuda::half_activations::half_io(plan),
        _ => BTreeMap::new(),
    };
    let arch = (target.preset.backend == "cuda").then(|| cuda_arch(target));
    let Some(mut timer) = (ctx.timer_factory)(target.preset.name, arch)? else {
        tracing::info!(
            "tune: no local device runs {} kernels; using the preset defaults (untuned)",
            target.preset.name
        );
        return Ok(None);
    };
    let device = timer.device_id();
    let db = TuningDb::open(&ctx.cache.root, &device);
    let half = |sig: &str| half_io.get(sig).copied().unwrap_or_default();
    let key = |sig: &str| db_key(target, f16, half(sig), sig);
    let mut stored = db.load()?;
    // Records measured without checking the candidates' results count as missing.
    stored.retain(|_, r| r.checked);
    let missing: Vec<&String> = signatures
        .iter()
        .filter(|s| !stored.contains_key(&key(s)))
        .collect();
    if ctx.tune_mode == TuneMode::On && !missing.is_empty() && !ctx.probe {
        let specs = crate::codegen::wgsl::spec::specs_by_signature(plan)?;
        let started = std::time::Instant::now();
        let mut measured = BTreeMap::new();
        for sig in &missing {
            let spec = specs.get(*sig).ok_or_else(|| {
                anyhow::anyhow!("kernel signature {sig} has no spec (an mlcb bug)")
            })?;
            measured.insert(
                key(sig),
                measure(timer.as_mut(), target, f16, half(sig), sig, spec)?,
            );
        }
        db.insert(&measured)?;
        eprintln!(
            "tune: measured {} kernel signatures on {device} in {:.1} s (stored in {})",
            measured.len(),
            started.elapsed().as_secs_f64(),
            db.path().display()
        );
        stored.extend(measured);
    } else {
        eprintln!(
            "tune: {} of {} kernel signatures from the tuning database of {device}",
            signatures.len() - missing.len(),
            signatures.len()
        );
    }
    let known = signatures
        .iter()
        .filter_map(|s| stored.get(&key(s)).map(|r| (s.clone(), r.clone())))
        .collect();
    Ok(Some((device, known)))
}

/// A signature's key in the device's tuning database: wgpu kernels with subgroup reductions
/// (the preset's choice), libraries computing in f16 and cuda kernels with f16 activations
/// ([`HalfIo`]) have other kernels than the same signature without, so they are timed and
/// stored apart.
fn db_key(target: &TargetSpec, f16: bool, half: HalfIo, signature: &str) -> String {
    let mut key = signature.to_string();
    if target.preset.backend == "wgpu" && target.preset.subgroups {
        key.push_str("#subgroups");
    }
    // A record measured over another candidate space (before a knob existed) or timed another
    // way is not reused.
    if target.preset.backend == "cuda" {
        key.push_str(&format!(
            "#space{}",
            crate::codegen::cuda::tune_space::SPACE_VERSION
        ));
    }
    if f16 {
        key.push_str("#f16");
    }
    if half.input {
        key.push_str("#f16-input");
    }
    if half.out {
        key.push_str("#f16-out");
    }
    key
}

/// The CUDA architecture a cuda build targets: the recipe's, else the preset's default.
fn cuda_arch(target: &TargetSpec) -> &str {
    target
        .cuda_arch
        .as_deref()
        .or(target.preset.default_cuda_arch)
        .unwrap_or("sm_80")
}

pub fn run(
    ctx: &BuildContext,
    plan: &Plan,
    target: &TargetSpec,
    tuning_file: Option<&Path>,
    scope: &[String],
) -> Result<StageOutput> {
    let signatures: Vec<String> = crate::codegen::signature::plan_signatures(plan)
        .into_iter()
        .collect();
    let sig_digest = blake3::hash(serde_json::to_string(&signatures)?.as_bytes())
        .to_hex()
        .to_string();
    let pinned = match tuning_file {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| {
                crate::error::user(format!("cannot read the tuning file {}: {e}", p.display()))
            })?;
            let recs: TuningRecords = serde_json::from_slice(&bytes).map_err(|e| {
                crate::error::user(format!("{} is not a tuning-records file: {e}", p.display()))
            })?;
            Some((blake3::hash(&bytes).to_hex().to_string(), recs))
        }
        None => None,
    };
    let f16 = super::codegen::f16_kernels(plan, target);
    let measured = match pinned {
        Some(_) => None,
        None => device_records(ctx, plan, target, f16, &signatures)?,
    };
    let mut inputs = KeyInputs::new("tune", VERSION)
        .with("signatures", &sig_digest)
        .with("target", target.preset.name)
        .with("f16_kernels", f16)
        .with(
            "tuning_file",
            pinned.as_ref().map(|(d, _)| d.as_str()).unwrap_or("-"),
        );
    if let Some((device, recs)) = &measured {
        let configs: BTreeMap<&String, &serde_json::Value> =
            recs.iter().map(|(s, r)| (s, &r.config)).collect();
        inputs = inputs.with("device", device).with(
            "device_records",
            blake3::hash(&serde_json::to_vec(&configs)?).to_hex(),
        );
    }
    cached_or_run(ctx, inputs, scope, || {
        // The cuda defaults depend on the kernel's shape.
        let specs = match target.preset.backend {
            "cuda" => Some(crate::codegen::wgsl::spec::specs_by_signature(plan)?),
            _ => None,
        };
        let mut records = BTreeMap::new();
        for s in &signatures {
            let spec = specs.as_ref().and_then(|m| m.get(s));
            records.insert(s.clone(), default_config(target, s, spec)?);
        }
        let (device, tuned) = match (&pinned, &measured) {
            (Some((_, p)), _) => {
                for (s, v) in &p.records {
                    if records.contains_key(s) {
                        records.insert(s.clone(), v.clone());
                    }
                }
                (p.device.clone(), p.tuned)
            }
            (None, Some((device, recs))) => {
                for (s, r) in recs {
                    records.insert(s.clone(), r.config.clone());
                }
                (device.clone(), recs.len() == signatures.len())
            }
            (None, None) => (format!("preset-defaults:{}", target.preset.name), false),
        };
        let recs = TuningRecords {
            device,
            tuned,
            records,
        };
        Ok(BTreeMap::from([(
            "tuning.json".to_string(),
            temp_output(ctx, "tuning", &serde_json::to_vec_pretty(&recs)?)?,
        )]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::codegen::tune_check::Written;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    static TIMED: AtomicUsize = AtomicUsize::new(0);

    static TIMED_CUDA: AtomicUsize = AtomicUsize::new(0);

    /// Held by each test that counts timings: the counters are global, and another test timing
    /// meanwhile would be counted in its figures (seen under qemu, where tests run slower).
    static ONE_TIMING_TEST: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_timing_test() -> std::sync::MutexGuard<'static, ()> {
        ONE_TIMING_TEST.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device on which bigger workgroups are faster, except that 256 is slower than 128: the
    /// fastest of every family must be 128. Its CUDA side prefers 64 threads and 2 rows.
    struct FakeTimer {
        /// Whether its fastest configurations (workgroups of 128; 64 CUDA threads) compute
        /// something else than the defaults.
        fastest_is_wrong: bool,
    }
    impl KernelTimer for FakeTimer {
        fn probe(&mut self, kernel: TimedKernel<'_>, _: &KernelSpec) -> Result<Vec<Written>> {
            let fastest = match kernel {
                TimedKernel::Wgsl(k) => k.launch.tuning.workgroup_size == 128,
                TimedKernel::Cuda { kernel, .. } => kernel.launch.tuning.threads_per_block == 64,
            };
            let wrong = self.fastest_is_wrong && fastest;
            Ok(vec![Written {
                name: "out".into(),
                values: vec![1.0, if wrong { 2.0 } else { -1.0 }],
            }])
        }
        fn device_id(&self) -> String {
            "test:fake-gpu:driver 1".into()
        }
        fn time(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> Result<f64> {
            if self.probe(kernel, spec)?[0].values[1] > 0.0 {
                anyhow::bail!("a candidate computing other results was timed");
            }
            match kernel {
                TimedKernel::Wgsl(kernel) => {
                    TIMED.fetch_add(1, Ordering::SeqCst);
                    let t = kernel.launch.tuning;
                    let wg = if t.workgroup_size == 256 {
                        16
                    } else {
                        t.workgroup_size
                    };
                    Ok(1.0 / wg as f64
                        + t.rows_per_workgroup as f64 * 1e-3
                        + t.vector_width as f64 * 1e-4)
                }
                TimedKernel::Cuda { kernel, ptx } => {
                    TIMED_CUDA.fetch_add(1, Ordering::SeqCst);
                    assert!(String::from_utf8_lossy(ptx).contains(".entry"));
                    Ok(fake_cuda_seconds(kernel.launch.tuning))
                }
            }
        }
    }
    fn fake_cuda_seconds(t: crate::codegen::cuda::launch::CudaTuning) -> f64 {
        (t.threads_per_block as f64 - 64.0).abs() + (t.rows_per_block as f64 - 2.0).abs() * 1e-3
    }
    /// Records an older mlcb measured over a smaller candidate space (no `kv_splits`) are not
    /// taken for the current space's: the build stays untuned instead of using them.
    #[test]
    fn cuda_records_of_an_older_candidate_space_are_not_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan();
        let c = ctx(tmp.path(), TuneMode::Cached);
        let mut cuda = target("cuda");
        cuda.cuda_arch = Some("sm_86".into());
        let db = TuningDb::open(&tmp.path().join("cache"), "test:fake-gpu:driver 1");
        let old: BTreeMap<String, TunedRecord> = crate::codegen::signature::plan_signatures(&plan)
            .into_iter()
            .map(|sig| {
                let rec = TunedRecord {
                    config: serde_json::json!({"threads_per_block": 512, "rows_per_block": 1}),
                    seconds: 1e-6,
                    candidates: 4,
                    refused: 0,
                    checked: true,
                };
                (sig, rec)
            })
            .collect();
        db.insert(&old).unwrap();
        let r = records(&c, &run(&c, &plan, &cuda, None, &[]).unwrap());
        assert!(!r.tuned, "old-space records were used");
        assert!(r.records.values().all(|v| v["threads_per_block"] != 512));
        // The current space's key finds a record.
        let key = db_key(&cuda, false, HalfIo::default(), "decode:x");
        assert_eq!(
            key,
            format!(
                "decode:x#space{}",
                crate::codegen::cuda::tune_space::SPACE_VERSION
            )
        );
    }

    /// The fake device runs Vulkan kernels (vulkan and android), and CUDA kernels for sm_86.
    fn fake(target: &str, arch: Option<&str>) -> Result<Option<Box<dyn KernelTimer>>> {
        let runs =
            matches!(target, "vulkan" | "android") || (target == "cuda" && arch == Some("sm_86"));
        Ok(runs.then(|| {
            Box::new(FakeTimer {
                fastest_is_wrong: false,
            }) as Box<dyn KernelTimer>
        }))
    }

    /// The fake device whose fastest configurations are wrong kernels.
    fn fake_wrong(target: &str, arch: Option<&str>) -> Result<Option<Box<dyn KernelTimer>>> {
        Ok(fake(target, arch)?.map(|_| {
            Box::new(FakeTimer {
                fastest_is_wrong: true,
            }) as Box<dyn KernelTimer>
        }))
    }

    fn ctx(root: &Path, mode: TuneMode) -> BuildContext {
        BuildContext {
            cache: Arc::new(Cache::open(&root.join("cache")).unwrap()),
            dist_root: root.join("dist"),
            use_cache: true,
            debug_dump: false,
            probe: false,
            progress: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::hidden(),
            ),
            tune_mode: mode,
            timer_factory: fake,
            remote: None,
        }
    }

    fn plan() -> Plan {
        crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32)
    }

    fn target(name: &str) -> TargetSpec {
        let preset = crate::recipe::targets::TARGETS
            .iter()
            .find(|t| t.name == name)
            .unwrap();
        TargetSpec {
            preset,
            cuda_arch: None,
            llvm_mingw: None,
            shader_f16: preset.shader_f16,
        }
    }

    /// On a GPU of the target's architecture every CUDA candidate is generated, compiled by NVRTC
    /// and timed, and the fastest stored; a build for another architecture stays untuned.
    #[test]
    fn cuda_candidates_are_compiled_timed_and_the_fastest_kept() {
        let _serial = one_timing_test();
        if !crate::codegen::cuda::nvrtc::available() {
            eprintln!("SKIPPED: NVRTC not found (pip install nvidia-cuda-nvrtc==13.0.*)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan();
        let specs = crate::codegen::wgsl::spec::specs_by_signature(&plan).unwrap();
        let c = ctx(tmp.path(), TuneMode::On);
        let mut cuda = target("cuda");
        cuda.cuda_arch = Some("sm_80".into());
        let before = TIMED_CUDA.load(Ordering::SeqCst);
        let r = records(&c, &run(&c, &plan, &cuda, None, &[]).unwrap());
        assert!(!r.tuned, "no sm_80 device here");
        assert_eq!(TIMED_CUDA.load(Ordering::SeqCst), before);

        cuda.cuda_arch = Some("sm_86".into());
        let r = records(&c, &run(&c, &plan, &cuda, None, &[]).unwrap());
        assert!(r.tuned);
        let timed = TIMED_CUDA.load(Ordering::SeqCst) - before;
        let expected: usize = specs
            .iter()
            .map(|(s, spec)| crate::codegen::cuda::tune_space::candidates(s, spec).len())
            .sum();
        // Attention candidates whose shared memory would not fit are skipped, nothing else.
        assert!(
            timed <= expected && timed + 4 >= expected,
            "{timed} of {expected}"
        );
        for (sig, spec) in &specs {
            let v = &r.records[sig];
            // Fixed-block kernels (the 3xTF32 GEMM and tiled attention) have one candidate.
            if crate::codegen::cuda::tune_space::candidates(sig, spec).len() == 1 {
                assert_eq!(
                    v,
                    &default_config(&cuda, sig, Some(spec)).unwrap(),
                    "{sig}: one candidate"
                );
                continue;
            }
            // 64 threads where a kernel takes them (the f16 GEMM's warp tilings: 256 or 128) and
            // 2 rows where rows are a knob.
            let c = crate::codegen::cuda::tune_space::candidates(sig, spec);
            let fastest = c
                .iter()
                .min_by(|a, b| fake_cuda_seconds(**a).total_cmp(&fake_cuda_seconds(**b)))
                .unwrap();
            assert_eq!(
                v,
                &serde_json::to_value(fastest).unwrap(),
                "{sig}: not the fastest of {c:?}"
            );
        }
    }

    /// A candidate whose results are not the default's is neither timed nor kept, and the
    /// record says so; records measured by an mlcb that did not check results are measured
    /// again.
    #[test]
    fn candidates_computing_other_results_are_not_timed_or_kept() {
        let _serial = one_timing_test();
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan();
        let vulkan = target("vulkan");
        let mut c = ctx(tmp.path(), TuneMode::On);
        c.timer_factory = fake_wrong;
        let r = records(&c, &run(&c, &plan, &vulkan, None, &[]).unwrap());
        assert!(r.tuned);
        for (sig, v) in &r.records {
            // The next fastest: 64 (the fake's 128 is wrong).
            assert_eq!(v["workgroup_size"], 64, "{sig}");
        }
        let db = TuningDb::open(&tmp.path().join("cache"), "test:fake-gpu:driver 1");
        let stored = db.load().unwrap();
        assert!(stored.values().all(|r| r.checked && r.refused >= 1));

        // Records without the check are dropped: a cached build is untuned, an `on` one measures.
        let unchecked = stored
            .into_iter()
            .map(|(k, mut r)| {
                r.checked = false;
                (k, r)
            })
            .collect();
        db.insert(&unchecked).unwrap();
        c.tune_mode = TuneMode::Cached;
        let r = records(&c, &run(&c, &plan, &vulkan, None, &[]).unwrap());
        assert!(!r.tuned, "unchecked records were used");
        c.tune_mode = TuneMode::On;
        let r = records(&c, &run(&c, &plan, &vulkan, None, &[]).unwrap());
        assert!(r.tuned);
        assert!(db.load().unwrap().values().all(|r| r.checked));
    }

    fn records(ctx: &BuildContext, out: &StageOutput) -> TuningRecords {
        let bytes = ctx
            .cache
            .blobs
            .read_verified(&out.output("tuning.json").unwrap().digest)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn measured_records_are_stored_then_reused_without_measuring() {
        let _serial = one_timing_test();
        let tmp = tempfile::tempdir().unwrap();
        let plan = plan();
        let n_sig = crate::codegen::signature::plan_signatures(&plan).len();
        let vulkan = target("vulkan");

        let step = |mode: TuneMode, target: &TargetSpec| {
            let c = ctx(tmp.path(), mode);
            let out = run(&c, &plan, target, None, &[]).unwrap();
            let recs = records(&c, &out);
            (out, recs)
        };
        let timed = || TIMED.load(Ordering::SeqCst);
        let before = timed();

        // Off: preset defaults, nothing timed.
        let (off, r) = step(TuneMode::Off, &vulkan);
        assert_eq!(timed(), before);
        assert!(!r.tuned);
        assert_eq!(r.device, "preset-defaults:vulkan");

        // Cached with an empty database: untuned, nothing timed.
        let (_, r) = step(TuneMode::Cached, &vulkan);
        assert_eq!(timed(), before);
        assert!(!r.tuned);

        // On: every signature measured, the fastest configuration (workgroup 128) kept.
        let (first, r) = step(TuneMode::On, &vulkan);
        let measured = timed() - before;
        assert!(
            measured >= n_sig * 4,
            "{measured} timings for {n_sig} signatures"
        );
        assert!(r.tuned);
        assert_eq!(r.device, "test:fake-gpu:driver 1");
        assert_eq!(r.records.len(), n_sig);
        for (sig, v) in &r.records {
            assert_eq!(v["workgroup_size"], 128, "{sig}");
            assert_eq!(v["rows_per_workgroup"], 1, "{sig}");
            assert_eq!(
                v["subgroups"], true,
                "{sig}: the vulkan preset reduces with subgroups"
            );
        }
        assert_ne!(first.key, off.key, "measured records change the key");
        let db = TuningDb::open(&tmp.path().join("cache"), "test:fake-gpu:driver 1");
        assert_eq!(db.load().unwrap().len(), n_sig);

        // Later builds, on or cached: the database answers, nothing is re-measured.
        for mode in [TuneMode::On, TuneMode::Cached] {
            let (again, r) = step(mode, &vulkan);
            assert_eq!(timed() - before, measured, "{mode:?} measured again");
            assert_eq!(again.key, first.key);
            assert!(again.cached && r.tuned);
        }

        // android runs on the same device without subgroups: other kernels, timed and stored
        // apart from vulkan's, and never given vulkan's subgroup records.
        let (_, r) = step(TuneMode::On, &target("android"));
        assert!(r.tuned);
        assert_eq!(
            timed() - before,
            2 * measured,
            "android measured its own kernels"
        );
        assert!(r.records.values().all(|v| v["subgroups"] == false));
        assert_eq!(db.load().unwrap().len(), 2 * n_sig);

        // A target no local device runs stays on the preset defaults.
        let (_, r) = step(TuneMode::On, &target("webgpu"));
        assert!(!r.tuned);
        assert_eq!(timed() - before, 2 * measured);
    }
}
