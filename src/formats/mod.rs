//! File formats mlcb reads and writes. Readers never trust a size field: every length is checked
//! against the file before anything is allocated.

pub mod dtype;
pub mod lfs;
pub mod model_lib;
pub mod ndarray_cache;
pub mod pytorch;
pub mod safetensors;
pub mod sharded;
pub mod tensor;

pub use sharded::MultiSource;

use anyhow::Result;
use std::path::{Path, PathBuf};
use tensor::TensorSource;

/// How a model folder stores its weights, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsLayout {
    /// `model.safetensors`
    Safetensors,
    /// `model.safetensors.index.json` + shards
    SafetensorsSharded,
    /// `pytorch_model.bin`
    PyTorch,
    /// `pytorch_model.bin.index.json` + shards
    PyTorchSharded,
}

impl WeightsLayout {
    /// The file that identifies the layout in a model folder.
    pub fn file_name(self) -> &'static str {
        match self {
            WeightsLayout::Safetensors => safetensors::SAFETENSORS_WEIGHTS,
            WeightsLayout::SafetensorsSharded => safetensors::SAFETENSORS_INDEX,
            WeightsLayout::PyTorch => pytorch::PYTORCH_WEIGHTS,
            WeightsLayout::PyTorchSharded => pytorch::PYTORCH_INDEX,
        }
    }

    const PREFERENCE: [WeightsLayout; 4] = [
        WeightsLayout::Safetensors,
        WeightsLayout::SafetensorsSharded,
        WeightsLayout::PyTorch,
        WeightsLayout::PyTorchSharded,
    ];
}

/// Which weights layout `dir` holds (the first present in [`WeightsLayout`] preference order).
/// None present is a user error listing what was looked for.
pub fn detect_weights(dir: &Path) -> Result<WeightsLayout> {
    for layout in WeightsLayout::PREFERENCE {
        if dir.join(layout.file_name()).is_file() {
            return Ok(layout);
        }
    }
    let looked: Vec<&str> = WeightsLayout::PREFERENCE
        .iter()
        .map(|l| l.file_name())
        .collect();
    crate::user_bail!(
        "{} holds no model weights: looked for {}",
        dir.display(),
        looked.join(", ")
    )
}

fn open_safetensors(path: &Path) -> Result<Box<dyn TensorSource>> {
    Ok(Box::new(safetensors::SafetensorsFile::open(path)?))
}

fn open_pytorch(path: &Path) -> Result<Box<dyn TensorSource>> {
    Ok(Box::new(pytorch::PyTorchFile::open(path)?))
}

/// Open the weights of a Hugging Face model folder: `model.safetensors`, else
/// `model.safetensors.index.json`, else `pytorch_model.bin`, else `pytorch_model.bin.index.json`.
pub fn open_model_weights(dir: &Path) -> Result<Box<dyn TensorSource>> {
    let layout = detect_weights(dir)?;
    let path = dir.join(layout.file_name());
    Ok(match layout {
        WeightsLayout::Safetensors => open_safetensors(&path)?,
        WeightsLayout::PyTorch => open_pytorch(&path)?,
        WeightsLayout::SafetensorsSharded => {
            Box::new(sharded::open_sharded(&path, open_safetensors)?)
        }
        WeightsLayout::PyTorchSharded => Box::new(sharded::open_sharded(&path, open_pytorch)?),
    })
}

/// The files that make up the weights of `dir`, for digests: the single weights file, or the
/// index file followed by its shards (sorted by name). Does not open the weights.
pub fn model_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let layout = detect_weights(dir)?;
    let path = dir.join(layout.file_name());
    Ok(match layout {
        WeightsLayout::Safetensors | WeightsLayout::PyTorch => {
            lfs::check_not_lfs_pointer(&path)?;
            vec![path]
        }
        WeightsLayout::SafetensorsSharded | WeightsLayout::PyTorchSharded => {
            let index = sharded::read_index(&path)?;
            let mut files = vec![path];
            files.extend(index.files.iter().map(|f| dir.join(f)));
            files
        }
    })
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

    #[test]
    fn opens_each_fixture_kind() {
        let llama = open_model_weights(&fixture("tiny-llama")).unwrap();
        assert!(llama.info("model.embed_tokens.weight").is_some());
        let neox = open_model_weights(&fixture("tiny-neox")).unwrap();
        assert!(neox.info("gpt_neox.embed_in.weight").is_some());
        assert_eq!(
            model_weight_files(&fixture("tiny-rwkv")).unwrap(),
            vec![fixture("tiny-rwkv").join("pytorch_model.bin")]
        );
    }

    #[test]
    fn empty_folder_lists_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_model_weights(dir.path()).err().unwrap();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        for f in [
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ] {
            assert!(msg.contains(f), "{msg}");
        }
    }

    #[test]
    fn sharded_safetensors_folder_opens_as_one_source() {
        // Two small hand-written shards and an index in HF's layout (weight_map sorted by name).
        let dir = tempfile::tempdir().unwrap();
        let shard = |name: &str, tensor: &str, v: f32| {
            let header =
                format!(r#"{{"{tensor}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend(v.to_le_bytes());
            std::fs::write(dir.path().join(name), b).unwrap();
        };
        shard("model-00001-of-00002.safetensors", "a", 1.0);
        shard("model-00002-of-00002.safetensors", "b", 2.0);
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{"total_size":8},"weight_map":{"b":"model-00002-of-00002.safetensors","a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let src = open_model_weights(dir.path()).unwrap();
        let names: Vec<&str> = src.infos().iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(src.read("b").unwrap().to_f32().unwrap(), vec![2.0]);
        let files = model_weight_files(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
    }

    #[test]
    fn lfs_pointer_weights_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pytorch_model.bin"),
            "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 5\n",
        )
        .unwrap();
        let e = open_model_weights(dir.path()).err().unwrap();
        assert!(e.to_string().contains("git lfs pull"), "{e}");
        let e = model_weight_files(dir.path()).unwrap_err();
        assert!(e.to_string().contains("Git LFS pointer"), "{e}");
    }
}
