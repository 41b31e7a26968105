//! Opening a built artifact: `dist/<model>-<quant>/` as `mlcb build` writes it.
//!
//! The folder holds `mlc-chat-config.json`, the model library (`*.mlcblib`: header with the
//! execution plan), `params/ndarray-cache.json` with its shards, and the tokenizer files. Shards are
//! memory-mapped, never read into memory: weights are handed out as slices of the maps. Every range
//! read from a file is checked against the real file size first, so a truncated or hostile artifact
//! gives a user error, never a crash.

use crate::formats::model_lib::plan::{Plan, WeightStorage};
use crate::formats::model_lib::{ModelLibrary, LIBRARY_EXTENSION};
use crate::formats::ndarray_cache::{NdArrayCache, ParamRecord};
use crate::runtime::chat_config::{ChatConfig, CHAT_CONFIG_FILE};
use crate::runtime::cpu::kernels::WeightView;
use crate::user_bail;
use anyhow::{Context, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Folder of the parameters inside a dist folder.
pub const PARAMS_DIR: &str = "params";
/// The parameter index inside [`PARAMS_DIR`].
pub const NDARRAY_CACHE_FILE: &str = "ndarray-cache.json";

/// An opened artifact. Cheap to query; the shards stay mapped while it lives.
pub struct Artifact {
    pub dir: PathBuf,
    /// Where the chat config and tokenizer files are: `params/` (MLC's layout), else `dir`.
    pub config_dir: PathBuf,
    pub config: ChatConfig,
    pub library: ModelLibrary,
    pub library_path: PathBuf,
    pub cache: NdArrayCache,
    shards: Vec<Shard>,
    index: HashMap<String, RecordLoc>,
}

/// One shard file: its map (None when the file is empty, which cannot be mapped).
struct Shard {
    path: PathBuf,
    map: Option<Mmap>,
}

impl Shard {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Where a record lives: shard index, record index within the shard, validated byte range.
#[derive(Debug, Clone, Copy)]
struct RecordLoc {
    shard: usize,
    record: usize,
    start: usize,
    end: usize,
}

impl Artifact {
    /// Opens `dir`: reads the chat config, the model library and the parameter index, maps the
    /// shards and checks every record range.
    pub fn open(dir: &Path) -> Result<Artifact> {
        Self::open_for(dir, None)
    }

    /// Like [`Artifact::open`], for the `--device` the user asked for: when the folder holds
    /// libraries of several targets (one build with several recipes), one whose target runs on
    /// that backend (`cpu`, `wgpu`, `cuda`) is preferred to the chat config's.
    pub fn open_for(dir: &Path, device: Option<&str>) -> Result<Artifact> {
        if !dir.is_dir() {
            user_bail!(
                "{} is not a directory; pass the dist folder that `mlcb build` wrote (dist/<model>-<quant>)",
                dir.display()
            );
        }
        let config_dir = if dir.join(PARAMS_DIR).join(CHAT_CONFIG_FILE).is_file() {
            dir.join(PARAMS_DIR)
        } else {
            dir.to_path_buf()
        };
        let config_path = config_dir.join(CHAT_CONFIG_FILE);
        if !config_path.is_file() {
            user_bail!(
                "{} is not an mlcb artifact: no {CHAT_CONFIG_FILE}; build it with `mlcb build <recipe>`",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: ChatConfig = serde_json::from_str(&text).map_err(|e| {
            crate::error::user(format!(
                "{}: invalid chat config: {e}; rebuild the artifact with `mlcb build`",
                config_path.display()
            ))
        })?;

        let mut library_path = find_library(dir, &config)?;
        let mut library = ModelLibrary::read(&library_path)?;
        if let Some(device) = device.map(|d| d.trim().to_ascii_lowercase()) {
            if !library.header.target.backend.eq_ignore_ascii_case(&device) {
                if let Some((p, l)) = library_for_backend(dir, &device)? {
                    (library_path, library) = (p, l);
                }
            }
        }

        let cache_path = dir.join(PARAMS_DIR).join(NDARRAY_CACHE_FILE);
        if !cache_path.is_file() {
            user_bail!(
                "{} is missing: the artifact in {} is incomplete; rebuild it with `mlcb build`",
                cache_path.display(),
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&cache_path)
            .with_context(|| format!("reading {}", cache_path.display()))?;
        let cache = NdArrayCache::from_json(text.as_bytes(), &cache_path.display().to_string())?;

        let mut shards = Vec::with_capacity(cache.records.len());
        let mut index = HashMap::new();
        for (si, shard) in cache.records.iter().enumerate() {
            let path = shard_path(dir, &cache_path, &shard.data_path)?;
            let file = std::fs::File::open(&path).map_err(|e| {
                crate::error::user(format!(
                    "cannot open shard {} listed in {}: {e}; the artifact is incomplete, rebuild it",
                    path.display(),
                    cache_path.display()
                ))
            })?;
            let len = file
                .metadata()
                .with_context(|| format!("reading size of {}", path.display()))?
                .len();
            if len < shard.nbytes {
                user_bail!(
                    "shard {} has {len} bytes but {} says {}: the file is truncated; rebuild the artifact",
                    path.display(),
                    cache_path.display(),
                    shard.nbytes
                );
            }
            // SAFETY: the shard is a read-only build output; mlcb never writes into a dist folder
            // while something runs it, and a changed file can only change numbers, not bounds we
            // checked against the map's own length.
            let map = if len == 0 {
                None
            } else {
                Some(
                    unsafe { Mmap::map(&file) }
                        .with_context(|| format!("memory-mapping {}", path.display()))?,
                )
            };
            let map_len = map.as_ref().map_or(0, |m| m.len());
            for (ri, rec) in shard.records.iter().enumerate() {
                let (start, end) = record_range(rec, map_len).map_err(|why| {
                    crate::error::user(format!(
                        "record {} in shard {}: {why}; the artifact is corrupt or truncated, rebuild it",
                        rec.name,
                        path.display()
                    ))
                })?;
                let loc = RecordLoc {
                    shard: si,
                    record: ri,
                    start,
                    end,
                };
                if index.insert(rec.name.clone(), loc).is_some() {
                    user_bail!(
                        "{}: record {} appears twice; rebuild the artifact",
                        cache_path.display(),
                        rec.name
                    );
                }
            }
            shards.push(Shard { path, map });
        }

        let artifact = Artifact {
            dir: dir.to_path_buf(),
            config_dir,
            config,
            library,
            library_path,
            cache,
            shards,
            index,
        };
        artifact.check_consistency()?;
        Ok(artifact)
    }

    pub fn plan(&self) -> &Plan {
        &self.library.header.plan
    }

    /// The metadata of a record, if the parameter index has it.
    pub fn record_info(&self, name: &str) -> Option<&ParamRecord> {
        let loc = self.index.get(name)?;
        Some(&self.cache.records[loc.shard].records[loc.record])
    }

    /// The bytes of a record, straight from the mapped shard.
    pub fn record(&self, name: &str) -> Result<&[u8]> {
        match self.index.get(name) {
            Some(loc) => Ok(&self.shards[loc.shard].bytes()[loc.start..loc.end]),
            None => user_bail!(
                "record {name} is not in {}/{PARAMS_DIR}/{NDARRAY_CACHE_FILE}; the library and the \
                 parameters come from different builds, rebuild the artifact",
                self.dir.display()
            ),
        }
    }

    /// For each plan weight, the bytes of its records in declaration order. Keep the result alive
    /// and pass it to [`Artifact::weight_views`].
    pub fn weight_records(&self) -> Result<Vec<Vec<&[u8]>>> {
        self.plan()
            .weights
            .iter()
            .map(|w| w.records.iter().map(|r| self.record(r)).collect())
            .collect()
    }

    /// The weight views a backend needs, one per plan weight, in plan order.
    pub fn weight_views<'a>(&'a self, records: &'a [Vec<&'a [u8]>]) -> Vec<WeightView<'a>> {
        WeightView::for_plan(self.plan(), records)
    }

    /// Token ids that end generation: the chat config's, then the plan's, without repeats.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for &t in self
            .config
            .stop_token_ids
            .iter()
            .chain(&self.plan().stop_tokens)
        {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }

    /// Context size in tokens: the plan's KV capacity, lowered by the config's window if smaller.
    pub fn context_len(&self) -> usize {
        let plan = self.plan().max_seq_len;
        match self.config.max_window_size {
            Some(w) if w > 0 => plan.min(w as usize),
            _ => plan,
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.plan().vocab_size
    }

    /// Recomputes each shard's blake3 and compares it with the index. Reads every byte: slow for
    /// big models, so callers ask for it explicitly.
    pub fn verify_shards(&self) -> Result<()> {
        for (shard, rec) in self.shards.iter().zip(&self.cache.records) {
            let bytes = shard.bytes();
            let n = (rec.nbytes as usize).min(bytes.len());
            let got = blake3::hash(&bytes[..n]).to_hex();
            if !got.as_str().eq_ignore_ascii_case(&rec.blake3) {
                user_bail!(
                    "shard {} has blake3 {got}, the index says {}: the file is corrupt; rebuild the artifact",
                    shard.path.display(),
                    rec.blake3
                );
            }
        }
        Ok(())
    }

    /// Plan weights against parameter records: every record exists, and raw weights have the
    /// dtype and size the plan declares.
    fn check_consistency(&self) -> Result<()> {
        let plan = self.plan();
        if let Some(v) = self.config.vocab_size {
            if v != plan.vocab_size {
                user_bail!(
                    "{}: vocab_size {v} in {CHAT_CONFIG_FILE} differs from the library's {}; rebuild the artifact",
                    self.dir.display(),
                    plan.vocab_size
                );
            }
        }
        for w in &plan.weights {
            let expected_records = match w.storage {
                WeightStorage::Raw { .. } => 1,
                WeightStorage::Quantized { .. } => 2,
            };
            if w.records.len() != expected_records {
                user_bail!(
                    "{}: weight {} has {} records, its storage needs {expected_records}; rebuild the artifact",
                    self.library_path.display(),
                    w.name,
                    w.records.len()
                );
            }
            for r in &w.records {
                self.record(r)?;
            }
            if let WeightStorage::Raw { dtype } = w.storage {
                let info = self.record_info(&w.records[0]).expect("checked above");
                let want = w
                    .shape
                    .iter()
                    .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64));
                if info.dtype != dtype || want != Some(info.nbytes) {
                    user_bail!(
                        "weight {} (shape {:?}, {dtype}) is bound to record {} ({:?}, {}, {} bytes): \
                         they do not match; the library and the parameters come from different builds, rebuild the artifact",
                        w.name,
                        w.shape,
                        info.name,
                        info.shape,
                        info.dtype,
                        info.nbytes
                    );
                }
            }
        }
        Ok(())
    }
}

/// The byte range of a record, checked: inside the mapped file and consistent with shape × dtype.
fn record_range(rec: &ParamRecord, file_len: usize) -> std::result::Result<(usize, usize), String> {
    let expected = rec
        .shape
        .iter()
        .try_fold(rec.dtype.size() as u64, |a, &d| a.checked_mul(d as u64));
    // Quantized records are stored with their packed shape and dtype, so the product must match.
    if expected != Some(rec.nbytes) {
        return Err(format!(
            "nbytes {} does not match shape {:?} of {}",
            rec.nbytes, rec.shape, rec.dtype
        ));
    }
    let end = rec.byte_offset.checked_add(rec.nbytes);
    match end {
        Some(end) if end <= file_len as u64 => Ok((rec.byte_offset as usize, end as usize)),
        _ => Err(format!(
            "bytes {}..{} lie beyond the end of the file ({file_len} bytes)",
            rec.byte_offset,
            rec.byte_offset.saturating_add(rec.nbytes)
        )),
    }
}

/// The shard file for a `dataPath`: a plain file name inside `params/`, nothing that escapes it.
fn shard_path(dir: &Path, cache_path: &Path, data_path: &str) -> Result<PathBuf> {
    let p = Path::new(data_path);
    let plain = p.components().count() == 1
        && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
    if !plain {
        user_bail!(
            "{}: shard path {data_path:?} is not a file name inside {PARAMS_DIR}/; the index is corrupt",
            cache_path.display()
        );
    }
    Ok(dir.join(PARAMS_DIR).join(p))
}

/// The first library of `dir` (by file name) that `backend` can run: its target's backend, and for
/// the GPU backends kernels in a language any adapter loads (for wgpu, SPIR-V or WGSL for every
/// kernel; metal libraries carry WGSL beside their MSL, older MSL-only ones do not qualify).
fn library_for_backend(dir: &Path, backend: &str) -> Result<Option<(PathBuf, ModelLibrary)>> {
    let runs = |lib: &ModelLibrary| {
        let kernels = &lib.header.kernels;
        lib.header.target.backend.eq_ignore_ascii_case(backend)
            && match backend {
                "wgpu" => {
                    !kernels.is_empty()
                        && crate::runtime::gpu::kernels::wgpu_entries(kernels).is_ok()
                }
                "cuda" => !kernels.is_empty(),
                _ => true,
            }
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(LIBRARY_EXTENSION))
        .collect();
    paths.sort();
    for p in paths {
        let lib = ModelLibrary::read(&p)?;
        if runs(&lib) {
            return Ok(Some((p, lib)));
        }
    }
    Ok(None)
}

/// The model library: the config's `model_lib_file`, else `<model_lib>-<target>.mlcblib`, else the
/// only `*.mlcblib` in the folder.
fn find_library(dir: &Path, config: &ChatConfig) -> Result<PathBuf> {
    if let Some(name) = &config.model_lib_file {
        crate::safe_path::check_file_name(name, "model_lib_file")?;
        let p = dir.join(name);
        if !p.is_file() {
            user_bail!(
                "{} names model library {name}, which is not in {}; rebuild the artifact",
                dir.join(CHAT_CONFIG_FILE).display(),
                dir.display()
            );
        }
        return Ok(p);
    }
    if let Some(target) = &config.target {
        let name = format!("{}-{target}.{LIBRARY_EXTENSION}", config.model_lib);
        crate::safe_path::check_file_name(&name, "model_lib/target of the chat config")?;
        let p = dir.join(format!("{}-{target}.{LIBRARY_EXTENSION}", config.model_lib));
        if p.is_file() {
            return Ok(p);
        }
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some(LIBRARY_EXTENSION) {
            found.push(path);
        }
    }
    found.sort();
    match found.len() {
        1 => Ok(found.pop().expect("one element")),
        0 => user_bail!(
            "{} has no model library (*.{LIBRARY_EXTENSION}); build one with `mlcb build`",
            dir.display()
        ),
        _ => user_bail!(
            "{} has several model libraries ({}); set \"model_lib_file\" in {CHAT_CONFIG_FILE} to choose",
            dir.display(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::formats::dtype::DType;
    use crate::formats::model_lib::plan::{BufferDecl, Op, WeightDecl, PLAN_FORMAT_VERSION};
    use crate::formats::model_lib::{LibraryHeader, TargetInfo};
    use crate::formats::ndarray_cache::{CacheMetadata, ShardRecord, RECORD_ALIGN};

    pub const VOCAB: usize = 6;
    pub const HIDDEN: usize = 4;

    /// A tiny plan: embedding → RMSNorm → logits with a separate head, raw f32 weights.
    pub fn tiny_plan() -> Plan {
        let ops = vec![
            Op::Embedding { weight: 0, out: 0 },
            Op::RmsNorm {
                input: 0,
                weight: 1,
                eps: 1e-5,
                out: 1,
            },
            Op::Logits {
                input: 1,
                weight: 2,
            },
        ];
        let raw = WeightStorage::Raw { dtype: DType::F32 };
        Plan {
            format_version: PLAN_FORMAT_VERSION,
            arch: "test".into(),
            quantization: "q0f32".into(),
            model_dtype: DType::F32,
            vocab_size: VOCAB,
            hidden_size: HIDDEN,
            max_seq_len: 16,
            stop_tokens: vec![0],
            weights: vec![
                WeightDecl {
                    name: "embed.weight".into(),
                    shape: vec![VOCAB, HIDDEN],
                    storage: raw.clone(),
                    records: vec!["embed.weight".into()],
                },
                WeightDecl {
                    name: "norm.weight".into(),
                    shape: vec![HIDDEN],
                    storage: raw.clone(),
                    records: vec!["norm.weight".into()],
                },
                WeightDecl {
                    name: "lm_head.weight".into(),
                    shape: vec![VOCAB, HIDDEN],
                    storage: raw,
                    records: vec!["lm_head.weight".into()],
                },
            ],
            buffers: vec![
                BufferDecl {
                    name: "x".into(),
                    cols: HIDDEN,
                },
                BufferDecl {
                    name: "h".into(),
                    cols: HIDDEN,
                },
                BufferDecl {
                    name: "logits".into(),
                    cols: VOCAB,
                },
            ],
            states: vec![],
            prefill: ops.clone(),
            decode: ops,
            logits: 2,
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes a complete synthetic artifact into `dir`; returns the weight values by record name.
    pub fn write_tiny_artifact(dir: &Path) -> Vec<(String, Vec<f32>)> {
        let embed: Vec<f32> = (0..VOCAB * HIDDEN).map(|i| i as f32 * 0.25 - 1.0).collect();
        let norm = vec![1.0, 0.5, 2.0, 1.5];
        let head: Vec<f32> = (0..VOCAB * HIDDEN).map(|i| (i % 7) as f32 - 3.0).collect();
        let tensors = vec![
            ("embed.weight".to_string(), embed, vec![VOCAB, HIDDEN]),
            ("norm.weight".to_string(), norm, vec![HIDDEN]),
            ("lm_head.weight".to_string(), head, vec![VOCAB, HIDDEN]),
        ];
        let mut shard = Vec::new();
        let mut records = Vec::new();
        for (name, data, shape) in &tensors {
            while shard.len() % RECORD_ALIGN != 0 {
                shard.push(0);
            }
            let bytes = f32_bytes(data);
            records.push(ParamRecord {
                name: name.clone(),
                shape: shape.clone(),
                dtype: DType::F32,
                format: "raw".into(),
                nbytes: bytes.len() as u64,
                byte_offset: shard.len() as u64,
            });
            shard.extend_from_slice(&bytes);
        }
        let cache = NdArrayCache {
            metadata: CacheMetadata {
                param_size: 2 * VOCAB * HIDDEN + HIDDEN,
                param_bytes: 4 * (2 * VOCAB * HIDDEN + HIDDEN) as u64,
                bits_per_param: 32.0,
            },
            records: vec![ShardRecord {
                data_path: "params_shard_0.bin".into(),
                format: "raw-shard".into(),
                nbytes: shard.len() as u64,
                blake3: blake3::hash(&shard).to_hex().to_string(),
                records,
            }],
        };
        std::fs::create_dir_all(dir.join(PARAMS_DIR)).unwrap();
        std::fs::write(dir.join("params/params_shard_0.bin"), &shard).unwrap();
        std::fs::write(
            dir.join("params/ndarray-cache.json"),
            serde_json::to_string_pretty(&cache).unwrap(),
        )
        .unwrap();
        let lib = ModelLibrary {
            header: LibraryHeader {
                model: "tiny".into(),
                quantization: "q0f32".into(),
                target: TargetInfo {
                    name: "cpu".into(),
                    backend: "cpu".into(),
                    options: Default::default(),
                },
                plan: tiny_plan(),
                kernels: vec![],
                tuning: serde_json::Value::Null,
                generator: "test".into(),
            },
            blobs: vec![],
        };
        std::fs::write(dir.join("tiny-q0f32-cpu.mlcblib"), lib.to_bytes().unwrap()).unwrap();
        let config = serde_json::json!({
            "model_lib": "tiny-q0f32",
            "local_id": "tiny-q0f32",
            "conv_template": "LM",
            "temperature": 0.5,
            "vocab_size": VOCAB,
            "max_window_size": 8,
            "model_lib_file": "tiny-q0f32-cpu.mlcblib",
            "stop_token_ids": [5, 0],
            "target": "cpu",
            "tokenizer_files": ["tokenizer.json"],
        });
        std::fs::write(
            dir.join(CHAT_CONFIG_FILE),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        tensors.into_iter().map(|(n, d, _)| (n, d)).collect()
    }

    /// A tokenizer.json for the synthetic artifact: byte-level BPE over "a".."e" (ids 1..=5), no
    /// merges, id 0 the special end-of-text token.
    pub fn write_tiny_tokenizer(dir: &Path) {
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
                "merges": []},
        });
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}"#,
        )
        .unwrap();
    }

    #[test]
    fn opens_and_slices_records() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = write_tiny_artifact(tmp.path());
        let a = Artifact::open(tmp.path()).unwrap();
        for (name, values) in &weights {
            let bytes = a.record(name).unwrap();
            let got: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&got, values, "{name}");
        }
        assert_eq!(a.config.temperature, 0.5);
        assert_eq!(a.stop_tokens(), vec![5, 0]);
        assert_eq!(a.context_len(), 8);
        assert_eq!(a.vocab_size(), VOCAB);
        a.verify_shards().unwrap();

        let records = a.weight_records().unwrap();
        let views = a.weight_views(&records);
        assert_eq!(views.len(), 3);
        assert_eq!(views[1].shape, &[HIDDEN]);
        assert_eq!(
            crate::runtime::cpu::kernels::vector(&views[1]),
            weights[1].1
        );
        let mut row = vec![0f32; HIDDEN];
        crate::runtime::cpu::kernels::gather_row(&views[0], 2, &mut row);
        assert_eq!(row, weights[0].1[2 * HIDDEN..3 * HIDDEN]);
        assert_eq!(class_of(&a.record("nope").unwrap_err()), ErrorClass::User);
    }

    #[test]
    fn truncated_shard_is_a_user_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let shard = tmp.path().join("params/params_shard_0.bin");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() - 8]).unwrap();
        let err = Artifact::open(tmp.path()).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn record_beyond_shard_end_is_a_user_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let path = tmp.path().join("params/ndarray-cache.json");
        let mut cache: NdArrayCache =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cache.records[0].records[2].byte_offset += 4096;
        std::fs::write(&path, serde_json::to_string(&cache).unwrap()).unwrap();
        let err = Artifact::open(tmp.path()).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
        assert!(err.to_string().contains("lm_head.weight"), "{err}");
    }

    #[test]
    fn corrupt_shard_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let shard = tmp.path().join("params/params_shard_0.bin");
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[3] ^= 0xff;
        std::fs::write(&shard, &bytes).unwrap();
        let a = Artifact::open(tmp.path()).unwrap();
        assert_eq!(class_of(&a.verify_shards().unwrap_err()), ErrorClass::User);
    }

    #[test]
    fn missing_config_names_the_build_command() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Artifact::open(tmp.path()).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
        let msg = err.to_string();
        assert!(
            msg.contains("is not an mlcb artifact: no mlc-chat-config.json"),
            "{msg}"
        );
        assert!(msg.contains("mlcb build"), "{msg}");
        let err = Artifact::open(&tmp.path().join("absent")).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
    }

    #[test]
    fn escaping_shard_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let path = tmp.path().join("params/ndarray-cache.json");
        let mut cache: NdArrayCache =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cache.records[0].data_path = "../mlc-chat-config.json".into();
        std::fs::write(&path, serde_json::to_string(&cache).unwrap()).unwrap();
        let err = Artifact::open(tmp.path()).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
    }

    #[test]
    fn plan_record_mismatch_is_a_user_error() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let lib_path = tmp.path().join("tiny-q0f32-cpu.mlcblib");
        let mut lib = ModelLibrary::read(&lib_path).unwrap();
        lib.header.plan.weights[1].shape = vec![HIDDEN + 1];
        std::fs::write(&lib_path, lib.to_bytes().unwrap()).unwrap();
        let err = Artifact::open(tmp.path()).err().unwrap();
        assert_eq!(class_of(&err), ErrorClass::User);
        assert!(err.to_string().contains("norm.weight"), "{err}");
    }

    /// A folder with libraries of two targets (one build, two recipes): `--device` picks the one
    /// that runs on it; without it, or when none matches, the chat config's.
    #[test]
    fn the_requested_device_picks_its_library() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let cpu_lib = tmp.path().join("tiny-q0f32-cpu.mlcblib");
        let mut lib = ModelLibrary::read(&cpu_lib).unwrap();
        lib.header.target.backend = "wgpu".into();
        lib.header.target.name = "vulkan".into();
        let msl = tmp.path().join("tiny-q0f32-metal.mlcblib");
        let mut metal = lib.clone();
        metal.header.target.name = "metal".into();
        metal.header.kernels = vec![crate::formats::model_lib::KernelEntry {
            signature: "rms_norm".into(),
            entry_point: "main".into(),
            language: "msl".into(),
            offset: 0,
            len: 0,
            launch: serde_json::Value::Null,
        }];
        std::fs::write(&msl, metal.to_bytes().unwrap()).unwrap();
        lib.header.kernels = metal.header.kernels.clone();
        lib.header.kernels[0].language = "spirv".into();
        std::fs::write(
            tmp.path().join("tiny-q0f32-vulkan.mlcblib"),
            lib.to_bytes().unwrap(),
        )
        .unwrap();
        let name = |a: &Artifact| a.library_path.file_name().unwrap().to_owned();
        let a = Artifact::open(tmp.path()).unwrap();
        assert_eq!(name(&a), "tiny-q0f32-cpu.mlcblib");
        let a = Artifact::open_for(tmp.path(), Some("WGPU")).unwrap();
        assert_eq!(name(&a), "tiny-q0f32-vulkan.mlcblib");
        assert_eq!(a.library.header.target.name, "vulkan");
        let a = Artifact::open_for(tmp.path(), Some("cpu")).unwrap();
        assert_eq!(name(&a), "tiny-q0f32-cpu.mlcblib");
        let a = Artifact::open_for(tmp.path(), Some("cuda")).unwrap();
        assert_eq!(name(&a), "tiny-q0f32-cpu.mlcblib");
    }
}
