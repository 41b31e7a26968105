//! The CPU backend: executes an execution plan with native kernels.
//!
//! [`CpuModel`] binds a plan to its weights (validated once); [`CpuSession`] holds one
//! conversation's state (KV cache or RWKV state, position) and runs `forward` calls.

mod exec;
pub mod kernels;
mod ops;
mod validate;

pub use exec::{forward_intercepting, CpuModel, CpuSession, InterceptedMatmul};
pub use validate::{validate_plan, validate_weights};

#[cfg(test)]
mod tests;
