//! Assembles one CUDA C translation unit: the shared device helpers, `constexpr` constants, the
//! kernel's pointer parameters (recorded for the launch JSON in the same order), in-kernel helper
//! lambdas (they capture the pointers, as WGSL helpers see module-scope bindings) and the body.

use super::launch::{Arg, CudaLaunch, CudaTuning, GridDim, ParamsUse};
use crate::formats::dtype::DType;
use std::fmt::Write;

/// A CUDA C float literal that parses back to exactly `x`.
pub fn f32_lit(x: f32) -> String {
    assert!(x.is_finite(), "non-finite constant {x} in a kernel");
    let s = format!("{x:?}");
    if s.contains('.') || s.contains('e') {
        format!("{s}f")
    } else {
        format!("{s}.0f")
    }
}

/// Device helpers every kernel may use. No CUDA headers: NVRTC from pip ships none, so halves
/// convert with inline PTX `cvt` and bf16 by shifting.
///
/// `MLCB_EMULATE` is never defined for NVRTC; the tests' host emulator
/// (`runtime::cuda::emulate`) defines it and supplies these few functions itself.
pub const PRELUDE: &str = r#"typedef unsigned long long u64;
#ifndef MLCB_EMULATE
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short f2h(float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
__device__ __forceinline__ float f16_round(float v) { return h2f(f2h(v)); }
#endif
__device__ __forceinline__ float bf2f(unsigned short b) {
    return __uint_as_float(((unsigned)b) << 16);
}
__device__ __forceinline__ float bf16_round(float v) {
    unsigned u = __float_as_uint(v);
    return __uint_as_float((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}
#ifndef MLCB_EMULATE
// A hint: start moving the 128-byte line at p into L2 (no register, no fault past the end).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
#endif
// silu(g) * u (Llama's gated MLP), as the CPU computes it.
__device__ __forceinline__ float silu_gate(float g, float u) {
    return g * (1.0f / (1.0f + expf(-g))) * u;
}
// Sum over the block; `red` holds one float per warp. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0u) red[warp] = v;
    __syncthreads();
    float r = (lane < (blockDim.x >> 5)) ? red[lane] : 0.0f;
    r = warp_sum(r);
    return r;
}
"#;

/// First statements of a kernel that may be launched with programmatic dependent launch (sm_90):
/// wait until the grids it depends on have finished and their writes are visible (before
/// anything they write is read; only [`CudaBuilder::pre_wait`] comes before it), then allow the
/// next kernel to be launched, so its launch overlaps this kernel's work. Without such a launch
/// the wait returns at once.
pub const PDL_ENTER: &str = "#ifndef MLCB_EMULATE
    asm volatile(\"griddepcontrol.wait;\" ::: \"memory\");
    asm volatile(\"griddepcontrol.launch_dependents;\" ::: \"memory\");
#endif
";

/// How a pointer parameter's elements are declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    U32,
    U16,
    F16,
    Bf16,
}

impl Elem {
    /// The element type a float weight record of `dtype` is read as.
    pub fn float(dtype: DType) -> Elem {
        match dtype {
            DType::F16 => Elem::F16,
            DType::BF16 => Elem::Bf16,
            _ => Elem::F32,
        }
    }
    fn c_type(self) -> &'static str {
        match self {
            Elem::F32 => "float",
            Elem::U32 => "unsigned",
            Elem::U16 | Elem::F16 | Elem::Bf16 => "unsigned short",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::U32 => "u32",
            Elem::U16 => "u16",
            Elem::F16 => "f16",
            Elem::Bf16 => "bf16",
        }
    }
}

/// C expression reading float element `i` of an array declared with `elem`.
pub fn float_read(buf: &str, elem: Elem, i: &str) -> String {
    match elem {
        Elem::F32 => format!("{buf}[{i}]"),
        Elem::F16 => format!("h2f({buf}[{i}])"),
        Elem::Bf16 => format!("bf2f({buf}[{i}])"),
        Elem::U32 | Elem::U16 => unreachable!("float read of an integer array"),
    }
}

pub struct CudaBuilder {
    pub entry_point: String,
    pub tuning: CudaTuning,
    /// Start with [`PDL_ENTER`]: the kernel may be launched before the one it depends on ends.
    pub pdl: bool,
    /// With `pdl`: statements before the wait, which must not read anything the kernels before
    /// write: independent work that overlaps their end. `meta` may be read (`meta[1]` is `POS`):
    /// the runtime writes it by a copy ordered before the call's first kernel, which every later
    /// kernel of the call starts after.
    pub pre_wait: String,
    /// `__launch_bounds__`'s second argument: the blocks per SM the register allocation must
    /// allow. Without it ptxas may squeeze a kernel's registers (and spill) for an occupancy it
    /// does not need.
    pub min_blocks: Option<u32>,
    arch: String,
    consts: String,
    lambdas: String,
    params: Vec<String>,
    args: Vec<Arg>,
    scalar: Option<String>,
    index: Option<String>,
}

impl CudaBuilder {
    pub fn new(entry_point: &str, tuning: CudaTuning, arch: &str) -> CudaBuilder {
        let mut b = CudaBuilder {
            entry_point: entry_point.to_string(),
            tuning,
            pdl: false,
            pre_wait: String::new(),
            min_blocks: None,
            arch: arch.to_string(),
            consts: String::new(),
            lambdas: String::new(),
            params: Vec::new(),
            args: Vec::new(),
            scalar: None,
            index: None,
        };
        b.const_u32("TPB", tuning.threads_per_block as usize);
        b.const_u32("NWARPS", tuning.warps() as usize);
        b
    }

    /// The architecture the library is built for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Compile this kernel for `arch` instead (an architecture-specific variant of the
    /// library's, e.g. sm_90a for `wgmma`): the launch description records it, and the runtime
    /// refuses a GPU of another architecture.
    pub fn ptx_arch(&mut self, arch: &str) {
        self.arch = arch.to_string();
    }

    pub fn const_u32(&mut self, name: &str, v: usize) {
        let v = u32::try_from(v).expect("kernel dimension fits u32 (checked by the caller)");
        writeln!(self.consts, "constexpr unsigned {name} = {v}u;").unwrap();
    }

    pub fn const_f32(&mut self, name: &str, v: f32) {
        writeln!(self.consts, "constexpr float {name} = {};", f32_lit(v)).unwrap();
    }

    pub fn const_bool(&mut self, name: &str, v: bool) {
        writeln!(self.consts, "constexpr bool {name} = {v};").unwrap();
    }

    /// A helper inside the kernel (a lambda capturing the parameters by reference).
    pub fn lambda(&mut self, code: &str) {
        self.lambdas.push_str("    ");
        self.lambdas.push_str(code);
        self.lambdas.push('\n');
    }

    #[allow(clippy::too_many_arguments)]
    fn pointer(
        &mut self,
        role: &str,
        op_field: &str,
        record: Option<usize>,
        part: Option<&str>,
        write: bool,
        restrict: bool,
        elem: Elem,
        name: &str,
    ) {
        let constness = if write { "" } else { "const " };
        let r = if restrict { " __restrict__" } else { "" };
        self.params
            .push(format!("{constness}{}*{r} {name}", elem.c_type()));
        self.args.push(Arg {
            role: role.into(),
            op_field: op_field.into(),
            record,
            part: part.map(Into::into),
            bytes: None,
            elem: elem.name().into(),
            write,
            name: name.into(),
            row_blocks: None,
        });
    }

    /// An f32 activation buffer `[T, cols]` (f16 ones: [`Self::activation_of`]).
    pub fn activation(&mut self, op_field: &str, write: bool, name: &str) {
        self.pointer(
            "activation",
            op_field,
            None,
            None,
            write,
            true,
            Elem::F32,
            name,
        );
    }

    /// An activation buffer `[T, cols]` held as f16 (`unsigned short` bits; see
    /// [`super::half_activations`]) when `half`, else f32.
    pub fn activation_of(&mut self, op_field: &str, write: bool, name: &str, half: bool) {
        let elem = if half { Elem::F16 } else { Elem::F32 };
        self.pointer("activation", op_field, None, None, write, true, elem, name);
    }

    /// An activation that may alias another argument of the same kernel (no `__restrict__`).
    pub fn activation_aliased(&mut self, op_field: &str, write: bool, name: &str) {
        self.pointer(
            "activation",
            op_field,
            None,
            None,
            write,
            false,
            Elem::F32,
            name,
        );
    }

    /// The token ids of this call (`T` u32).
    pub fn tokens(&mut self, name: &str) {
        self.pointer("tokens", "tokens", None, None, false, true, Elem::U32, name);
    }

    /// The plan's logits buffer.
    pub fn logits(&mut self, name: &str) {
        self.pointer("logits", "logits", None, None, true, true, Elem::F32, name);
    }

    pub fn weight(&mut self, op_field: &str, record: usize, elem: Elem, name: &str) {
        self.pointer(
            "weight",
            op_field,
            Some(record),
            None,
            false,
            true,
            elem,
            name,
        );
    }

    /// A weight record the runtime uploads in row blocks ([`super::row_blocks`]).
    pub fn weight_in_row_blocks(
        &mut self,
        op_field: &str,
        record: usize,
        elem: Elem,
        name: &str,
        layout: super::row_blocks::RowBlocks,
    ) {
        self.weight(op_field, record, elem, name);
        self.args.last_mut().expect("just pushed").row_blocks = Some(layout);
    }

    /// A part of the op's state (`elem`: the KV cache's element; the RWKV state is f32).
    pub fn state(&mut self, part: &str, elem: Elem, name: &str) {
        self.pointer("state", "state", None, Some(part), true, true, elem, name);
    }

    /// The kernel's own zero-initialised workspace of `bytes` (see the launch module), as f32.
    pub fn scratch(&mut self, bytes: u64, name: &str) {
        self.pointer(
            "scratch",
            "scratch",
            None,
            None,
            true,
            true,
            Elem::F32,
            name,
        );
        self.args.last_mut().expect("just pushed").bytes = Some(bytes);
    }

    pub fn params_scalar(&mut self, op_field: &str) {
        self.scalar = Some(op_field.into());
    }
    pub fn params_index(&mut self, what: &str) {
        self.index = Some(what.into());
    }

    /// The finished translation unit and its launch description. `shared` is code placed before
    /// the kernel (extra device functions); `body` is the kernel body, which may use `T`, `POS`,
    /// `ROWS`, `ROW0`, `scalar`, `index` and the lambdas.
    pub fn finish(
        self,
        shared: &str,
        body: &str,
        block: u32,
        grid: [GridDim; 3],
    ) -> (String, CudaLaunch) {
        let mut params = self.params.clone();
        params.push("const unsigned* __restrict__ meta".into());
        params.push("float scalar".into());
        params.push("unsigned index".into());
        let pdl = if self.pdl {
            format!("{}{PDL_ENTER}", self.pre_wait)
        } else {
            String::new()
        };
        let bounds = match self.min_blocks {
            Some(m) => format!("{block}, {m}"),
            None => block.to_string(),
        };
        let src = format!(
            "// mlcb kernel `{ep}` (generated; arguments: see the launch JSON)\n{PRELUDE}\n{consts}\n{shared}\n\
extern \"C\" __global__ void __launch_bounds__({bounds}) {ep}(\n    {params})\n{{\n{pdl}    \
const unsigned T = meta[0], POS = meta[1], ROWS = meta[2], ROW0 = meta[3];\n    \
(void)T; (void)POS; (void)ROWS; (void)ROW0; (void)scalar; (void)index;\n{lambdas}{body}}}\n",
            ep = self.entry_point,
            consts = self.consts,
            params = params.join(",\n    "),
            lambdas = self.lambdas,
        );
        let launch = CudaLaunch {
            block: [block, 1, 1],
            grid,
            args: self.args,
            params: ParamsUse {
                scalar: self.scalar,
                index: self.index,
            },
            arch: self.arch,
            tuning: self.tuning,
            pdl: self.pdl,
        };
        (src, launch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_literals_round_trip() {
        for x in [1e-5f32, 0.125, 1.0, 10000.0, 0.70710677, 3.4028235e38, -2.5] {
            let s = f32_lit(x);
            assert!(s.ends_with('f'));
            let parsed: f32 = s.trim_end_matches('f').parse().unwrap();
            assert_eq!(parsed.to_bits(), x.to_bits(), "{s}");
        }
        assert_eq!(f32_lit(1.0), "1.0f");
    }
}
