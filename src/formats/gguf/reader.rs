//! A bounded GGUF v2/v3 parser over a memory map.
//!
//! Layout (all little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count,
//! the metadata key/value pairs, the tensor infos (name, u32 n_dims, u64 ne[n_dims], u32 ggml type,
//! u64 offset), padding up to `general.alignment` (default 32), then the data section; each tensor's
//! offset is relative to the data section. Every count and length read from the file is checked
//! against the bytes left before anything is allocated, and every tensor's extent against the file,
//! so a corrupt or hostile header is a user error, never a huge allocation or a panic.

use super::ggml_type::GgmlType;
use super::value::{type_id, GgufArray, GgufValue};
use crate::error::{env, user};
use anyhow::Result;
use memmap2::Mmap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Nested arrays are legal in the spec but unused in practice; bound the recursion.
const MAX_ARRAY_DEPTH: usize = 4;

/// One tensor of the file, as its header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml dimensions: `ne[0]` is the fastest-varying (innermost) one.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data, relative to the data section.
    pub offset: u64,
    /// Size of the data in bytes (checked to lie inside the file).
    pub nbytes: u64,
}

impl GgufTensorInfo {
    pub fn numel(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The row-major shape (outermost first), i.e. `ne` reversed, as PyTorch would hold it.
    pub fn row_major_shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: parsed header plus the memory map its tensors are read from.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_len", &self.metadata.len())
            .field("tensors_len", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Open and parse `path`. A missing file or a malformed header is a user error naming the file;
    /// other I/O failures are environment errors.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                user(format!("GGUF file {} does not exist", path.display()))
            } else {
                env(format!("cannot open GGUF file {}: {e}", path.display()))
            }
        })?;
        // SAFETY: the map is read-only; mlcb never writes the file while it is open. A concurrent
        // external writer could change the bytes, which at worst yields wrong values or a checked
        // error, since every access is bounds-checked against the map's length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| {
            env(format!(
                "cannot memory-map GGUF file {}: {e}",
                path.display()
            ))
        })?;
        let header = parse_header(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    /// `general.alignment`, or 32 when absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    /// The raw bytes of a tensor of this file (its extent was checked at open).
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.nbytes as usize]
    }

    /// A required metadata value: a user error naming the key and the file when absent.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| {
            user(format!(
                "GGUF file {} lacks the metadata key `{key}`",
                self.path.display()
            ))
        })
    }

    /// A required non-negative integer (any integer type).
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.bad_type(key, v, "a non-negative integer"))
    }

    /// An optional non-negative integer; present with another type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, v, "a non-negative integer")),
        }
    }

    /// An optional number (float or integer).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, v, "a number")),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, v, "a string")),
        }
    }

    /// An optional bool.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad_type(key, v, "a bool")),
        }
    }

    fn bad_type(&self, key: &str, v: &GgufValue, wanted: &str) -> anyhow::Error {
        user(format!(
            "GGUF file {}: metadata `{key}` is a {} but should be {wanted}",
            self.path.display(),
            v.type_name()
        ))
    }
}

/// The parsed header of a GGUF file: everything but the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor infos in file order; each extent was checked to lie inside the data section.
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or 32 when absent.
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

