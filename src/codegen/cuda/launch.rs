//! The launch description stored in `KernelEntry::launch` of every CUDA kernel, and the tuning
//! configuration a kernel is specialised for. The CUDA runtime reads it to build the argument
//! list and size the grid, so its shape is a contract:
//!
//! ```json
//! { "block": [256, 1, 1],
//!   "grid": [ {"extent": 2048, "times": "1", "per_workgroup": 4}, {"extent": 1, "times": "rows", "per_workgroup": 1}, … ],
//!   "args": [ {"role": "activation", "op_field": "input", "elem": "f32", "write": false, "name": "x"}, … ],
//!   "params": {"scalar": "eps", "index": null},
//!   "arch": "sm_80",
//!   "tuning": {"threads_per_block": 256, "rows_per_block": 4, "kv_splits": 1} }
//! ```
//!
//! - Blocks along each axis: [`GridDim::workgroups`] (`ceil(extent · times / per_workgroup)`,
//!   `times` = "1", "T" or "rows"), exactly as for the WGSL kernels.
//! - Kernel parameters, in order: one device pointer per entry of `args`, then
//!   `const unsigned* meta` (four u32 in device memory: `T`, `pos`, `rows`, `row0`, see
//!   [`META_FIELDS`]), `float scalar` (the op field `params.scalar` names: eps, theta, factor, else
//!   0) and `unsigned index` (`params.index`: the RWKV state slot vector, else 0). The per-call
//!   values live in device memory so a captured CUDA graph replays with new positions.
//! - Every argument points at the start of its own allocation (so 16-byte vector loads are
//!   aligned): activations `[T, cols]` f32, weight records as stored (16-bit data as `u16`),
//!   state parts (`k`, `v`: `[max_seq_len, n_kv_heads, head_dim]` of the arg's `elem`, f16 or
//!   f32; `rwkv`: five `hidden` f32).
//! - A weight argument with `row_blocks` is the record permuted into that layout
//!   ([`super::row_blocks`]); every kernel reading the record declares the same.
//! - A `scratch` argument (role "scratch", `bytes` long) is the kernel's own device workspace: the
//!   runtime allocates it zeroed, once per session and kernel, and the kernel leaves it in a state
//!   the next launch accepts (the split decode attention's counters return to zero).
//! - No dynamic shared memory: every kernel declares its own static `__shared__` arrays.
//! - `"pdl": true` (decode kernels for sm_90 and newer): the kernel starts with
//!   `griddepcontrol.wait`, so the runtime may launch it with programmatic dependent launch.

pub use crate::codegen::wgsl::launch::GridDim;
use serde::{Deserialize, Serialize};

/// What the four u32 of `meta` hold, in order.
pub const META_FIELDS: [&str; 4] = ["t", "pos", "rows", "row0"];

/// The device `meta` buffer of one forward call over `t` tokens at position `pos` computing
/// `rows` logits rows: two [`META_FIELDS`] quadruples, the first for every kernel (`rows` = T, `row0`
/// = 0), the second, at byte 16, for the logits kernels (the last `rows` positions).
pub fn call_meta(t: usize, pos: usize, rows: usize) -> [u32; 8] {
    let (t, pos, rows) = (t as u32, pos as u32, rows as u32);
    [t, pos, t, 0, t, pos, rows, t - rows]
}

/// Threads of the tensor-core GEMM block (four warps in a 2×2 arrangement); fixed by the kernel.
pub const GEMM_THREADS: u32 = 128;

/// One kernel parameter that is a device pointer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Arg {
    /// "activation", "tokens", "weight", "state", "logits" or "scratch".
    pub role: String,
    /// The op field it binds (`input`, `out`, `weight`, `bias`, `mixes[1]`, `state`, …).
    pub op_field: String,
    /// For weights: which record of `WeightDecl::records`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub record: Option<usize>,
    /// For states: "k", "v" (KV cache) or "rwkv".
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub part: Option<String>,
    /// For scratch: its size in bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes: Option<u64>,
    /// Element type as the kernel reads it: "f32", "u32", "u16", "f16" or "bf16".
    pub elem: String,
    /// Whether the kernel writes through it.
    pub write: bool,
    /// The C parameter name.
    pub name: String,
    /// For weights: the record goes to the device in row blocks
    /// ([`super::row_blocks::RowBlocks::permute`]), as every kernel reading it expects.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub row_blocks: Option<super::row_blocks::RowBlocks>,
}

/// What `scalar` and `index` carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamsUse {
    pub scalar: Option<String>,
    pub index: Option<String>,
}

/// The tuning record a CUDA kernel is specialised for (from the tune stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaTuning {
    pub threads_per_block: u32,
    /// Output rows per block of the decode GEMV (split over the block's warps).
    pub rows_per_block: u32,
    /// Blocks per query head of decode attention, each over its own run of the KV cache, merged
    /// by the last to finish (flash-decoding). Records written before the knob existed mean 1.
    #[serde(default = "one")]
    pub kv_splits: u32,
    /// The tensor-core decode GEMV's weight ring ([`super::gemv_mma`]): 0 (the default, and
    /// what records written before the knob existed mean) loads a few steps' weights into
    /// registers at a time; `d` streams them through a ring of up to `d` steps per warp in
    /// shared memory by `cp.async`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_ring: u32,
}

