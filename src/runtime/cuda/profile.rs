//! `MLCB_CUDA_PROFILE=1`: where a forward call's GPU time goes, kernel by kernel.
//!
//! The session then launches every kernel on its own (no CUDA graph) between two CUDA events and
//! adds each kernel's GPU time to its signature's row; when the session ends, a table goes to
//! stderr: per phase, the calls, the kernels per call, the kernel time per call (the sum of the
//! kernels alone: what graph replay could approach if the gaps between kernels were free), and per
//! signature its share, time and launches per call, the weight bytes it read per second and, for
//! matmuls and attention, the arithmetic it did per second (multiply-adds count 2). The
//! gap between the kernel time per call and `mlcb bench`'s time per token (graph replay) is what
//! launches and inter-kernel gaps cost; a GEMV row far below the device's bandwidth is a kernel to
//! tune or rewrite.

use crate::formats::model_lib::plan::{Op, Plan};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Floating-point operations (a multiply-add counts 2) of the matmuls and attention of `op` over
/// `t` tokens at positions `pos..pos + t`, whose logits cover `rows` rows; 0 for other ops.
pub fn op_flops(plan: &Plan, op: &Op, t: usize, pos: usize, rows: usize) -> f64 {
    let matrix = |w: usize| plan.weights[w].shape.iter().product::<usize>() as f64;
    match op {
        Op::Matmul { weight, .. } => 2.0 * t as f64 * matrix(*weight),
        Op::Logits { weight, .. } => 2.0 * rows as f64 * matrix(*weight),
        Op::Attention {
            n_q_heads,
            head_dim,
            ..
        } => {
            // Row i scores and sums pos + i + 1 keys: q·k and p·v, head_dim multiply-adds each.
            let keys: f64 = (0..t).map(|i| (pos + i + 1) as f64).sum();
            4.0 * keys * (*n_q_heads * *head_dim) as f64
        }
        _ => 0.0,
    }
}

/// The environment variable that turns profiling on.
pub const PROFILE_ENV: &str = "MLCB_CUDA_PROFILE";

