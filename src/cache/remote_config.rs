//! Where the shared remote cache is, and how it may be used: from `--remote-cache URL`
//! (`--remote-cache-mode`, `--remote-cache-required`), else the environment (`MLCB_REMOTE_CACHE`,
//! `MLCB_REMOTE_CACHE_MODE`, `MLCB_REMOTE_CACHE_REQUIRED`), else the config file (`$MLCB_CONFIG`,
//! else `./mlcb.toml`) with a `[cache]` table. Each setting is taken from the first place that
//! gives it. The URL value `none` (or an empty one) switches the remote off at that level, so a
//! flag can override a config file.
//!
//! Only parsing and checking happens here (no network): a malformed URL or an unknown scheme is a
//! user error (exit 2) whatever the remote's state.

use anyhow::Result;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The URL schemes this build can talk to (the object_store features compiled in).
pub const SUPPORTED_SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "file",
];

/// The config file looked for in the current directory when `MLCB_CONFIG` is not set.
pub const CONFIG_FILE: &str = "mlcb.toml";

/// How a build may use the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteMode {
    /// Download hits, upload what this build computed (trusted builders).
    ReadWrite,
    /// Download hits, never upload (untrusted builds, e.g. pull requests).
    ReadOnly,
}

impl RemoteMode {
    pub fn name(self) -> &'static str {
        match self {
            RemoteMode::ReadWrite => "read-write",
            RemoteMode::ReadOnly => "read-only",
        }
    }

    fn parse(s: &str, origin: &str) -> Result<RemoteMode> {
        match s.trim() {
            "read-write" => Ok(RemoteMode::ReadWrite),
            "read-only" => Ok(RemoteMode::ReadOnly),
            other => crate::user_bail!(
                "{origin}: unknown remote cache mode {other:?}; valid: read-write, read-only"
            ),
        }
    }
}

/// Which kind of object store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    S3,
    Gcs,
    Azure,
    /// A folder, typically on a shared filesystem.
    Folder,
}

/// A remote cache URL, checked: its kind, and the key prefix inside the bucket (or the folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    /// As written (for messages and the report).
    pub text: String,
    pub kind: StoreKind,
    /// Key prefix inside the bucket/container, without leading or trailing `/` (may be empty).
    /// For a folder: empty (the folder itself is the root).
    pub prefix: String,
    /// For `file://`: the folder.
    pub folder: Option<PathBuf>,
}

impl RemoteUrl {
    /// Parse and check a remote cache URL; every failure is a user error naming the URL.
    pub fn parse(text: &str) -> Result<RemoteUrl> {
        let bad = |why: &str| {
            crate::error::user(format!(
                "remote cache URL {text:?} {why}; expected e.g. s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///shared/folder (this build supports: {})",
                SUPPORTED_SCHEMES.join(", ")
            ))
        };
        let url = url::Url::parse(text).map_err(|e| bad(&format!("is not a URL ({e})")))?;
        // The URL parser would silently resolve dot segments: refuse them instead.
        let path_part = text.split_once("://").map(|(_, r)| r).unwrap_or(text);
        if path_part.split('/').any(|seg| {
            matches!(
                seg.to_ascii_lowercase().as_str(),
                "." | ".." | "%2e" | "%2e%2e" | ".%2e" | "%2e."
            )
        }) {
            return Err(bad("has `.` or `..` in its path"));
        }
        let scheme = url.scheme().to_ascii_lowercase();
        let kind = match scheme.as_str() {
            "s3" | "s3a" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "azure" | "abfs" | "abfss" | "adl" => StoreKind::Azure,
            "file" => StoreKind::Folder,
            "http" | "https" => {
                return Err(bad(
                    "uses http(s): name the store by its scheme instead (for an S3-compatible server: s3://bucket/prefix with AWS_ENDPOINT=https://host:port)",
                ))
            }
            other => return Err(bad(&format!("has the unsupported scheme `{other}:`"))),
        };
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(
                "has a query or fragment (give options through the environment)",
            ));
        }
        if kind == StoreKind::Folder {
            if url
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(bad(
                    "names a host: a file:// URL must be an absolute local path (file:///path)",
                ));
            }
            let folder = url
                .to_file_path()
                .map_err(|_| bad("is not an absolute local path"))?;
            return Ok(RemoteUrl {
                text: text.to_string(),
                kind,
                prefix: String::new(),
                folder: Some(folder),
            });
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("has no bucket (container) name"));
        }
        // Percent-decoded segments; empty ones (`a//b`, a trailing `/`) are dropped.
        let mut segments = Vec::new();
        for s in url.path_segments().into_iter().flatten() {
            if s.is_empty() {
                continue;
            }
            let seg = percent_decode(s).ok_or_else(|| bad("has a badly escaped path"))?;
            if seg == "." || seg == ".." || seg.contains('/') {
                return Err(bad("has `.`/`..` or an escaped `/` in its path"));
            }
            segments.push(seg);
        }
        Ok(RemoteUrl {
            text: text.to_string(),
            kind,
            prefix: segments.join("/"),
            folder: None,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The remote cache a build should use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSettings {
    pub url: RemoteUrl,
    pub mode: RemoteMode,
    /// An unreachable remote fails the build (exit 3) instead of being skipped with a warning.
    pub required: bool,
}

/// What the command line gave.
#[derive(Debug, Clone, Default)]
pub struct RemoteFlags {
    pub url: Option<String>,
    pub mode: Option<RemoteMode>,
    pub required: bool,
}

/// The `[cache]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigCache {
    remote: Option<String>,
    remote_mode: Option<String>,
    remote_required: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    cache: ConfigCache,
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::error::user(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    toml::from_str(&text).map_err(|e| {
        crate::error::user(format!(
            "config file {}: {e}valid: [cache] remote = \"s3://bucket/prefix\", remote_mode = \"read-write\"|\"read-only\", remote_required = true|false",
            path.display()
        ))
    })
}

/// The config file in effect: `$MLCB_CONFIG` (which must exist), else `<cwd>/mlcb.toml` if present.
fn config_path(env: &dyn Fn(&str) -> Option<String>, cwd: &Path) -> Result<Option<PathBuf>> {
    if let Some(p) = env("MLCB_CONFIG").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            crate::user_bail!(
                "MLCB_CONFIG names {}, which is not a file; unset it or point it at a TOML file with a [cache] table",
                p.display()
            );
        }
        return Ok(Some(p));
    }
    let p = cwd.join(CONFIG_FILE);
    Ok(p.is_file().then_some(p))
}

