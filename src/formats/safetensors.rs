//! `.safetensors` weights: an 8-byte header length, a JSON header, then the raw tensor bytes.
//!
//! The header is parsed and validated by the `safetensors` crate (offsets contiguous, sizes equal
//! to shape × dtype, data length equal to the file length), so a truncated or hand-edited file is
//! refused at open. Tensor bytes are borrowed from a memory map on read.

use crate::error::user;
use crate::formats::dtype::DType;
use crate::formats::lfs;
use crate::formats::tensor::{Tensor, TensorInfo, TensorSource};
use anyhow::{Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The single-file weights name.
pub const SAFETENSORS_WEIGHTS: &str = "model.safetensors";
/// The index of sharded safetensors weights.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// One opened `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    infos: Vec<TensorInfo>,
    /// Absolute byte range in the file, by tensor index.
    ranges: Vec<(usize, usize)>,
    by_name: HashMap<String, usize>,
    /// Tensors of a dtype mlcb does not read: (name, safetensors dtype).
    skipped: Vec<(String, String)>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

fn dtype_of(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::U32 => DType::U32,
        StDtype::U16 => DType::U16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        // Bool is one byte 0/1 per element.
        StDtype::U8 | StDtype::BOOL => DType::U8,
        _ => return None,
    })
}

/// The tensor table of a `.safetensors` file, as [`parse_header`] validated it.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsHeader {
    /// Readable tensors in file order.
    pub infos: Vec<TensorInfo>,
    /// Absolute byte range of each readable tensor in the file (same order as `infos`).
    pub ranges: Vec<(usize, usize)>,
    /// Tensors of a dtype mlcb does not read: (name, safetensors dtype).
    pub skipped: Vec<(String, String)>,
}

/// Parse and validate the header of a whole `.safetensors` file held in `bytes` (offsets
/// contiguous, sizes equal to shape × dtype, data length equal to what the header claims).
/// `origin` names the file in errors. Nothing is allocated from a size field before it is
/// checked against `bytes`.
pub fn parse_header(bytes: &[u8], origin: &Path) -> Result<SafetensorsHeader> {
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        user(format!(
            "{}: not a valid safetensors file ({e}); the file may be truncated or corrupt — \
             download it again",
            origin.display()
        ))
    })?;
    let data_start = 8 + header_len;
    let mut infos = Vec::new();
    let mut ranges = Vec::new();
    let mut skipped = Vec::new();
    // offset_keys: names in file order.
    for name in meta.offset_keys() {
        let info = meta.info(&name).expect("name from the same metadata");
        let Some(dtype) = dtype_of(info.dtype) else {
            skipped.push((name, format!("{:?}", info.dtype)));
            continue;
        };
        let (s, e) = info.data_offsets;
        ranges.push((data_start + s, data_start + e));
        infos.push(TensorInfo {
            name,
            dtype,
            shape: info.shape.clone(),
        });
    }
    Ok(SafetensorsHeader {
        infos,
        ranges,
        skipped,
    })
}

impl SafetensorsFile {
    /// Open and validate a file. Bad or truncated files are user errors naming the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        lfs::check_not_lfs_pointer(path)?;
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open safetensors weights {}", path.display()))?;
        // SAFETY: read-only map of a file mlcb does not modify while reading it.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let SafetensorsHeader {
            infos,
            ranges,
            skipped,
        } = parse_header(&map, path)?;
        let by_name = infos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            infos,
            ranges,
            by_name,
            skipped,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors whose dtype mlcb does not read: (name, safetensors dtype name).
    pub fn skipped(&self) -> &[(String, String)] {
        &self.skipped
    }
}

impl TensorSource for SafetensorsFile {
    fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn read(&self, name: &str) -> Result<Tensor<'_>> {
        let Some(&i) = self.by_name.get(name) else {
            if let Some((_, d)) = self.skipped.iter().find(|(n, _)| n == name) {
                crate::user_bail!(
                    "{}: tensor {name} has dtype {d}, which mlcb does not read",
                    self.path.display()
                );
            }
            crate::user_bail!("{}: no tensor named {name}", self.path.display());
        };
        let (s, e) = self.ranges[i];
        Ok(Tensor {
            dtype: self.infos[i].dtype,
            shape: self.infos[i].shape.clone(),
            data: Cow::Borrowed(&self.map[s..e]),
        })
    }

    fn release(&self, name: &str) {
        if let Some(&i) = self.by_name.get(name) {
            let (s, e) = self.ranges[i];
            release_pages(&self.map, s, e);
        }
    }
}

