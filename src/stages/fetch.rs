//! fetch: resolve a source to files on this machine and record their digests.
//!
//! Local folders are used in place (symlinks followed); hub repositories are downloaded with the
//! hf-hub crate into `<cache>/sources/hf` (honouring `HF_ENDPOINT`); git URLs are cloned with git and
//! git-lfs into `<cache>/sources/git`. Digests of local files come from the cache's memo, so an
//! unchanged folder is not read again. Output: `files.json`, the sorted list of (relative path,
//! blake3, size): the content identity every later stage keys on.

use super::{cached_or_run, temp_output, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::recipe::Source;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileList {
    /// "folder", "hub", "git" or "gguf".
    pub kind: String,
    /// The resolved revision (hub commit, git commit), when there is one.
    pub revision: Option<String>,
    pub files: Vec<FileEntry>,
}

/// Names of files in a model folder that matter to a build.
pub fn is_model_file(name: &str) -> bool {
    name == "config.json"
        || name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".index.json")
        || name.ends_with(".gguf")
        || crate::stages::load::TOKENIZER_FILES.contains(&name)
        || name == "tokenizer_config.json"
        || name == "generation_config.json"
}

pub fn run(ctx: &BuildContext, source: &Source, scope: &[String]) -> Result<StageOutput> {
    let (kind, dir, revision, single) = match source {
        Source::Local(p) => ("folder", resolve_local(p)?, None, None),
        Source::Gguf(p) => {
            let f = p
                .canonicalize()
                .map_err(|_| crate::error::user(format!("GGUF file {} not found", p.display())))?;
            ("gguf", f.parent().unwrap().to_path_buf(), None, Some(f))
        }
        Source::Hub { .. } | Source::Git { .. } if ctx.probe => {
            return Err(anyhow::Error::new(super::WouldRun {
                key: None,
                inputs: None,
            }))
        }
        Source::Hub { repo, revision } => {
            ctx.cache.index.release();
            let (dir, commit) = super::fetch_remote::hub(ctx, repo, revision)?;
            ("hub", dir, Some(commit), None)
        }
        Source::Git { url, rev } => {
            ctx.cache.index.release();
            let (dir, commit) = super::fetch_remote::git(ctx, url, rev.as_deref())?;
            ("git", dir, Some(commit), None)
        }
    };
    let names: Vec<String> = match &single {
        Some(f) => vec![f.file_name().unwrap().to_string_lossy().into_owned()],
        None => list_model_files(&dir)?,
    };
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    for p in &paths {
        crate::formats::lfs::check_not_lfs_pointer(p)?;
    }
    let digests = ctx.cache.file_digests(&paths)?;
    let list = FileList {
        kind: kind.to_string(),
        revision: revision.clone(),
        files: names
            .iter()
            .zip(digests)
            .map(|(n, (digest, size))| FileEntry {
                path: n.clone(),
                digest,
                size,
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&list)?;
    let inputs = KeyInputs::new("fetch", VERSION)
        .with("source", source.describe())
        .with("files", blake3::hash(&json).to_hex());
    let mut out = cached_or_run(ctx, inputs, scope, || {
        Ok(BTreeMap::from([(
            "files.json".to_string(),
            temp_output(ctx, "files", &json)?,
        )]))
    })?;
    out.local.insert("source_dir".into(), dir);
    if let Some(f) = single {
        out.local.insert("gguf".into(), f);
    }
    Ok(out)
}

fn resolve_local(p: &Path) -> Result<PathBuf> {
    let dir = p.canonicalize().map_err(|_| {
        crate::error::user(format!(
            "model folder {} not found; put the Hugging Face model there, or use --hf-path ORG/NAME (or source = {{ hf = \"ORG/NAME\" }})",
            p.display()
        ))
    })?;
    if !dir.is_dir() {
        crate::user_bail!("model source {} is not a folder", p.display());
    }
    Ok(dir)
}

/// The model files directly inside `dir`, sorted. Hidden files and subfolders are skipped.
pub fn list_model_files(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !is_model_file(&name) {
            continue;
        }
        // Follow symlinks: only regular files (or links to them) count.
        if std::fs::metadata(entry.path())
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            names.push(name);
        }
    }
    names.sort();
    if !names.iter().any(|n| n == "config.json") {
        crate::user_bail!(
            "{} has no config.json: it is not a Hugging Face model folder (found: {})",
            dir.display(),
            if names.is_empty() {
                "no model files".to_string()
            } else {
                names.join(", ")
            }
        );
    }
    Ok(names)
}
