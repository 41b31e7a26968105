//! Sharded weights: `*.index.json` (`{"metadata": …, "weight_map": {tensor: shard file}}`) and
//! [`MultiSource`], which presents several files as one [`TensorSource`].

use crate::error::user;
use crate::formats::lfs;
use crate::formats::tensor::{Tensor, TensorInfo, TensorSource};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Several tensor sources seen as one. Tensor names must be unique across the parts.
pub struct MultiSource {
    parts: Vec<(PathBuf, Box<dyn TensorSource>)>,
    infos: Vec<TensorInfo>,
    owner: HashMap<String, usize>,
}

impl std::fmt::Debug for MultiSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiSource")
            .field(
                "parts",
                &self.parts.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl MultiSource {
    /// Join `parts` (each labelled by its file, for messages). Tensors are listed part by part,
    /// each part in its own order. A name in two parts is a user error.
    pub fn new(parts: Vec<(PathBuf, Box<dyn TensorSource>)>) -> Result<MultiSource> {
        let mut infos = Vec::new();
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, (path, src)) in parts.iter().enumerate() {
            for info in src.infos() {
                if let Some(&j) = owner.get(&info.name) {
                    crate::user_bail!(
                        "tensor {} is in both {} and {}; a model's shards must not overlap",
                        info.name,
                        parts[j].0.display(),
                        path.display()
                    );
                }
                owner.insert(info.name.clone(), i);
                infos.push(info.clone());
            }
        }
        Ok(MultiSource {
            parts,
            infos,
            owner,
        })
    }

    /// The file each part came from.
    pub fn part_paths(&self) -> Vec<&Path> {
        self.parts.iter().map(|(p, _)| p.as_path()).collect()
    }
}

impl TensorSource for MultiSource {
    fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn release(&self, name: &str) {
        if let Some(&i) = self.owner.get(name) {
            self.parts[i].1.release(name);
        }
    }

    fn read(&self, name: &str) -> Result<Tensor<'_>> {
        match self.owner.get(name) {
            Some(&i) => self.parts[i].1.read(name),
            None => {
                let files: Vec<String> = self
                    .parts
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect();
                crate::user_bail!("no tensor named {name} in {}", files.join(", "))
            }
        }
    }
}

/// A parsed `*.index.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    /// The shard file names, sorted, each once.
    pub files: Vec<String>,
    /// Tensor name → shard file name, in the index's order.
    pub weight_map: Vec<(String, String)>,
}

/// Read and check an index file: shard names must be plain file names in the same folder.
pub fn read_index(index_path: &Path) -> Result<ShardIndex> {
    lfs::check_not_lfs_pointer(index_path)?;
    let text = std::fs::read_to_string(index_path)
        .with_context(|| format!("cannot read {}", index_path.display()))?;
    let bad = |msg: String| user(format!("{}: {msg}", index_path.display()));
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("has no \"weight_map\" object".into()));
    };
    let mut weight_map = Vec::with_capacity(map.len());
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("weight_map entry {name} is not a file name")));
        };
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && Path::new(file).file_name() == Some(std::ffi::OsStr::new(file));
        if !plain {
            return Err(bad(format!(
                "weight_map entry {name} names {file:?}, which is not a file in the same folder"
            )));
        }
        weight_map.push((name.clone(), file.to_string()));
    }
    if weight_map.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    let mut files: Vec<String> = weight_map.iter().map(|(_, f)| f.clone()).collect();
    files.sort();
    files.dedup();
    Ok(ShardIndex { files, weight_map })
}

