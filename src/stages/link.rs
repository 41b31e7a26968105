//! link: materialise `dist/<model>-<quant>/` from cached blobs, atomically.
//!
//! The folder is assembled next to its destination and swapped in with one `renameat2(EXCHANGE)`
//! (or a rename when there is none yet), so nobody ever sees a half-written artifact. Libraries
//! of other targets already in the old folder are kept when the parameters are the same (MLC's
//! layout lets several `<model>-<quant>-<kind>` libraries share one folder).

use super::load::{TOKENIZER_CONFIG, TOKENIZER_FILES};
use super::{BuildContext, StageOutput};
use crate::cache::blobs::{hash_file, rand_nonce, write_synced};
use crate::cache::key::KeyInputs;
use crate::cache::OutputRef;
use crate::recipe::Recipe;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;
pub const MANIFEST: &str = "build-manifest.json";
pub const CHAT_CONFIG: &str = "mlc-chat-config.json";

/// What went into one library of the folder.
pub struct LinkLibrary<'a> {
    pub recipe: &'a Recipe,
    pub codegen: &'a StageOutput,
    pub tune: &'a StageOutput,
}

pub struct LinkRequest<'a> {
    pub recipe: &'a Recipe,
    pub libraries: Vec<LinkLibrary<'a>>,
    pub quantize: &'a StageOutput,
    /// The load or delta-merge output (tokenizer files, model.json).
    pub model: &'a StageOutput,
    pub sources: Vec<&'a StageOutput>,
    /// Every stage of this recipe, for the manifest: (stage name, output).
    pub stages: Vec<(String, &'a StageOutput)>,
    pub max_seq_len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub mlcb_version: String,
    pub local_id: String,
    pub link_key: String,
    /// Target -> the link key that produced its library here (libraries of other targets kept
    /// from an earlier build keep theirs), so rebuilding any of them finds the folder current.
    #[serde(default)]
    pub library_links: BTreeMap<String, String>,
    /// blake3 over every output's path and digest (this manifest excluded).
    pub artifact_digest: String,
    pub outputs: BTreeMap<String, OutputRef>,
    /// Library file → target.
    pub libraries: BTreeMap<String, String>,
    pub recipe: serde_json::Value,
    pub sources: Vec<serde_json::Value>,
    pub stages: Vec<ManifestStage>,
    pub tuned: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestStage {
    pub stage: String,
    pub key: String,
    pub inputs: KeyInputs,
    pub seconds: f64,
}

pub fn library_file_name(local_id: &str, kind: &str) -> String {
    format!(
        "{local_id}-{kind}.{}",
        crate::formats::model_lib::LIBRARY_EXTENSION
    )
}

/// The `mlc-chat-config.json` content (MLC's fields and defaults plus mlcb's own).
pub fn chat_config(
    req: &LinkRequest,
    desc: &super::load::ModelDescription,
    tokenizer_names: &[String],
) -> serde_json::Value {
    let r = req.recipe;
    let has_template = tokenizer_names.iter().any(|n| n == TOKENIZER_CONFIG);
    let conv = r
        .chat
        .conv_template
        .clone()
        .unwrap_or_else(|| default_conv_template(r, desc, has_template));
    let listed: Vec<&String> = tokenizer_names
        .iter()
        .filter(|n| TOKENIZER_FILES.contains(&n.as_str()))
        .collect();
    let stop: Vec<u32> = {
        let plan_stop = desc.config.eos_token_ids.clone();
        if plan_stop.is_empty() {
            vec![0]
        } else {
            plan_stop
        }
    };
    serde_json::json!({
        "model_lib": r.local_id(),
        "local_id": r.local_id(),
        "conv_template": conv,
        "temperature": r.chat.temperature.unwrap_or(0.7),
        "repetition_penalty": r.chat.repetition_penalty.unwrap_or(1.0),
        "top_p": r.chat.top_p.unwrap_or(0.95),
        "mean_gen_len": r.chat.mean_gen_len.unwrap_or(128),
        "max_gen_len": r.chat.max_gen_len.unwrap_or(512),
        "shift_fill_factor": 0.3,
        "tokenizer_files": listed,
        "model_category": desc.config.arch,
        "model_name": r.model_name,
        "vocab_size": desc.config.vocab_size,
        "max_window_size": req.max_seq_len,
        "stop_token_ids": stop,
        "bos_token_id": desc.config.bos_token_id,
        "quantization": r.quantization.name,
        "target": r.target.preset.kind,
    })
}

/// MLC chose the template by name prefix; mlcb does too, then prefers the tokenizer's own chat
/// template, then the architecture's default.
fn default_conv_template(
    r: &Recipe,
    desc: &super::load::ModelDescription,
    has_tokenizer_config: bool,
) -> String {
    let name = r.model_name.to_ascii_lowercase();
    for (prefix, t) in [
        ("vicuna", "vicuna_v1.1"),
        ("redpajama", "redpajama_chat"),
        ("rwkv", "rwkv"),
        ("llama-2", "llama-2"),
    ] {
        if name.starts_with(prefix) {
            return t.to_string();
        }
    }
    if has_tokenizer_config {
        return "auto".to_string();
    }
    crate::model::by_name(&desc.config.arch)
        .map(|a| a.default_conv_template())
        .unwrap_or("LM")
        .to_string()
}

pub fn run(ctx: &BuildContext, req: &LinkRequest) -> Result<StageOutput> {
    let local_id = req.recipe.local_id();
    // The folder name comes from the model name: it must stay one folder inside the dist root.
    crate::safe_path::check_file_name(&local_id, "artifact folder name (model name)")?;
    let desc = super::load::read_description(ctx, req.model)?;
    let tokenizer: BTreeMap<String, &OutputRef> = req
        .model
        .outputs
        .iter()
        .filter_map(|(n, o)| n.strip_prefix("tokenizer/").map(|t| (t.to_string(), o)))
        .collect();
    let tokenizer_names: Vec<String> = tokenizer.keys().cloned().collect();
    let chat = chat_config(req, &desc, &tokenizer_names);
    let mut inputs = KeyInputs::new("link", VERSION)
        .with("params", req.quantize.digest())
        .with("model", req.model.digest())
        .with("chat_config", serde_json::to_string(&chat)?)
        .with("debug_dump", ctx.debug_dump);
    for lib in &req.libraries {
        inputs.add(
            &format!("library:{}", lib.recipe.target.preset.name),
            lib.codegen.digest(),
        );
    }
    let key = inputs.key();
    let dest = ctx.dist_root.join(&local_id);
    let start = std::time::Instant::now();
    if ctx.use_cache && up_to_date(&dest, &key) {
        return Ok(StageOutput {
            key,
            cached: true,
            remote_seconds: None,
            seconds: 0.0,
            outputs: BTreeMap::new(),
            local: BTreeMap::from([("dist".into(), dest)]),
            inputs,
        });
    }
    if ctx.probe {
        return Err(anyhow::Error::new(super::WouldRun {
            key: Some(key),
            inputs: Some(inputs),
        }));
    }
    std::fs::create_dir_all(&ctx.dist_root).map_err(|e| {
        crate::error::explain_no_space(
            crate::error::env(format!(
                "cannot create the artifact folder {}: {e}",
                ctx.dist_root.display()
            )),
            "the artifact folder",
            &ctx.dist_root,
            "--artifact-path",
        )
    })?;
    ctx.cache.index.release();
    let tmp = ctx.dist_root.join(format!(
        ".{local_id}.tmp-{}-{:x}",
        std::process::id(),
        rand_nonce()
    ));
    let result = assemble(ctx, req, &desc, &tmp, &dest, &key, &chat, &tokenizer)
        .and_then(|_| swap_into_place(&tmp, &dest));
    if let Err(e) = result {
        // The half-assembled folder goes; `dest` is untouched (old artifact or none).
        std::fs::remove_dir_all(&tmp).ok();
        return Err(crate::error::explain_no_space(
            e,
            "the artifact folder",
            &ctx.dist_root,
            "--artifact-path",
        ));
    }
    Ok(StageOutput {
        key,
        cached: false,
        remote_seconds: None,
        seconds: start.elapsed().as_secs_f64(),
        outputs: BTreeMap::new(),
        local: BTreeMap::from([("dist".into(), dest)]),
        inputs,
    })
}

/// The folder already holds exactly this link's result.
fn up_to_date(dest: &Path, key: &str) -> bool {
    let Ok(bytes) = std::fs::read(dest.join(MANIFEST)) else {
        return false;
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
        return false;
    };
    (m.link_key == key || m.library_links.values().any(|k| k == key))
        && m.outputs.iter().all(|(p, o)| {
            crate::safe_path::check_relative(p, "").is_ok()
                && std::fs::metadata(dest.join(p))
                    .map(|md| md.len() == o.size)
                    .unwrap_or(false)
        })
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    ctx: &BuildContext,
    req: &LinkRequest,
    desc: &super::load::ModelDescription,
    tmp: &Path,
    dest: &Path,
    key: &str,
    chat: &serde_json::Value,
    tokenizer: &BTreeMap<String, &OutputRef>,
) -> Result<()> {
    let params = tmp.join("params");
    std::fs::create_dir_all(&params)
        .map_err(|e| crate::error::env(format!("cannot create {}: {e}", params.display())))?;
    let mut outputs: BTreeMap<String, OutputRef> = BTreeMap::new();
    let mut put = |rel: String, o: &OutputRef| -> Result<()> {
        // Output names come from cache records; never let one write outside the new folder.
        crate::safe_path::check_relative(&rel, "artifact output path")?;
        ctx.cache.blobs.copy_verified(&o.digest, &tmp.join(&rel))?;
        outputs.insert(rel, o.clone());
        Ok(())
    };
    for (name, o) in &req.quantize.outputs {
        put(name.clone(), o)?;
    }
    // Tokenizer files go into params/ before the chat config that lists them (MLC #668).
    for (name, o) in tokenizer {
        crate::safe_path::check_file_name(name, "tokenizer file name")?;
        put(format!("params/{name}"), o)?;
    }
    let mut libraries = BTreeMap::new();
    for lib in &req.libraries {
        let file = library_file_name(&req.recipe.local_id(), lib.recipe.target.preset.kind);
        put(file.clone(), lib.codegen.output("library")?)?;
        libraries.insert(file, lib.recipe.target.preset.name.to_string());
    }
    let mut write = |rel: String, bytes: &[u8]| -> Result<()> {
        let p = tmp.join(&rel);
        write_synced(&p, bytes)?;
        outputs.insert(
            rel,
            OutputRef {
                digest: blake3::hash(bytes).to_hex().to_string(),
                size: bytes.len() as u64,
            },
        );
        Ok(())
    };
    write(
        format!("params/{CHAT_CONFIG}"),
        &serde_json::to_vec_pretty(chat)?,
    )?;
    if ctx.debug_dump {
        std::fs::create_dir_all(tmp.join("debug"))?;
        for lib in &req.libraries {
            let bytes = ctx
                .cache
                .blobs
                .read_verified(&lib.codegen.output("library")?.digest)?;
            let l = crate::formats::model_lib::ModelLibrary::from_bytes(&bytes, "library")?;
            let name = lib.recipe.target.preset.name;
            write(
                format!("debug/plan-{name}.txt"),
                crate::formats::model_lib::render::render_plan(&l.header.plan).as_bytes(),
            )?;
            write(
                format!("debug/plan-{name}.json"),
                &serde_json::to_vec_pretty(&l.header.plan)?,
            )?;
            write(
                format!("debug/tuning-{name}.json"),
                &serde_json::to_vec_pretty(&l.header.tuning)?,
            )?;
            for (rel, bytes) in kernel_dump_files(&l, name)? {
                if let Some(dir) = tmp.join(&rel).parent() {
                    std::fs::create_dir_all(dir)?;
                }
                write(rel, &bytes)?;
            }
        }
        write("debug/model.json".into(), &serde_json::to_vec_pretty(desc)?)?;
    }
    let mut library_links: BTreeMap<String, String> = req
        .libraries
        .iter()
        .map(|l| (l.recipe.target.preset.name.to_string(), key.to_string()))
        .collect();
    carry_over_libraries(dest, tmp, &mut outputs, &mut libraries, &mut library_links)?;
    let artifact_digest = digest_outputs(&outputs);
    // Tuned when every library's records were all measured on a device (or pinned from a file
    // that says so): the tune stage's own verdict.
    let mut tuned = true;
    for l in &req.libraries {
        let bytes = ctx
            .cache
            .blobs
            .read_verified(&l.tune.output("tuning.json")?.digest)?;
        let recs: serde_json::Value = serde_json::from_slice(&bytes)?;
        tuned &= recs["tuned"].as_bool().unwrap_or(false);
    }
    let manifest = Manifest {
        mlcb_version: env!("CARGO_PKG_VERSION").to_string(),
        local_id: req.recipe.local_id(),
        link_key: key.to_string(),
        library_links,
        artifact_digest,
        outputs,
        libraries,
        recipe: manifest_recipe(req.recipe),
        sources: req
            .sources
            .iter()
            .map(|s| {
                let bytes = ctx
                    .cache
                    .blobs
                    .read_verified(&s.outputs["files.json"].digest)?;
                Ok(serde_json::from_slice(&bytes)?)
            })
            .collect::<Result<_>>()?,
        stages: req
            .stages
            .iter()
            .map(|(n, s)| ManifestStage {
                stage: n.clone(),
                key: s.key.clone(),
                inputs: s.inputs.clone(),
                seconds: s.seconds,
            })
            .collect(),
        tuned,
    };
    write_synced(&tmp.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
    Ok(())
}

/// The recipe as the manifest records it: what was asked, without machine-specific paths.
fn manifest_recipe(r: &Recipe) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("origin");
    }
    v
}

