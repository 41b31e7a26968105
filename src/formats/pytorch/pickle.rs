//! A small pickle interpreter that builds data and never runs code.
//!
//! `torch.save` writes the state dict as a pickle (protocol 2) whose only "code" is a handful of
//! constructor calls: `collections.OrderedDict()`, `torch._utils._rebuild_tensor_v2(...)` and
//! storage references through persistent ids. This interpreter understands exactly those: every
//! `GLOBAL` is resolved against an allow-list ([`Global`]); anything else stops the load with an
//! error naming it. Calling an allowed global builds a plain value, it never imports or executes.
//!
//! Bounds: every length field is checked against the bytes left in the pickle, and each opcode
//! adds at most a constant number of values, so memory stays proportional to the pickle size.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Element type of a torch storage class (`torch.HalfStorage` …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageKind {
    pub fn elem_size(self) -> u64 {
        match self {
            StorageKind::F64 | StorageKind::I64 => 8,
            StorageKind::F32 | StorageKind::I32 => 4,
            StorageKind::F16 | StorageKind::BF16 | StorageKind::I16 => 2,
            StorageKind::I8 | StorageKind::U8 | StorageKind::Bool => 1,
        }
    }

    /// The torch class name, for messages.
    pub fn class_name(self) -> &'static str {
        match self {
            StorageKind::F32 => "FloatStorage",
            StorageKind::F16 => "HalfStorage",
            StorageKind::BF16 => "BFloat16Storage",
            StorageKind::F64 => "DoubleStorage",
            StorageKind::I64 => "LongStorage",
            StorageKind::I32 => "IntStorage",
            StorageKind::I16 => "ShortStorage",
            StorageKind::I8 => "CharStorage",
            StorageKind::U8 => "ByteStorage",
            StorageKind::Bool => "BoolStorage",
        }
    }

    fn from_class_name(name: &str) -> Option<StorageKind> {
        [
            StorageKind::F32,
            StorageKind::F16,
            StorageKind::BF16,
            StorageKind::F64,
            StorageKind::I64,
            StorageKind::I32,
            StorageKind::I16,
            StorageKind::I8,
            StorageKind::U8,
            StorageKind::Bool,
        ]
        .into_iter()
        .find(|k| k.class_name() == name)
    }

    fn from_dtype_name(name: &str) -> Option<StorageKind> {
        Some(match name {
            "float32" | "float" => StorageKind::F32,
            "float16" | "half" => StorageKind::F16,
            "bfloat16" => StorageKind::BF16,
            "float64" | "double" => StorageKind::F64,
            "int64" | "long" => StorageKind::I64,
            "int32" | "int" => StorageKind::I32,
            "int16" | "short" => StorageKind::I16,
            "int8" => StorageKind::I8,
            "uint8" => StorageKind::U8,
            "bool" => StorageKind::Bool,
            _ => return None,
        })
    }
}

