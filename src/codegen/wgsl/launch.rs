//! The launch description stored in `KernelEntry::launch` of every WGSL-derived kernel, and the
//! tuning configuration a kernel is specialised for. The wgpu runtime reads the launch JSON to bind
//! buffers and size the dispatch, so its shape is a contract:
//!
//! ```json
//! { "workgroup_size": [64, 1, 1],
//!   "grid": [ {"extent": 2048, "times": "1", "per_workgroup": 4},
//!             {"extent": 1, "times": "T", "per_workgroup": 1},
//!             {"extent": 1, "times": "1", "per_workgroup": 1} ],
//!   "bindings": [ {"binding": 0, "role": "activation", "op_field": "input", "access": "read", "elem": "f32"}, … ],
//!   "params": {"binding": 5, "scalar": "eps", "index": null},
//!   "msl": {"sizes_buffer": 6},
//!   "folds_x_into_z": true,
//!   "tuning": {"workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 4} }
//! ```
//!
//! - Workgroups along each axis: `ceil(extent · times / per_workgroup)` where `times` is `"1"`,
//!   `"T"` (tokens of this call) or `"rows"` (the activation rows the op computes: `T` for matmul,
//!   `T` or 1 for logits).
//! - When the x count exceeds the device's workgroups per dimension, a runtime may dispatch
//!   [`fold_grid`]`(x, y, max)` instead: the kernels (`folds_x_into_z`) rebuild the linear x.
//! - All bindings are in bind group 0, numbered in list order: activation inputs (and the token
//!   ids), weight records, state buffers, outputs, then the params uniform.
//! - `elem: "u32"` bindings of `packs: "f16x2"` / `"u16x2"` hold 16-bit data read as u32 pairs:
//!   the runtime binds the record's bytes padded with zeros to a multiple of 4.
//! - `shader_f16: true`: the kernel declares `enable f16;` (f16 arithmetic, f16 KV cache).
//! - The params uniform is [`PARAMS_WGSL`]: 8 × 4 bytes.

use serde::{Deserialize, Serialize};

/// The params uniform every kernel declares (std140-compatible: 32 bytes).
pub const PARAMS_WGSL: &str = "struct Params {
    // tokens of this call (T)
    t: u32,
    // absolute position of the first token (tokens the session already processed)
    pos: u32,
    // activation rows to compute (matmul: T; logits: T or 1)
    rows: u32,
    // first input row (logits of the last position only: T - 1)
    row0: u32,
    // the op's f32 parameter (eps, theta, factor), see launch.params.scalar
    scalar: f32,
    // the op's integer parameter (RWKV state slot), see launch.params.index
    index: u32,
    pad0: u32,
    pad1: u32,
}
";

/// Field names of [`PARAMS_WGSL`] in order, for the launch JSON.
pub const PARAMS_FIELDS: [&str; 8] = [
    "t", "pos", "rows", "row0", "scalar", "index", "pad0", "pad1",
];

/// One axis of the dispatch grid: `ceil(extent · times / per_workgroup)` workgroups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridDim {
    pub extent: u64,
    /// "1", "T" or "rows".
    pub times: String,
    pub per_workgroup: u64,
}

impl GridDim {
    pub fn fixed(extent: u64, per_workgroup: u64) -> GridDim {
        GridDim {
            extent,
            times: "1".into(),
            per_workgroup,
        }
    }
    pub fn tokens(per_workgroup: u64) -> GridDim {
        GridDim {
            extent: 1,
            times: "T".into(),
            per_workgroup,
        }
    }
    pub fn rows(per_workgroup: u64) -> GridDim {
        GridDim {
            extent: 1,
            times: "rows".into(),
            per_workgroup,
        }
    }
    pub fn one() -> GridDim {
        GridDim::fixed(1, 1)
    }
    /// Workgroups for a call with `t` tokens computing `rows` rows.
    pub fn workgroups(&self, t: u64, rows: u64) -> u64 {
        let times = match self.times.as_str() {
            "T" => t,
            "rows" => rows,
            _ => 1,
        };
        (self.extent * times).div_ceil(self.per_workgroup)
    }
}

