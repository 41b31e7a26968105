//! Assembles one WGSL module: constants, binding declarations (recorded for the launch JSON in
//! the same order), helper functions and the entry point.

use super::launch::{Binding, GridDim, Launch, ParamsUse, Tuning, PARAMS_FIELDS, PARAMS_WGSL};
use crate::formats::dtype::DType;
use std::fmt::Write;

/// The parameter list and opening of every entry point. It defines `wid`, the logical workgroup
/// id, and `lid`. Grids are logically `[x, y, 1]`; when `x` exceeds the device's workgroups per
/// dimension (65,535 on most), the runtime folds it into `[ceil(x / z), y, z]` and `wid.x`
/// recovers the linear index. Workgroups past the logical `x` then exist, so every kernel bounds-
/// checks `wid.x` ([`Launch::folds_x_into_z`]).
pub const ENTRY_HEAD: &str = "(@builtin(workgroup_id) wg_id: vec3<u32>, @builtin(num_workgroups) wg_n: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = vec3<u32>(wg_id.x + wg_id.z * wg_n.x, wg_id.y, 0u);";

/// A WGSL f32 literal that parses back to exactly `x` (Rust's shortest round-trip form).
pub fn f32_lit(x: f32) -> String {
    assert!(x.is_finite(), "non-finite constant {x} in a kernel");
    format!("{x:?}f")
}

/// How a binding's array is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    U32,
    /// f16 pairs read as u32.
    F16x2,
    /// bf16 pairs read as u32.
    Bf16x2,
    /// uint16 pairs read as u32.
    U16x2,
    /// Native f16 (`enable f16;`, the device needs shader-f16): the f16 KV cache.
    F16,
}

impl Elem {
    /// The array element type a float weight record of `dtype` is declared with.
    pub fn float(dtype: DType) -> Elem {
        match dtype {
            DType::F16 => Elem::F16x2,
            DType::BF16 => Elem::Bf16x2,
            _ => Elem::F32,
        }
    }
}

pub struct KernelBuilder {
    pub entry_point: String,
    pub tuning: Tuning,
    /// The library computes in f16 where a kernel can ([`KernelBuilder::use_f16`]).
    f16: bool,
    /// The kernel declares `enable f16;` (it used f16 types).
    uses_f16: bool,
    consts: String,
    decls: String,
    helpers: String,
    bindings: Vec<Binding>,
    scalar: Option<String>,
    index: Option<String>,
}

impl KernelBuilder {
    /// `f16`: the library's precision choice (`codegen::wgsl::f16_kernels`).
    pub fn new(entry_point: &str, tuning: Tuning, f16: bool) -> KernelBuilder {
        let mut b = KernelBuilder {
            entry_point: entry_point.to_string(),
            tuning,
            f16,
            uses_f16: false,
            consts: String::new(),
            decls: String::new(),
            helpers: String::new(),
            bindings: Vec::new(),
            scalar: None,
            index: None,
        };
        b.const_u32("WG", tuning.workgroup_size as usize);
        b
    }

    pub fn const_u32(&mut self, name: &str, v: usize) {
        let v = u32::try_from(v).expect("kernel dimension fits u32 (checked by the caller)");
        writeln!(self.consts, "const {name}: u32 = {v}u;").unwrap();
    }

    /// Whether this kernel computes in f16; when it does, the module gets `enable f16;` and the
    /// helper `to_h(v: f32) -> f16` (clamped to f16's finite range, so an outlier activation
    /// saturates instead of turning into inf and then NaN).
    pub fn use_f16(&mut self) -> bool {
        if self.f16 && !self.uses_f16 {
            self.uses_f16 = true;
            self.helper("fn to_h(v: f32) -> f16 { return f16(clamp(v, -65504.0, 65504.0)); }");
        }
        self.f16
    }

    pub fn const_f32(&mut self, name: &str, v: f32) {
        writeln!(self.consts, "const {name}: f32 = {};", f32_lit(v)).unwrap();
    }

    pub fn helper(&mut self, code: &str) {
        self.helpers.push_str(code);
        self.helpers.push('\n');
    }

