//! Tests without a GPU: the generated CUDA C, compiled by the host C++ compiler against a small
//! emulation of the CUDA execution model (one fiber per CUDA thread, all on the calling thread,
//! switched at barriers: `__syncthreads` and the warp-synchronous shuffles and `mma.sync`;
//! blocks run one after another), driven by the same step binding ([`super::bind`]) and launch
//! descriptions the GPU runtime uses, and compared with the CPU executor on fixture plans and on
//! quantized matrices of every scheme.
//!
//! What it checks: kernel indexing, dequantization, reductions, the attention/KV-cache logic,
//! argument order, grids derived from the launch JSON, the meta convention; the alignment the
//! GPU demands of vector accesses, `cp.async` and `ldmatrix` (a misaligned one stops the test);
//! some races: between barriers a block's threads run first to last, then last to first, so a
//! read of another thread's write with no barrier between sees it one way and misses it the
//! other, and `cp.async` copies land at their wait or, compiled with [`CopyLanding::AtIssue`],
//! at their issue. What it cannot check: the real hardware (the `mma` and `ldmatrix` fragment
//! layouts are emulated from the PTX ISA's description; the f16/tf32 conversions, f16x2
//! arithmetic, `lop3` and `prmt` are host code written from it), the memory model beyond that,
//! and performance. Tests skip when `g++` (C++20) is missing.
//!
//! `emu.h` is that execution model in C++ (threads as fibers, barriers, shuffles, `mma`,
//! `ldmatrix`, `cp.async`, the launch loop); this file compiles it with a plan's kernels and
//! binds their arguments; `tests.rs` compares them with the CPU executor.

use super::bind::{bind_phase, ArgRef, Step};
use super::timer::{arg_bytes, meta_values, probe_name, timed_calls};
use crate::codegen::cuda::launch::{CudaLaunch, CudaTuning};
use crate::codegen::cuda::{generate_plan, CudaKernel};
use crate::codegen::tune_check::{probe_fill, read_values, Written};
use crate::codegen::wgsl::spec::KernelSpec;
use crate::formats::model_lib::plan::{Plan, StateDecl};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;

/// Prepended to every compiled set of kernels.
const EMU_HEADER: &str = include_str!("emu.h");

type LaunchFn = unsafe extern "C" fn(*mut *mut c_void, f32, u32, u32, u32, u32, u32);

/// A plan's kernels compiled for the host.
pub struct EmuKernels {
    _dir: tempfile::TempDir,
    launches: Vec<LaunchFn>,
    pub kernels: Vec<CudaKernel>,
    /// One launch at a time: the library's statics (`__shared__` arrays, the collectives'
    /// buffers, the fiber scheduler) are one set per library. Other libraries run meanwhile.
    running: std::sync::Mutex<()>,
}

fn c_type(elem: &str, write: bool) -> String {
    let t = match elem {
        "f32" => "float",
        "u32" => "unsigned",
        _ => "unsigned short",
    };
    format!("{}{t}*", if write { "" } else { "const " })
}

/// Whether a C++20 host compiler is available.
pub fn have_cxx() -> bool {
    std::process::Command::new("g++")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// When an emulated `cp.async` copy lands: on the GPU any time between its issue and the wait
/// that covers it; the emulator takes one end, so a test run at each end catches both a read
/// too early and an overwrite too early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyLanding {
    /// At the wait: reading the destination before it (or before the barrier after another
    /// thread's wait) sees stale bytes.
    AtWait,
    /// At the issue: a copy into a buffer another thread still reads changes what it reads.
    AtIssue,
}

impl EmuKernels {
    pub fn compile(kernels: Vec<CudaKernel>) -> EmuKernels {
        EmuKernels::compile_with(kernels, CopyLanding::AtWait)
    }

