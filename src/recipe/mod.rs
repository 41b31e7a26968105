//! Recipes: one TOML file per model × target × quantization, validated into a [`Recipe`].
//!
//! ```toml
//! quantization = "q4f16_1"
//! quantization_scales = "mse"   # optional: "absmax" gives build.py's scales bit for bit
//! [calibration]                 # optional: GPTQ codes instead of round-to-nearest
//! method = "gptq"               #   (see `quant::calibration` for `text` and `damp`)
//! max_seq_len = 2048            # optional: default is the model's context length
//! [model]
//! name = "vicuna-v1-7b"
//! source = { hf = "huggyllama/llama-7b" }          # or "path", { path }, { git, rev }, { gguf }
//! delta = { hf = "lmsys/vicuna-7b-delta-v1.1" }    # optional
//! architecture = "llama"                            # optional: default from config.json
//! [target]
//! preset = "cuda"                                   # or target = "cuda"
//! cuda_arch = "sm_80"
//! [chat]
//! conv_template = "vicuna_v1.1"
//! temperature = 0.7
//! ```
//! Relative paths resolve against the recipe file's folder.

pub mod schema;
pub mod span;
pub mod targets;

use crate::error::user;
use crate::quant::calibration::Calibration;
use crate::quant::scheme::{scheme, scheme_names, QuantScheme};
use crate::quant::ScaleRule;
use anyhow::Result;
use serde::Serialize;
use span::location;
use std::path::{Path, PathBuf};
use targets::TargetPreset;
use toml::Spanned;

/// Conversation templates the runtime knows; `auto` takes the chat template of the tokenizer files.
pub const CONV_TEMPLATES: &[&str] = &[
    "vicuna_v1.1",
    "redpajama_chat",
    "rwkv",
    "llama-2",
    "chatml",
    "LM",
    "auto",
];

/// Where model files come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Source {
    /// A local folder (symlinks followed).
    Local(PathBuf),
    /// A Hugging Face hub repository (`HF_ENDPOINT` honoured).
    Hub { repo: String, revision: String },
    /// A git repository cloned with git and git-lfs.
    Git { url: String, rev: Option<String> },
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl Source {
    /// A short human-readable description.
    pub fn describe(&self) -> String {
        match self {
            Source::Local(p) => p.display().to_string(),
            Source::Hub { repo, revision } => format!("hf://{repo}@{revision}"),
            Source::Git { url, rev } => format!(
                "{url}{}",
                rev.as_ref().map(|r| format!("@{r}")).unwrap_or_default()
            ),
            Source::Gguf(p) => p.display().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetSpec {
    pub preset: &'static TargetPreset,
    pub cuda_arch: Option<String>,
    pub llvm_mingw: Option<PathBuf>,
    /// wgpu targets: f16 kernels for f16 schemes (the preset's `shader_f16` unless the recipe
    /// says otherwise; always false for cpu and cuda).
    pub shader_f16: bool,
}

/// Chat settings written to `mlc-chat-config.json`; `None` means the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatSettings {
    pub conv_template: Option<String>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub mean_gen_len: Option<u64>,
    pub max_gen_len: Option<u64>,
}

/// A validated recipe.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// The recipe file, or "command line".
    pub origin: String,
    pub model_name: String,
    pub source: Source,
    pub delta: Option<Source>,
    pub architecture: Option<String>,
    pub target: TargetSpec,
    #[serde(serialize_with = "serialize_scheme")]
    pub quantization: &'static QuantScheme,
    /// How symmetric schemes pick group scales (`quantization_scales`).
    pub scale_rule: ScaleRule,
    /// GPTQ calibration (`[calibration]`); None: round to nearest.
    pub calibration: Option<Calibration>,
    pub max_seq_len: Option<usize>,
    pub chat: ChatSettings,
    pub tuning_file: Option<PathBuf>,
}

fn serialize_scheme<S: serde::Serializer>(
    s: &&'static QuantScheme,
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.name)
}

impl Recipe {
    /// `<model>-<quant>`: the dist folder name and MLC's `local_id`.
    pub fn local_id(&self) -> String {
        format!("{}-{}", self.model_name, self.quantization.name)
    }
}