pub fn digest_outputs(outputs: &BTreeMap<String, OutputRef>) -> String {
    let mut h = blake3::Hasher::new();
    for (p, o) in outputs {
        h.update(p.as_bytes());
        h.update(&[0]);
        h.update(o.digest.as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

/// Keep other targets' libraries of the old folder when its parameters are the ones we link.
fn carry_over_libraries(
    dest: &Path,
    tmp: &Path,
    outputs: &mut BTreeMap<String, OutputRef>,
    libraries: &mut BTreeMap<String, String>,
    library_links: &mut BTreeMap<String, String>,
) -> Result<()> {
    let Ok(bytes) = std::fs::read(dest.join(MANIFEST)) else {
        return Ok(());
    };
    let Ok(old) = serde_json::from_slice::<Manifest>(&bytes) else {
        return Ok(());
    };
    let old_params: BTreeMap<String, OutputRef> = old
        .outputs
        .iter()
        .filter(|(p, _)| {
            p.starts_with("params/params_shard") || p.as_str() == "params/ndarray-cache.json"
        })
        .map(|(p, o)| (p.clone(), o.clone()))
        .collect();
    let new_params: BTreeMap<String, OutputRef> = outputs
        .iter()
        .filter(|(p, _)| {
            p.starts_with("params/params_shard") || p.as_str() == "params/ndarray-cache.json"
        })
        .map(|(p, o)| (p.clone(), o.clone()))
        .collect();
    if old_params != new_params {
        return Ok(());
    }
    for (file, target) in &old.libraries {
        crate::safe_path::check_file_name(file, "model library name").map_err(|e| {
            crate::error::user(format!(
                "{} lists a library that would lie outside the folder: {e:#}; remove {} and build again",
                dest.join(MANIFEST).display(),
                dest.display()
            ))
        })?;
        if libraries.contains_key(file) || libraries.values().any(|t| t == target) {
            continue;
        }
        let Some(o) = old.outputs.get(file) else {
            continue;
        };
        let src = dest.join(file);
        let (digest, size) = match hash_file(&src) {
            Ok(x) => x,
            Err(_) => continue,
        };
        if digest != o.digest {
            tracing::warn!(
                "{} changed since it was built; not carrying it over",
                src.display()
            );
            continue;
        }
        std::fs::copy(&src, tmp.join(file))
            .with_context(|| format!("copying {}", src.display()))?;
        outputs.insert(file.clone(), OutputRef { digest, size });
        libraries.insert(file.clone(), target.clone());
        if let Some(k) = old.library_links.get(target) {
            library_links.insert(target.clone(), k.clone());
        }
    }
    Ok(())
}

/// Put `tmp` at `dest` in one atomic step; the old folder (if any) is removed afterwards.
fn swap_into_place(tmp: &Path, dest: &Path) -> Result<()> {
    sync_dir(tmp);
    for _ in 0..20 {
        if !dest.exists() {
            match std::fs::rename(tmp, dest) {
                Ok(()) => {
                    sync_dir(dest.parent().unwrap_or(Path::new(".")));
                    return Ok(());
                }
                // Another process put a folder there first: exchange with it instead.
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOTEMPTY)
                        || e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("moving the artifact into {}", dest.display()))
                }
            }
        }
        if exchange(tmp, dest)? {
            // `tmp` now holds the previous folder.
            std::fs::remove_dir_all(tmp)
                .with_context(|| format!("removing the previous artifact {}", tmp.display()))?;
            sync_dir(dest.parent().unwrap_or(Path::new(".")));
            return Ok(());
        }
    }
    crate::env_bail!(
        "could not move the artifact into {}: another process keeps replacing it",
        dest.display()
    )
}

