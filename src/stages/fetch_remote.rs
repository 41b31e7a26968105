//! Remote sources for the fetch stage: the Hugging Face hub (hf-hub crate) and git repositories.

use super::BuildContext;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Download the model files of `repo@revision` into the cache's hub folder. Returns the snapshot
/// folder and the resolved commit.
pub fn hub(ctx: &BuildContext, repo: &str, revision: &str) -> Result<(PathBuf, String)> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let cache_dir = ctx.cache.root.join("sources").join("hf");
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache_dir)
        .with_progress(false)
        .with_retries(2)
        .build()
        .map_err(|e| {
            crate::error::env(format!("cannot set up the Hugging Face hub client: {e}"))
        })?;
    let handle = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let info = handle.info().map_err(|e| {
        crate::error::env(format!("cannot reach {repo}@{revision} on the hub at {endpoint}: {e}; check the name, HF_ENDPOINT and the network"))
    })?;
    // The commit names the snapshot folder: it must be a plain name.
    crate::safe_path::check_file_name(&info.sha, "hub commit id")?;
    let mut names: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|n| !n.contains('/') && !n.starts_with('.') && super::fetch::is_model_file(n))
        .collect();
    names.sort();
    if !names.iter().any(|n| n == "config.json") {
        crate::user_bail!(
            "hub repository {repo}@{revision} has no config.json: it is not a Hugging Face model"
        );
    }
    let mut dir = None;
    for name in &names {
        tracing::info!("downloading {repo}/{name}");
        let path = handle.get(name).map_err(|e| {
            crate::error::env(format!(
                "downloading {name} from {repo}@{revision} at {endpoint}: {e}"
            ))
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    Ok((dir.expect("config.json was downloaded"), info.sha))
}

/// Clone `url` (or update an earlier clone) into the cache's git folder, check out `rev` and pull
/// Git LFS files. Returns the work tree and the commit.
pub fn git(ctx: &BuildContext, url: &str, rev: Option<&str>) -> Result<(PathBuf, String)> {
    let dest = ctx
        .cache
        .root
        .join("sources")
        .join("git")
        .join(&blake3::hash(url.as_bytes()).to_hex()[..16]);
    if dest.join(".git").is_dir() {
        run_git(&dest, &["fetch", "--tags", "origin"])?;
    } else {
        std::fs::create_dir_all(dest.parent().unwrap())?;
        let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
        let out = Command::new("git")
            .args(["clone", "--no-checkout", url])
            .arg(&tmp)
            .env("GIT_LFS_SKIP_SMUDGE", "1")
            .output()
            .map_err(|e| {
                crate::error::env(format!("cannot run git ({e}); install git to fetch {url}"))
            })?;
        if !out.status.success() {
            std::fs::remove_dir_all(&tmp).ok();
            crate::env_bail!(
                "git clone {url} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("moving the clone to {}", dest.display()))?;
    }
    let target = match rev {
        Some(r) => r.to_string(),
        None => "origin/HEAD".to_string(),
    };
    run_git(
        &dest,
        &[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--force",
            &target,
        ],
    )
    .map_err(|e| crate::error::user(format!("cannot check out `{target}` of {url}: {e}")))?;
    let uses_lfs = std::fs::read_to_string(dest.join(".gitattributes"))
        .map(|s| s.contains("filter=lfs"))
        .unwrap_or(false);
    if uses_lfs {
        run_git(&dest, &["lfs", "pull"]).map_err(|e| {
            crate::error::env(format!("{url} stores weights in Git LFS and `git lfs pull` failed ({e}); install git-lfs and run `git lfs install`"))
        })?;
    }
    let commit = run_git(&dest, &["rev-parse", "HEAD"])?;
    Ok((dest, commit.trim().to_string()))
}

fn run_git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| crate::error::env(format!("cannot run git ({e}); install git")))?;
    if !out.status.success() {
        anyhow::bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
