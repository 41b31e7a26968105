//! The zip side of a `torch.save` file: where each entry's bytes lie in the file.
//!
//! `torch.save` writes every entry *stored* (uncompressed) and pads the local headers so each
//! storage starts on a 64-byte boundary, so an entry's bytes are one contiguous, aligned range of
//! the file and can be read straight from a memory map. The `zip` crate parses the central
//! directory and local headers; decompression is never needed.

use std::collections::HashMap;
use std::io::Cursor;
use zip::CompressionMethod;

/// One zip entry: its byte range in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ZipEntry {
    /// Offset of the first data byte in the file.
    pub data_start: u64,
    /// Data length in the file (compressed size; equals the size for stored entries).
    pub len: u64,
    /// Whether the entry is stored uncompressed (the only kind mlcb reads).
    pub stored: bool,
}

impl ZipEntry {
    /// The entry's bytes. Ranges were checked against the file in [`read_entries`].
    pub fn bytes<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        &file[self.data_start as usize..(self.data_start + self.len) as usize]
    }
}

/// Every entry of the zip archive in `file`, by name. Errors are messages without the file name.
pub fn read_entries(file: &[u8]) -> Result<HashMap<String, ZipEntry>, String> {
    let mut zip = zip::ZipArchive::new(Cursor::new(file))
        .map_err(|e| format!("not a readable zip archive ({e}); the file may be truncated"))?;
    let mut entries = HashMap::with_capacity(zip.len());
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| format!("zip entry {i} is unreadable ({e})"))?;
        let stored = f.compression() == CompressionMethod::Stored;
        let entry = ZipEntry {
            data_start: f.data_start(),
            len: f.compressed_size(),
            stored,
        };
        let end = entry.data_start.checked_add(entry.len);
        if end.is_none_or(|end| end > file.len() as u64) {
            return Err(format!(
                "zip entry {} claims bytes {}..+{} but the file has {} bytes (truncated?)",
                f.name(),
                entry.data_start,
                entry.len,
                file.len()
            ));
        }
        if stored && f.size() != f.compressed_size() {
            return Err(format!(
                "stored zip entry {} has size {} but {} bytes of data",
                f.name(),
                f.size(),
                f.compressed_size()
            ));
        }
        entries.insert(f.name().to_string(), entry);
    }
    Ok(entries)
}
