//! A tensor read from a weights file: name, dtype, shape and its little-endian bytes.
//!
//! Every reader (safetensors, PyTorch pickle, GGUF) hands tensors out through [`TensorSource`], one at
//! a time, so a stage holds a few tensors in memory, never the whole model.

use super::dtype::DType;
use anyhow::Result;
use half::{bf16, f16};
use std::borrow::Cow;

/// What a reader knows about a tensor before reading its data.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// A tensor with its data, row-major, little-endian.
#[derive(Debug, Clone)]
pub struct Tensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl<'a> Tensor<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn into_owned(self) -> Tensor<'static> {
        Tensor {
            dtype: self.dtype,
            shape: self.shape,
            data: Cow::Owned(self.data.into_owned()),
        }
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Tensor<'static> {
        Tensor {
            dtype: DType::F32,
            shape,
            data: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
        }
    }

    pub fn from_f16(shape: Vec<usize>, values: &[f16]) -> Tensor<'static> {
        let mut bytes = Vec::with_capacity(values.len() * 2);
        for v in values {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Tensor {
            dtype: DType::F16,
            shape,
            data: Cow::Owned(bytes),
        }
    }

    /// The values as f32, converted exactly (every f16/bf16 is representable in f32).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let d = &self.data;
        Ok(match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => anyhow::bail!("tensor of dtype {other} is not floating point"),
        })
    }
}

/// A set of named tensors that can be read one at a time.
pub trait TensorSource: Send + Sync {
    /// Every tensor, in file order.
    fn infos(&self) -> &[TensorInfo];
    /// Read one tensor's data. Borrowed from a memory map where the format allows.
    fn read(&self, name: &str) -> Result<Tensor<'_>>;

    /// A hint that `name` will not be read again soon: memory-mapped sources drop its pages from
    /// this process's resident set (the file stays in the page cache), so streaming a model
    /// tensor by tensor keeps the peak at a few tensors.
    fn release(&self, _name: &str) {}

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.infos().iter().find(|i| i.name == name)
    }
}
