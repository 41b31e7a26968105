//! From the unpickled state dict to a checked list of tensors.
//!
//! The pickle gives `{name: tensor view}`; here each view is tied to its zip entry
//! (`<archive>/data/<key>`) and every offset, stride and size is checked against that entry, so
//! reading later can index the memory map without further checks.

use super::archive::ZipEntry;
use super::pickle::{StorageKind, Value};
use super::view::StridedLayout;
use crate::formats::dtype::DType;
use std::collections::HashMap;

/// A tensor ready to read: where its storage lies in the file and the view on it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    /// Byte range of the storage in the file (the zip entry's data).
    pub storage_start: u64,
    pub storage_len: u64,
    pub layout: StridedLayout,
}

/// A state-dict value mlcb does not read, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

fn dtype_of(kind: StorageKind) -> Option<DType> {
    match kind {
        StorageKind::F32 => Some(DType::F32),
        StorageKind::F16 => Some(DType::F16),
        StorageKind::BF16 => Some(DType::BF16),
        StorageKind::I64 => Some(DType::I64),
        StorageKind::I32 => Some(DType::I32),
        // Bool tensors (e.g. GPT-NeoX's cached causal mask buffer) are one byte 0/1 per element.
        StorageKind::U8 | StorageKind::Bool => Some(DType::U8),
        StorageKind::F64 | StorageKind::I16 | StorageKind::I8 => None,
    }
}

/// Check and list the tensors of the unpickled `root`. `prefix` is the archive folder
/// (`"pytorch_model/"`); `file_len` bounds the size of any gathered (non-contiguous) view.
/// Errors are messages without the file name.
pub fn collect(
    root: &Value,
    entries: &HashMap<String, ZipEntry>,
    prefix: &str,
    file_len: u64,
) -> Result<(Vec<TensorEntry>, Vec<Skipped>), String> {
    let Value::Dict(items) = root else {
        return Err(format!(
            "the pickle holds a {}, not a state dict (a dict of tensors)",
            root.kind()
        ));
    };
    let mut tensors: Vec<TensorEntry> = Vec::new();
    let mut skipped = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (key, value) in items.borrow().iter() {
        let Value::Str(name) = key else {
            return Err(format!("state dict key is a {}, not a string", key.kind()));
        };
        let name = name.to_string();
        let Value::Tensor(t) = value else {
            skipped.push(Skipped {
                reason: format!("a {}, not a tensor", value.kind()),
                name,
            });
            continue;
        };
        let kind = t.storage.kind;
        let Some(dtype) = dtype_of(kind) else {
            skipped.push(Skipped {
                reason: format!(
                    "stored as torch.{}, which mlcb does not read",
                    kind.class_name()
                ),
                name,
            });
            continue;
        };
        let entry_name = format!("{prefix}data/{}", t.storage.key);
        let Some(entry) = entries.get(&entry_name) else {
            return Err(format!(
                "tensor {name} refers to storage {entry_name}, which is not in the archive"
            ));
        };
        if !entry.stored {
            return Err(format!(
                "storage {entry_name} is compressed; mlcb reads only the uncompressed entries \
                 torch.save writes (re-save the checkpoint with torch.save)"
            ));
        }
        let es = kind.elem_size();
        let storage_bytes = t.storage.numel.checked_mul(es);
        if storage_bytes.is_none_or(|b| b > entry.len) {
            return Err(format!(
                "storage {entry_name} should hold {} elements of {} bytes but has {} bytes \
                 (truncated?)",
                t.storage.numel, es, entry.len
            ));
        }
        let layout = StridedLayout {
            offset: t.offset,
            shape: t.shape.clone(),
            strides: t.strides.clone(),
            elem_size: es,
        };
        let end = layout.storage_end();
        if end.is_none_or(|e| e > t.storage.numel) {
            return Err(format!(
                "tensor {name} (shape {:?}, strides {:?}, offset {}) reaches past the end of its \
                 storage of {} elements",
                t.shape, t.strides, t.offset, t.storage.numel
            ));
        }
        let nbytes = layout.numel().and_then(|n| n.checked_mul(es));
        if nbytes.is_none_or(|b| b > file_len.max(1 << 20)) {
            // Only a broadcast (stride 0) view can be larger than its storage; refuse absurd ones
            // rather than allocate them.
            return Err(format!(
                "tensor {name} (shape {:?}, strides {:?}) is a view larger than the whole file; \
                 re-save it with tensor.contiguous()",
                t.shape, t.strides
            ));
        }
        let shape_ok = t.shape.iter().all(|&d| usize::try_from(d).is_ok());
        if !shape_ok {
            return Err(format!(
                "tensor {name} has a dimension too large for this machine"
            ));
        }
        let tensor = TensorEntry {
            name: name.clone(),
            dtype,
            storage_start: entry.data_start,
            storage_len: entry.len,
            layout,
        };
        // A repeated key: the last value wins, as in Python.
        match index.get(&name) {
            Some(&i) => tensors[i] = tensor,
            None => {
                index.insert(name, tensors.len());
                tensors.push(tensor);
            }
        }
    }
    Ok((tensors, skipped))
}