/// Largest `max_seq_len` accepted: beyond this a KV cache would not fit any device.
pub const MAX_SEQ_LEN_LIMIT: usize = 1 << 20;

/// Read and validate a recipe file.
pub fn load(path: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| user(format!("cannot read recipe {}: {e}", path.display())))?;
    parse(
        &text,
        &path.display().to_string(),
        path.parent().unwrap_or(Path::new(".")),
    )
}

/// Validate recipe text. `origin` names it in errors; relative paths resolve against `base`.
pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Recipe> {
    let file: schema::RecipeFile = toml::from_str(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| location(origin, text, &s))
            .unwrap_or_else(|| origin.to_string());
        user(format!("{at}: {}", e.message().trim()))
    })?;
    let err = |span: std::ops::Range<usize>, msg: String| {
        user(format!("{}: {msg}", location(origin, text, &span)))
    };

    let quantization = scheme(file.quantization.get_ref()).ok_or_else(|| {
        err(
            file.quantization.span(),
            format!(
                "unknown quantization `{}`; valid: {}",
                file.quantization.get_ref(),
                scheme_names().join(", ")
            ),
        )
    })?;

    let target = parse_target(&file.target, base, &err)?;
    let target = TargetSpec {
        cuda_arch: target
            .cuda_arch
            .or_else(|| target.preset.default_cuda_arch.map(String::from)),
        ..target
    };

    let name = file.model.name.get_ref();
    if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
        return Err(err(
            file.model.name.span(),
            format!(
                "model name `{name}` must be a plain folder name (no `/`, not starting with `.`)"
            ),
        ));
    }
    let source = parse_source(&file.model.source, base, &err)?;
    let delta = file
        .model
        .delta
        .as_ref()
        .map(|d| parse_source(d, base, &err))
        .transpose()?;
    if let Some(a) = &file.model.architecture {
        if crate::model::by_name(a.get_ref()).is_none() {
            let names: Vec<_> = crate::model::ARCHITECTURES
                .iter()
                .map(|a| a.name())
                .collect();
            return Err(err(
                a.span(),
                format!(
                    "unknown architecture `{}`; valid: {}",
                    a.get_ref(),
                    names.join(", ")
                ),
            ));
        }
    }

    let max_seq_len = match &file.max_seq_len {
        None => None,
        Some(m) if *m.get_ref() == -1 => None,
        Some(m) if *m.get_ref() <= 0 || *m.get_ref() as u64 > MAX_SEQ_LEN_LIMIT as u64 => {
            return Err(err(m.span(), format!("max_seq_len {} must be between 1 and {MAX_SEQ_LEN_LIMIT} (or -1 for the model's own)", m.get_ref())))
        }
        Some(m) => Some(*m.get_ref() as usize),
    };

    let scale_rule = match &file.quantization_scales {
        None => ScaleRule::default(),
        Some(r) => ScaleRule::from_name(r.get_ref()).ok_or_else(|| {
            err(
                r.span(),
                format!(
                    "unknown quantization_scales `{}`; valid: {}",
                    r.get_ref(),
                    ScaleRule::NAMES.join(", ")
                ),
            )
        })?,
    };
    let calibration = match &file.calibration {
        None => None,
        Some(c) => Some(parse_calibration(c, base, &err)?),
    };
    let chat = parse_chat(&file.chat, &err)?;
    let tuning_file = file.tuning_file.as_ref().map(|t| base.join(t.get_ref()));
    Ok(Recipe {
        origin: origin.to_string(),
        model_name: name.clone(),
        source,
        delta,
        architecture: file.model.architecture.map(|a| a.into_inner()),
        target,
        quantization,
        scale_rule,
        calibration,
        max_seq_len,
        chat,
        tuning_file,
    })
}