/// The globals a torch state-dict pickle may name. Nothing else is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    /// `collections.OrderedDict`: calling it makes an empty dict.
    OrderedDict,
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`.
    RebuildTensorV2,
    /// `torch._utils._rebuild_parameter(data, requires_grad, hooks)` (and `_with_state`): `data`.
    RebuildParameter,
    /// `torch.Size(tuple)`: the tuple.
    TorchSize,
    /// A typed storage class, used inside persistent ids.
    Storage(StorageKind),
    /// A dtype constant such as `torch.float16`.
    Dtype(StorageKind),
}

impl Global {
    /// Resolve `module.name` against the allow-list.
    pub fn resolve(module: &str, name: &str) -> Option<Global> {
        match (module, name) {
            ("collections", "OrderedDict") => Some(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => Some(Global::RebuildParameter),
            ("torch", "Size") => Some(Global::TorchSize),
            ("torch", n) => StorageKind::from_class_name(n)
                .map(Global::Storage)
                .or_else(|| StorageKind::from_dtype_name(n).map(Global::Dtype)),
            _ => None,
        }
    }
}

/// A storage named by a persistent id: the zip entry `<archive>/data/<key>`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub kind: StorageKind,
    pub key: String,
    /// Element count as recorded in the pickle (checked against the entry size by the caller).
    pub numel: u64,
}

/// A tensor view of a storage, as `_rebuild_tensor_v2` describes it (offset and strides in
/// elements).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: Rc<StorageRef>,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
}

pub type DictItems = Rc<RefCell<Vec<(Value, Value)>>>;

/// A value built by the interpreter. Mutable containers are shared (`Rc<RefCell>`) because the
/// memo holds references that later opcodes mutate.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    /// Items in insertion order; a repeated key appears twice (the last one wins).
    Dict(DictItems),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    /// A short description for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Why a pickle could not be loaded. The caller adds the file name.
#[derive(Debug, Clone, PartialEq)]
pub enum PickleError {
    /// The pickle names a global outside the allow-list (`module.name`).
    ForbiddenGlobal(String),
    /// Anything else malformed or unsupported, with the byte offset.
    Malformed { offset: usize, message: String },
}

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickleError::ForbiddenGlobal(name) => write!(
                f,
                "pickle refers to global {name}, which mlcb refuses to load (only tensors, \
                 storages and OrderedDict are allowed; nothing in a checkpoint is executed)"
            ),
            PickleError::Malformed { offset, message } => {
                write!(f, "bad pickle at byte {offset}: {message}")
            }
        }
    }
}

impl std::error::Error for PickleError {}

/// Run the pickle in `data` and return the value left by STOP.
pub fn load(data: &[u8]) -> Result<Value, PickleError> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

type R<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn err<T>(&self, message: impl Into<String>) -> R<T> {
        Err(PickleError::Malformed {
            offset: self.pos,
            message: message.into(),
        })
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match self.pos.checked_add(n) {
            Some(end) if end <= data.len() => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.err(format!(
                "needs {n} more bytes but the pickle ends (truncated?)"
            )),
        }
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length field: must fit in what is left of the pickle.
    fn len_field(&mut self, n: u64) -> R<usize> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.err(format!(
                "length {n} exceeds the {left} bytes left in the pickle"
            ));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> R<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("unterminated text line");
        };
        self.pos += nl + 1;
        std::str::from_utf8(&rest[..nl]).or_else(|_| self.err("text line is not UTF-8"))
    }

    fn string(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(Rc::from(s))),
            Err(_) => self.err("string is not UTF-8"),
        }
    }

    fn pop(&mut self) -> R<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&mut self) -> R<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return self.err("stack underflow");
        }
        Ok(self.stack.last_mut().expect("checked non-empty"))
    }

    /// Pop everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return self.err("no MARK on the stack");
        };
        Ok(self.stack.split_off(mark))
    }

    fn global(&mut self, module: &str, name: &str) -> R<Value> {
        match Global::resolve(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => Err(PickleError::ForbiddenGlobal(format!("{module}.{name}"))),
        }
    }

    fn memo_get(&mut self, key: u32) -> R<Value> {
        match self.memo.get(&key) {
            Some(v) => Ok(v.clone()),
            None => self.err(format!("memo key {key} was never stored")),
        }
    }

    fn memo_put(&mut self, key: u32) -> R<()> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(mut self) -> R<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(format!("pickle protocol {p} is unknown"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only (nothing is allocated from it), but a frame that
                    // claims more bytes than the pickle holds means a truncated file, as Python
                    // reports it ("pickle exhausted before end of frame").
                    let len = self.u64()?;
                    let left = (self.data.len() - self.pos) as u64;
                    if len > left {
                        return self.err(format!(
                            "a frame of {len} bytes, but only {left} bytes remain (truncated?)"
                        ));
                    }
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'}' => self
                    .stack
                    .push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b']' => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b')' => self.stack.push(Value::Tuple(Rc::from(Vec::new()))),
                b'X' => {
                    let n = self.u32()? as u64;
                    let n = self.len_field(n)?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let n = self.len_field(n)?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'B' | b'C' | 0x8e => {
                    // BINBYTES, SHORT_BINBYTES, BINBYTES8
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_field(n)?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(Rc::from(b)));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement.
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len_field(n)?;
                    let b = self.take(n)?;
                    match long_from_bytes(b) {
                        Some(v) => self.stack.push(Value::Int(v)),
                        None => return self.err("integer does not fit in 64 bits"),
                    }
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::from(items)));
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    // MEMOIZE: the next free index.
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.memo_get(k)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = self.global(&m, &n)?;
                            self.stack.push(g);
                        }
                        _ => return self.err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(func, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); only allowed classes.
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.call(cls, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: set state on the object. Only dicts (HF's `_metadata` attribute) and
                    // tensors (no state we need) take state; it is dropped.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => {
                            let kind = other.kind();
                            return self.err(format!("BUILD on a {kind} is not supported"));
                        }
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.dict_insert(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of values");
                    }
                    self.dict_insert(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.list_extend(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_extend(items)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                other => {
                    self.pos -= 1;
                    return self.err(format!(
                        "pickle opcode 0x{other:02x} is not supported in a state dict"
                    ));
                }
            }
        }
    }

    fn dict_insert(&mut self, items: Vec<Value>) -> R<()> {
        let Value::Dict(d) = self.top()? else {
            return self.err("SETITEM on something that is not a dict");
        };
        let d = d.clone();
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn list_extend(&mut self, items: Vec<Value>) -> R<()> {
        let Value::List(l) = self.top()? else {
            return self.err("APPEND on something that is not a list");
        };
        l.clone().borrow_mut().extend(items);
        Ok(())
    }

    /// torch's persistent ids: `('storage', storage_class, key, location, numel)`.
    fn persistent_load(&mut self, pid: Value) -> R<Value> {
        let Value::Tuple(t) = &pid else {
            return self.err(format!("persistent id is a {}, not a tuple", pid.kind()));
        };
        match &t[..] {
            [Value::Str(tag), Value::Global(Global::Storage(kind)), key, _location, Value::Int(numel)]
                if &**tag == "storage" =>
            {
                let key = match key {
                    Value::Str(s) => s.to_string(),
                    Value::Int(i) => i.to_string(),
                    other => {
                        return self.err(format!("storage key is a {}", other.kind()));
                    }
                };
                if *numel < 0 {
                    return self.err("negative storage size");
                }
                Ok(Value::Storage(Rc::new(StorageRef {
                    kind: *kind,
                    key,
                    numel: *numel as u64,
                })))
            }
            _ => self.err("persistent id is not a torch storage reference"),
        }
    }

    fn call(&mut self, func: Value, args: Value) -> R<Value> {
        let Value::Global(g) = func else {
            return self.err(format!("REDUCE calls a {}, not a global", func.kind()));
        };
        let Value::Tuple(args) = args else {
            return self.err("REDUCE arguments are not a tuple");
        };
        match g {
            Global::OrderedDict => {
                let items = Rc::new(RefCell::new(Vec::new()));
                // OrderedDict([(k, v), ...]) is legal too.
                if let Some(Value::List(l)) = args.first() {
                    for pair in l.borrow().iter() {
                        match pair {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                items.borrow_mut().push((kv[0].clone(), kv[1].clone()))
                            }
                            _ => return self.err("OrderedDict item is not a pair"),
                        }
                    }
                }
                Ok(Value::Dict(items))
            }
            Global::RebuildTensorV2 => self.rebuild_tensor(&args),
            Global::RebuildParameter => match args.first() {
                Some(v @ Value::Tensor(_)) => Ok(v.clone()),
                _ => self.err("_rebuild_parameter without a tensor"),
            },
            Global::TorchSize => match args.first() {
                Some(Value::Tuple(t)) => Ok(Value::Tuple(t.clone())),
                Some(Value::List(l)) => Ok(Value::Tuple(Rc::from(l.borrow().clone()))),
                None => Ok(Value::Tuple(Rc::from(Vec::new()))),
                _ => self.err("torch.Size of something that is not a sequence"),
            },
            Global::Storage(k) | Global::Dtype(k) => {
                self.err(format!("calling torch.{} is not supported", k.class_name()))
            }
        }
    }

    fn rebuild_tensor(&mut self, args: &[Value]) -> R<Value> {
        if args.len() < 4 {
            return self.err("_rebuild_tensor_v2 needs at least 4 arguments");
        }
        let Value::Storage(storage) = &args[0] else {
            return self.err(format!(
                "_rebuild_tensor_v2 of a {}, not a storage",
                args[0].kind()
            ));
        };
        let Value::Int(offset) = args[1] else {
            return self.err("tensor storage offset is not an int");
        };
        let shape = self.int_tuple(&args[2], "size")?;
        let strides = self.int_tuple(&args[3], "stride")?;
        if offset < 0 {
            return self.err("negative tensor storage offset");
        }
        if shape.len() != strides.len() {
            return self.err(format!(
                "tensor has {} dimensions but {} strides",
                shape.len(),
                strides.len()
            ));
        }
        Ok(Value::Tensor(Rc::new(TensorRef {
            storage: storage.clone(),
            offset: offset as u64,
            shape,
            strides,
        })))
    }

    fn int_tuple(&self, v: &Value, what: &str) -> R<Vec<u64>> {
        let items: Vec<Value> = match v {
            Value::Tuple(t) => t.to_vec(),
            Value::List(l) => l.borrow().clone(),
            _ => return self.err(format!("tensor {what} is a {}, not a tuple", v.kind())),
        };
        items
            .iter()
            .map(|x| match x {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => self.err(format!("tensor {what} holds a non-negative-int value")),
            })
            .collect()
    }
}

/// Two's-complement little-endian integer of any length, if it fits in i64.
fn long_from_bytes(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    if b.len() > 8 {
        // Extra high bytes must be pure sign extension.
        if b[8..].iter().any(|&x| x != fill) || ((b[7] & 0x80 != 0) != negative) {
            return None;
        }
    }
    let mut buf = [fill; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    Some(i64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long1_decodes_twos_complement() {
        assert_eq!(long_from_bytes(&[]), Some(0));
        assert_eq!(long_from_bytes(&[0xff]), Some(-1));
        assert_eq!(long_from_bytes(&[0x00, 0x01]), Some(256));
        assert_eq!(long_from_bytes(&[0x80, 0x00]), Some(128));
        assert_eq!(long_from_bytes(&[0; 9]), Some(0));
        assert_eq!(long_from_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn frame_longer_than_the_pickle_is_an_error() {
        // PROTO 4, FRAME claiming 10^15 bytes, NONE, STOP: found by tests/fuzz_smoke.rs.
        let mut p = vec![0x80, 4, 0x95];
        p.extend(1_000_000_000_000_000u64.to_le_bytes());
        p.extend([b'N', b'.']);
        let e = load(&p).unwrap_err().to_string();
        assert!(
            e.contains("a frame of 1000000000000000 bytes, but only 2 bytes remain"),
            "{e}"
        );
        // An honest frame is accepted.
        let mut p = vec![0x80, 4, 0x95];
        p.extend(2u64.to_le_bytes());
        p.extend([b'N', b'.']);
        assert!(matches!(load(&p), Ok(Value::None)));
    }

    #[test]
    fn builds_dict_with_memo_and_setitems() {
        // {'a': 1, 'b': (2, -3)} via EMPTY_DICT, BINPUT, MARK, SETITEMS, with a memo reference.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
        p.extend([0x8c, 1, b'a', b'K', 1]);
        p.extend([0x8c, 1, b'b', b'K', 2, b'J']);
        p.extend((-3i32).to_le_bytes());
        p.extend([0x86, b'u', b'0', b'h', 0, b'.']);
        let v = load(&p).unwrap();
        let Value::Dict(d) = v else {
            panic!("not a dict")
        };
        let d = d.borrow();
        assert_eq!(d.len(), 2);
        assert!(matches!(&d[0], (Value::Str(k), Value::Int(1)) if &**k == "a"));
        match &d[1] {
            (Value::Str(k), Value::Tuple(t)) => {
                assert_eq!(&**k, "b");
                assert!(matches!(t[..], [Value::Int(2), Value::Int(-3)]));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn forbidden_global_is_named() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00ls\x85R.";
        assert_eq!(
            load(p).unwrap_err(),
            PickleError::ForbiddenGlobal("os.system".into())
        );
        // STACK_GLOBAL too.
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        let e = load(p).unwrap_err();
        assert_eq!(e, PickleError::ForbiddenGlobal("builtins.eval".into()));
        assert!(e.to_string().contains("builtins.eval"));
    }

    #[test]
    fn truncated_and_hostile_lengths_are_errors() {
        // BINUNICODE claiming 4 GiB.
        let p = b"\x80\x02X\xff\xff\xff\xff";
        assert!(matches!(load(p), Err(PickleError::Malformed { .. })));
        // Ends without STOP.
        assert!(matches!(
            load(b"\x80\x02K\x01"),
            Err(PickleError::Malformed { .. })
        ));
        // Stack underflow.
        assert!(matches!(load(b"."), Err(PickleError::Malformed { .. })));
        // Unknown opcode.
        assert!(matches!(load(b"\xff"), Err(PickleError::Malformed { .. })));
        // BINGET of a key never stored.
        assert!(matches!(
            load(b"h\x05."),
            Err(PickleError::Malformed { .. })
        ));
    }
}
