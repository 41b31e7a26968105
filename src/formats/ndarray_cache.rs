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
use serde::{Deserialize, Serialize};

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
