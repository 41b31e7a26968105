//! The model-library container: `<model>-<quant>-<target>.mlcblib`.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `MLCBLIB\0` |
//! | 4 | container format version ([`LIBRARY_FORMAT_VERSION`]) |
//! | 4 | reserved, zero |
//! | 8 | header length `h` |
//! | h | header: UTF-8 JSON, a [`LibraryHeader`] |
//! | … | kernel blobs; [`KernelEntry::offset`] counts from the first byte after the header |
//!
//! A reader refuses a file with another magic or a version it does not know, and checks every blob
//! range against the file size, so a truncated or hostile file is an error, never a crash.

pub mod plan;
pub mod render;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MAGIC: &[u8; 8] = b"MLCBLIB\0";
pub const LIBRARY_FORMAT_VERSION: u32 = 1;
/// File extension of model libraries.
pub const LIBRARY_EXTENSION: &str = "mlcblib";
/// Headers larger than this are refused (a hostile size field must not allocate).
const MAX_HEADER_BYTES: u64 = 256 << 20;

/// What the library was built for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// The preset name: cpu, cuda, vulkan, metal, metal_x86_64, webgpu, iphone, android.
    pub name: String,
    /// The runtime backend that executes it: "cpu", "cuda", "wgpu".
    pub backend: String,
    /// Preset options that shaped the kernels (e.g. CUDA arch), as recorded.
    #[serde(default)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// One compiled kernel in the blob area.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelEntry {
    /// The kernel signature (op, dtypes, scheme, layout, static dims).
    pub signature: String,
    pub entry_point: String,
    /// "wgsl", "spirv", "msl", "ptx", … (MSL libraries list each signature twice: "msl", then
    /// the "wgsl" it was compiled from, which the wgpu runtime loads.)
    pub language: String,
    pub offset: u64,
    pub len: u64,
    /// Launch configuration (workgroup size etc.), backend-specific.
    #[serde(default)]
    pub launch: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LibraryHeader {
    pub model: String,
    pub quantization: String,
    pub target: TargetInfo,
    pub plan: plan::Plan,
    pub kernels: Vec<KernelEntry>,
    /// The tuning records used, as the tune stage produced them.
    #[serde(default)]
    pub tuning: serde_json::Value,
    /// The mlcb version that wrote it.
    pub generator: String,
}

/// A library in memory: header plus blob bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLibrary {
    pub header: LibraryHeader,
    pub blobs: Vec<u8>,
}

impl ModelLibrary {
    /// Serialise. Deterministic: the same header and blobs give the same bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(&self.header)?;
        let mut out = Vec::with_capacity(24 + header.len() + self.blobs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&LIBRARY_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.blobs);
        Ok(out)
    }

    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<ModelLibrary> {
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            crate::user_bail!(
                "{origin} is not an mlcb model library (bad magic); rebuild it with `mlcb build`"
            );
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != LIBRARY_FORMAT_VERSION {
            crate::user_bail!(
                "{origin} has model-library format version {version}, this mlcb reads version {LIBRARY_FORMAT_VERSION}; rebuild it with this mlcb"
            );
        }
        let hlen = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        if hlen > MAX_HEADER_BYTES || 24 + hlen > bytes.len() as u64 {
            crate::user_bail!("{origin}: header length {hlen} exceeds the file ({} bytes); the file is truncated or corrupt", bytes.len());
        }
        let hend = 24 + hlen as usize;
        let header: LibraryHeader = serde_json::from_slice(&bytes[24..hend])
            .map_err(|e| crate::error::user(format!("{origin}: invalid library header: {e}")))?;
        if !(plan::PLAN_FORMAT_BASE..=plan::PLAN_FORMAT_VERSION)
            .contains(&header.plan.format_version)
        {
            crate::user_bail!(
                "{origin} holds execution-plan version {}, this mlcb runs versions {} to {}; rebuild it",
                header.plan.format_version,
                plan::PLAN_FORMAT_BASE,
                plan::PLAN_FORMAT_VERSION
            );
        }
        let blobs = bytes[hend..].to_vec();
        for k in &header.kernels {
            let end = k.offset.checked_add(k.len);
            if end.is_none_or(|e| e > blobs.len() as u64) {
                crate::user_bail!(
                    "{origin}: kernel {} points outside the file; the file is corrupt",
                    k.signature
                );
            }
        }
        Ok(ModelLibrary { header, blobs })
    }

    pub fn read(path: &Path) -> Result<ModelLibrary> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading model library {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// The bytes of one kernel.
    pub fn kernel_bytes(&self, k: &KernelEntry) -> &[u8] {
        &self.blobs[k.offset as usize..(k.offset + k.len) as usize]
    }
}