/// `renameat2(RENAME_EXCHANGE)`: true when swapped, false when `dest` vanished meanwhile.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths; the call has no memory effects on our side.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(false);
    }
    Err(crate::error::env(format!(
        "cannot swap {} into place: {err}",
        b.display()
    )))
}

fn sync_dir(p: &Path) {
    if let Ok(f) = std::fs::File::open(p) {
        f.sync_all().ok();
    }
}

/// Paths of dist folders for a list of recipes (for `mlcb clean`).
pub fn dist_dir(dist_root: &Path, recipe: &Recipe) -> PathBuf {
    dist_root.join(recipe.local_id())
}

/// `debug/kernels/<target>/<n>-<op>.<ext>`: each kernel as the library holds it (`.spv`, `.metal`
/// `.wgsl` or `.ptx`) plus, for SPIR-V and MSL, the WGSL it was compiled from, and for PTX the CUDA
/// C (`.cu`) (regenerated from the
/// library's plan and tuning records, which determine it).
fn kernel_dump_files(
    lib: &crate::formats::model_lib::ModelLibrary,
    target: &str,
) -> Result<Vec<(String, Vec<u8>)>> {
    use crate::codegen::wgsl::spec::op_name;
    let mut out = Vec::new();
    if lib.header.kernels.is_empty() {
        return Ok(out);
    }
    // A signature whose WGSL the library carries itself (MSL libraries' twins) gets it once,
    // and the WGSL is regenerated only for kernels without such a twin (SPIR-V).
    let carried: std::collections::BTreeSet<&str> = lib
        .header
        .kernels
        .iter()
        .filter(|k| k.language == "wgsl")
        .map(|k| k.signature.as_str())
        .collect();
    let uncarried = lib
        .header
        .kernels
        .iter()
        .any(|k| k.language != "wgsl" && !carried.contains(k.signature.as_str()));
    let wgsl: BTreeMap<String, String> = if lib.header.target.backend == "wgpu" && uncarried {
        let records = crate::codegen::gpu::tuning_records(&lib.header.tuning)?;
        let f16 = lib.header.target.options.get("shader_f16") == Some(&true.into());
        crate::codegen::wgsl::generate_plan(&lib.header.plan, &records, f16)?
            .into_iter()
            .map(|k| (k.signature, k.source))
            .collect()
    } else if lib.header.target.backend == "cuda" {
        // The CUDA C the PTX was compiled from, regenerated from plan, tuning and arch.
        let records = crate::codegen::gpu::tuning_records(&lib.header.tuning)?;
        let arch = lib
            .header
            .target
            .options
            .get("cuda_arch")
            .and_then(|a| a.as_str())
            .unwrap_or("sm_80");
        crate::codegen::cuda::generate_plan(&lib.header.plan, &records, arch)?
            .into_iter()
            .map(|k| (k.signature, k.source))
            .collect()
    } else {
        BTreeMap::new()
    };
    for (n, k) in lib.header.kernels.iter().enumerate() {
        let stem = format!("debug/kernels/{target}/{n}-{}", op_name(&k.signature));
        let ext = match k.language.as_str() {
            "spirv" => "spv",
            "msl" => "metal",
            other => other,
        };
        out.push((format!("{stem}.{ext}"), lib.kernel_bytes(k).to_vec()));
        if k.language != "wgsl" && !carried.contains(k.signature.as_str()) {
            if let Some(src) = wgsl.get(&k.signature) {
                let src_ext = if k.language == "ptx" { "cu" } else { "wgsl" };
                out.push((format!("{stem}.{src_ext}"), src.clone().into_bytes()));
            }
        }
    }
    Ok(out)
}