    /// Declare a storage buffer; returns nothing, the WGSL name is `name`.
    #[allow(clippy::too_many_arguments)]
    fn storage(
        &mut self,
        role: &str,
        op_field: &str,
        record: Option<usize>,
        part: Option<&str>,
        write: bool,
        elem: Elem,
        name: &str,
        range: Option<[u64; 2]>,
    ) {
        let i = self.bindings.len() as u32;
        let (ty, packs) = match elem {
            Elem::F32 => ("f32", None),
            Elem::U32 => ("u32", None),
            Elem::F16x2 => ("u32", Some("f16x2")),
            Elem::Bf16x2 => ("u32", Some("bf16x2")),
            Elem::U16x2 => ("u32", Some("u16x2")),
            Elem::F16 => ("f16", None),
        };
        let access = if write { "read_write" } else { "read" };
        writeln!(
            self.decls,
            "@group(0) @binding({i}) var<storage, {access}> {name}: array<{ty}>;"
        )
        .unwrap();
        self.bindings.push(Binding {
            binding: i,
            role: role.into(),
            op_field: op_field.into(),
            record,
            part: part.map(Into::into),
            range,
            access: access.into(),
            elem: ty.into(),
            packs: packs.map(Into::into),
            name: name.into(),
        });
    }

    /// An f32 activation buffer `[T, cols]` (read, or read_write when the kernel writes it).
    pub fn activation(&mut self, op_field: &str, write: bool, name: &str) {
        self.storage(
            "activation",
            op_field,
            None,
            None,
            write,
            Elem::F32,
            name,
            None,
        );
    }

    /// The token ids of this call (`T` u32).
    pub fn tokens(&mut self, name: &str) {
        self.storage("tokens", "tokens", None, None, false, Elem::U32, name, None);
    }

    /// The plan's logits buffer.
    pub fn logits(&mut self, name: &str) {
        self.storage("logits", "logits", None, None, true, Elem::F32, name, None);
    }

    /// A weight record of `bytes` bytes, read through `fn {name}_ld(i: u32) -> f32|u32` (element
    /// `i` of the array). A record above `tuning.max_binding_bytes` is bound as consecutive
    /// ranges `{name}_p0, {name}_p1, …` of that size, and `_ld` picks the part.
    pub fn weight(&mut self, op_field: &str, record: usize, elem: Elem, name: &str, bytes: u64) {
        let ty = match elem {
            Elem::F32 => "f32",
            _ => "u32",
        };
        let chunk = self.tuning.max_binding_bytes;
        let bytes = bytes.max(4).div_ceil(4) * 4;
        if bytes <= chunk {
            self.storage(
                "weight",
                op_field,
                Some(record),
                None,
                false,
                elem,
                name,
                None,
            );
            self.helper(&format!(
                "fn {name}_ld(i: u32) -> {ty} {{ return {name}[i]; }}"
            ));
            return;
        }
        let parts = bytes.div_ceil(chunk);
        let shift = (chunk / 4).trailing_zeros();
        let mut body = format!(
            "    let j = i & {}u;\n    let part = i >> {shift}u;\n",
            chunk / 4 - 1
        );
        for p in 0..parts {
            let part = format!("{name}_p{p}");
            let range = [p * chunk, chunk.min(bytes - p * chunk)];
            self.storage(
                "weight",
                op_field,
                Some(record),
                None,
                false,
                elem,
                &part,
                Some(range),
            );
            if p + 1 < parts {
                body.push_str(&format!("    if (part == {p}u) {{ return {part}[j]; }}\n"));
            } else {
                body.push_str(&format!("    return {part}[j];\n"));
            }
        }
        self.helper(&format!("fn {name}_ld(i: u32) -> {ty} {{\n{body}}}"));
    }

    /// A state buffer (`elem`: F32, or F16 for the f16 KV cache).
    pub fn state(&mut self, part: &str, name: &str, elem: Elem) {
        self.storage("state", "state", None, Some(part), true, elem, name, None);
    }

    /// What the runtime writes into `params.scalar` / `params.index`.
    pub fn params_scalar(&mut self, op_field: &str) {
        self.scalar = Some(op_field.into());
    }
    pub fn params_index(&mut self, what: &str) {
        self.index = Some(what.into());
    }