    pub fn compile_with(kernels: Vec<CudaKernel>, landing: CopyLanding) -> EmuKernels {
        let mut src = String::from(EMU_HEADER);
        for (i, k) in kernels.iter().enumerate() {
            src.push_str(&format!(
                "namespace k{i} {{\n{}\n}}\n",
                k.source.replace("extern \"C\" __global__", "__global__")
            ));
            let n = k.launch.args.len();
            let args: Vec<String> = k
                .launch
                .args
                .iter()
                .enumerate()
                .map(|(j, a)| format!("({})p[{j}]", c_type(&a.elem, a.write)))
                .collect();
            src.push_str(&format!(
                "extern \"C\" void emu_launch_{i}(void** p, float scalar, unsigned index, unsigned gx, unsigned gy, unsigned gz, unsigned bx) {{\n    auto body = [&] {{ k{i}::{}({}, (const unsigned*)p[{n}], scalar, index); }};\n    emu::run(gx, gy, gz, bx, [](void* b) {{ (*static_cast<decltype(body)*>(b))(); }}, &body);\n}}\n",
                k.entry_point,
                args.join(", ")
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let cpp = dir.path().join("kernels.cpp");
        let so = dir.path().join("kernels.so");
        std::fs::write(&cpp, &src).unwrap();
        let out = std::process::Command::new("g++")
            .args([
                "-std=c++20",
                "-O1",
                // The library runs where it is compiled: the host's f16 conversions (F16C)
                // instead of libgcc's; no contraction into FMAs, which would change results.
                "-march=native",
                "-ffp-contract=off",
                "-shared",
                "-fPIC",
                "-fno-strict-aliasing",
                "-w",
            ])
            .args(alignment_check_flags())
            .args((landing == CopyLanding::AtIssue).then_some("-DEMU_CP_LAND_AT_ISSUE"))
            .arg("-o")
            .arg(&so)
            .arg(&cpp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "g++ failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let launches = load(&so, kernels.len());
        EmuKernels {
            _dir: dir,
            launches,
            kernels,
            running: std::sync::Mutex::new(()),
        }
    }
}

impl EmuKernels {
    /// What kernel `i` (of `spec`) writes on the tune stage's probe inputs, as the CUDA timer's
    /// probe reads it back from a GPU ([`super::timer`]): the same calls, buffer sizes, inputs
    /// and names.
    pub fn probe(&self, i: usize, spec: &KernelSpec) -> Vec<Written> {
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let k = &self.kernels[i];
        let calls = timed_calls(spec, &k.signature);
        let sizes = arg_bytes(k, spec, &calls);
        let mut written = Vec::new();
        for (t, pos) in calls {
            let mut bufs: Vec<Mem> = k
                .launch
                .args
                .iter()
                .zip(&sizes)
                .map(|(a, &b)| Mem::from_bytes(&probe_fill(&a.role, &a.elem, &a.name, b as usize)))
                .collect();
            let mut meta = Mem::from_bytes(bytemuck::cast_slice(&meta_values(t, pos)));
            let mut ptrs: Vec<*mut c_void> = bufs.iter_mut().map(|m| m.ptr()).collect();
            ptrs.push(meta.ptr());
            let g: Vec<u32> = k
                .launch
                .grid
                .iter()
                .map(|d| d.workgroups(t, t) as u32)
                .collect();
            // SAFETY: the generated wrapper casts each pointer to the kernel's parameter type;
            // every buffer has the size the timer gives it on a GPU.
            unsafe {
                (self.launches[i])(
                    ptrs.as_mut_ptr(),
                    1e-5,
                    0,
                    g[0],
                    g[1],
                    g[2],
                    k.launch.block[0],
                )
            };
            for ((a, m), &b) in k.launch.args.iter().zip(&bufs).zip(&sizes) {
                if a.write && a.role != "scratch" {
                    let bytes = &bytemuck::cast_slice::<u128, u8>(&m.0)[..b as usize];
                    written.push(Written {
                        name: probe_name(&a.name, t, pos),
                        values: read_values(&a.elem, bytes),
                    });
                }
            }
        }
        written
    }
}

/// g++'s alignment sanitizer for the emulated kernels, with its runtime (a message naming the
/// line) where the compiler has it, else as a trap; either way a misaligned vector access ends
/// the test instead of passing on the host as it would not on the GPU.
fn alignment_check_flags() -> &'static [&'static str] {
    static FLAGS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    const WITH_RUNTIME: &[&str] = &["-fsanitize=alignment", "-fno-sanitize-recover=alignment"];
    const TRAP: &[&str] = &["-fsanitize=alignment", "-fsanitize-trap=alignment"];
    FLAGS.get_or_init(|| {
        let Ok(dir) = tempfile::tempdir() else {
            return TRAP;
        };
        let cpp = dir.path().join("probe.cpp");
        let links = std::fs::write(&cpp, "extern \"C\" int probe(int* p) { return *p; }\n").is_ok()
            && std::process::Command::new("g++")
                .args(["-shared", "-fPIC"])
                .args(WITH_RUNTIME)
                .arg("-o")
                .arg(dir.path().join("probe.so"))
                .arg(&cpp)
                .output()
                .is_ok_and(|o| o.status.success());
        if links {
            WITH_RUNTIME
        } else {
            TRAP
        }
    })
}

fn load(so: &Path, n: usize) -> Vec<LaunchFn> {
    let c = std::ffi::CString::new(so.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a shared library this test just compiled; the handle is leaked on purpose.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen of the emulated kernels failed");
    (0..n)
        .map(|i| {
            let name = std::ffi::CString::new(format!("emu_launch_{i}")).unwrap();
            // SAFETY: the symbol has the LaunchFn signature (generated above).
            unsafe {
                let s = libc::dlsym(h, name.as_ptr());
                assert!(!s.is_null());
                std::mem::transmute::<*mut c_void, LaunchFn>(s)
            }
        })
        .collect()
}

/// Host memory with 16-byte alignment (the kernels' vector loads need it, as on the GPU).
struct Mem(Vec<u128>);

impl Mem {
    fn zeroed(bytes: usize) -> Mem {
        Mem(vec![0u128; bytes.div_ceil(16).max(1)])
    }
    fn from_bytes(b: &[u8]) -> Mem {
        let mut m = Mem::zeroed(b.len());
        bytemuck::cast_slice_mut::<u128, u8>(&mut m.0)[..b.len()].copy_from_slice(b);
        m
    }
    fn ptr(&mut self) -> *mut c_void {
        self.0.as_mut_ptr() as *mut c_void
    }
    fn f32s(&self, n: usize) -> Vec<f32> {
        bytemuck::cast_slice::<u128, f32>(&self.0)[..n].to_vec()
    }
}

/// The GPU runtime's session logic on emulated kernels.
pub struct EmuSession<'k> {
    plan: Plan,
    k: &'k EmuKernels,
    prefill: Vec<Step>,
    decode: Vec<Step>,
    weights: Vec<Vec<Mem>>,
    kv: Vec<(Mem, Mem)>,
    rwkv: Vec<Mem>,
    /// Per kernel, its scratch (zeroed once, as the runtime does).
    scratch: Vec<Option<Mem>>,
    pos: usize,
}

impl<'k> EmuSession<'k> {
    pub fn new(plan: &Plan, k: &'k EmuKernels, records: &[Vec<Vec<u8>>]) -> EmuSession<'k> {
        let table: HashMap<String, (usize, CudaLaunch)> = k
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| (k.signature.clone(), (i, k.launch.clone())))
            .collect();
        let steps = |ops: &[crate::formats::model_lib::plan::Op], phase: &str| {
            bind_phase(plan, ops, phase, &table, "cuda").unwrap()
        };
        let s = plan.max_seq_len;
        let kv_elem = super::bind::kv_elem_bytes(k.kernels.iter().map(|k| &k.launch)).unwrap();
        let mut kv = Vec::new();
        let mut rwkv = Vec::new();
        for st in &plan.states {
            match *st {
                StateDecl::KvCache {
                    n_kv_heads,
                    head_dim,
                    ..
                } => {
                    kv.push((
                        Mem::zeroed(s * n_kv_heads * head_dim * kv_elem),
                        Mem::zeroed(s * n_kv_heads * head_dim * kv_elem),
                    ));
                    rwkv.push(Mem::zeroed(16));
                }
                StateDecl::Rwkv { hidden, .. } => {
                    let mut init = vec![0f32; 5 * hidden];
                    init[3 * hidden..4 * hidden].fill(-1e38);
                    rwkv.push(Mem::from_bytes(bytemuck::cast_slice(&init)));
                    kv.push((Mem::zeroed(16), Mem::zeroed(16)));
                }
            }
        }
        let (prefill, decode) = (
            steps(&plan.prefill, "prefill"),
            steps(&plan.decode, "decode"),
        );
        let launches: Vec<&CudaLaunch> = k.kernels.iter().map(|k| &k.launch).collect();
        let sizes: Vec<Vec<usize>> = records
            .iter()
            .map(|w| w.iter().map(|r| r.len()).collect())
            .collect();
        let layouts =
            super::bind::weight_layouts(plan, &[&prefill, &decode], &launches, &sizes).unwrap();
        let weights = records
            .iter()
            .zip(&layouts)
            .map(|(w, l)| {
                w.iter()
                    .zip(l)
                    .map(|(r, l)| Mem::from_bytes(&super::bind::device_bytes(r, *l, "").unwrap()))
                    .collect()
            })
            .collect();
        EmuSession {
            plan: plan.clone(),
            k,
            prefill,
            decode,
            weights,
            kv,
            rwkv,
            scratch: k
                .kernels
                .iter()
                .map(|k| Some(Mem::zeroed(k.launch.scratch_bytes()? as usize)))
                .collect(),
            pos: 0,
        }
    }

    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Vec<f32> {
        let _one = self.k.running.lock().unwrap_or_else(|e| e.into_inner());
        let t = tokens.len();
        let rows = if all_logits { t } else { 1 };
        let mut bufs: Vec<Mem> = self
            .plan
            .buffers
            .iter()
            .map(|d| Mem::zeroed(t * d.cols * 4))
            .collect();
        let mut toks = Mem::from_bytes(bytemuck::cast_slice(tokens));
        let meta = crate::codegen::cuda::launch::call_meta(t, self.pos, rows);
        let mut meta = Mem::from_bytes(bytemuck::cast_slice(&meta));
        let steps = if t > 1 { &self.prefill } else { &self.decode };
        for step in steps {
            let k = &self.k.kernels[step.kernel];
            let r = if step.logits { rows } else { t } as u64;
            let g: Vec<u64> = k
                .launch
                .grid
                .iter()
                .map(|d| d.workgroups(t as u64, r))
                .collect();
            let mut ptrs: Vec<*mut c_void> = step
                .args
                .iter()
                .map(|a| match *a {
                    ArgRef::Buffer(b) => bufs[b].ptr(),
                    ArgRef::Weight(w, i) => self.weights[w][i].ptr(),
                    ArgRef::Tokens => toks.ptr(),
                    ArgRef::KvK(s) => self.kv[s].0.ptr(),
                    ArgRef::KvV(s) => self.kv[s].1.ptr(),
                    ArgRef::Rwkv(s) => self.rwkv[s].ptr(),
                    ArgRef::Scratch(k) => self.scratch[k].as_mut().expect("bound").ptr(),
                })
                .collect();
            // SAFETY: meta holds 8 u32; the logits half starts at 16 bytes.
            ptrs.push(
                unsafe { (meta.ptr() as *mut u8).add(if step.logits { 16 } else { 0 }) }
                    as *mut c_void,
            );
            if g.contains(&0) {
                continue;
            }
            // SAFETY: the generated wrapper casts each pointer to the kernel's parameter type;
            // every buffer has the size the plan declares for `t` rows.
            unsafe {
                (self.k.launches[step.kernel])(
                    ptrs.as_mut_ptr(),
                    step.scalar,
                    step.index,
                    g[0] as u32,
                    g[1] as u32,
                    g[2] as u32,
                    k.launch.block[0],
                )
            };
        }
        self.pos += t;
        bufs[self.plan.logits].f32s(rows * self.plan.vocab_size)
    }
}

/// A tuning of `threads_per_block`, `rows_per_block` and `kv_splits` (registers for the weights).
#[cfg(test)]
fn tuned(threads_per_block: u32, rows_per_block: u32, kv_splits: u32) -> CudaTuning {
    CudaTuning {
        threads_per_block,
        rows_per_block,
        kv_splits,
        weight_ring: 0,
    }
}

/// One tuning record for every signature of a plan (knobs a kernel ignores, it ignores).
#[cfg(test)]
fn tuning_records(
    plan: &Plan,
    t: CudaTuning,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let v = serde_json::to_value(t).expect("a tuning serialises");
    crate::codegen::signature::plan_signatures(plan)
        .into_iter()
        .map(|s| (s, v.clone()))
        .collect()
}

/// [`tuning_records`] at `base`, but `t` for the signatures `pick` selects (the kernels a test
/// is about; the others at a cheap-to-emulate shape).
#[cfg(test)]
fn tuning_records_where(
    plan: &Plan,
    base: CudaTuning,
    pick: impl Fn(&str) -> bool,
    t: CudaTuning,
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let picked = tuning_records(plan, t);
    let mut records = tuning_records(plan, base);
    for (sig, v) in records.iter_mut() {
        if pick(sig) {
            *v = picked[sig].clone();
        }
    }
    records
}

#[cfg(test)]
mod tests;