/// One buffer binding of a kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub binding: u32,
    /// "activation", "tokens", "weight", "state", "logits" or "params".
    pub role: String,
    /// The op field it binds: `input`, `out`, `weight`, `bias`, `mixes[1]`, `state`, … (`params`
    /// and `logits` for those roles).
    pub op_field: String,
    /// For weights: which record of `WeightDecl::records`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub record: Option<usize>,
    /// For states: "k" / "v" (KV cache: `[max_seq_len, n_kv_heads, head_dim]` each, of `elem`
    /// f32 or f16) or
    /// "rwkv" (five vectors of `hidden` f32: att_shift, num, den, max, ffn_shift).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub part: Option<String>,
    /// For weights bound in several parts: `[byte offset, byte length]` of the record this
    /// binding covers (offsets are multiples of `tuning.max_binding_bytes`). None: the whole record.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub range: Option<[u64; 2]>,
    /// "read", "read_write" or "uniform".
    pub access: String,
    /// "f32", "u32" or "f16" (element type of the WGSL array; "f16" only for the KV cache of
    /// f16 kernels).
    pub elem: String,
    /// "f16x2" or "u16x2" when 16-bit data are read as u32 pairs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub packs: Option<String>,
    /// The WGSL variable name.
    pub name: String,
}

/// What the params uniform carries besides `t`, `pos`, `rows`, `row0`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamsUse {
    pub binding: u32,
    pub fields: Vec<String>,
    /// The op field the runtime writes into `scalar` (eps, theta, factor), if any.
    pub scalar: Option<String>,
    /// What the runtime writes into `index`, if any.
    pub index: Option<String>,
}

/// The tuning record a kernel is specialised for (from the tune stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    pub workgroup_size: u32,
    pub rows_per_workgroup: u32,
    pub vector_width: u32,
    /// Largest storage binding the kernel may assume, in bytes (a power of two, at least 256):
    /// a weight record above it is bound as several consecutive ranges of this size. Default
    /// [`DEFAULT_MAX_BINDING_BYTES`], WebGPU's guaranteed minimum.
    #[serde(default = "default_max_binding_bytes")]
    pub max_binding_bytes: u64,
    /// Reductions use subgroup operations (`subgroupAdd`/`subgroupMax`, then one value per
    /// subgroup through workgroup memory) instead of a workgroup-memory tree. The target preset
    /// decides (`TargetPreset::subgroups`); the runtime then needs an adapter with wgpu's
    /// `SUBGROUP` feature. Absent in older records: false.
    #[serde(default)]
    pub subgroups: bool,
}

/// WebGPU's default `maxStorageBufferBindingSize` (128 MiB), which every adapter offers.
pub const DEFAULT_MAX_BINDING_BYTES: u64 = 128 << 20;

fn default_max_binding_bytes() -> u64 {
    DEFAULT_MAX_BINDING_BYTES
}

impl Tuning {
    /// Read and check a tune-stage record; `Err` names what is wrong.
    pub fn from_record(v: &serde_json::Value) -> Result<Tuning, String> {
        let field = |name: &str| -> Result<u32, String> {
            v.get(name)
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| format!("`{name}` is missing or not a non-negative integer"))
        };
        let max_binding_bytes = match v.get("max_binding_bytes") {
            None => DEFAULT_MAX_BINDING_BYTES,
            Some(x) => x
                .as_u64()
                .ok_or("`max_binding_bytes` is not a non-negative integer")?,
        };
        let subgroups = match v.get("subgroups") {
            None => false,
            Some(x) => x.as_bool().ok_or("`subgroups` is not true or false")?,
        };
        let t = Tuning {
            workgroup_size: field("workgroup_size")?,
            rows_per_workgroup: field("rows_per_workgroup")?,
            vector_width: field("vector_width")?,
            max_binding_bytes,
            subgroups,
        };
        if !max_binding_bytes.is_power_of_two() || !(256..=1 << 31).contains(&max_binding_bytes) {
            return Err(format!(
                "max_binding_bytes {max_binding_bytes} must be a power of two from 256 to 2^31"
            ));
        }
        if !t.workgroup_size.is_power_of_two() || !(32..=256).contains(&t.workgroup_size) {
            return Err(format!(
                "workgroup_size {} must be a power of two from 32 to 256 (WebGPU's default limit)",
                t.workgroup_size
            ));
        }
        if !(1..=64).contains(&t.rows_per_workgroup) {
            return Err(format!(
                "rows_per_workgroup {} must be from 1 to 64",
                t.rows_per_workgroup
            ));
        }
        if ![1, 2, 4].contains(&t.vector_width) {
            return Err(format!("vector_width {} must be 1, 2 or 4", t.vector_width));
        }
        Ok(t)
    }
}

