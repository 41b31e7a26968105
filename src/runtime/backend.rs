//! Which backend runs an artifact, and building a [`Session`] on it.
//!
//! The plan is backend-neutral data, so any backend this binary has can run any artifact; the
//! library's target only sets the default.

use crate::runtime::artifact::Artifact;
use crate::runtime::Session;
use crate::user_bail;
use anyhow::Result;

/// A runtime backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
}

/// Backends this binary can execute.
pub const AVAILABLE_DEVICES: &[Device] = &[Device::Cpu];

/// Backend names a library target may carry (`TargetInfo::backend`) or a user may ask for.
const KNOWN_BACKENDS: &[&str] = &["cpu", "cuda", "wgpu"];

impl Device {
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
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
/// returned value because sessions borrow the artifact's mapped weights.
pub fn with_session<R>(
    artifact: &Artifact,
    device: Device,
    f: impl FnOnce(&mut dyn Session) -> Result<R>,
) -> Result<R> {
    match device {
        Device::Cpu => cpu_session(artifact, f),
    }
}

/// Runs the plan with the native CPU kernels over the memory-mapped records.
fn cpu_session<R>(artifact: &Artifact, f: impl FnOnce(&mut dyn Session) -> Result<R>) -> Result<R> {
    let records = artifact.weight_records()?;
    let views = artifact.weight_views(&records);
    let model = crate::runtime::cpu::CpuModel::new(artifact.plan(), views)?;
    let mut session = model.session();
    f(&mut session)
}

impl Session for crate::runtime::cpu::CpuSession<'_> {
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>> {
        crate::runtime::cpu::CpuSession::forward(self, tokens, all_logits)
    }
    fn reset(&mut self) {
        crate::runtime::cpu::CpuSession::reset(self)
    }
    fn position(&self) -> usize {
        crate::runtime::cpu::CpuSession::position(self)
    }
    fn max_seq_len(&self) -> usize {
        crate::runtime::cpu::CpuSession::max_seq_len(self)
    }
}
