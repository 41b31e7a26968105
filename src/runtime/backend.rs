//! Which backend runs an artifact, and building a [`Session`] on it.
//!
//! The plan is backend-neutral data, so any backend this binary has can run any artifact; the
//! library's target only sets the default.

use crate::runtime::artifact::Artifact;
use crate::runtime::cpu::{CpuModel, CpuSession};
use crate::runtime::Session;
use crate::user_bail;
use anyhow::Result;

/// A runtime backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// wgpu: Vulkan, Metal or DX12, running the library's GPU kernels.
    Wgpu,
    /// An NVIDIA GPU through the CUDA driver (needs a library built for the cuda target).
    Cuda,
}

/// Backends this binary can execute (cuda when the machine has a driver and a GPU).
pub const AVAILABLE_DEVICES: &[Device] = &[Device::Cpu, Device::Wgpu, Device::Cuda];

/// Backend names a library target may carry (`TargetInfo::backend`) or a user may ask for.
const KNOWN_BACKENDS: &[&str] = &["cpu", "cuda", "wgpu"];

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Wgpu => "wgpu",
            Device::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn available_names() -> String {
    AVAILABLE_DEVICES
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The device to run on: `requested` (the `--device` flag) if given, else the library's target
/// backend. A name this binary cannot run is a user error that lists the ones it can.
pub fn resolve_device(artifact: &Artifact, requested: Option<&str>) -> Result<Device> {
    let (name, origin) = match requested {
        Some(r) => (r.trim().to_ascii_lowercase(), "--device".to_string()),
        None => (
            artifact.library.header.target.backend.to_ascii_lowercase(),
            format!(
                "the library {} (built for target {})",
                artifact.library_path.display(),
                artifact.library.header.target.name
            ),
        ),
    };
    if let Some(d) = AVAILABLE_DEVICES.iter().find(|d| d.name() == name) {
        return Ok(*d);
    }
    if KNOWN_BACKENDS.contains(&name.as_str()) {
        user_bail!(
            "{origin} asks for the {name} backend, which this mlcb binary cannot run; it runs: {}. \
             Pass `--device cpu` (any artifact runs on the CPU)",
            available_names()
        );
    }
    user_bail!(
        "unknown device {name:?} from {origin}; this mlcb binary runs: {}",
        available_names()
    )
}

/// Builds a session for `artifact` on `device` and hands it to `f`. A closure rather than a
/// returned value because sessions borrow the artifact's mapped weights. `adapter` (the
/// `--adapter` flag) chooses a wgpu adapter by name; it is a user error with another device.
pub fn with_session<R>(
    artifact: &Artifact,
    device: Device,
    adapter: Option<&str>,
    f: impl FnOnce(&mut dyn Session) -> Result<R>,
) -> Result<R> {
    match device {
        Device::Cpu => {
            if let Some(a) = adapter {
                user_bail!("--adapter {a:?} chooses a wgpu adapter; it needs `--device wgpu`");
            }
            cpu_session(artifact, f)
        }
        Device::Wgpu => wgpu_session(artifact, adapter, f),
        Device::Cuda => {
            if let Some(a) = adapter {
                user_bail!("--adapter {a:?} chooses a wgpu adapter; it needs `--device wgpu`");
            }
            cuda_session(artifact, f)
        }
    }
}

/// Opens the adapter (reported on stderr), uploads the weights and runs `f` on a fresh session.
fn wgpu_session<R>(
    artifact: &Artifact,
    adapter: Option<&str>,
    f: impl FnOnce(&mut dyn Session) -> Result<R>,
) -> Result<R> {
    let target = &artifact.library.header.target;
    if artifact.library.header.kernels.is_empty() {
        user_bail!(
            "{} was built for target {}, which carries no GPU kernels; build the model for a GPU \
             target (vulkan, webgpu, …) to run it with `--device wgpu`, or use `--device cpu`",
            artifact.library_path.display(),
            target.name
        );
    }
    let ctx = crate::runtime::gpu::open(
        crate::runtime::gpu::adapter::preferred_backend(&target.name),
        adapter,
    )?;
    eprintln!("mlcb: wgpu adapter: {}", ctx.description());
    let records = artifact.weight_records()?;
    let mut session = crate::runtime::gpu::GpuSession::new(ctx, &artifact.library, &records)?;
    f(&mut session)
}

impl Session for crate::runtime::gpu::GpuSession {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        crate::runtime::gpu::GpuSession::forward(self, tokens, all_logits)
    }
    fn reset(&mut self) {
        crate::runtime::gpu::GpuSession::reset(self)
    }
    fn position(&self) -> usize {
        crate::runtime::gpu::GpuSession::position(self)
    }
    fn max_seq_len(&self) -> usize {
        crate::runtime::gpu::GpuSession::max_seq_len(self)
    }
}

