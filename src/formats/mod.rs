//! File formats mlcb reads and writes. Readers never trust a size field: every length is checked
//! against the file before anything is allocated.

pub mod dtype;
pub mod gguf;
pub mod model_lib;
pub mod ndarray_cache;
pub mod tensor;