    /// The finished module and its launch description.
    pub fn finish(mut self, body: &str, grid: [GridDim; 3]) -> (String, Launch) {
        let pb = self.bindings.len() as u32;
        writeln!(
            self.decls,
            "@group(0) @binding({pb}) var<uniform> params: Params;"
        )
        .unwrap();
        // Subgroup kernels also take the invocation's subgroup position and the subgroup size
        // (naga gates them by capability; its WGSL front end does not take `enable subgroups;`).
        let body = if self.tuning.subgroups {
            body.replace(
                "@builtin(local_invocation_index) lid: u32)",
                "@builtin(local_invocation_index) lid: u32, @builtin(subgroup_invocation_id) sg_lid: u32, @builtin(subgroup_size) sg_size: u32)",
            )
        } else {
            body.to_string()
        };
        let src = format!(
            "{}// mlcb kernel `{}` (generated; bindings: see the launch JSON)\n{}\n{PARAMS_WGSL}\n{}\n{}\n{}",
            if self.uses_f16 { "enable f16;\n" } else { "" },
            self.entry_point, self.consts, self.decls, self.helpers, body
        );
        let launch = Launch {
            workgroup_size: [self.tuning.workgroup_size, 1, 1],
            grid,
            bindings: self.bindings,
            params: ParamsUse {
                binding: pb,
                fields: PARAMS_FIELDS.iter().map(|s| s.to_string()).collect(),
                scalar: self.scalar,
                index: self.index,
            },
            msl: None,
            folds_x_into_z: true,
            shader_f16: self.uses_f16,
            tuning: self.tuning,
        };
        (src, launch)
    }
}

/// WGSL `fn NAME(i: u32) -> f32` reading element `i` of a float weight record declared with
/// `elem` (through its `{buf}_ld` accessor).
pub fn float_reader(fn_name: &str, buf: &str, elem: Elem) -> String {
    let body = match elem {
        Elem::F32 => format!("return {buf}_ld(i);"),
        Elem::F16x2 => format!("return unpack2x16float({buf}_ld(i >> 1u))[i & 1u];"),
        Elem::Bf16x2 => {
            format!(
                "return bitcast<f32>((({buf}_ld(i >> 1u) >> ((i & 1u) * 16u)) & 0xFFFFu) << 16u);"
            )
        }
        Elem::U32 | Elem::U16x2 | Elem::F16 => {
            unreachable!("float reader over an integer or native-f16 array")
        }
    };
    format!("fn {fn_name}(i: u32) -> f32 {{ {body} }}\n")
}

/// A workgroup tree reduction of `var_in` (each invocation's value) into `let out` (uniform),
/// with `op` "+" or "max". Needs `var<workgroup> red: array<f32, WG>;` and `lid`.
/// Reduce `var_in` over the workgroup into `out` (every invocation gets it), with `op` "+" or
/// "max"; needs `red: array<f32, WG>` in workgroup memory. With subgroups (the preset's choice):
/// one subgroup operation, each subgroup's first invocation stores its result, and every
/// invocation combines those few values — two barriers instead of log2(WG)+1.
pub fn reduce(subgroups: bool, var_in: &str, out: &str, op: &str) -> String {
    if subgroups {
        let (sg_op, combine) = if op == "max" {
            ("subgroupMax", format!("{out} = max({out}, red[i]);"))
        } else {
            ("subgroupAdd", format!("{out} = {out} + red[i];"))
        };
        return format!(
            "    let sg_{out} = {sg_op}({var_in});
    if (sg_lid == 0u) {{ red[lid / sg_size] = sg_{out}; }}
    workgroupBarrier();
    var {out} = red[0];
    for (var i = 1u; i < (WG + sg_size - 1u) / sg_size; i = i + 1u) {{ {combine} }}
    workgroupBarrier();
"
        );
    }
    let combine = if op == "max" {
        "red[lid] = max(red[lid], red[lid + s]);"
    } else {
        "red[lid] = red[lid] + red[lid + s];"
    };
    format!(
        "    red[lid] = {var_in};
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {{
        if (lid < s) {{ {combine} }}
        workgroupBarrier();
    }}
    let {out} = red[0];
    workgroupBarrier();
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_literals_round_trip() {
        for x in [
            1e-5f32,
            1e-6,
            0.125,
            1.0,
            10000.0,
            0.70710677,
            3.4028235e38,
            -2.5,
        ] {
            let s = f32_lit(x);
            let parsed: f32 = s.trim_end_matches('f').parse().unwrap();
            assert_eq!(parsed.to_bits(), x.to_bits(), "{s}");
            assert!(
                s.contains('.') || s.contains('e'),
                "{s} must be a float literal"
            );
        }
    }
}