/// Resolve the remote cache settings: flag > environment > config file. `env` reads a variable
/// (the process environment in production, a map in tests). `Ok(None)`: no remote.
pub fn resolve(
    flags: &RemoteFlags,
    env: &dyn Fn(&str) -> Option<String>,
    cwd: &Path,
) -> Result<Option<RemoteSettings>> {
    let config = match config_path(env, cwd)? {
        Some(p) => Some((read_config(&p)?, p)),
        None => None,
    };
    let cfg = config.as_ref().map(|(c, _)| &c.cache);
    let cfg_origin = config
        .as_ref()
        .map(|(_, p)| format!("[cache] in {}", p.display()))
        .unwrap_or_default();

    let (url, url_origin) = if let Some(u) = &flags.url {
        (Some(u.clone()), "--remote-cache".to_string())
    } else if let Some(u) = env("MLCB_REMOTE_CACHE") {
        (Some(u), "MLCB_REMOTE_CACHE".to_string())
    } else {
        (cfg.and_then(|c| c.remote.clone()), cfg_origin.clone())
    };
    let Some(url) = url.map(|u| u.trim().to_string()) else {
        return Ok(None);
    };
    if url.is_empty() || url.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let url =
        RemoteUrl::parse(&url).map_err(|e| crate::error::user(format!("{url_origin}: {e}")))?;
    let mode = if let Some(m) = flags.mode {
        m
    } else if let Some(m) = env("MLCB_REMOTE_CACHE_MODE") {
        RemoteMode::parse(&m, "MLCB_REMOTE_CACHE_MODE")?
    } else if let Some(m) = cfg.and_then(|c| c.remote_mode.as_deref()) {
        RemoteMode::parse(m, &cfg_origin)?
    } else {
        RemoteMode::ReadWrite
    };
    let required = if flags.required {
        true
    } else if let Some(v) = env("MLCB_REMOTE_CACHE_REQUIRED") {
        match v.trim() {
            "1" | "true" | "yes" => true,
            "0" | "false" | "no" | "" => false,
            other => crate::user_bail!(
                "MLCB_REMOTE_CACHE_REQUIRED={other:?}: use 1/true/yes or 0/false/no"
            ),
        }
    } else {
        cfg.and_then(|c| c.remote_required).unwrap_or(false)
    };
    Ok(Some(RemoteSettings {
        url,
        mode,
        required,
    }))
}

