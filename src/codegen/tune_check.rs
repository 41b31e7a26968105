//! The tune stage's check that a candidate configuration computes what the default one does.
//!
//! Why: tuning must never change what a kernel computes beyond floating-point reassociation, but
//! a candidate is another kernel (a weight ring, split-K, warpgroup MMA, other tilings), and the
//! tests run each kind in an emulator, not on the GPU that tunes: a race, a missing fence or a
//! fragment layout the emulator reads differently from the hardware would give a kernel that is
//! fast and wrong, and timing alone would pick it. So before a candidate is timed, the device runs
//! it once on the same deterministic inputs as the signature's default configuration
//! ([`probe_fill`]), reads back every buffer it writes ([`read_values`]), and a candidate whose
//! results are not the default's within [`AGREE_TOL`] ([`disagreement`]) is not used.
//!
//! The inputs: every floating-point element uniform in ±[`PROBE_SCALE`] (activations, scales,
//! raw weights, norm weights, caches), integer codes as random bits (every 16-bit half of them an
//! f16 of that range, so data read either way are finite), token ids and scratch zero (valid ids;
//! a scratch starts zeroed, as at a kernel's first launch). The scale keeps an f16 kernel's
//! results inside f16's range: with 8-bit codes (values up to 128 scales) over 11,008 inputs,
//! then a SiLU gate, outputs stay in the thousands.

use rayon::prelude::*;

/// Magnitude of every floating-point input of a probe launch.
pub const PROBE_SCALE: f32 = 1.0 / 16.0;

/// A candidate agrees when, in every buffer it writes, `max |candidate − default|` is at most
/// this fraction of `max |default|`. Reassociation differs by a few f16 rounding steps (~1e-3 of
/// the largest value at most, as the GPU checks' f16 tolerance has it); a kernel that reads the
/// wrong data, or data before they land, differs by the values themselves.
pub const AGREE_TOL: f32 = 1e-2;

/// Bytes for one buffer of a probe launch: `role` and `elem` as the kernel's launch names them
/// ("tokens" and "scratch" roles are zero; `elem` "f32" or "bf16" elements are values of their
/// type; anything else, 16-bit halves that are f16 values), from a stream seeded by the buffer's
/// `name`, so every candidate of a signature reads the same inputs.
pub fn probe_fill(role: &str, elem: &str, name: &str, bytes: usize) -> Vec<u8> {
    if matches!(role, "tokens" | "scratch") {
        return vec![0; bytes];
    }
    let seed = u64::from_le_bytes(
        blake3::hash(name.as_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap(),
    );
    let size = if elem == "f32" { 4 } else { 2 };
    let mut out = vec![0u8; bytes.next_multiple_of(size)];
    // Element i's value depends on i alone (a counter-based stream), so the chunks fill in
    // parallel (a 7B head's codes are 65 MB) and the bytes never depend on the thread count.
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, e) in chunk.chunks_exact_mut(size).enumerate() {
                let v = uniform(seed, (c * CHUNK + j) as u64) * PROBE_SCALE;
                match elem {
                    "f32" => e.copy_from_slice(&v.to_le_bytes()),
                    "bf16" => e.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    _ => e.copy_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                }
            }
        });
    out.truncate(bytes);
    out
}

/// The values of a buffer a probe launch wrote, read as its `elem` ("f32", "f16", "bf16"; other
/// element types as unsigned 32-bit integers, exact up to 2^24).
pub fn read_values(elem: &str, bytes: &[u8]) -> Vec<f32> {
    match elem {
        "f32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        "f16" => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "bf16" => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
    }
}

/// One buffer a probe launch wrote (its launch name and values).
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub name: String,
    pub values: Vec<f32>,
}

/// Why `candidate`'s results are not `reference`'s (the default configuration's), or `None`
/// when they agree: every buffer the default writes must be written by the candidate, finite
/// where the default's is (and only there), and within [`AGREE_TOL`] of it.
pub fn disagreement(reference: &[Written], candidate: &[Written]) -> Option<String> {
    for r in reference {
        let Some(c) = candidate.iter().find(|c| c.name == r.name) else {
            return Some(format!("it does not write {}", r.name));
        };
        if c.values.len() != r.values.len() {
            return Some(format!(
                "{}: {} values against {}",
                r.name,
                c.values.len(),
                r.values.len()
            ));
        }
        let mut scale = 0.0f32;
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (&a, &b)) in r.values.iter().zip(&c.values).enumerate() {
            if a.is_finite() != b.is_finite() {
                return Some(format!("{}[{i}]: {b} where the default gives {a}", r.name));
            }
            if a.is_finite() {
                scale = scale.max(a.abs());
                let d = (a - b).abs();
                if d > worst {
                    (worst, at) = (d, i);
                }
            }
        }
        if worst > AGREE_TOL * scale {
            return Some(format!(
                "{}[{at}]: {} where the default gives {} (max |default| {scale})",
                r.name, c.values[at], r.values[at]
            ));
        }
    }
    None
}

