//! The wgpu backend: runs a GPU-target library's kernels (SPIR-V for vulkan/android, WGSL for
//! webgpu and, beside their MSL, for the metal targets) on whatever wgpu finds — Vulkan (lavapipe
//! on a machine without a GPU), Metal, DX12.
//!
//! [`adapter`] chooses and opens the device, [`kernels`] turns the library's kernels into compute
//! pipelines, [`bind`] maps each kernel binding onto the op it runs for, and [`GpuSession`] holds
//! the persistent device buffers and executes `forward` calls, one submit each.

pub mod adapter;
pub mod bind;
pub mod kernels;
mod session;
pub mod timer;

pub use adapter::{open, GpuContext};
pub use session::GpuSession;