/// Drop the whole pages inside `start..end` of a read-only file mapping from the resident set.
pub(crate) fn release_pages(map: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let (a, b) = (start.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
    if b > a {
        // SAFETY: the mapping is a read-only shared file mapping; MADV_DONTNEED only drops pages,
        // which the kernel reads back from the file on the next access, so contents never change.
        unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) }.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    /// A safetensors file written by hand (header JSON + bytes), so the test does not trust the
    /// crate's writer.
    fn hand_written(dir: &Path) -> PathBuf {
        let header = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[12,16]},"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"m":{"dtype":"F64","shape":[1],"data_offsets":[16,24]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        for v in [1.5f32, -2.0, 0.25] {
            bytes.extend(v.to_le_bytes());
        }
        bytes.extend(half::f16::from_f32(3.0).to_le_bytes());
        bytes.extend(half::f16::from_f32(-0.5).to_le_bytes());
        bytes.extend(7.0f64.to_le_bytes());
        let p = dir.join("model.safetensors");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_hand_written_file_in_offset_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = SafetensorsFile::open(&hand_written(dir.path())).unwrap();
        let names: Vec<&str> = f.infos().iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            f.read("a").unwrap().to_f32().unwrap(),
            vec![1.5, -2.0, 0.25]
        );
        let b = f.read("b").unwrap();
        assert_eq!((b.dtype, b.shape.clone()), (DType::F16, vec![2]));
        assert_eq!(b.to_f32().unwrap(), vec![3.0, -0.5]);
        assert_eq!(f.skipped(), &[("m".to_string(), "F64".to_string())]);
        let e = f.read("m").unwrap_err();
        assert!(e.to_string().contains("F64"), "{e}");
        assert_eq!(class_of(&f.read("zz").unwrap_err()), ErrorClass::User);
    }

    #[test]
    fn parse_header_gives_ranges_and_refuses_huge_claims() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(hand_written(dir.path())).unwrap();
        let h = parse_header(&bytes, Path::new("x.safetensors")).unwrap();
        let data = bytes.len() - 24;
        assert_eq!(h.ranges, vec![(data, data + 12), (data + 12, data + 16)]);
        assert_eq!(h.skipped, vec![("m".to_string(), "F64".to_string())]);
        // A header length of 10^15 bytes is an error naming the file, not an allocation.
        let mut huge = 1_000_000_000_000_000u64.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}      ");
        let e = parse_header(&huge, Path::new("x.safetensors")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(
            e.to_string().starts_with("x.safetensors: not a valid"),
            "{e}"
        );
    }

    #[test]
    fn reads_tiny_llama_fixture() {
        let f = SafetensorsFile::open(&fixture("tiny-llama").join(SAFETENSORS_WEIGHTS)).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap(),
        )
        .unwrap();
        let h = cfg["hidden_size"].as_u64().unwrap() as usize;
        let vocab = cfg["vocab_size"].as_u64().unwrap() as usize;
        let inter = cfg["intermediate_size"].as_u64().unwrap() as usize;
        let emb = f.info("model.embed_tokens.weight").unwrap();
        assert_eq!(emb.shape, vec![vocab, h]);
        assert_eq!(
            f.info("model.layers.0.mlp.down_proj.weight").unwrap().shape,
            vec![h, inter]
        );
        let w = f.read("model.layers.0.mlp.down_proj.weight").unwrap();
        let v = w.to_f32().unwrap();
        assert_eq!(v.len(), h * inter);
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn truncated_or_garbage_is_a_user_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = hand_written(dir.path());
        let bytes = std::fs::read(&p).unwrap();
        for keep in [bytes.len() - 1, 20, 4, 0] {
            std::fs::write(&p, &bytes[..keep]).unwrap();
            let e = SafetensorsFile::open(&p).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User, "{e:#}");
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        }
        // A header length far beyond the file.
        let mut bad = u64::MAX.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{}");
        std::fs::write(&p, bad).unwrap();
        assert_eq!(
            class_of(&SafetensorsFile::open(&p).unwrap_err()),
            ErrorClass::User
        );
    }
}
