//! What the tune stage needs from a local device, for every kernel language: a [`KernelTimer`]
//! that times one generated kernel, and the buffer sizes a kernel may touch when it runs alone.

use super::cuda::CudaKernel;
use super::tune_check::Written;
use super::wgsl::spec::{KernelSpec, MatrixSpec, MatrixStorage, Phase};
use super::wgsl::WgslKernel;

/// One candidate kernel, as the device's API loads it.
#[derive(Clone, Copy)]
pub enum TimedKernel<'a> {
    Wgsl(&'a WgslKernel),
    /// The generated source and its PTX (NVRTC output for the target's architecture).
    Cuda {
        kernel: &'a CudaKernel,
        ptx: &'a [u8],
    },
}

/// Times kernels on one local device (the tune stage's measurements; a GPU runtime implements it).
pub trait KernelTimer: Send {
    /// Vendor, device, driver and API of the device: the tuning database key.
    fn device_id(&self) -> String;
    /// Seconds per launch of `kernel` (a typical call: one token for decode kernels, a prompt
    /// block for prefill kernels), robust to noise (e.g. the median of several runs).
    fn time(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec) -> anyhow::Result<f64>;
    /// What `kernel` writes when it runs alone on the inputs of [`super::tune_check::probe_fill`],
    /// for the calls it is timed at: every buffer it writes but scratch, named by its launch
    /// name and the call. The tune stage compares a candidate's with the default configuration's
    /// ([`super::tune_check::disagreement`]) before timing it.
    fn probe(&mut self, kernel: TimedKernel<'_>, spec: &KernelSpec)
        -> anyhow::Result<Vec<Written>>;
}

/// Opens a timer on a local device that runs the kernels of the target preset named (and, for
/// cuda, of the architecture given), or `None` when there is none.
pub type TimerFactory = fn(&str, Option<&str>) -> anyhow::Result<Option<Box<dyn KernelTimer>>>;

/// Tokens of a timed prefill call.
pub const PREFILL_TOKENS: u64 = 16;
/// Tokens already in the KV cache when attention is timed.
pub const POSITION: u64 = 64;
/// A longer context at which the CUDA timer also times decode attention: how many blocks share a
/// head's keys (`kv_splits`) pays off with the context's length, and a split count chosen at 64
/// keys alone (seen on an H200: one block per head) is slow for a few hundred.
pub const LONG_POSITION: u64 = 512;
/// A longer prompt at which the CUDA timer also times prefill matmuls: a 16-token call fills one
/// 16-row mma tile of a GEMM block's 128 rows, which says nothing of how the f16 GEMM's warp
/// tilings (`cuda::gemm_f16::WarpTiles`, its candidates) compare on the full tiles of a real
/// prompt.
pub const LONG_PROMPT: u64 = 512;
/// KV-cache capacity of the timed state buffers.
pub const STATE_TOKENS: u64 = LONG_POSITION + PREFILL_TOKENS;

/// Tokens of a timed call of `spec` (signature `signature`): one for decode kernels.
pub fn timed_tokens(spec: &KernelSpec, signature: &str) -> u64 {
    match spec {
        KernelSpec::Matmul {
            phase: Phase::Decode,
            ..
        } => 1,
        _ if signature.starts_with("decode:") => 1,
        _ => PREFILL_TOKENS,
    }
}

/// Upper bound of the bytes an argument of `spec` with `role` ("weight", "state", "params",
/// activations otherwise) and weight `record` may touch in a timed call of at most `tokens`
/// tokens. Generous on purpose: kernels bound-check every access, so a larger buffer never
/// changes the work done.
pub fn buffer_bytes(spec: &KernelSpec, role: &str, record: Option<usize>, tokens: u64) -> u64 {
    let t = match spec {
        KernelSpec::Matmul {
            phase: Phase::Decode,
            ..
        } => 1,
        _ => PREFILL_TOKENS,
    }
    .max(tokens);
    let widest = widest(spec);
    let bytes = match role {
        // A matmul's vectors (bias, a fused norm's weight) are no longer than its widest row.
        "weight" => match spec {
            KernelSpec::Matmul { m, .. } | KernelSpec::Embedding { m } => {
                matrix_bytes(m, record.unwrap_or(0)).max(widest * 4)
            }
            _ => widest * 4,
        },
        "state" => STATE_TOKENS * widest * 4,
        _ => t * widest * 4,
    };
    bytes.max(16).next_multiple_of(16)
}

/// The widest row any buffer of `spec` has (qkv and gate/up rows included), in elements.
fn widest(spec: &KernelSpec) -> u64 {
    let w = match spec {
        KernelSpec::Matmul { m, .. } | KernelSpec::Embedding { m } => m.n.max(m.k),
        KernelSpec::RmsNorm { cols, .. }
        | KernelSpec::LayerNorm { cols, .. }
        | KernelSpec::SiluMul { cols }
        | KernelSpec::Unary { cols, .. }
        | KernelSpec::Binary { cols, .. } => 2 * cols,
        KernelSpec::Rotary {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        }
        | KernelSpec::Attention {
            n_q_heads,
            n_kv_heads,
            head_dim,
            ..
        } => (n_q_heads + 2 * n_kv_heads) * head_dim,
        KernelSpec::TokenShift { hidden, .. } | KernelSpec::Wkv { hidden, .. } => 5 * hidden,
    };
    w as u64
}

fn matrix_bytes(m: &MatrixSpec, record: usize) -> u64 {
    let (n, k) = (m.n as u64, m.k as u64);
    match m.storage {
        MatrixStorage::Raw(_) => n * k * 4,
        MatrixStorage::Quant(q) if record == 0 => n * (q.words_per_row as u64) * 4,
        MatrixStorage::Quant(q) => n * (q.n_group as u64) * 4,
    }
}
