//! Code generation: kernel signatures of an execution plan, and (per kernel language, one folder
//! each) the kernels a target needs. The CPU target runs native Rust kernels, so its library
//! carries the plan and no kernel blobs; the wgpu targets carry WGSL-derived kernels
//! ([`wgsl`] generates, [`gpu`] validates and cross-compiles).

pub mod cuda;
pub mod fuse;
pub mod gpu;
pub mod signature;
pub mod tune;
pub mod tune_check;
pub mod wgsl;

#[cfg(test)]
mod gpu_tests;
