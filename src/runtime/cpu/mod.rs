//! The CPU backend: executes an execution plan with native kernels.

pub mod kernels;