/// Opens GPU 0 (reported on stderr), uploads the plan's weights and runs `f` on a fresh CUDA
/// session. The library must carry PTX kernels (target cuda); no driver or no GPU is an
/// environment error (exit 3).
fn cuda_session<R>(
    artifact: &Artifact,
    f: impl FnOnce(&mut dyn Session) -> Result<R>,
) -> Result<R> {
    use crate::runtime::cuda::{driver, CudaModel};
    let lib = &artifact.library;
    if !lib.header.kernels.iter().any(|k| k.language == "ptx") {
        user_bail!(
            "the library {} was built for target {}, which carries no CUDA kernels; rebuild it with `--target cuda`, or run it with `--device cpu` (any artifact runs on the CPU)",
            artifact.library_path.display(),
            lib.header.target.name,
        );
    }
    let plan = artifact.plan();
    crate::runtime::cpu::validate_plan(plan)?;
    let records = artifact.weight_records()?;
    let views = artifact.weight_views(&records);
    crate::runtime::cpu::validate_weights(plan, &views)?;
    let device = driver::open_device()?;
    eprintln!("mlcb: cuda device: {} (sm_{})", device.name, device.sm);
    let model = CudaModel::new(device, lib, &views)?;
    let mut session = CudaAdapter {
        inner: model.session()?,
        max_seq_len: plan.max_seq_len,
    };
    f(&mut session)
}

/// [`Session`] over the CUDA executor's session.
struct CudaAdapter<'m> {
    inner: crate::runtime::cuda::CudaSession<'m>,
    max_seq_len: usize,
}

impl Session for CudaAdapter<'_> {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.inner.forward(tokens, all_logits)
    }
    fn reset(&mut self) {
        // A failed state reset surfaces as an error on the next forward (the stream is broken).
        let _ = self.inner.reset();
    }
    fn position(&self) -> usize {
        self.inner.position()
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
}

/// Binds the plan to the mapped weights and runs `f` on a fresh CPU session.
fn cpu_session<R>(artifact: &Artifact, f: impl FnOnce(&mut dyn Session) -> Result<R>) -> Result<R> {
    let records = artifact.weight_records()?;
    let views = artifact.weight_views(&records);
    let model = CpuModel::new(artifact.plan(), views)?;
    let mut session = CpuAdapter {
        inner: model.session(),
        max_seq_len: artifact.plan().max_seq_len,
    };
    f(&mut session)
}

/// [`Session`] over the CPU executor's session.
struct CpuAdapter<'m> {
    inner: CpuSession<'m>,
    max_seq_len: usize,
}

impl Session for CpuAdapter<'_> {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        self.inner.forward(tokens, all_logits)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn position(&self) -> usize {
        self.inner.position()
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::runtime::artifact::tests::write_tiny_artifact;

    #[test]
    fn device_defaults_to_the_target_and_refuses_what_it_cannot_run() {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let mut a = Artifact::open(tmp.path()).unwrap();
        assert_eq!(resolve_device(&a, None).unwrap(), Device::Cpu);
        assert_eq!(resolve_device(&a, Some("CPU")).unwrap(), Device::Cpu);
        assert_eq!(resolve_device(&a, Some("cuda")).unwrap(), Device::Cuda);
        let e = resolve_device(&a, Some("tpu")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("runs: cpu, wgpu, cuda"), "{e}");
        a.library.header.target.backend = "wgpu".into();
        assert_eq!(resolve_device(&a, None).unwrap(), Device::Wgpu);
        assert_eq!(resolve_device(&a, Some("cpu")).unwrap(), Device::Cpu);
        a.library.header.target.backend = "cuda".into();
        assert_eq!(resolve_device(&a, None).unwrap(), Device::Cuda);
        a.library.header.target.backend = "tpu".into();
        let e = resolve_device(&a, None).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("unknown device"), "{e}");
        // A CPU library has no kernels for the GPU; --adapter needs the wgpu device.
        let e = with_session(&a, Device::Wgpu, None, |_| Ok(())).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("no GPU kernels"), "{e}");
        let e = with_session(&a, Device::Cpu, Some("llvmpipe"), |_| Ok(())).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
    }

    /// Logits of the tiny plan computed by hand: RMSNorm of the embedding row, times the head.
    fn expected_logits(weights: &[(String, Vec<f32>)], token: u32) -> Vec<f32> {
        use crate::runtime::artifact::tests::{HIDDEN, VOCAB};
        let (embed, norm, head) = (&weights[0].1, &weights[1].1, &weights[2].1);
        let x = &embed[token as usize * HIDDEN..(token as usize + 1) * HIDDEN];
        let ms = x.iter().map(|v| v * v).sum::<f32>() / HIDDEN as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        let y: Vec<f32> = x.iter().zip(norm).map(|(a, w)| a * inv * w).collect();
        (0..VOCAB)
            .map(|v| (0..HIDDEN).map(|k| y[k] * head[v * HIDDEN + k]).sum())
            .collect()
    }

    #[test]
    fn cpu_session_runs_the_synthetic_artifact() {
        use crate::runtime::artifact::tests::VOCAB;
        let tmp = tempfile::tempdir().unwrap();
        let weights = write_tiny_artifact(tmp.path());
        let a = Artifact::open(tmp.path()).unwrap();
        let ids = [1u32, 4, 2];
        let (all, last, pos, cap) = with_session(&a, Device::Cpu, None, |s| {
            let all = crate::cli::logits::all_logits(s, &ids, VOCAB)?;
            s.reset();
            let last = s.forward(&ids, false)?;
            Ok((all, last, s.position(), s.max_seq_len()))
        })
        .unwrap();
        assert_eq!((pos, cap), (3, 16));
        assert_eq!(all.len(), ids.len() * VOCAB);
        for (t, &id) in ids.iter().enumerate() {
            let want = expected_logits(&weights, id);
            for (g, w) in all[t * VOCAB..(t + 1) * VOCAB].iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "position {t}: {g} vs {w}");
            }
        }
        assert_eq!(last, all[2 * VOCAB..]);
    }
}
