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

/// The CPU executor (`runtime::cpu::CpuModel`) is written on another branch; until it is merged
/// this reports that it is missing.
fn cpu_session<R>(
    artifact: &Artifact,
    _f: impl FnOnce(&mut dyn Session) -> Result<R>,
) -> Result<R> {
    let _ = artifact.weight_records()?;
    anyhow::bail!("this mlcb build has no CPU plan executor yet (runtime::cpu::CpuModel)")
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
        for bad in ["cuda", "tpu"] {
            let e = resolve_device(&a, Some(bad)).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User);
            assert!(e.to_string().contains("runs: cpu"), "{e}");
        }
        a.library.header.target.backend = "wgpu".into();
        let e = resolve_device(&a, None).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("--device cpu"), "{e}");
        assert_eq!(resolve_device(&a, Some("cpu")).unwrap(), Device::Cpu);
    }
}