/// The machine-readable launch description (`KernelEntry::launch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub workgroup_size: [u32; 3],
    pub grid: [GridDim; 3],
    pub bindings: Vec<Binding>,
    pub params: ParamsUse,
    /// MSL only: the buffer index of naga's array-sizes buffer (one u32 per bound buffer holding
    /// a runtime-sized array, in binding order).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub msl: Option<MslLaunch>,
    /// The kernel reads its logical workgroup x as `workgroup_id.x + workgroup_id.z ·
    /// num_workgroups.x` and bounds-checks it, so a runtime may fold an x larger than the device's
    /// per-dimension limit into z (see [`fold_grid`]). Libraries of codegen version < 3 lack it.
    #[serde(default)]
    pub folds_x_into_z: bool,
    /// The kernel computes in f16 (`enable f16;`): the runtime needs an adapter with wgpu's
    /// `SHADER_F16` feature (Vulkan `shaderFloat16` + 16-bit storage). Absent in libraries built
    /// before f16 kernels: false.
    #[serde(default)]
    pub shader_f16: bool,
    pub tuning: Tuning,
}

impl Launch {
    /// The dispatch of a call with `t` tokens computing `rows` rows under a per-dimension limit
    /// `max`: the grid as is, or folded ([`fold_grid`]) when x exceeds it and the kernel allows.
    /// `Err`: the workgroups `[x, y, z]` it needs, which do not fit.
    pub fn dispatch(&self, t: u64, rows: u64, max: u64) -> Result<[u32; 3], [u64; 3]> {
        let [x, y, z] = [0, 1, 2].map(|i| self.grid[i].workgroups(t, rows));
        if x <= max && y <= max && z <= max {
            return Ok([x as u32, y as u32, z as u32]);
        }
        (z == 1 && self.folds_x_into_z)
            .then(|| fold_grid(x, y, max))
            .flatten()
            .ok_or([x, y, z])
    }
}

/// The dispatch `[x, y, z]` for logical workgroups `[x, y]` under a per-dimension limit `max`:
/// `[x, y, 1]` when `x ≤ max`, else `x` folded into `z` (`nx · nz ≥ x`, the surplus workgroups
/// are bounds-checked by the kernel). `None` when even folding cannot fit (`y > max` or
/// `x > max²`).
pub fn fold_grid(x: u64, y: u64, max: u64) -> Option<[u32; 3]> {
    if y > max || max == 0 {
        return None;
    }
    if x <= max {
        return Some([x as u32, y as u32, 1]);
    }
    let nz = x.div_ceil(max);
    let nx = x.div_ceil(nz);
    (nz <= max).then_some([nx as u32, y as u32, nz as u32])
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MslLaunch {
    pub sizes_buffer: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_counts_round_up() {
        assert_eq!(GridDim::fixed(2048, 4).workgroups(7, 7), 512);
        assert_eq!(GridDim::fixed(10, 4).workgroups(7, 7), 3);
        assert_eq!(GridDim::tokens(8).workgroups(17, 1), 3);
        assert_eq!(GridDim::rows(8).workgroups(17, 1), 1);
    }

    #[test]
    fn big_grids_fold_into_z() {
        assert_eq!(fold_grid(10, 3, 65535), Some([10, 3, 1]));
        assert_eq!(fold_grid(65535, 1, 65535), Some([65535, 1, 1]));
        // 128,256 vocab rows, one per workgroup: 2 × 64,128 ≥ 128,256.
        assert_eq!(fold_grid(128_256, 1, 65535), Some([64_128, 1, 2]));
        let [nx, _, nz] = fold_grid(1_000_003, 1, 65535).unwrap();
        assert!(nx as u64 * nz as u64 >= 1_000_003 && nx <= 65535);
        assert_eq!(fold_grid(1, 70_000, 65535), None);
        assert_eq!(fold_grid(65535 * 65535 + 1, 1, 65535), None);
    }

    #[test]
    fn tuning_records_are_checked() {
        let ok =
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 2, "vector_width": 4});
        assert_eq!(
            Tuning::from_record(&ok).unwrap(),
            Tuning {
                workgroup_size: 64,
                rows_per_workgroup: 2,
                vector_width: 4,
                max_binding_bytes: DEFAULT_MAX_BINDING_BYTES,
                subgroups: false,
            }
        );
        let sg = serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 2,
            "vector_width": 4, "subgroups": true});
        assert!(Tuning::from_record(&sg).unwrap().subgroups);
        for bad in [
            serde_json::json!({"workgroup_size": 48, "rows_per_workgroup": 1, "vector_width": 4}),
            serde_json::json!({"workgroup_size": 512, "rows_per_workgroup": 1, "vector_width": 4}),
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 0, "vector_width": 4}),
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 3}),
            serde_json::json!({"workgroup_size": 64, "vector_width": 4}),
            serde_json::json!({"workgroup_size": -1, "rows_per_workgroup": 1, "vector_width": 4}),
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 4, "max_binding_bytes": 1000}),
            serde_json::json!({"workgroup_size": 64, "rows_per_workgroup": 1, "vector_width": 4, "max_binding_bytes": 128}),
        ] {
            assert!(Tuning::from_record(&bad).is_err(), "{bad}");
        }
    }
}
