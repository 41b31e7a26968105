//! Finding NVRTC and compiling CUDA C to PTX with it (through cudarc, dynamically loaded).
//!
//! cudarc opens NVRTC by bare file name (`libnvrtc.so.13`, …), so the usual dlopen search applies
//! and a missing library makes it panic. mlcb therefore looks for the library itself first, in
//! this order, and only then lets cudarc use it:
//!
//! 1. the dynamic loader's own search (`LD_LIBRARY_PATH`, RUNPATH, the ld.so cache);
//! 2. `MLCB_NVRTC`: the library file, or the folder holding it;
//! 3. the site-packages folders of `python3` (asked once, with
//!    `python3 -c 'import site; print(site.getsitepackages())'`), where
//!    `pip install 'nvidia-cuda-nvrtc==13.0.*'` puts `nvidia/cu13/lib/libnvrtc.so.13`
//!    (the CUDA 12 wheel: `nvidia/cuda_nvrtc/lib/libnvrtc.so.12`).
//!
//! A library found by path is opened with `RTLD_GLOBAL` (after the `libnvrtc-builtins` beside it,
//! which NVRTC itself opens by bare name); the loader then resolves cudarc's bare-name open to it
//! by its soname. Without any, the error (an environment error, exit 3)
//! lists every place tried and the pip command that fixes it.

use anyhow::Result;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The pip line that installs an NVRTC whose PTX the H200 machines' driver (CUDA 13.0) accepts.
pub const INSTALL_HINT: &str = "pip install 'nvidia-cuda-nvrtc==13.0.*'";

/// Library files a pip wheel installs, relative to a site-packages folder.
const WHEEL_LIBS: &[&str] = &[
    "nvidia/cu13/lib/libnvrtc.so.13",
    "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
];
/// File names looked for inside a folder named by `MLCB_NVRTC`.
const LIB_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// NVRTC as found: its version and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nvrtc {
    pub major: i32,
    pub minor: i32,
    /// "loader search" or the library path.
    pub origin: String,
}

impl Nvrtc {
    pub fn version(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }
}

static FOUND: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// Find and load NVRTC (once per process). `Err` is an environment error naming what was tried.
pub fn nvrtc() -> Result<Nvrtc> {
    FOUND.get_or_init(locate).clone().map_err(crate::error::env)
}

/// Whether NVRTC can be found (tests skip, loudly, when it cannot).
pub fn available() -> bool {
    nvrtc().is_ok()
}

fn loader_finds_it() -> bool {
    // SAFETY: only opens and closes candidate libraries; never panics.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Open `path` globally so a later bare-name open resolves to it.
fn preload(path: &Path) -> std::result::Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path contains a NUL byte", path.display()))?;
    // SAFETY: dlopen with a valid C string; the handle is deliberately never closed (NVRTC stays
    // loaded for the life of the process, as cudarc expects).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let msg = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown dlopen error".to_string()
            } else {
                std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("{}: {msg}", path.display()));
    }
    Ok(())
}

/// `libnvrtc-builtins.so.<major>.<minor>` in the folder of `lib` (not the `.alt` variant).
fn builtins_beside(lib: &Path) -> Option<PathBuf> {
    let dir = lib.parent()?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
        })
        .collect();
    found.sort();
    found.pop()
}

