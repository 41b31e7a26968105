//! A minimal GGUF writer for tests only: synthetic files with chosen metadata and tensors.

use super::ggml_type::GgmlType;
use super::value::{type_id, GgufArray, GgufValue};

pub struct TensorSpec {
    pub name: String,
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    pub data: Vec<u8>,
}

impl TensorSpec {
    /// An F32 tensor with ggml dims `ne` (ne[0] innermost) and values in memory order.
    pub fn f32(name: &str, ne: &[u64], values: &[f32]) -> TensorSpec {
        TensorSpec::raw(
            name,
            ne,
            GgmlType::F32,
            bytemuck::cast_slice(values).to_vec(),
        )
    }

    pub fn raw(name: &str, ne: &[u64], ggml_type: GgmlType, data: Vec<u8>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            ne: ne.to_vec(),
            ggml_type,
            data,
        }
    }
}

pub struct GgufWriter {
    pub version: u32,
    pub kvs: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorSpec>,
}

impl GgufWriter {
    pub fn new(version: u32) -> GgufWriter {
        GgufWriter {
            version,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn kv(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.kvs.push((key.into(), value));
        self
    }

    pub fn tensor(&mut self, t: TensorSpec) -> &mut Self {
        self.tensors.push(t);
        self
    }

    fn alignment(&self) -> usize {
        self.kvs
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(32) as usize
    }

    /// The file's bytes. Padding follows the header only when there are tensors.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment().max(1);
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut b, k);
            b.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            put_str(&mut b, &t.name);
            b.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            b.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(align) * align;
        }
        if self.tensors.is_empty() {
            return b;
        }
        b.resize(b.len().div_ceil(align) * align, 0);
        let data_start = b.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            b.resize(data_start + off, 0);
            b.extend_from_slice(&t.data);
        }
        b
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    use type_id as t;
    match v {
        GgufValue::U8(_) => t::U8,
        GgufValue::I8(_) => t::I8,
        GgufValue::U16(_) => t::U16,
        GgufValue::I16(_) => t::I16,
        GgufValue::U32(_) => t::U32,
        GgufValue::I32(_) => t::I32,
        GgufValue::U64(_) => t::U64,
        GgufValue::I64(_) => t::I64,
        GgufValue::F32(_) => t::F32,
        GgufValue::F64(_) => t::F64,
        GgufValue::Bool(_) => t::BOOL,
        GgufValue::String(_) => t::STRING,
        GgufValue::Array(_) => t::ARRAY,
    }
}

fn put_value(b: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => b.push(*x),
        GgufValue::I8(x) => b.push(*x as u8),
        GgufValue::U16(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => b.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => b.push(*x as u8),
        GgufValue::String(s) => put_str(b, s),
        GgufValue::Array(a) => put_array(b, a),
    }
}

fn put_array(b: &mut Vec<u8>, a: &GgufArray) {
    use type_id as t;
    macro_rules! each {
        ($ty:expr, $v:expr, |$x:ident| $body:expr) => {{
            b.extend_from_slice(&($ty as u32).to_le_bytes());
            b.extend_from_slice(&($v.len() as u64).to_le_bytes());
            for $x in $v {
                $body;
            }
        }};
    }
    match a {
        GgufArray::U8(v) => each!(t::U8, v, |x| b.push(*x)),
        GgufArray::I8(v) => each!(t::I8, v, |x| b.push(*x as u8)),
        GgufArray::U16(v) => each!(t::U16, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => each!(t::I16, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => each!(t::U32, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => each!(t::I32, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U64(v) => each!(t::U64, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => each!(t::I64, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => each!(t::F32, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => each!(t::F64, v, |x| b.extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => each!(t::BOOL, v, |x| b.push(*x as u8)),
        GgufArray::String(v) => each!(t::STRING, v, |x| put_str(b, x)),
        GgufArray::Array(v) => each!(t::ARRAY, v, |x| put_array(b, x)),
    }
}
