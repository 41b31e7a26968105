//! Fuzzing as a bounded smoke run on stable (no cargo-fuzz, no nightly): every file of the kept
//! corpora (`fuzz/corpus/<target>/`) goes through the same entry points as the cargo-fuzz targets,
//! then a deterministic mutation loop (seeded xorshift: byte flips, truncations, insertions, size
//! fields overwritten with huge values) runs a few thousand inputs per target.
//!
//! Each input must give `Ok` or an error, never a panic (caught and reported with the input saved
//! under target/fuzz-smoke-failures/), and no single allocation may exceed
//! `MAX_ALLOCATION` (the entry points' global allocator refuses it, which aborts this binary
//! loudly: "memory allocation of N bytes failed"). Set MLCB_FUZZ_SMOKE_ITERS to run longer.

#[path = "../fuzz/src/lib.rs"]
mod entries;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

const DEFAULT_ITERS: usize = 20000;

/// Size values a hostile header would claim.
const HUGE: &[u64] = &[
    u64::MAX,
    u64::MAX - 7,
    1_000_000_000_000_000, // 10^15
    1 << 40,
    1 << 32,
    u32::MAX as u64,
    i32::MAX as u64,
    i64::MAX as u64,
    0x8000_0000_0000_0000,
];

/// Decimal spellings of the same, for the text formats.
const HUGE_TEXT: &[&str] = &[
    "18446744073709551615",
    "1000000000000000",
    "99999999999999999999999999",
    "-1",
    "4294967296",
    "1e308",
    "0",
];

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// One to four mutations of `input`.
fn mutate(rng: &mut XorShift, input: &[u8], text: bool) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(if text { 8 } else { 7 }) {
            // Flip one bit.
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            // Random byte.
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            // Truncate.
            2 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            // Insert bytes (copied from elsewhere in the input or random).
            3 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            // A huge little-endian size at a random position (8 or 4 bytes).
            4 | 5 if v.len() >= 8 => {
                let huge = HUGE[rng.below(HUGE.len())];
                let width = if rng.below(2) == 0 { 8 } else { 4 };
                let i = rng.below(v.len() - width + 1);
                v[i..i + width].copy_from_slice(&huge.to_le_bytes()[..width]);
            }
            // A huge size where headers keep theirs: the first 32 bytes, 8-aligned.
            6 if v.len() >= 8 => {
                let huge = HUGE[rng.below(HUGE.len())];
                let slots = (v.len().min(32) - 8) / 4 + 1;
                let i = rng.below(slots) * 4;
                v[i..i + 8].copy_from_slice(&huge.to_le_bytes());
            }
            // Text: a run of digits becomes a huge or odd number.
            7 => {
                let starts: Vec<usize> = (0..v.len())
                    .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
                    .collect();
                if !starts.is_empty() {
                    let s = starts[rng.below(starts.len())];
                    let e = (s..v.len())
                        .find(|&i| !v[i].is_ascii_digit())
                        .unwrap_or(v.len());
                    let t = HUGE_TEXT[rng.below(HUGE_TEXT.len())];
                    v.splice(s..e, t.bytes());
                }
            }
            _ => {}
        }
    }
    v
}

/// Run one input; on a panic, save it and return a description.
fn check(target: &str, data: &[u8], what: &str) -> Option<String> {
    let r = catch_unwind(AssertUnwindSafe(|| entries::run(target, data)));
    if r.is_ok() {
        return None;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-smoke-failures");
    std::fs::create_dir_all(&dir).ok();
    let file = dir.join(format!(
        "{target}-{}",
        &blake3::hash(data).to_hex().as_str()[..16]
    ));
    std::fs::write(&file, data).ok();
    Some(format!(
        "{target}: {what} panicked; input saved as {}",
        file.display()
    ))
}

fn smoke(target: &str, text: bool, hostile: &[(&str, Vec<u8>)]) {
    let start = std::time::Instant::now();
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "{target}: empty corpus");
    let mut failures = Vec::new();
    let mut rejected_seeds = Vec::new();
    for (p, bytes) in &seeds {
        failures.extend(check(
            target,
            bytes,
            &format!("corpus file {}", p.display()),
        ));
        // Inputs libFuzzer found are named by their SHA-1 and are mostly invalid; the seeds
        // (real files and hand-made ones) must parse, or the targets would test only errors.
        let name = p.file_name().unwrap().to_string_lossy();
        let found_by_fuzzer = name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if !found_by_fuzzer && !entries::run(target, bytes) {
            rejected_seeds.push(name.into_owned());
        }
    }
    assert!(
        rejected_seeds.is_empty(),
        "{target}: seed files do not parse: {rejected_seeds:?}"
    );
    for (name, bytes) in hostile {
        let r = catch_unwind(AssertUnwindSafe(|| entries::run(target, bytes)));
        match r {
            Ok(accepted) => assert!(!accepted, "{target}: hostile input `{name}` was accepted"),
            Err(_) => failures.push(format!("{target}: hostile input `{name}` panicked")),
        }
    }
    let iters: usize = std::env::var("MLCB_FUZZ_SMOKE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITERS);
    // Seeded per target: the same inputs every run.
    let mut rng =
        XorShift(0x9E37_79B9_7F4A_7C15 ^ blake3::hash(target.as_bytes()).as_bytes()[0] as u64);
    for i in 0..iters {
        let (_, seed) = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed, text);
        failures.extend(check(target, &input, &format!("mutation #{i}")));
    }
    let largest = entries::LARGEST_ALLOCATION.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{target}: {} corpus files, {iters} mutations in {:.1}s; largest allocation so far {} KiB",
        seeds.len(),
        start.elapsed().as_secs_f64(),
        largest >> 10
    );
    assert!(largest <= entries::MAX_ALLOCATION);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