/// A read position over the file with bounds-checked primitives.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn corrupt(&self, what: impl std::fmt::Display) -> anyhow::Error {
        user(format!(
            "GGUF file {} is corrupt: {what} (at byte {}); re-download or re-convert it",
            self.path.display(),
            self.pos
        ))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(user(format!(
                "GGUF file {} is truncated: reading {what} at byte {} needs {n} bytes but only {} \
                 remain; re-download the file",
                self.path.display(),
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against the bytes left.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(self.corrupt(format!(
                "{what} is {n}, but the {} bytes left can hold at most {max}",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    /// A GGUF string: u64 length then bytes.
    fn string_bytes(&mut self, what: &str) -> Result<&'a [u8]> {
        let len = self.count(1, &format!("length of {what}"))?;
        self.take(len, what)
    }

    /// A string that must be UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: &str) -> Result<String> {
        let start = self.pos;
        let bytes = self.string_bytes(what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => {
                self.pos = start;
                Err(self.corrupt(format!("{what} is not UTF-8")))
            }
        }
    }

    /// A string value; invalid UTF-8 (seen in some vocabularies) is replaced, not fatal.
    fn lossy_string(&mut self, what: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(self.string_bytes(what)?).into_owned())
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        use type_id as t;
        Ok(match ty {
            t::U8 => GgufValue::U8(self.array::<1>(key)?[0]),
            t::I8 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            t::U16 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            t::I16 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            t::U32 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            t::I32 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            t::U64 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            t::I64 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            t::F32 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            t::F64 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            t::BOOL => GgufValue::Bool(self.bool(key)?),
            t::STRING => GgufValue::String(self.lossy_string(key)?),
            t::ARRAY => GgufValue::Array(self.array_value(key, depth + 1)?),
            other => {
                return Err(self.corrupt(format!("metadata `{key}` has unknown value type {other}")))
            }
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool> {
        match self.array::<1>(key)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.corrupt(format!("metadata `{key}` holds bool byte {b}"))),
        }
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        use type_id as t;
        if depth > MAX_ARRAY_DEPTH {
            return Err(self.corrupt(format!(
                "metadata `{key}` nests arrays deeper than {MAX_ARRAY_DEPTH}"
            )));
        }
        let elem = self.u32(&format!("element type of `{key}`"))?;
        let what = format!("element count of `{key}`");
        // Fixed-size elements: read them in one checked slice.
        macro_rules! fixed {
            ($variant:ident, $ty:ty) => {{
                const SIZE: usize = std::mem::size_of::<$ty>();
                let n = self.count(SIZE, &what)?;
                let bytes = self.take(n * SIZE, key)?;
                GgufArray::$variant(
                    bytes
                        .chunks_exact(SIZE)
                        .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk of SIZE")))
                        .collect(),
                )
            }};
        }
        Ok(match elem {
            t::U8 => fixed!(U8, u8),
            t::I8 => fixed!(I8, i8),
            t::U16 => fixed!(U16, u16),
            t::I16 => fixed!(I16, i16),
            t::U32 => fixed!(U32, u32),
            t::I32 => fixed!(I32, i32),
            t::U64 => fixed!(U64, u64),
            t::I64 => fixed!(I64, i64),
            t::F32 => fixed!(F32, f32),
            t::F64 => fixed!(F64, f64),
            t::BOOL => {
                let n = self.count(1, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                GgufArray::Bool(v)
            }
            t::STRING => {
                // Each string is at least its 8-byte length.
                let n = self.count(8, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.lossy_string(key)?);
                }
                GgufArray::String(v)
            }
            t::ARRAY => {
                // Each inner array is at least a 4-byte type and an 8-byte count.
                let n = self.count(12, &what)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                GgufArray::Array(v)
            }
            other => {
                return Err(self.corrupt(format!(
                    "metadata array `{key}` has unknown element type {other}"
                )))
            }
        })
    }
}

/// Parse the header of a whole GGUF file held in `buf`; `path` names it in errors. Every count and
/// length is checked against the bytes left before anything is allocated, so a corrupt or hostile
/// file is a user error, never a huge allocation or a panic.
pub fn parse_header(buf: &[u8], path: &Path) -> Result<GgufHeader> {
    let mut c = Cursor { buf, pos: 0, path };
    if buf.len() < 4 || &buf[..4] != MAGIC {
        return Err(user(format!(
            "{} is not a GGUF file (it does not start with the bytes `GGUF`)",
            path.display()
        )));
    }
    c.pos = 4;
    let version = c.u32("the version")?;
    if version != 2 && version != 3 {
        return Err(user(format!(
            "GGUF file {} has version {version}; mlcb reads versions 2 and 3 (re-convert it with a \
             current llama.cpp)",
            path.display()
        )));
    }
    // A tensor info is at least: name length 8, n_dims 4, type 4, offset 8.
    let n_tensors = c.count(24, "the tensor count")?;
    // A key/value is at least: key length 8, value type 4, one byte of value.
    let n_kv = c.count(13, "the metadata count")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen = HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c.strict_string(&format!("metadata key #{i}"))?;
        if !seen.insert(key.clone()) {
            return Err(c.corrupt(format!("metadata key `{key}` appears twice")));
        }
        let ty = c.u32(&format!("value type of `{key}`"))?;
        let value = c.value(ty, &key, 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= u32::MAX as u64 => a,
            _ => {
                return Err(c.corrupt(format!(
                    "general.alignment is {v:?}; it must be a power of two"
                )))
            }
        },
    };

    let mut raw = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.strict_string(&format!("the name of tensor #{i}"))?;
        if !names.insert(name.clone()) {
            return Err(c.corrupt(format!("tensor `{name}` appears twice")));
        }
        let n_dims = c.u32(&format!("n_dims of tensor `{name}`"))?;
        if n_dims > MAX_DIMS {
            return Err(c.corrupt(format!(
                "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(c.u64(&format!("the shape of tensor `{name}`"))?);
        }
        let ggml_type = GgmlType(c.u32(&format!("the type of tensor `{name}`"))?);
        let offset = c.u64(&format!("the offset of tensor `{name}`"))?;
        raw.push((name, ne, ggml_type, offset));
    }

    let data_offset = align_up(c.pos as u64, alignment);
    // Even an empty tensor's bytes are a slice at data_offset + offset: the data section must
    // start inside the file when there are tensors (found by fuzzing: a zero-size tensor after a
    // header whose padding was cut off).
    if !raw.is_empty() && data_offset > buf.len() as u64 {
        return Err(user(format!(
            "GGUF file {} is truncated: its data section starts at byte {data_offset} but the file \
             has {} bytes; re-download the file",
            path.display(),
            buf.len()
        )));
    }
    let data_len = (buf.len() as u64).saturating_sub(data_offset);
    let mut tensors = Vec::with_capacity(raw.len());
    for (name, ne, ggml_type, offset) in raw {
        let nbytes = tensor_nbytes(&name, &ne, ggml_type, path)?;
        if offset % alignment != 0 {
            return Err(c.corrupt(format!(
                "tensor `{name}` starts at data offset {offset}, not a multiple of the alignment \
                 {alignment}"
            )));
        }
        match offset.checked_add(nbytes) {
            Some(end) if end <= data_len => {}
            _ => {
                return Err(user(format!(
                    "GGUF file {} is truncated: tensor `{name}` ({ggml_type}, ne {ne:?}) needs \
                     bytes {offset}..{} of the data section, which has {data_len}; re-download \
                     the file",
                    path.display(),
                    offset.saturating_add(nbytes),
                )))
            }
        }
        tensors.push(GgufTensorInfo {
            name,
            ne,
            ggml_type,
            offset,
            nbytes,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bytes of a tensor: checks the type is known, the count does not overflow and the innermost
/// dimension is a whole number of blocks.
fn tensor_nbytes(name: &str, ne: &[u64], ty: GgmlType, path: &Path) -> Result<u64> {
    let Some((block, type_size)) = ty.block_layout() else {
        return Err(user(format!(
            "GGUF file {}: tensor `{name}` has {ty}, which mlcb does not know; convert the model \
             with a supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K)",
            path.display()
        )));
    };
    let numel = ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let Some(numel) = numel else {
        return Err(user(format!(
            "GGUF file {} is corrupt: tensor `{name}` has an impossible shape {ne:?}",
            path.display()
        )));
    };
    let inner = ne.first().copied().unwrap_or(1);
    if inner % block as u64 != 0 {
        return Err(user(format!(
            "GGUF file {} is corrupt: tensor `{name}` of type {ty} has ne[0] = {inner}, not a \
             multiple of its block size {block}",
            path.display()
        )));
    }
    // numel ≤ i64::MAX does not keep numel/block * type_size in range (F32: 4 bytes per
    // element), so the product is checked too.
    (numel / block as u64)
        .checked_mul(type_size as u64)
        .ok_or_else(|| {
            user(format!(
                "GGUF file {} is corrupt: tensor `{name}` has an impossible shape {ne:?} \
                 (more than 2^64 bytes of {ty})",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::super::test_writer::{GgufWriter, TensorSpec};
    use super::*;
    use crate::error::{class_of, ErrorClass};

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, bytes).unwrap();
        (dir, p)
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn user_err(bytes: &[u8]) -> String {
        let (_d, p) = write(bytes);
        let e = GgufFile::open(&p).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User, "{e:#}");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("m.gguf"),
            "message should name the file: {msg}"
        );
        msg
    }

    fn all_types_writer() -> GgufWriter {
        let mut w = GgufWriter::new(3);
        w.kv("u8", GgufValue::U8(200));
        w.kv("i8", GgufValue::I8(-5));
        w.kv("u16", GgufValue::U16(60000));
        w.kv("i16", GgufValue::I16(-30000));
        w.kv("u32", GgufValue::U32(4_000_000_000));
        w.kv("i32", GgufValue::I32(-2_000_000_000));
        w.kv("u64", GgufValue::U64(u64::MAX));
        w.kv("i64", GgufValue::I64(i64::MIN));
        w.kv("f32", GgufValue::F32(1.5));
        w.kv("f64", GgufValue::F64(-0.25));
        w.kv("bool", GgufValue::Bool(true));
        w.kv("str", GgufValue::String("héllo".into()));
        w.kv(
            "strs",
            GgufValue::Array(GgufArray::String(vec![
                "a".into(),
                "".into(),
                "ĠParis".into(),
            ])),
        );
        w.kv("i32s", GgufValue::Array(GgufArray::I32(vec![1, -2, 3])));
        w.kv("f64s", GgufValue::Array(GgufArray::F64(vec![0.5])));
        w.kv(
            "bools",
            GgufValue::Array(GgufArray::Bool(vec![true, false])),
        );
        w.kv("empty", GgufValue::Array(GgufArray::U8(vec![])));
        w.kv(
            "nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::U16(vec![7]),
                GgufArray::String(vec!["x".into()]),
            ])),
        );
        w
    }

    #[test]
    fn reads_every_metadata_type() {
        for version in [2, 3] {
            let mut w = all_types_writer();
            w.version = version;
            let (_d, p) = write(&w.to_bytes());
            let f = GgufFile::open(&p).unwrap();
            assert_eq!(f.version(), version);
            let expected = all_types_writer().kvs;
            assert_eq!(f.metadata().len(), expected.len());
            for ((k, v), (ek, ev)) in f.metadata().iter().zip(&expected) {
                assert_eq!(k, ek);
                assert_eq!(v, ev, "{k}");
            }
            assert_eq!(f.get("u16").unwrap().as_u64(), Some(60000));
            assert_eq!(f.get("str").unwrap().as_str(), Some("héllo"));
            assert_eq!(f.alignment(), 32);
            assert!(f.tensors().is_empty());
        }
    }

    #[test]
    fn tensor_table_alignment_and_data() {
        for alignment in [None, Some(64u32), Some(8)] {
            let mut w = GgufWriter::new(3);
            w.kv("general.architecture", GgufValue::String("llama".into()));
            if let Some(a) = alignment {
                w.kv("general.alignment", GgufValue::U32(a));
            }
            let a_vals = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
            w.tensor(TensorSpec::f32("a", &[3, 2], &a_vals));
            w.tensor(TensorSpec::f32("b", &[5], &[9.0; 5]));
            let bytes = w.to_bytes();
            let (_d, p) = write(&bytes);
            let f = GgufFile::open(&p).unwrap();
            let al = alignment.unwrap_or(32) as u64;
            assert_eq!(f.alignment(), al);
            assert_eq!(f.data_offset() % al, 0);
            assert!(f.data_offset() >= al.min(f.data_offset()));
            let a = f.tensor("a").unwrap();
            assert_eq!(a.ne, vec![3, 2]);
            assert_eq!(a.row_major_shape(), vec![2, 3]);
            assert_eq!(a.ggml_type, GgmlType::F32);
            assert_eq!(a.nbytes, 24);
            let got: Vec<f32> = f32s(f.tensor_bytes(a));
            assert_eq!(got, a_vals);
            let b = f.tensor("b").unwrap();
            assert_eq!(b.offset % al, 0);
            let got: Vec<f32> = f32s(f.tensor_bytes(b));
            assert_eq!(got, vec![9.0; 5]);
        }
    }

    #[test]
    fn truncation_anywhere_is_a_user_error_naming_the_file() {
        let mut w = all_types_writer();
        w.tensor(TensorSpec::f32("t", &[4], &[1.0, 2.0, 3.0, 4.0]));
        let bytes = w.to_bytes();
        // Every proper prefix fails cleanly (no panic), except prefixes that only drop padding
        // after the last tensor, of which there is none here (the tensor ends the file).
        for len in 0..bytes.len() {
            let msg = user_err(&bytes[..len]);
            assert!(
                msg.contains("truncated") || msg.contains("not a GGUF") || msg.contains("corrupt"),
                "{len}: {msg}"
            );
        }
        let msg = user_err(&bytes[..bytes.len() - 1]);
        assert!(msg.contains("tensor `t`"), "{msg}");
    }

    #[test]
    fn absurd_counts_do_not_allocate() {
        let mut header = b"GGUF".to_vec();
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&1_000_000_000_000_000u64.to_le_bytes());
        header.extend_from_slice(&0u64.to_le_bytes());
        let msg = user_err(&header);
        assert!(msg.contains("tensor count is 1000000000000000"), "{msg}");

        // An array claiming 10^15 strings.
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        b.extend_from_slice(b"arr");
        b.extend_from_slice(&type_id::ARRAY.to_le_bytes());
        b.extend_from_slice(&type_id::STRING.to_le_bytes());
        b.extend_from_slice(&1_000_000_000_000_000u64.to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        let msg = user_err(&b);
        assert!(msg.contains("element count of `arr`"), "{msg}");

        // A string claiming u64::MAX bytes.
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        let msg = user_err(&b);
        assert!(msg.contains("length of metadata key #0"), "{msg}");
    }

    #[test]
    fn bad_headers_are_user_errors() {
        assert!(user_err(b"PK\x03\x04 not gguf").contains("not a GGUF file"));
        let mut w = GgufWriter::new(1);
        w.kv("x", GgufValue::U8(1));
        assert!(user_err(&w.to_bytes()).contains("version 1"));

        let mut w = GgufWriter::new(3);
        w.kv("general.alignment", GgufValue::U32(24));
        assert!(user_err(&w.to_bytes()).contains("power of two"));

        let mut w = GgufWriter::new(3);
        w.kv("k", GgufValue::U8(1));
        w.kv("k", GgufValue::U8(2));
        assert!(user_err(&w.to_bytes()).contains("appears twice"));

        // Unknown ggml type id, and an inner dimension that is not whole Q8_0 blocks.
        let mut w = GgufWriter::new(3);
        w.tensor(TensorSpec::raw("t", &[4], GgmlType(99), vec![0; 16]));
        assert!(user_err(&w.to_bytes()).contains("unknown ggml type 99"));
        let mut w = GgufWriter::new(3);
        w.tensor(TensorSpec::raw("q", &[16], GgmlType::Q8_0, vec![0; 34]));
        assert!(user_err(&w.to_bytes()).contains("not a multiple of its block size 32"));

        // Shape whose element count overflows.
        let mut w = GgufWriter::new(3);
        w.tensor(TensorSpec::raw(
            "big",
            &[u64::MAX, 4],
            GgmlType::F32,
            vec![],
        ));
        assert!(user_err(&w.to_bytes()).contains("impossible shape"));

        // An element count within i64 whose byte size is not (2^62 F32 elements = 2^64 bytes):
        // found by tests/fuzz_smoke.rs, it overflowed the multiplication.
        let mut w = GgufWriter::new(3);
        w.tensor(TensorSpec::raw(
            "huge",
            &[1 << 31, 1 << 31],
            GgmlType::F32,
            vec![],
        ));
        assert!(user_err(&w.to_bytes()).contains("more than 2^64 bytes of F32"));

        // Found by cargo fuzz (gguf): one tensor of zero bytes, and the header's padding up to
        // the data section cut off, so a slice at the data offset would start past the end.
        let fuzz_crash: &[u8] = &[
            71, 71, 85, 70, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 22,
        ];
        assert!(user_err(fuzz_crash).contains("data section starts at byte"));

        // A bool byte that is neither 0 nor 1.
        let mut w = GgufWriter::new(3);
        w.kv("b", GgufValue::Bool(true));
        let mut bytes = w.to_bytes();
        let n = bytes.len();
        bytes[n - 1] = 7;
        assert!(user_err(&bytes).contains("bool byte 7"));
    }

    #[test]
    fn missing_file_is_a_user_error() {
        let e = GgufFile::open(Path::new("/nonexistent/x.gguf")).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("/nonexistent/x.gguf"));
    }
}
