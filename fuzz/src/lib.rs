//! What each fuzz target does with its input: one public mlcb entry point that parses untrusted
//! bytes, plus the cheap follow-ups a caller would run on its result. Errors are the expected
//! outcome for most inputs; a panic, an abort or a huge allocation is a bug.
//!
//! Shared by the cargo-fuzz targets (`fuzz_targets/*.rs`) and by mlcb's stable CI smoke test
//! (`tests/fuzz_smoke.rs` includes this file by path), so both exercise the same code.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation any input may cause. Inputs are at most a few MB, so anything
/// near this came from a size field read from the input and trusted: the bug class the readers
/// must not have ("a header claiming 10^15 bytes is an error, not an allocation").
pub const MAX_ALLOCATION: usize = 256 << 20;

/// The largest allocation seen so far (for the smoke test's report).
pub static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, refusing any single allocation above [`MAX_ALLOCATION`]: Rust then
/// aborts with "memory allocation of N bytes failed", which libFuzzer records as a crash with its
/// input (libFuzzer's own -malloc_limit_mb needs a sanitizer runtime; this works without one).
pub struct LimitedAlloc;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by the GlobalAlloc contract.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

fn note(size: usize) -> bool {
    LARGEST_ALLOCATION.fetch_max(size, Ordering::Relaxed);
    size <= MAX_ALLOCATION
}

#[global_allocator]
static ALLOCATOR: LimitedAlloc = LimitedAlloc;

/// The fuzz targets, by name (also the corpus folder names under `fuzz/corpus/`).
pub const TARGETS: &[&str] = &[
    "recipe",
    "safetensors_header",
    "pickle",
    "gguf",
    "ndarray_cache",
    "model_lib",
];

/// Run `target` on `data`. Returns whether the input was accepted (for statistics only).
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "recipe" => recipe(data),
        "safetensors_header" => safetensors_header(data),
        "pickle" => pickle(data),
        "gguf" => gguf(data),
        "ndarray_cache" => ndarray_cache(data),
        "model_lib" => model_lib(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// A recipe file (TOML with spans in its errors). Relative paths resolve against a folder that
/// does not exist, so nothing on this machine is read.
pub fn recipe(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    match mlcb::recipe::parse(text, "fuzz.toml", Path::new("/nonexistent-fuzz-base")) {
        Ok(r) => {
            let _ = (r.local_id(), r.source.describe());
            true
        }
        Err(e) => {
            let _ = format!("{e:#}");
            false
        }
    }
}

/// A whole `.safetensors` file: the 8-byte length, the JSON header, the data it describes.
pub fn safetensors_header(data: &[u8]) -> bool {
    match mlcb::formats::safetensors::parse_header(data, Path::new("fuzz.safetensors")) {
        Ok(h) => {
            // Every range the header yields must be readable from the same bytes.
            for &(s, e) in &h.ranges {
                assert!(
                    s <= e && e <= data.len(),
                    "range {s}..{e} outside {}",
                    data.len()
                );
            }
            true
        }
        Err(_) => false,
    }
}

/// A whole `torch.save` checkpoint: zip directory, `data.pkl` run by mlcb's pickle machine, state
/// dict checked against the storages. Inputs that are not zip archives go straight to the pickle
/// machine, so the fuzzer also reaches it without learning the zip format.
pub fn pickle(data: &[u8]) -> bool {
    if data.starts_with(b"PK\x03\x04") {
        let ok = mlcb::formats::pytorch::parse_checkpoint(data, Path::new("fuzz.bin")).is_ok();
        return ok;
    }
    match mlcb::formats::pytorch::pickle::load(data) {
        Ok(v) => {
            let _ = v.kind();
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

/// A whole GGUF file (header, metadata, tensor table; extents checked against the bytes).
pub fn gguf(data: &[u8]) -> bool {
    match mlcb::formats::gguf::reader::parse_header(data, Path::new("fuzz.gguf")) {
        Ok(h) => {
            for t in &h.tensors {
                let end = h.data_offset + t.offset + t.nbytes;
                assert!(
                    end <= data.len() as u64,
                    "tensor {} ends past the file",
                    t.name
                );
            }
            true
        }
        Err(_) => false,
    }
}

/// `params/ndarray-cache.json`.
pub fn ndarray_cache(data: &[u8]) -> bool {
    mlcb::formats::ndarray_cache::NdArrayCache::from_json(data, "fuzz/ndarray-cache.json").is_ok()
}

/// A model-library file (`.mlcblib`): header, execution plan, kernel table, then the runtime's
/// plan validation and the readable rendering (neither may panic on any plan).
pub fn model_lib(data: &[u8]) -> bool {
    match mlcb::formats::model_lib::ModelLibrary::from_bytes(data, "fuzz.mlcblib") {
        Ok(lib) => {
            for k in &lib.header.kernels {
                let _ = lib.kernel_bytes(k);
            }
            // What `mlcb run` does with a library before executing it, and `--debug-dump`'s view.
            let _ = mlcb::runtime::cpu::validate_plan(&lib.header.plan);
            let _ = mlcb::formats::model_lib::render::render_plan(&lib.header.plan);
            true
        }
        Err(_) => false,
    }
}
