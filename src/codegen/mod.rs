//! Code generation: kernel signatures of an execution plan, and (per kernel language, one folder
//! each) the kernels a target needs. The CPU target runs native Rust kernels, so its library
//! carries the plan and no kernel blobs.

pub mod signature;