/// `[calibration]`: `method` (required: "gptq"), `text` (relative to the recipe), `damp` in
/// (0, 1], `act_order`.
fn parse_calibration(
    c: &schema::CalibrationSection,
    base: &Path,
    err: &SpanErr,
) -> Result<Calibration> {
    let method = c.method.get_ref();
    if method != "gptq" {
        return Err(err(
            c.method.span(),
            format!(
                "unknown calibration method `{method}`; valid: {} (leave [calibration] out for \
                 round-to-nearest)",
                crate::quant::calibration::METHODS.join(", ")
            ),
        ));
    }
    let mut out = Calibration::default();
    if let Some(t) = &c.text {
        let path = base.join(t.get_ref());
        if !path.is_file() {
            return Err(err(
                t.span(),
                format!("calibration text {} is not a file", path.display()),
            ));
        }
        out.text_file = Some(path);
    }
    if let Some(d) = &c.damp {
        let v = *d.get_ref();
        if !(v > 0.0 && v <= 1.0) {
            return Err(err(
                d.span(),
                format!("damp {v} must be in (0, 1]; GPTQ's usual value is 0.01"),
            ));
        }
        out.damp = v;
    }
    if let Some(a) = c.act_order {
        out.act_order = a;
    }
    Ok(out)
}

type SpanErr<'a> = dyn Fn(std::ops::Range<usize>, String) -> anyhow::Error + 'a;

fn lookup_target(
    name: &str,
    span: std::ops::Range<usize>,
    err: &SpanErr,
) -> Result<&'static TargetPreset> {
    targets::target(name).ok_or_else(|| {
        err(
            span,
            format!(
                "unknown target `{name}`; valid: {}",
                targets::target_names().join(", ")
            ),
        )
    })
}

fn parse_target(v: &Spanned<toml::Value>, base: &Path, err: &SpanErr) -> Result<TargetSpec> {
    let t = match v.get_ref() {
        toml::Value::String(n) => {
            let preset = lookup_target(n, v.span(), err)?;
            return Ok(TargetSpec {
                preset,
                cuda_arch: None,
                llvm_mingw: None,
                shader_f16: preset.shader_f16,
            });
        }
        toml::Value::Table(t) => t,
        _ => {
            return Err(err(
                v.span(),
                "target must be a preset name or a table with `preset`".into(),
            ))
        }
    };
    let string = |k: &str| -> Result<Option<String>> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(v.span(), format!("target.{k} must be a string"))),
        }
    };
    if let Some(k) = t
        .keys()
        .find(|k| !["preset", "cuda_arch", "llvm_mingw", "shader_f16"].contains(&k.as_str()))
    {
        return Err(err(
            v.span(),
            format!(
                "unknown key `{k}` in [target]; valid: preset, cuda_arch, llvm_mingw, shader_f16"
            ),
        ));
    }
    let name = string("preset")?.ok_or_else(|| err(v.span(), "[target] needs `preset`".into()))?;
    let preset = lookup_target(&name, v.span(), err)?;
    let cuda_arch = string("cuda_arch")?;
    if let Some(a) = &cuda_arch {
        if preset.name != "cuda" {
            return Err(err(
                v.span(),
                format!(
                    "cuda_arch applies only to the cuda target, not {}",
                    preset.name
                ),
            ));
        }
        if !targets::CUDA_ARCHS.contains(&a.as_str()) {
            return Err(err(
                v.span(),
                format!(
                    "unknown cuda_arch `{a}`; valid: {}",
                    targets::CUDA_ARCHS.join(", ")
                ),
            ));
        }
    }
    let asked = match t.get("shader_f16") {
        None => None,
        Some(toml::Value::Boolean(on)) => Some(*on),
        Some(_) => {
            return Err(err(
                v.span(),
                "target.shader_f16 must be true or false".into(),
            ))
        }
    };
    let shader_f16 = targets::shader_f16_for(preset, asked).map_err(|m| err(v.span(), m))?;
    Ok(TargetSpec {
        preset,
        cuda_arch,
        llvm_mingw: string("llvm_mingw")?.map(|p| base.join(p)),
        shader_f16,
    })
}