/// Element `i` of the stream seeded `seed`, uniform in [-1, 1) on a grid of 2^-23: splitmix64's
/// output function (Steele, Lea, Flood 2014) at its `i + 1`-th state, a well-mixed value per
/// index; a probe's inputs only need to be the same for every candidate and far from degenerate.
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_inputs_are_finite_in_range_and_the_same_for_every_candidate() {
        for elem in ["f32", "f16", "bf16", "u32", "u16"] {
            let bytes = probe_fill("weight", elem, "w_q", 4098);
            assert_eq!(bytes.len(), 4098);
            assert_eq!(bytes, probe_fill("activation", elem, "w_q", 4098));
            assert_ne!(bytes, probe_fill("weight", elem, "w_s", 4098), "{elem}");
            let values = match elem {
                "f32" | "bf16" => read_values(elem, &bytes),
                // Codes: each 16-bit half is an f16 (so also finite read as f16 pairs).
                _ => read_values("f16", &bytes),
            };
            assert!(values
                .iter()
                .all(|v| v.is_finite() && v.abs() <= PROBE_SCALE));
            // Not degenerate: both signs, spread over the range.
            let max = values.iter().fold(0.0f32, |m, v| m.max(*v));
            let min = values.iter().fold(0.0f32, |m, v| m.min(*v));
            assert!(
                max > 0.9 * PROBE_SCALE && min < -0.9 * PROBE_SCALE,
                "{elem}"
            );
        }
        // The same bytes on any number of threads (several chunks of the parallel fill).
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let big = 3 * (1 << 15) + 6;
        assert_eq!(
            one.install(|| probe_fill("weight", "u32", "w_q", big)),
            probe_fill("weight", "u32", "w_q", big)
        );
        assert!(probe_fill("tokens", "u32", "ids", 64)
            .iter()
            .all(|&b| b == 0));
        assert!(probe_fill("scratch", "f32", "part", 64)
            .iter()
            .all(|&b| b == 0));
    }

    fn written(name: &str, values: &[f32]) -> Vec<Written> {
        vec![Written {
            name: name.into(),
            values: values.to_vec(),
        }]
    }

    #[test]
    fn reassociation_agrees_and_wrong_results_do_not() {
        let r = written("out", &[10.0, -4.0, 0.5, 0.0]);
        assert_eq!(disagreement(&r, &r), None);
        // A few rounding steps of the largest value.
        assert_eq!(
            disagreement(&r, &written("out", &[10.01, -4.0, 0.49, 0.0])),
            None
        );
        // One element off by a tenth of the largest: a wrong kernel.
        let why = disagreement(&r, &written("out", &[10.0, -4.0, 1.5, 0.0])).unwrap();
        assert!(
            why.contains("out[2]: 1.5 where the default gives 0.5"),
            "{why}"
        );
        // Non-finite where the default is finite, a missing buffer, a short one.
        assert!(disagreement(&r, &written("out", &[10.0, f32::NAN, 0.5, 0.0])).is_some());
        assert!(disagreement(&r, &written("other", &[10.0, -4.0, 0.5, 0.0])).is_some());
        assert!(disagreement(&r, &written("out", &[10.0, -4.0, 0.5])).is_some());
        // Infinities where the default has them are the same result.
        let inf = written("out", &[f32::INFINITY, 1.0]);
        assert_eq!(disagreement(&inf, &inf), None);
        // An all-zero default: the candidate must be zero too.
        let zero = written("out", &[0.0, 0.0]);
        assert!(disagreement(&zero, &written("out", &[0.0, 1e-3])).is_some());
    }

    #[test]
    fn written_values_are_read_as_their_type() {
        let f = 1.5f32.to_le_bytes();
        assert_eq!(read_values("f32", &f), [1.5]);
        let h = half::f16::from_f32(-2.0).to_le_bytes();
        assert_eq!(read_values("f16", &h), [-2.0]);
        let b = half::bf16::from_f32(3.0).to_le_bytes();
        assert_eq!(read_values("bf16", &b), [3.0]);
        assert_eq!(read_values("u32", &7u32.to_le_bytes()), [7.0]);
    }
}
