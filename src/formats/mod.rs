//! File formats mlcb reads and writes. Readers never trust a size field: every length is checked
//! against the file before anything is allocated.

pub mod dtype;
pub mod lfs;
pub mod model_lib;
pub mod ndarray_cache;
pub mod pytorch;
pub mod tensor;