pub(crate) fn python_site_packages() -> std::result::Result<Vec<PathBuf>, String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import site; print('\\n'.join(site.getsitepackages()))",
        ])
        .output()
        .map_err(|e| format!("python3 could not be run ({e})"))?;
    if !out.status.success() {
        return Err("python3 -c 'import site; …' failed".into());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

fn version() -> std::result::Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (checked by the caller); nvrtcVersion writes two ints.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

fn found(origin: String) -> std::result::Result<Nvrtc, String> {
    let (major, minor) = version()?;
    Ok(Nvrtc {
        major,
        minor,
        origin,
    })
}

fn locate() -> std::result::Result<Nvrtc, String> {
    let mut tried = Vec::new();
    if loader_finds_it() {
        return found("loader search".into());
    }
    tried.push(format!(
        "the dynamic loader's search (LD_LIBRARY_PATH={})",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_else(|_| "<unset>".into())
    ));
    let mut candidates: Vec<PathBuf> = Vec::new();
    match std::env::var_os("MLCB_NVRTC") {
        Some(v) => {
            let p = PathBuf::from(v);
            if p.is_dir() {
                candidates.extend(LIB_NAMES.iter().map(|n| p.join(n)));
            } else {
                candidates.push(p);
            }
        }
        None => tried.push("MLCB_NVRTC (unset)".into()),
    }
    match python_site_packages() {
        Ok(dirs) => {
            for d in dirs {
                candidates.extend(WHEEL_LIBS.iter().map(|l| d.join(l)));
            }
        }
        Err(e) => tried.push(format!("python3 site-packages: {e}")),
    }
    for c in candidates {
        if !c.is_file() {
            tried.push(format!("{} (absent)", c.display()));
            continue;
        }
        // NVRTC opens its builtins library by bare name at compile time; load the one beside
        // it first so that open resolves by soname too.
        if let Some(b) = builtins_beside(&c) {
            if let Err(e) = preload(&b) {
                tried.push(format!("{e} (builtins cannot be loaded)"));
                continue;
            }
        }
        match preload(&c) {
            Ok(()) if loader_finds_it() => return found(c.display().to_string()),
            Ok(()) => tried.push(format!(
                "{} (loaded, but its soname is not one cudarc opens)",
                c.display()
            )),
            Err(e) => tried.push(format!("{e} (cannot be loaded)")),
        }
    }
    Err(format!(
        "NVRTC (the CUDA runtime compiler) was not found; the cuda target needs it to compile \
         kernels to PTX. Install it with `{INSTALL_HINT}` (then mlcb finds it in python3's \
         site-packages), or set MLCB_NVRTC to libnvrtc.so.13 or its folder. Tried:\n  - {}",
        tried.join("\n  - ")
    ))
}

/// Compile one kernel's CUDA C to PTX for `arch` (e.g. "sm_80"). A compile error names the
/// kernel and carries NVRTC's log.
pub fn compile(signature: &str, source: &str, arch: &'static str) -> Result<String> {
    nvrtc()?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        // Precise division and square root, no flush-to-zero: the CPU reference is IEEE f32.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| {
        let log = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                log.to_string_lossy().into_owned()
            }
            other => format!("{other:?}"),
        };
        anyhow::anyhow!(
            "NVRTC failed to compile kernel {signature} for {arch} (an mlcb bug; please report it):\n{log}"
        )
    })?;
    let ptx = ptx.to_src();
    // NVRTC accepts any size; the driver refuses to load a kernel over the limit, i.e. on the
    // user's GPU, long after the build.
    let smem = static_shared_bytes(&ptx);
    if smem > MAX_STATIC_SHARED_BYTES {
        anyhow::bail!(
            "kernel {signature} declares {smem} bytes of static shared memory for {arch}, over the \
             {MAX_STATIC_SHARED_BYTES} a CUDA kernel may declare statically (an mlcb bug; please report it)"
        );
    }
    Ok(ptx)
}

/// The static shared memory a kernel may declare on every architecture (more needs dynamic
/// shared memory and an opt-in at launch).
pub const MAX_STATIC_SHARED_BYTES: usize = 48 * 1024;

/// Bytes of the `.shared` variables a PTX module declares (one kernel per module here), e.g.
/// `.shared .align 16 .b8 _ZZ…E2xs[20480];`.
pub fn static_shared_bytes(ptx: &str) -> usize {
    ptx.lines()
        .map(str::trim)
        .filter(|l| l.starts_with(".shared"))
        .map(|l| {
            let elem = l
                .split_whitespace()
                .find_map(|w| match w {
                    ".b8" | ".u8" | ".s8" => Some(1),
                    ".b16" | ".u16" | ".s16" | ".f16" => Some(2),
                    ".b32" | ".u32" | ".s32" | ".f32" => Some(4),
                    ".b64" | ".u64" | ".s64" | ".f64" => Some(8),
                    _ => None,
                })
                .unwrap_or(1);
            // Every dimension `[n]` of the declaration; a scalar has none.
            let count: usize = l
                .split('[')
                .skip(1)
                .filter_map(|d| d.split(']').next()?.trim().parse::<usize>().ok())
                .product();
            elem * count
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_shared_bytes_sums_every_declaration() {
        let ptx = "
.version 8.8
.target sm_90
.address_size 64
	// .globl	mlcb_matmul_gemm
// _ZZ16mlcb_matmul_gemmE2xs has been demoted
.shared .align 128 .b8 _ZZ16mlcb_matmul_gemmE2xs[24576];
.shared .align 4 .b32 _ZZ16mlcb_matmul_gemmE4part[8][4];
.shared .align 4 .f32 _ZZ16mlcb_matmul_gemmE2ss;
.visible .entry mlcb_matmul_gemm(
	.param .u64 mlcb_matmul_gemm_param_0
)
{
	ld.shared.u32 	%r1, [_ZZ16mlcb_matmul_gemmE2xs+16];
}";
        assert_eq!(static_shared_bytes(ptx), 24576 + 8 * 4 * 4 + 4);
        assert_eq!(static_shared_bytes(".visible .entry k()\n{\n}"), 0);
    }
}