fn parse_source(v: &Spanned<toml::Value>, base: &Path, err: &SpanErr) -> Result<Source> {
    let bad = |msg: &str| {
        err(
            v.span(),
            format!("{msg}; a source is a path string or one of {{ path = \"…\" }}, {{ hf = \"org/name\", revision = \"main\" }}, {{ git = \"url\", rev = \"…\" }}, {{ gguf = \"file.gguf\" }}"),
        )
    };
    match v.get_ref() {
        toml::Value::String(s) if s.is_empty() => Err(bad("empty source")),
        toml::Value::String(s) if s.ends_with(".gguf") => Ok(Source::Gguf(base.join(s))),
        toml::Value::String(s) => Ok(Source::Local(base.join(s))),
        toml::Value::Table(t) => {
            let get = |k: &str| -> Result<Option<String>> {
                match t.get(k) {
                    None => Ok(None),
                    Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                    Some(_) => Err(bad(&format!("`{k}` must be a non-empty string"))),
                }
            };
            let keys: Vec<&str> = t.keys().map(String::as_str).collect();
            let allowed: &[&str] = match keys
                .iter()
                .find(|k| ["path", "hf", "git", "gguf"].contains(k))
            {
                Some(&"hf") => &["hf", "revision"],
                Some(&"git") => &["git", "rev"],
                Some(&"path") => &["path"],
                Some(&"gguf") => &["gguf"],
                _ => return Err(bad("source table needs one of `path`, `hf`, `git`, `gguf`")),
            };
            if let Some(k) = keys.iter().find(|k| !allowed.contains(k)) {
                return Err(bad(&format!(
                    "unknown key `{k}` in source (valid here: {})",
                    allowed.join(", ")
                )));
            }
            if let Some(p) = get("path")? {
                return Ok(Source::Local(base.join(p)));
            }
            if let Some(p) = get("gguf")? {
                return Ok(Source::Gguf(base.join(p)));
            }
            if let Some(repo) = get("hf")? {
                if repo.split('/').count() != 2 || repo.contains("..") {
                    return Err(bad(&format!(
                        "hub repository `{repo}` must look like `org/name`"
                    )));
                }
                return Ok(Source::Hub {
                    repo,
                    revision: get("revision")?.unwrap_or_else(|| "main".into()),
                });
            }
            let url = get("git")?.ok_or_else(|| bad("`git` must be a URL"))?;
            Ok(Source::Git {
                url,
                rev: get("rev")?,
            })
        }
        _ => Err(bad("source has the wrong type")),
    }
}

