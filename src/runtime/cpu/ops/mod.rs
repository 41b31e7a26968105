//! Native implementations of the plan's ops on f32 activations (matmuls go through `kernels`).
//! Every op is deterministic whatever the thread count: parallel work is split so each output
//! element is computed by one thread in a fixed order.

pub mod attention;
pub mod elementwise;
pub mod math;
pub mod norm;
pub mod rotary;
pub mod rwkv;

/// Below this many elements, elementwise work stays on the calling thread.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 14;