fn one() -> u32 {
    1
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl CudaTuning {
    /// Read and check a tune-stage record; `Err` names what is wrong.
    pub fn from_record(v: &serde_json::Value) -> Result<CudaTuning, String> {
        let field = |name: &str| -> Result<u32, String> {
            v.get(name)
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("`{name}` is missing or not a non-negative integer"))
        };
        // A knob added after records were first written: its default where absent.
        let field_or = |name: &str, default: u32| match v.get(name) {
            None => Ok(default),
            Some(_) => field(name),
        };
        let t = CudaTuning {
            threads_per_block: field("threads_per_block")?,
            rows_per_block: field("rows_per_block")?,
            kv_splits: field_or("kv_splits", 1)?,
            weight_ring: field_or("weight_ring", 0)?,
        };
        if !t.threads_per_block.is_power_of_two() || !(32..=1024).contains(&t.threads_per_block) {
            return Err(format!(
                "threads_per_block {} must be a power of two from 32 to 1024",
                t.threads_per_block
            ));
        }
        if !t.rows_per_block.is_power_of_two() || !(1..=64).contains(&t.rows_per_block) {
            return Err(format!(
                "rows_per_block {} must be a power of two from 1 to 64",
                t.rows_per_block
            ));
        }
        if !t.kv_splits.is_power_of_two() || !(1..=64).contains(&t.kv_splits) {
            return Err(format!(
                "kv_splits {} must be a power of two from 1 to 64",
                t.kv_splits
            ));
        }
        if t.weight_ring == 1 || t.weight_ring > super::gemv_mma::MAX_RING as u32 {
            return Err(format!(
                "weight_ring {} must be 0 (registers) or from 2 to {}",
                t.weight_ring,
                super::gemv_mma::MAX_RING
            ));
        }
        Ok(t)
    }

    /// Warps per block.
    pub fn warps(&self) -> u32 {
        self.threads_per_block / 32
    }
}

/// The machine-readable launch description (`KernelEntry::launch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CudaLaunch {
    pub block: [u32; 3],
    pub grid: [GridDim; 3],
    pub args: Vec<Arg>,
    pub params: ParamsUse,
    /// The architecture the PTX targets.
    pub arch: String,
    pub tuning: CudaTuning,
    /// The kernel waits for the grid before it (`griddepcontrol.wait`) before it reads
    /// anything, then lets the next one start: it may be launched with programmatic dependent
    /// launch, which overlaps a kernel's launch with the tail of the one before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pdl: bool,
}

impl CudaLaunch {
    /// Bytes of the kernel's scratch, if it declares one (0 when its size is missing, which
    /// binding refuses as a corrupt library).
    pub fn scratch_bytes(&self) -> Option<u64> {
        self.args
            .iter()
            .find(|a| a.role == "scratch")
            .map(|a| a.bytes.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_records_are_checked() {
        let ok = serde_json::json!({"threads_per_block": 256, "rows_per_block": 4});
        let t = CudaTuning::from_record(&ok).unwrap();
        assert_eq!(
            (
                t.threads_per_block,
                t.rows_per_block,
                t.kv_splits,
                t.warps()
            ),
            (256, 4, 1, 8),
            "a record without kv_splits means one block per head"
        );
        let split =
            serde_json::json!({"threads_per_block": 128, "rows_per_block": 1, "kv_splits": 8});
        assert_eq!(CudaTuning::from_record(&split).unwrap().kv_splits, 8);
        // Without a weight ring, records serialise as they did before the knob existed.
        assert_eq!(t.weight_ring, 0);
        assert!(!serde_json::to_string(&t).unwrap().contains("weight_ring"));
        let ring =
            serde_json::json!({"threads_per_block": 128, "rows_per_block": 2, "weight_ring": 5});
        let r = CudaTuning::from_record(&ring).unwrap();
        assert_eq!(r.weight_ring, 5);
        assert_eq!(serde_json::to_value(r).unwrap()["weight_ring"], 5);
        for bad in [
            serde_json::json!({"threads_per_block": 128, "rows_per_block": 1, "weight_ring": 1}),
            serde_json::json!({"threads_per_block": 128, "rows_per_block": 1, "weight_ring": 9}),
            serde_json::json!({"threads_per_block": 48, "rows_per_block": 1}),
            serde_json::json!({"threads_per_block": 2048, "rows_per_block": 1}),
            serde_json::json!({"threads_per_block": 256, "rows_per_block": 0}),
            serde_json::json!({"threads_per_block": 256, "rows_per_block": 3}),
            serde_json::json!({"threads_per_block": 256}),
            serde_json::json!({"threads_per_block": 256, "rows_per_block": 1, "kv_splits": 3}),
            serde_json::json!({"threads_per_block": 256, "rows_per_block": 1, "kv_splits": 0}),
            serde_json::json!({"threads_per_block": 256, "rows_per_block": 1, "kv_splits": "8"}),
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 4}),
        ] {
            assert!(CudaTuning::from_record(&bad).is_err(), "{bad}");
        }
    }
}
