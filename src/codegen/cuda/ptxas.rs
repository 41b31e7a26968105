//! Tests only: NVIDIA's PTX assembler, where one is installed, assembles the PTX the build
//! stores. NVRTC passes inline PTX (`mma`, `ldmatrix`, `cp.async`, `wgmma`, …) through as text,
//! so without this the first to parse it would be the driver on a user's GPU; ptxas also says
//! what the driver's JIT will make of a kernel: registers, spills, and whether `wgmma`
//! products run asynchronously.
//!
//! Found as `MLCB_PTXAS`, else `ptxas` on `PATH`, else in python3's site-packages where
//! `pip install 'nvidia-cuda-nvcc==13.0.*'` puts it (`nvidia/cu13/bin/ptxas`). Its version
//! must read the PTX ISA of the NVRTC in use (13.0: 9.0).

use std::path::PathBuf;
use std::sync::OnceLock;

/// Where pip's nvcc wheels put ptxas, relative to a site-packages folder.
const WHEEL_PTXAS: &[&str] = &["nvidia/cu13/bin/ptxas", "nvidia/cuda_nvcc/bin/ptxas"];

/// The ptxas binary, if one is found.
pub fn ptxas() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("MLCB_PTXAS") {
                return Some(PathBuf::from(p));
            }
            if let Some(p) = std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join("ptxas"))
                    .find(|p| p.is_file())
            }) {
                return Some(p);
            }
            super::nvrtc::python_site_packages()
                .ok()?
                .into_iter()
                .flat_map(|d| WHEEL_PTXAS.iter().map(move |w| d.join(w)))
                .find(|p| p.is_file())
        })
        .clone()
}

/// What ptxas says of one kernel (`-v`).
#[derive(Debug)]
pub struct Assembled {
    pub registers: u32,
    pub spill_store_bytes: u32,
    /// ptxas's messages, e.g. its performance advisories (`C7518 … wgmma … serialized`).
    pub log: String,
}

/// Assemble `ptx` for `arch` (its `.target`); `Err` carries ptxas's log.
pub fn assemble(ptxas: &std::path::Path, ptx: &str, arch: &str) -> Result<Assembled, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let src = dir.path().join("k.ptx");
    std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(dir.path().join("k.cubin"))
        .output()
        .map_err(|e| format!("{} could not be run: {e}", ptxas.display()))?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(log);
    }
    // "Used 121 registers, …" and "0 bytes spill stores, 0 bytes spill loads".
    let number_before = |what: &str| -> Option<u32> {
        let at = log.find(what)?;
        log[..at].split_whitespace().last()?.parse().ok()
    };
    let registers = log
        .find("Used ")
        .and_then(|at| log[at + 5..].split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Assembled {
        registers,
        spill_store_bytes: number_before(" bytes spill stores").unwrap_or(0),
        log,
    })
}