#[test]
fn recipe_parser() {
    smoke(
        "recipe",
        true,
        &[
            (
                "max_seq_len 10^15",
                b"quantization = \"q4f16_1\"\nmax_seq_len = 1000000000000000\n[model]\nname = \"m\"\nsource = \"x\"\n[target]\npreset = \"cpu\"\n".to_vec(),
            ),
            ("deep nesting", "a = ".bytes().chain(std::iter::repeat_n(b'[', 100_000)).collect()),
        ],
    );
}

#[test]
fn safetensors_header() {
    let mut claim = le64(1_000_000_000_000_000).to_vec();
    claim.extend_from_slice(b"{}      ");
    let mut shape = Vec::new();
    let h = br#"{"w":{"dtype":"F32","shape":[1000000000000000,1000000000000000],"data_offsets":[0,4]}}"#;
    shape.extend_from_slice(&le64(h.len() as u64));
    shape.extend_from_slice(h);
    shape.extend_from_slice(&[0; 4]);
    smoke(
        "safetensors_header",
        false,
        &[
            ("header length 10^15", claim),
            ("shape 10^30 elements", shape),
        ],
    );
}

#[test]
fn pickle_reader() {
    // BINUNICODE / BINBYTES8 / FRAME claiming huge lengths, then STOP.
    let mut unicode = vec![0x80, 2, b'X'];
    unicode.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut bytes8 = vec![0x80, 4, 0x8e];
    bytes8.extend_from_slice(&le64(1_000_000_000_000_000));
    let mut frame = vec![0x80, 4, 0x95];
    frame.extend_from_slice(&le64(1_000_000_000_000_000));
    frame.extend_from_slice(b"N.");
    // LONG4 with a huge byte count.
    let mut long4 = vec![0x80, 2, 0x8b];
    long4.extend_from_slice(&u32::MAX.to_le_bytes());
    smoke(
        "pickle",
        false,
        &[
            ("BINUNICODE 4 GiB", unicode),
            ("BINBYTES8 10^15", bytes8),
            ("FRAME 10^15", frame),
            ("LONG4 4 GiB", long4),
        ],
    );
}

#[test]
fn gguf_reader() {
    let mut counts = b"GGUF".to_vec();
    counts.extend_from_slice(&3u32.to_le_bytes());
    counts.extend_from_slice(&le64(1_000_000_000_000_000));
    counts.extend_from_slice(&le64(1_000_000_000_000_000));
    let mut key = b"GGUF".to_vec();
    key.extend_from_slice(&3u32.to_le_bytes());
    key.extend_from_slice(&le64(0));
    key.extend_from_slice(&le64(1));
    key.extend_from_slice(&le64(1_000_000_000_000_000));
    smoke(
        "gguf",
        false,
        &[("counts 10^15", counts), ("key length 10^15", key)],
    );
}

#[test]
fn ndarray_cache_json() {
    let huge = br#"{"metadata":{"ParamSize":1,"ParamBytes":0,"BitsPerParam":0},"records":[{"dataPath":"params_shard_0.bin","format":"raw-shard","nbytes":16,"blake3":"","records":[{"name":"w","shape":[1000000000000000,1000000000000000],"dtype":"float32","format":"raw","nbytes":16,"byteOffset":0}]}]}"#;
    let beyond = br#"{"metadata":{"ParamSize":1,"ParamBytes":0,"BitsPerParam":0},"records":[{"dataPath":"params_shard_0.bin","format":"raw-shard","nbytes":16,"blake3":"","records":[{"name":"w","shape":[4],"dtype":"float32","format":"raw","nbytes":16,"byteOffset":18446744073709551615}]}]}"#;
    smoke(
        "ndarray_cache",
        true,
        &[
            ("shape 10^30 elements", huge.to_vec()),
            ("offset u64::MAX", beyond.to_vec()),
        ],
    );
}

#[test]
fn model_library() {
    // Magic and version of a real library (the corpus holds some), then a huge header length.
    let mut lib = corpus("model_lib")[0].1[..16].to_vec();
    lib.extend_from_slice(&le64(1_000_000_000_000_000));
    lib.extend_from_slice(b"{}");
    smoke("model_lib", false, &[("header length 10^15", lib)]);
}

#[test]
fn every_target_has_a_corpus() {
    for t in entries::TARGETS {
        assert!(!corpus(t).is_empty(), "fuzz/corpus/{t} is empty");
    }
}