/// Open every shard of `index_path` with `open_one` and check that each tensor the index lists
/// is in the shard it names.
pub fn open_sharded(
    index_path: &Path,
    open_one: impl Fn(&Path) -> Result<Box<dyn TensorSource>>,
) -> Result<MultiSource> {
    let index = read_index(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut parts = Vec::with_capacity(index.files.len());
    for file in &index.files {
        let path = dir.join(file);
        if !path.is_file() {
            crate::user_bail!(
                "{} lists shard {file}, which is missing from {} (incomplete download?)",
                index_path.display(),
                dir.display()
            );
        }
        let src = open_one(&path)?;
        parts.push((path, src));
    }
    let multi = MultiSource::new(parts)?;
    for (name, file) in &index.weight_map {
        let expected = dir.join(file);
        match multi.owner.get(name) {
            Some(&i) if multi.parts[i].0 == expected => {}
            Some(&i) => crate::user_bail!(
                "{} puts tensor {name} in {file}, but it is in {}",
                index_path.display(),
                multi.parts[i].0.display()
            ),
            None => crate::user_bail!(
                "{} puts tensor {name} in {file}, but that file has no such tensor",
                index_path.display()
            ),
        }
    }
    Ok(multi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::formats::dtype::DType;
    use std::borrow::Cow;

    /// An in-memory source of f32 tensors, each holding its own index value.
    struct Fake(Vec<TensorInfo>);
    impl TensorSource for Fake {
        fn infos(&self) -> &[TensorInfo] {
            &self.0
        }
        fn read(&self, name: &str) -> Result<Tensor<'_>> {
            let i = self.0.iter().position(|t| t.name == name).unwrap();
            Ok(Tensor {
                dtype: DType::F32,
                shape: vec![1],
                data: Cow::Owned((i as f32).to_le_bytes().to_vec()),
            })
        }
    }

    fn fake(names: &[&str]) -> Box<dyn TensorSource> {
        Box::new(Fake(
            names
                .iter()
                .map(|n| TensorInfo {
                    name: n.to_string(),
                    dtype: DType::F32,
                    shape: vec![1],
                })
                .collect(),
        ))
    }

    #[test]
    fn multi_source_routes_reads_and_refuses_overlap() {
        let m = MultiSource::new(vec![
            ("a".into(), fake(&["x", "y"])),
            ("b".into(), fake(&["z"])),
        ])
        .unwrap();
        let names: Vec<&str> = m.infos().iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["x", "y", "z"]);
        assert_eq!(m.read("y").unwrap().to_f32().unwrap(), vec![1.0]);
        assert_eq!(m.read("z").unwrap().to_f32().unwrap(), vec![0.0]);
        assert_eq!(class_of(&m.read("w").unwrap_err()), ErrorClass::User);
        let e = MultiSource::new(vec![("a".into(), fake(&["x"])), ("b".into(), fake(&["x"]))])
            .unwrap_err();
        assert!(e.to_string().contains("tensor x is in both a and b"), "{e}");
    }

    #[test]
    fn index_checks_names_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &idx,
            r#"{"metadata":{},"weight_map":{"y":"s2","x":"s1","z":"s2"}}"#,
        )
        .unwrap();
        let i = read_index(&idx).unwrap();
        assert_eq!(i.files, ["s1", "s2"]);
        assert_eq!(i.weight_map[0], ("y".to_string(), "s2".to_string()));
        // Missing shard.
        let e = open_sharded(&idx, |_| Ok(fake(&[]))).unwrap_err();
        assert!(
            e.to_string().contains("lists shard s1, which is missing"),
            "{e}"
        );
        std::fs::write(dir.path().join("s1"), b"").unwrap();
        std::fs::write(dir.path().join("s2"), b"").unwrap();
        let open = |p: &Path| -> Result<Box<dyn TensorSource>> {
            Ok(if p.ends_with("s1") {
                fake(&["x"])
            } else {
                fake(&["y", "z"])
            })
        };
        let m = open_sharded(&idx, open).unwrap();
        assert_eq!(m.infos().len(), 3);
        // Index naming the wrong shard.
        std::fs::write(&idx, r#"{"weight_map":{"x":"s1","y":"s1","z":"s2"}}"#).unwrap();
        let e = open_sharded(&idx, open).unwrap_err();
        assert!(
            e.to_string().contains("puts tensor y in s1, but it is in"),
            "{e}"
        );
        // Index naming a shard that lacks the tensor.
        std::fs::write(&idx, r#"{"weight_map":{"x":"s2","y":"s2","z":"s2"}}"#).unwrap();
        let e = open_sharded(&idx, open).unwrap_err();
        assert!(
            e.to_string()
                .contains("puts tensor x in s2, but that file has no such tensor"),
            "{e}"
        );
        // Path traversal.
        std::fs::write(&idx, r#"{"weight_map":{"x":"../etc/passwd"}}"#).unwrap();
        let e = read_index(&idx).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        std::fs::write(&idx, "{not json").unwrap();
        assert_eq!(class_of(&read_index(&idx).unwrap_err()), ErrorClass::User);
    }
}
