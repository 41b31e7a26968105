//! GGUF (llama.cpp's single-file model format) as a model source.
//!
//! - [`reader`]: a bounded parser of the container (header, metadata, tensor table) over a memory map.
//! - [`value`]: metadata values; [`ggml_type`]: the tensor element types and their block layouts.
//! - [`dequant`]: ggml block formats → f32.
//! - [`source`]: [`GgufModel`], the file seen as a Hugging Face Llama checkpoint (names, shapes,
//!   `config.json`), including the inverse of llama.cpp's q/k row permutation.
//! - [`tokenizer`]: `tokenizer.json` / `tokenizer_config.json` rebuilt from `tokenizer.ggml.*`.

pub mod dequant;
pub mod ggml_type;
pub mod reader;
pub mod source;
pub mod tokenizer;
pub mod value;

#[cfg(test)]
mod smollm2_tests;
#[cfg(test)]
pub(crate) mod test_writer;

pub use ggml_type::GgmlType;
pub use reader::{GgufFile, GgufTensorInfo};
pub use source::GgufModel;
pub use value::{GgufArray, GgufValue};