fn parse_chat(c: &schema::ChatSection, err: &SpanErr) -> Result<ChatSettings> {
    if let Some(t) = &c.conv_template {
        if !CONV_TEMPLATES.contains(&t.get_ref().as_str()) {
            return Err(err(
                t.span(),
                format!(
                    "unknown conv_template `{}`; valid: {}",
                    t.get_ref(),
                    CONV_TEMPLATES.join(", ")
                ),
            ));
        }
    }
    let in_range =
        |v: &Option<Spanned<f64>>, name: &str, lo: f64, hi: f64| -> Result<Option<f64>> {
            match v {
                Some(x) if !(lo..=hi).contains(x.get_ref()) => Err(err(
                    x.span(),
                    format!("{name} = {} is outside {lo}..={hi}", x.get_ref()),
                )),
                Some(x) => Ok(Some(*x.get_ref())),
                None => Ok(None),
            }
        };
    let positive = |v: &Option<Spanned<i64>>, name: &str| -> Result<Option<u64>> {
        match v {
            Some(x) if *x.get_ref() <= 0 => Err(err(
                x.span(),
                format!("{name} must be positive, got {}", x.get_ref()),
            )),
            Some(x) => Ok(Some(*x.get_ref() as u64)),
            None => Ok(None),
        }
    };
    Ok(ChatSettings {
        conv_template: c.conv_template.as_ref().map(|t| t.get_ref().clone()),
        temperature: in_range(&c.temperature, "temperature", 0.0, 100.0)?,
        top_p: in_range(&c.top_p, "top_p", 0.0, 1.0)?,
        repetition_penalty: in_range(&c.repetition_penalty, "repetition_penalty", 0.0, 100.0)?,
        mean_gen_len: positive(&c.mean_gen_len, "mean_gen_len")?,
        max_gen_len: positive(&c.max_gen_len, "max_gen_len")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};

    fn p(text: &str) -> Result<Recipe> {
        parse(text, "r.toml", Path::new("/base"))
    }

    const OK: &str = "quantization = \"q4f16_1\"\n[model]\nname = \"m\"\nsource = \"models/m\"\n[target]\npreset = \"cuda\"\n";

    #[test]
    fn minimal_recipe() {
        let r = p(OK).unwrap();
        assert_eq!(r.source, Source::Local(PathBuf::from("/base/models/m")));
        assert_eq!(r.target.preset.name, "cuda");
        assert_eq!(r.target.cuda_arch.as_deref(), Some("sm_80"));
        assert_eq!(r.local_id(), "m-q4f16_1");
    }

    #[test]
    fn unknown_key_points_at_line() {
        let e = p(&format!("{OK}[chat]\nbogus = 1\n")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(msg.contains("r.toml:8:1"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        let msg = p(&format!("{OK}bogus = 1\n")).unwrap_err().to_string();
        assert!(
            msg.contains("r.toml:5:1") && msg.contains("unknown key `bogus` in [target]"),
            "{msg}"
        );
    }

    #[test]
    fn shader_f16_follows_the_preset_unless_a_wgpu_recipe_says_otherwise() {
        let vulkan = OK.replace("\"cuda\"", "\"vulkan\"");
        assert!(p(&vulkan).unwrap().target.shader_f16);
        assert!(!p(OK).unwrap().target.shader_f16, "cuda ignores it");
        let off = p(&format!("{vulkan}shader_f16 = false\n")).unwrap();
        assert!(!off.target.shader_f16);
        let e = p(&format!("{OK}shader_f16 = true\n")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(
            msg.contains("r.toml:5:1") && msg.contains("not cuda"),
            "{msg}"
        );
        let msg = p(&format!("{vulkan}shader_f16 = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("true or false"), "{msg}");
    }

    #[test]
    fn unknown_quantization_lists_choices() {
        let e = p(&OK.replace("q4f16_1", "q5f16")).unwrap_err().to_string();
        assert!(e.starts_with("r.toml:1:16"), "{e}");
        assert!(e.contains("q4f16_1") && e.contains("q3f16_0"), "{e}");
    }

    #[test]
    fn unknown_target_lists_choices() {
        let e = p(&OK.replace("\"cuda\"", "\"tpu\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml:5:1") && e.contains("vulkan"), "{e}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let e = p(&format!("max_seq_len = \"long\"\n{OK}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml:1:15"), "{e}");
    }

    #[test]
    fn nonsense_max_seq_len() {
        for v in ["0", "-5", "999999999999"] {
            let e = p(&format!("max_seq_len = {v}\n{OK}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_seq_len"), "{e}");
        }
        assert_eq!(
            p(&format!("max_seq_len = -1\n{OK}")).unwrap().max_seq_len,
            None
        );
    }

    #[test]
    fn source_forms() {
        let r = p(&OK.replace("\"models/m\"", "{ hf = \"org/m\" }")).unwrap();
        assert_eq!(
            r.source,
            Source::Hub {
                repo: "org/m".into(),
                revision: "main".into()
            }
        );
        let r = p(&OK.replace(
            "\"models/m\"",
            "{ git = \"https://x/y.git\", rev = \"abc\" }",
        ))
        .unwrap();
        assert_eq!(
            r.source,
            Source::Git {
                url: "https://x/y.git".into(),
                rev: Some("abc".into())
            }
        );
        let r = p(&OK.replace("\"models/m\"", "\"m.gguf\"")).unwrap();
        assert_eq!(r.source, Source::Gguf(PathBuf::from("/base/m.gguf")));
        let e = p(&OK.replace("\"models/m\"", "{ hf = \"org/m\", branch = \"x\" }"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("branch"), "{e}");
    }

    #[test]
    fn chat_values_are_checked() {
        let e = p(&format!("{OK}[chat]\ntop_p = 3.0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml:8:9") && e.contains("top_p"), "{e}");
        let e = p(&format!("{OK}[chat]\nconv_template = \"nope\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vicuna_v1.1"), "{e}");
    }

    #[test]
    fn bad_model_name() {
        let e = p(&OK.replace("name = \"m\"", "name = \"../x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain folder name"), "{e}");
    }
}
