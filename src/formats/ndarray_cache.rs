//! `params/ndarray-cache.json` + `params_shard_N.bin`: the parameter format MLC runtimes load.
//!
//! JSON: `{"metadata": {"ParamSize": n, "ParamBytes": b, "BitsPerParam": f}, "records": [shard…]}`,
//! each shard `{"dataPath": "params_shard_K.bin", "format": "raw-shard", "nbytes": B, "blake3": hex,
//! "records": [{"name", "shape", "dtype", "format": "raw", "nbytes", "byteOffset"}]}`.
//!
//! Sharding follows MLC's rule with a 32 MiB cap (`mlc-build-py.md` §3). One improvement: every
//! record starts at a multiple of [`RECORD_ALIGN`] bytes (zero padding), so runtimes can map
//! records as aligned arrays; `byteOffset` makes this transparent to readers.

use crate::formats::dtype::DType;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Bumped whenever the writer's output for the same records could change (quantize key).
pub const FORMAT_VERSION: u32 = 1;
pub const SHARD_CAP_BYTES: usize = 32 << 20;
pub const RECORD_ALIGN: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NdArrayCache {
    pub metadata: CacheMetadata,
    pub records: Vec<ShardRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CacheMetadata {
    pub param_size: usize,
    pub param_bytes: u64,
    pub bits_per_param: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardRecord {
    pub data_path: String,
    pub format: String,
    pub nbytes: u64,
    /// blake3 of the shard file, hex.
    pub blake3: String,
    pub records: Vec<ParamRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParamRecord {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub format: String,
    pub nbytes: u64,
    pub byte_offset: u64,
}

impl NdArrayCache {
    /// Parse `ndarray-cache.json` and check what a reader relies on before it touches a shard:
    /// each record's `nbytes` equals its shape × dtype size (no overflow) and its bytes lie inside
    /// its shard's declared `nbytes`. `origin` names the file in errors, which are user errors.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<NdArrayCache> {
        let cache: NdArrayCache = serde_json::from_slice(bytes)
            .map_err(|e| crate::error::user(format!("{origin}: invalid parameter index: {e}")))?;
        for shard in &cache.records {
            for rec in &shard.records {
                rec.check_within(shard.nbytes).map_err(|why| {
                    crate::error::user(format!(
                        "{origin}: record {} in {}: {why}; the artifact is corrupt, rebuild it",
                        rec.name, shard.data_path
                    ))
                })?;
            }
        }
        Ok(cache)
    }
}

impl ParamRecord {
    /// The record's byte range in a shard of `shard_len` bytes, checked: `nbytes` must equal
    /// shape × dtype size (quantized records carry their packed shape and dtype) and the range
    /// must end inside the shard.
    pub fn check_within(&self, shard_len: u64) -> std::result::Result<(u64, u64), String> {
        let expected = self
            .shape
            .iter()
            .try_fold(self.dtype.size() as u64, |a, &d| a.checked_mul(d as u64));
        if expected != Some(self.nbytes) {
            return Err(format!(
                "nbytes {} does not match shape {:?} of {}",
                self.nbytes, self.shape, self.dtype
            ));
        }
        match self.byte_offset.checked_add(self.nbytes) {
            Some(end) if end <= shard_len => Ok((self.byte_offset, end)),
            _ => Err(format!(
                "bytes {}..{} lie beyond the end of the shard ({shard_len} bytes)",
                self.byte_offset,
                self.byte_offset.saturating_add(self.nbytes)
            )),
        }
    }
}

/// Name of the JSON index in the params folder.
pub const NDARRAY_CACHE_JSON: &str = "ndarray-cache.json";

/// The file name of shard `n`.
pub fn shard_file_name(n: usize) -> String {
    format!("params_shard_{n}.bin")
}

fn align_up(x: usize, align: usize) -> usize {
    x.div_ceil(align) * align
}

/// Writes `params/`: parameters are added one at a time, in registration order, and shards are
/// written as they fill, so at most one pending shard (≤ the cap) is held in memory.
///
/// Sharding is MLC's rule (`mlc-build-py.md` §3) with the pending size measured at the aligned
/// offset the record would take: if `align_up(pending, RECORD_ALIGN) + len >= cap`, then a tensor
/// with `2 * len >= cap` is written at once, alone, as the next shard number, *leaving the pending
/// shard open* (so shard numbers do not follow parameter order); otherwise the pending shard is
/// committed first. The tensor is then appended at `byteOffset = align_up(pending, RECORD_ALIGN)`,
/// the gap zero-filled. Shards have no trailing padding: a shard's `nbytes` is its file length.
///
/// Metadata: `ParamSize` = number of records; `ParamBytes` = sum of record `nbytes` (padding not
/// counted); `BitsPerParam` = `8 * ParamBytes / logical elements`, where each record contributes
/// the number of model parameters it stores: its element count for a plain tensor (the default of
/// [`add`](Self::add)), the unpacked weight count for packed quantized data, and 0 for side
/// tensors such as scales (see [`add_with_logical_elems`](Self::add_with_logical_elems)). So a
/// 4-bit scheme with f16 group scales reports about 4.5. 0 when no logical elements were added.
///
/// The output is a pure function of the added tensors and the cap. Write into an empty folder:
/// shard files from an earlier run with higher numbers are not removed.
#[derive(Debug)]
pub struct NdArrayCacheWriter {
    dir: PathBuf,
    cap: usize,
    pending: Vec<u8>,
    pending_records: Vec<ParamRecord>,
    next_shard: usize,
    shards: Vec<ShardRecord>,
    names: HashSet<String>,
    param_bytes: u64,
    logical_elems: u64,
}

impl NdArrayCacheWriter {
    /// A writer with MLC's 32 MiB shard cap ([`SHARD_CAP_BYTES`]). Creates `params_dir`.
    pub fn new(params_dir: &Path) -> Result<Self> {
        Self::with_shard_cap(params_dir, SHARD_CAP_BYTES)
    }

    /// A writer with another shard cap (tests use small ones).
    pub fn with_shard_cap(params_dir: &Path, cap: usize) -> Result<Self> {
        anyhow::ensure!(cap > 0, "shard cap must be positive");
        std::fs::create_dir_all(params_dir)
            .with_context(|| format!("cannot create {}", params_dir.display()))?;
        Ok(NdArrayCacheWriter {
            dir: params_dir.to_path_buf(),
            cap,
            pending: Vec::new(),
            pending_records: Vec::new(),
            next_shard: 0,
            shards: Vec::new(),
            names: HashSet::new(),
            param_bytes: 0,
            logical_elems: 0,
        })
    }

    /// Add a tensor whose elements are all model parameters (logical elements = element count).
    /// `bytes` is row-major little-endian and must be `shape.product() * dtype.size()` long.
    pub fn add(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<()> {
        let numel: usize = shape.iter().product();
        self.add_with_logical_elems(name, dtype, shape, bytes, numel as u64)
    }

    /// Add a tensor that stores `logical_elems` model parameters (packed quantized weights: the
    /// unpacked count; scales and other side data: 0). Used only for `BitsPerParam`.
    pub fn add_with_logical_elems(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
        logical_elems: u64,
    ) -> Result<()> {
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .context("shape overflows")?;
        anyhow::ensure!(
            numel.checked_mul(dtype.size()) == Some(bytes.len()),
            "parameter {name}: shape {shape:?} of {dtype} needs {} bytes, got {}",
            numel.saturating_mul(dtype.size()),
            bytes.len()
        );
        anyhow::ensure!(
            self.names.insert(name.to_string()),
            "parameter {name} added twice to the ndarray cache"
        );
        let len = bytes.len();
        let mut record = ParamRecord {
            name: name.to_string(),
            shape: shape.to_vec(),
            dtype,
            format: "raw".into(),
            nbytes: len as u64,
            byte_offset: 0,
        };
        self.param_bytes += len as u64;
        self.logical_elems += logical_elems;
        let mut offset = align_up(self.pending.len(), RECORD_ALIGN);
        if offset + len >= self.cap {
            if 2 * len >= self.cap {
                // Out of band: alone in the next shard number, pending shard left open.
                return self.write_shard(bytes, vec![record]);
            }
            self.commit_pending()?;
            offset = 0;
        }
        self.pending.resize(offset, 0);
        self.pending.extend_from_slice(bytes);
        record.byte_offset = offset as u64;
        self.pending_records.push(record);
        Ok(())
    }

    fn commit_pending(&mut self) -> Result<()> {
        if self.pending_records.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        let records = std::mem::take(&mut self.pending_records);
        self.write_shard(&data, records)
    }

    fn write_shard(&mut self, data: &[u8], records: Vec<ParamRecord>) -> Result<()> {
        let file_name = shard_file_name(self.next_shard);
        self.next_shard += 1;
        let path = self.dir.join(&file_name);
        std::fs::write(&path, data).with_context(|| format!("cannot write {}", path.display()))?;
        self.shards.push(ShardRecord {
            data_path: file_name,
            format: "raw-shard".into(),
            nbytes: data.len() as u64,
            blake3: blake3::hash(data).to_hex().to_string(),
            records,
        });
        Ok(())
    }

    /// Commit the last shard and write `ndarray-cache.json` (formatted like Python's
    /// `json.dump(indent=4)`, no trailing newline). Returns what was written.
    pub fn finish(mut self) -> Result<NdArrayCache> {
        self.commit_pending()?;
        let param_size = self.shards.iter().map(|s| s.records.len()).sum();
        let bits_per_param = if self.logical_elems == 0 {
            0.0
        } else {
            8.0 * self.param_bytes as f64 / self.logical_elems as f64
        };
        let cache = NdArrayCache {
            metadata: CacheMetadata {
                param_size,
                param_bytes: self.param_bytes,
                bits_per_param,
            },
            records: self.shards,
        };
        let path = self.dir.join(NDARRAY_CACHE_JSON);
        std::fs::write(&path, to_json_indent4(&cache)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(cache)
    }
}

/// JSON with 4-space indentation, as Python's `json.dump(obj, f, indent=4)` writes it.
pub fn to_json_indent4<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value.serialize(&mut ser)?;
    Ok(out)
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    fn read_cache(dir: &Path) -> (String, NdArrayCache) {
        let text = std::fs::read_to_string(dir.join(NDARRAY_CACHE_JSON)).unwrap();
        let cache = serde_json::from_str(&text).unwrap();
        (text, cache)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    #[test]
    fn out_of_band_shard_numbering_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdArrayCacheWriter::with_shard_cap(dir.path(), 1024).unwrap();
        let tensors = [
            ("a", 300usize, 1u8), // shard 0 @ 0
            ("b", 600, 2),        // align(300)=320, 320+600 < 1024 → shard 0 @ 320
            ("c", 200, 3),        // align(920)=960, +200 ≥ 1024, small → commit 0; pending @ 0
            ("d", 900, 4),        // align(200)=256, +900 ≥ 1024, 2*900 ≥ 1024 → shard 1 alone
            ("e", 100, 5),        // pending: 256+100 < 1024 → @ 256
        ];
        for (name, len, seed) in tensors {
            w.add(name, DType::U8, &[len], &pattern(len, seed)).unwrap();
        }
        let cache = w.finish().unwrap();
        let layout: Vec<(String, Vec<(String, u64)>)> = cache
            .records
            .iter()
            .map(|s| {
                (
                    s.data_path.clone(),
                    s.records
                        .iter()
                        .map(|r| (r.name.clone(), r.byte_offset))
                        .collect(),
                )
            })
            .collect();
        let expect = |v: &[(&str, &[(&str, u64)])]| -> Vec<(String, Vec<(String, u64)>)> {
            v.iter()
                .map(|(p, rs)| {
                    (
                        p.to_string(),
                        rs.iter().map(|(n, o)| (n.to_string(), *o)).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(
            layout,
            expect(&[
                ("params_shard_0.bin", &[("a", 0), ("b", 320)]),
                ("params_shard_1.bin", &[("d", 0)]),
                ("params_shard_2.bin", &[("c", 0), ("e", 256)]),
            ])
        );
        // Shard files: sizes, contents at offsets, zero padding, blake3 of the file.
        let sizes: Vec<u64> = cache.records.iter().map(|s| s.nbytes).collect();
        assert_eq!(sizes, vec![920, 900, 356]);
        for shard in &cache.records {
            let bytes = std::fs::read(dir.path().join(&shard.data_path)).unwrap();
            assert_eq!(bytes.len() as u64, shard.nbytes);
            assert_eq!(shard.blake3, blake3::hash(&bytes).to_hex().to_string());
            assert_eq!(shard.format, "raw-shard");
            let mut covered = vec![false; bytes.len()];
            for r in &shard.records {
                assert_eq!(r.byte_offset % RECORD_ALIGN as u64, 0);
                let (_, len, seed) = tensors.iter().find(|t| t.0 == r.name).unwrap();
                let o = r.byte_offset as usize;
                assert_eq!(&bytes[o..o + len], &pattern(*len, *seed)[..]);
                covered[o..o + len].iter_mut().for_each(|c| *c = true);
            }
            for (i, c) in covered.iter().enumerate() {
                if !c {
                    assert_eq!(bytes[i], 0, "padding byte {i} of {}", shard.data_path);
                }
            }
        }
        assert_eq!(cache.metadata.param_size, 5);
        assert_eq!(cache.metadata.param_bytes, 2100);
        assert_eq!(cache.metadata.bits_per_param, 8.0);
        // The JSON on disk parses back to what finish returned.
        assert_eq!(read_cache(dir.path()).1, cache);
    }

    #[test]
    fn exact_cap_boundary_follows_mlc() {
        // pending + len == cap counts as full (>=): 512 + 512 → out of band since 2*512 >= 1024.
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdArrayCacheWriter::with_shard_cap(dir.path(), 1024).unwrap();
        w.add("p", DType::U8, &[512], &[1; 512]).unwrap();
        w.add("q", DType::U8, &[512], &[2; 512]).unwrap();
        w.add("r", DType::U8, &[64], &[3; 64]).unwrap();
        let cache = w.finish().unwrap();
        let names: Vec<Vec<&str>> = cache
            .records
            .iter()
            .map(|s| s.records.iter().map(|r| r.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["q"], vec!["p", "r"]]);
        assert_eq!(cache.records[0].data_path, "params_shard_0.bin");
    }

    #[test]
    fn json_is_formatted_like_python_indent4() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdArrayCacheWriter::new(dir.path()).unwrap();
        let v: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_with_logical_elems("w", DType::F32, &[1, 2], &v, 4)
            .unwrap();
        let cache = w.finish().unwrap();
        let hash = blake3::hash(&v).to_hex().to_string();
        // What Python's json.dump(obj, f, indent=4) writes for the same object.
        let expected = format!(
            r#"{{
    "metadata": {{
        "ParamSize": 1,
        "ParamBytes": 8,
        "BitsPerParam": 16.0
    }},
    "records": [
        {{
            "dataPath": "params_shard_0.bin",
            "format": "raw-shard",
            "nbytes": 8,
            "blake3": "{hash}",
            "records": [
                {{
                    "name": "w",
                    "shape": [
                        1,
                        2
                    ],
                    "dtype": "float32",
                    "format": "raw",
                    "nbytes": 8,
                    "byteOffset": 0
                }}
            ]
        }}
    ]
}}"#
        );
        let (text, parsed) = read_cache(dir.path());
        assert_eq!(text, expected);
        assert_eq!(parsed, cache);
        assert_eq!(to_json_indent4(&parsed).unwrap(), text.as_bytes());
    }

    #[test]
    fn bad_sizes_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdArrayCacheWriter::new(dir.path()).unwrap();
        assert!(w.add("x", DType::F16, &[3], &[0; 4]).is_err());
        w.add("x", DType::F16, &[2], &[0; 4]).unwrap();
        assert!(w.add("x", DType::F16, &[2], &[0; 4]).is_err());
        let cache = w.finish().unwrap();
        assert_eq!(cache.metadata.param_size, 1);
    }

    #[test]
    fn empty_cache_has_no_shards() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NdArrayCacheWriter::new(dir.path())
            .unwrap()
            .finish()
            .unwrap();
        assert!(cache.records.is_empty());
        assert_eq!(cache.metadata.bits_per_param, 0.0);
        assert!(!dir.path().join("params_shard_0.bin").exists());
    }

    #[test]
    fn from_json_reads_the_writer_output_and_refuses_bad_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdArrayCacheWriter::with_shard_cap(dir.path(), 256).unwrap();
        w.add("a", DType::F32, &[4], &[1; 16]).unwrap();
        w.add("b", DType::U32, &[2, 3], &[2; 24]).unwrap();
        let written = w.finish().unwrap();
        let bytes = std::fs::read(dir.path().join(NDARRAY_CACHE_JSON)).unwrap();
        assert_eq!(NdArrayCache::from_json(&bytes, "c.json").unwrap(), written);
        // b is at byte 64 (RECORD_ALIGN) of shard 0, 24 bytes long.
        assert_eq!(written.records[0].records[1].check_within(88), Ok((64, 88)));
        assert!(written.records[0].records[1].check_within(87).is_err());

        let with = |edit: &dyn Fn(&mut NdArrayCache)| {
            let mut c = written.clone();
            edit(&mut c);
            let err =
                NdArrayCache::from_json(&serde_json::to_vec(&c).unwrap(), "c.json").unwrap_err();
            assert_eq!(crate::error::class_of(&err), crate::error::ErrorClass::User);
            err.to_string()
        };
        // A shape whose element count overflows u64 is an error, not an allocation.
        let msg = with(&|c| c.records[0].records[0].shape = vec![usize::MAX, usize::MAX]);
        assert!(
            msg.contains("record a") && msg.contains("does not match shape"),
            "{msg}"
        );
        // An offset near u64::MAX does not wrap around.
        let msg = with(&|c| c.records[0].records[1].byte_offset = u64::MAX - 8);
        assert!(msg.contains("beyond the end of the shard"), "{msg}");
        let msg = with(&|c| c.records[0].nbytes = 80);
        assert!(msg.contains("record b in params_shard_0.bin"), "{msg}");
        let err = NdArrayCache::from_json(b"{\"metadata\": 1}", "c.json").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("c.json: invalid parameter index"));
    }
}