/// [`resolve`] with the process environment and current directory.
pub fn from_process(flags: &RemoteFlags) -> Result<Option<RemoteSettings>> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    resolve(flags, &|k| std::env::var(k).ok(), &cwd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn urls_of_each_store_parse_with_their_prefix() {
        let u = RemoteUrl::parse("s3://fleet-cache/mlcb/v1/").unwrap();
        assert_eq!((u.kind, u.prefix.as_str()), (StoreKind::S3, "mlcb/v1"));
        let u = RemoteUrl::parse("s3://b").unwrap();
        assert_eq!(u.prefix, "");
        let u = RemoteUrl::parse("gs://b/p%20q").unwrap();
        assert_eq!((u.kind, u.prefix.as_str()), (StoreKind::Gcs, "p q"));
        let u = RemoteUrl::parse("abfss://c@acct.dfs.core.windows.net/x").unwrap();
        assert_eq!((u.kind, u.prefix.as_str()), (StoreKind::Azure, "x"));
        let u = RemoteUrl::parse("file:///srv/shared/cache").unwrap();
        assert_eq!(u.kind, StoreKind::Folder);
        assert_eq!(u.folder.as_deref(), Some(Path::new("/srv/shared/cache")));
    }

    #[test]
    fn malformed_urls_are_user_errors_that_list_the_schemes() {
        for bad in [
            "bucket/prefix",
            "ftp://host/x",
            "https://s3.amazonaws.com/b/p",
            "s3:///prefix-without-bucket",
            "s3://b/../up",
            "s3://b/p?region=x",
            "file://otherhost/x",
            "s3://b/%zz",
        ] {
            let e = RemoteUrl::parse(bad).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User, "{bad}");
            let msg = e.to_string();
            assert!(msg.contains(bad), "{msg}");
            assert!(msg.contains("s3, s3a, gs"), "{msg}");
        }
    }

    #[test]
    fn precedence_is_flag_then_env_then_config_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("mlcb.toml"),
            "[cache]\nremote = \"s3://from-config/p\"\nremote_mode = \"read-only\"\n",
        )
        .unwrap();
        // Config file alone.
        let s = resolve(&RemoteFlags::default(), &env_of(&[]), dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(s.url.text, "s3://from-config/p");
        assert_eq!(s.mode, RemoteMode::ReadOnly);
        assert!(!s.required);
        // Environment beats the config file, setting by setting.
        let env = env_of(&[("MLCB_REMOTE_CACHE", "gs://from-env")]);
        let s = resolve(&RemoteFlags::default(), &env, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(s.url.text, "gs://from-env");
        assert_eq!(s.mode, RemoteMode::ReadOnly, "mode still from the file");
        // Flags beat both.
        let flags = RemoteFlags {
            url: Some("file:///x".into()),
            mode: Some(RemoteMode::ReadWrite),
            required: true,
        };
        let env = env_of(&[
            ("MLCB_REMOTE_CACHE", "gs://from-env"),
            ("MLCB_REMOTE_CACHE_MODE", "read-only"),
        ]);
        let s = resolve(&flags, &env, dir.path()).unwrap().unwrap();
        assert_eq!(s.url.text, "file:///x");
        assert_eq!(s.mode, RemoteMode::ReadWrite);
        assert!(s.required);
        // `none` switches a configured remote off.
        let flags = RemoteFlags {
            url: Some("none".into()),
            ..Default::default()
        };
        assert_eq!(resolve(&flags, &env, dir.path()).unwrap(), None);
        // Nothing anywhere: no remote, default mode unused.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve(&RemoteFlags::default(), &env_of(&[]), empty.path()).unwrap(),
            None
        );
    }

    #[test]
    fn mlcb_config_names_the_file_and_bad_files_are_user_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fleet.toml");
        std::fs::write(&f, "[cache]\nremote = \"s3://b/p\"\n").unwrap();
        let env = env_of(&[("MLCB_CONFIG", f.to_str().unwrap())]);
        let s = resolve(&RemoteFlags::default(), &env, Path::new("/nonexistent"))
            .unwrap()
            .unwrap();
        assert_eq!(s.url.prefix, "p");
        assert_eq!(s.mode, RemoteMode::ReadWrite, "default mode");

        let missing = env_of(&[("MLCB_CONFIG", "/nonexistent/mlcb.toml")]);
        let e = resolve(&RemoteFlags::default(), &missing, dir.path()).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);

        for (text, needle) in [
            ("[cache]\nremot = \"s3://b\"\n", "remot"),
            ("[cache]\nremote = \"s3://b\"\nremote_mode = \"rw\"\n", "rw"),
            ("[cache]\nremote = \"ftp://b\"\n", "ftp"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = resolve(&RemoteFlags::default(), &env, dir.path()).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User, "{text}");
            assert!(format!("{e:#}").contains(needle), "{e:#}");
        }
    }

    #[test]
    fn bad_mode_in_the_environment_is_a_user_error() {
        let env = env_of(&[
            ("MLCB_REMOTE_CACHE", "s3://b"),
            ("MLCB_REMOTE_CACHE_MODE", "write-only"),
        ]);
        let e = resolve(&RemoteFlags::default(), &env, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("write-only"));
    }
}
