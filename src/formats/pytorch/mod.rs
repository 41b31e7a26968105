//! PyTorch `pytorch_model.bin` checkpoints (the zip format of `torch.save`, torch ≥ 1.6).
//!
//! The file is a zip archive `<name>/data.pkl` + `<name>/data/<key>` storages. The pickle is run
//! by mlcb's own interpreter ([`pickle`]), which builds data and refuses any global outside a
//! small allow-list, so opening a checkpoint never executes code. Opening parses only the pickle;
//! tensor bytes are read lazily from a memory map of the file, in place when the tensor is a
//! contiguous view, gathered into a copy when it is strided.

pub mod archive;
pub mod pickle;
pub mod state_dict;
pub mod view;

use crate::error::user;
use crate::formats::lfs;
use crate::formats::tensor::{Tensor, TensorInfo, TensorSource};
use anyhow::{Context, Result};
use memmap2::Mmap;
use state_dict::{Skipped, TensorEntry};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The single-file weights name.
pub const PYTORCH_WEIGHTS: &str = "pytorch_model.bin";
/// The index of sharded PyTorch weights.
pub const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// One opened `torch.save` file.
pub struct PyTorchFile {
    path: PathBuf,
    map: Mmap,
    infos: Vec<TensorInfo>,
    entries: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    skipped: Vec<Skipped>,
}

impl std::fmt::Debug for PyTorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyTorchFile")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl PyTorchFile {
    /// Open and parse a checkpoint. Bad, truncated or legacy files are user errors naming the file.
    pub fn open(path: &Path) -> Result<PyTorchFile> {
        lfs::check_not_lfs_pointer(path)?;
        let bad = |msg: String| user(format!("{}: {msg}", path.display()));
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open PyTorch weights {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        if len < 4 {
            return Err(bad(format!(
                "file is {len} bytes long, not a PyTorch checkpoint (truncated download?)"
            )));
        }
        // SAFETY: the map is read-only; mlcb never writes model files while reading them. A file
        // truncated by another process while mapped is outside what we can defend against.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (entries, skipped) = parse_checkpoint(&map, path)?;
        let infos: Vec<TensorInfo> = entries
            .iter()
            .map(|e| TensorInfo {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.layout.shape.iter().map(|&d| d as usize).collect(),
            })
            .collect();
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        for s in &skipped {
            tracing::debug!("{}: skipping {}: {}", path.display(), s.name, s.reason);
        }
        Ok(PyTorchFile {
            path: path.to_path_buf(),
            map,
            infos,
            entries,
            by_name,
            skipped,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// State-dict entries that are not readable tensors (Python scalars, float64 tensors …).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }
}

/// Parse a whole `torch.save` checkpoint held in `bytes` (zip directory, `data.pkl` run by mlcb's
/// own pickle machine, state dict checked against the storages) without reading tensor data.
/// `origin` names the file in errors, which are user errors.
pub fn parse_checkpoint(bytes: &[u8], origin: &Path) -> Result<(Vec<TensorEntry>, Vec<Skipped>)> {
    let path = origin;
    let len = bytes.len() as u64;
    let bad = |msg: String| user(format!("{}: {msg}", path.display()));
    if bytes.len() < 4 {
        return Err(bad(format!(
            "file is {len} bytes long, not a PyTorch checkpoint (truncated download?)"
        )));
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        if bytes[0] == 0x80 {
            return Err(bad(
                "this is a legacy (pre-zip) torch.save file, which mlcb does not \
                 read; re-save it with a newer torch (≥ 1.6): \
                 torch.save(torch.load(path), path)"
                    .into(),
            ));
        }
        return Err(bad(
            "not a PyTorch checkpoint (no zip signature); expected the file torch.save writes"
                .into(),
        ));
    }
    let zip_entries = archive::read_entries(bytes).map_err(bad)?;
    let pkl_name = find_data_pkl(&zip_entries).map_err(bad)?;
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
    if let Some(order) = zip_entries.get(&format!("{prefix}byteorder")) {
        let order = order.bytes(bytes);
        if order != b"little" {
            return Err(bad(format!(
                "tensors are stored {} endian; mlcb reads only little-endian checkpoints",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let pkl = &zip_entries[&pkl_name];
    if !pkl.stored {
        return Err(bad(format!(
            "{pkl_name} is compressed; mlcb reads only the uncompressed entries torch.save \
             writes"
        )));
    }
    let root = pickle::load(pkl.bytes(bytes)).map_err(|e| bad(format!("{pkl_name}: {e}")))?;
    let (entries, skipped) = state_dict::collect(&root, &zip_entries, &prefix, len).map_err(bad)?;
    Ok((entries, skipped))
}

/// The one `<archive>/data.pkl` entry.
fn find_data_pkl(entries: &HashMap<String, archive::ZipEntry>) -> Result<String, String> {
    let mut found: Vec<&String> = entries
        .keys()
        .filter(|n| {
            n.strip_suffix("data.pkl")
                .is_some_and(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        })
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err("zip archive has no data.pkl: not a torch.save checkpoint \
                   (a TorchScript or other archive?)"
            .into()),
        many => Err(format!(
            "zip archive has several data.pkl entries ({}); expected one torch.save state dict",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

impl TensorSource for PyTorchFile {
    fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    fn read(&self, name: &str) -> Result<Tensor<'_>> {
        let Some(&i) = self.by_name.get(name) else {
            if let Some(s) = self.skipped.iter().find(|s| s.name == name) {
                crate::user_bail!(
                    "{}: state-dict entry {name} is {}",
                    self.path.display(),
                    s.reason
                );
            }
            crate::user_bail!("{}: no tensor named {name}", self.path.display());
        };
        let e = &self.entries[i];
        let shape = self.infos[i].shape.clone();
        // Range checked against the file when the zip was read.
        let storage =
            &self.map[e.storage_start as usize..(e.storage_start + e.storage_len) as usize];
        let data = if e.layout.is_contiguous() {
            let es = e.layout.elem_size as usize;
            let start = e.layout.offset as usize * es;
            let n = e.layout.numel().unwrap_or(0) as usize * es;
            Cow::Borrowed(&storage[start..start + n])
        } else {
            Cow::Owned(e.layout.gather(storage))
        };
        Ok(Tensor {
            dtype: e.dtype,
            shape,
            data,
        })
    }
}

#[cfg(test)]
mod tests;