/// Whether profiling is on (`MLCB_CUDA_PROFILE` set to anything but `0` or empty).
pub fn enabled() -> bool {
    std::env::var(PROFILE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Row {
    launches: u64,
    seconds: f64,
    weight_bytes: u64,
    flops: f64,
}

/// Kernel times of one session, by phase and signature.
#[derive(Debug, Default)]
pub struct KernelProfile {
    /// phase → signature → totals.
    rows: BTreeMap<&'static str, BTreeMap<String, Row>>,
    /// phase → forward calls.
    calls: BTreeMap<&'static str, u64>,
}

impl KernelProfile {
    /// One forward call of `phase` ended.
    pub fn call(&mut self, phase: &'static str) {
        *self.calls.entry(phase).or_default() += 1;
    }

    /// One launch of `signature` took `seconds`, read `weight_bytes` of weights and did `flops`
    /// floating-point operations (0 where not counted).
    pub fn add(
        &mut self,
        phase: &'static str,
        signature: &str,
        seconds: f64,
        weight_bytes: u64,
        flops: f64,
    ) {
        let row = self
            .rows
            .entry(phase)
            .or_default()
            .entry(signature.to_string())
            .or_default();
        row.launches += 1;
        row.seconds += seconds;
        row.weight_bytes += weight_bytes;
        row.flops += flops;
    }

    /// The table (empty when nothing ran).
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (phase, rows) in &self.rows {
            let calls = self.calls.get(phase).copied().unwrap_or(0).max(1) as f64;
            let total: f64 = rows.values().map(|r| r.seconds).sum();
            let launches: u64 = rows.values().map(|r| r.launches).sum();
            let _ = writeln!(
                out,
                "  {phase}: {calls} calls, {:.0} kernels per call, kernel time {:.3} ms per call",
                launches as f64 / calls,
                total / calls * 1e3
            );
            let _ = writeln!(
                out,
                "    {:>6} {:>10} {:>8} {:>12} {:>8}  signature",
                "share", "ms/call", "per call", "weights GB/s", "TFLOP/s"
            );
            let mut sorted: Vec<(&String, &Row)> = rows.iter().collect();
            sorted.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(a.0.cmp(b.0)));
            for (sig, r) in sorted {
                let rate = |amount: f64, unit: f64, digits: usize| {
                    if amount > 0.0 && r.seconds > 0.0 {
                        format!("{:.digits$}", amount / r.seconds / unit)
                    } else {
                        "-".into()
                    }
                };
                let _ = writeln!(
                    out,
                    "    {:>5.1}% {:>10.4} {:>8.0} {:>12} {:>8}  {sig}",
                    100.0 * r.seconds / total.max(f64::MIN_POSITIVE),
                    r.seconds / calls * 1e3,
                    r.launches as f64 / calls,
                    rate(r.weight_bytes as f64, 1e9, 0),
                    rate(r.flops, 1e12, 1)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmuls_and_attention_count_their_multiply_adds() {
        let plan = crate::model::testing::lowered_plan("tiny-llama", "llama", "q4f16_1", 32);
        let find = |f: &dyn Fn(&Op) -> bool| plan.prefill.iter().find(|op| f(op)).unwrap();
        let mm = find(&|op| matches!(op, Op::Matmul { .. }));
        let Op::Matmul { weight, .. } = mm else {
            unreachable!()
        };
        let [n, k] = plan.weights[*weight].shape[..] else {
            panic!("a matrix")
        };
        assert_eq!(op_flops(&plan, mm, 3, 5, 1), (2 * 3 * n * k) as f64);
        let logits = find(&|op| matches!(op, Op::Logits { .. }));
        let v = plan.vocab_size * plan.hidden_size;
        assert_eq!(op_flops(&plan, logits, 3, 5, 1), (2 * v) as f64);
        assert_eq!(op_flops(&plan, logits, 3, 5, 3), (6 * v) as f64);
        let att = find(&|op| matches!(op, Op::Attention { .. }));
        let Op::Attention {
            n_q_heads,
            head_dim,
            ..
        } = att
        else {
            unreachable!()
        };
        // Rows at positions 5, 6, 7 see 6 + 7 + 8 keys.
        let want = 4 * (6 + 7 + 8) * n_q_heads * head_dim;
        assert_eq!(op_flops(&plan, att, 3, 5, 1), want as f64);
        let norm = find(&|op| matches!(op, Op::RmsNorm { .. }));
        assert_eq!(op_flops(&plan, norm, 3, 5, 1), 0.0);
    }

    #[test]
    fn the_report_ranks_signatures_per_phase() {
        let mut p = KernelProfile::default();
        assert_eq!(p.report(), "");
        for _ in 0..2 {
            for _ in 0..3 {
                p.add("decode", "decode:matmul[a]", 1e-4, 400_000_000, 0.0);
            }
            p.add("decode", "decode:rms_norm[8]", 5e-5, 0, 0.0);
            p.call("decode");
        }
        p.add("prefill", "prefill:matmul[a]", 2e-3, 1_000_000, 6e11);
        p.call("prefill");
        let r = p.report();
        assert!(
            r.contains("decode: 2 calls, 4 kernels per call, kernel time 0.350 ms per call"),
            "{r}"
        );
        // 3 launches of 0.1 ms per call, 4 GB/ms... = 4000 GB/s; listed before the norm.
        assert!(
            r.contains("85.7%     0.3000        3         4000        -  decode:matmul[a]"),
            "{r}"
        );
        assert!(
            r.contains("14.3%     0.0500        1            -        -  decode:rms_norm[8]"),
            "{r}"
        );
        // 6e11 flops in 2 ms.
        assert!(
            r.contains("100.0%     2.0000        1            0    300.0  prefill:matmul[a]"),
            "{r}"
        );
        assert!(r.find("decode:matmul[a]") < r.find("decode:rms_norm[8]"));
        assert!(r.contains("prefill: 1 calls, 1 kernels per call"), "{r}");
    }
}
