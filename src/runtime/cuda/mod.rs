//! The CUDA backend: runs a library built for the cuda target on an NVIDIA GPU through the driver
//! API (cudarc, loaded at run time, so the binary runs without CUDA installed).
//!
//! [`driver`] finds the GPU (never panicking without one) and owns device resources; [`bind`]
//! matches each plan step with its PTX kernel and resolves the kernel's arguments from the launch
//! description codegen stored; [`exec`] uploads weights, keeps the KV cache / RWKV state on the
//! device and executes steps, replaying a captured CUDA graph for decode; [`timer`] times
//! candidate kernels for the tune stage.

mod bind;
pub mod driver;
#[cfg(test)]
mod emulate;
mod exec;
pub mod profile;
pub mod timer;

pub use exec::{CudaModel, CudaSession};
