//! A pickle reader for the subset of the protocol that `torch.save` emits for state dicts (protocols 2–5
//! opcodes; no code is ever executed). Objects we do not know stay as inert [`Value::Object`]s, so an
//! unusual file fails where its content is used, with the key that names it, rather than here.

use std::collections::HashMap;

/// A decoded pickle value. Calls (`REDUCE`, `NEWOBJ`) of the few torch and collections functions that state
/// dicts use are resolved while loading; everything else is kept as the call that would have built it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64 (the legacy format's magic number), little-endian two's complement.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    /// What a persistent id resolved to: a storage of the checkpoint.
    Storage(StorageRef),
    Tensor(TensorRef),
    /// A call we do not interpret: `callable(*args)`, plus any `BUILD` state.
    Object {
        callable: Box<Value>,
        args: Box<Value>,
    },
}

/// A typed storage of the checkpoint, identified by its key in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub dtype: StorageType,
    pub key: String,
    pub numel: u64,
    /// Legacy format only: this storage is a view `(root key, offset, size)` into another.
    pub view_of: Option<(String, u64, u64)>,
}

/// A tensor as `torch._utils._rebuild_tensor_v2` describes it: strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageType {
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

impl StorageType {
    fn from_class(name: &str) -> Option<StorageType> {
        Some(match name {
            "FloatStorage" => StorageType::F32,
            "HalfStorage" => StorageType::F16,
            "BFloat16Storage" => StorageType::BF16,
            "DoubleStorage" => StorageType::F64,
            "LongStorage" => StorageType::I64,
            "IntStorage" => StorageType::I32,
            "ShortStorage" => StorageType::I16,
            "CharStorage" => StorageType::I8,
            "ByteStorage" => StorageType::U8,
            "BoolStorage" => StorageType::Bool,
            _ => return None,
        })
    }

    pub fn element_size(self) -> usize {
        match self {
            StorageType::F64 | StorageType::I64 => 8,
            StorageType::F32 | StorageType::I32 => 4,
            StorageType::F16 | StorageType::BF16 | StorageType::I16 => 2,
            StorageType::I8 | StorageType::U8 | StorageType::Bool => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle ends early (at byte {0})")]
    Truncated(usize),
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {at}")]
    Opcode { opcode: u8, at: usize },
    #[error("malformed pickle at byte {at}: {reason}")]
    Malformed { at: usize, reason: String },
}

/// Reads one pickle from the start of `bytes`; returns the value and the number of bytes it used (the
/// legacy format stores several pickles back to back).
pub fn load(bytes: &[u8]) -> Result<(Value, usize), PickleError> {
    let copy_budget = bytes.len().saturating_mul(COPY_BUDGET_PER_INPUT_BYTE).max(MIN_COPY_BUDGET);
    let machine = Machine {
        bytes,
        pos: 0,
        stack: Vec::new(),
        depths: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copy_budget,
    };
    machine.run()
}

/// Deepest nesting of containers accepted. State dicts nest a few levels; a hostile pickle can nest a
/// million (two bytes per level), and dropping or walking such a value recursively overflows the stack.
pub const MAX_DEPTH: u32 = 100;
/// What values copied from the memo (or by DUP) may add up to, in nodes and bytes, per byte of input: a
/// pickle that recalls a memoised list into a new list and memoises that, again and again, doubles its
/// size with every few bytes.
const COPY_BUDGET_PER_INPUT_BYTE: usize = 64;
const MIN_COPY_BUDGET: usize = 1 << 20;

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Nesting depth of each stack value (0 for scalars), kept beside `stack`.
    depths: Vec<u32>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, (Value, u32)>,
    /// Nodes and bytes that copies may still make.
    copy_budget: usize,
}

impl Machine<'_> {
    fn run(mut self) -> Result<(Value, usize), PickleError> {
        loop {
            let at = self.pos;
            let opcode = self.take(1)?[0];
            match opcode {
                0x80 => {
                    self.take(1)?; // PROTO n: nothing to do, every protocol's opcodes are accepted
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => {
                    let (value, _) = self.pop(at)?;
                    return Ok((value, self.pos));
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.array::<4>()?);
                    self.push(Value::Int(v.into()));
                }
                b'K' => {
                    let v = self.take(1)?[0];
                    self.push(Value::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array::<2>()?);
                    self.push(Value::Int(v.into()));
                }
                0x8a => {
                    let n = self.take(1)?[0] as usize;
                    let digits = self.take(n)?.to_vec();
                    self.push(long_value(digits));
                }
                0x8b => {
                    let n = u32::from_le_bytes(self.array::<4>()?) as usize;
                    let digits = self.take(n)?.to_vec();
                    self.push(long_value(digits));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array::<8>()?);
                    self.push(Value::Float(v));
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.array::<4>()?) as usize;
                    let s = self.utf8(n, at)?;
                    self.push(Value::Str(s));
                }
                0x8c => {
                    let n = self.take(1)?[0] as usize;
                    let s = self.utf8(n, at)?;
                    self.push(Value::Str(s));
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.array::<8>()?) as usize;
                    let s = self.utf8(n, at)?;
                    self.push(Value::Str(s));
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.array::<4>()?) as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b));
                }
                b'C' => {
                    let n = self.take(1)?[0] as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b));
                }
                b')' => self.push(Value::Tuple(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b'}' => self.push(Value::Dict(Vec::new())),
                b't' => {
                    let (items, depth) = self.pop_mark(at)?;
                    self.push_nested(Value::Tuple(items), depth, at)?;
                }
                b'l' => {
                    let (items, depth) = self.pop_mark(at)?;
                    self.push_nested(Value::List(items), depth, at)?;
                }
                b'd' => {
                    let (items, depth) = self.pop_mark(at)?;
                    self.push_nested(Value::Dict(pairs(items, at)?), depth, at)?;
                }
                0x85..=0x87 => {
                    let n = (opcode - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(malformed(at, "tuple of more items than the stack holds"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let depth = self.depths.split_off(self.depths.len() - n).into_iter().max().unwrap_or(0);
                    self.push_nested(Value::Tuple(items), depth, at)?;
                }
                b'a' => {
                    let (item, depth) = self.pop(at)?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.push(item),
                        _ => return Err(malformed(at, "APPEND to something that is not a list")),
                    }
                    self.deepen_top(depth, at)?;
                }
                b'e' => {
                    let (items, depth) = self.pop_mark(at)?;
                    match self.stack.last_mut() {
                        Some(Value::List(list)) => list.extend(items),
                        _ => return Err(malformed(at, "APPENDS to something that is not a list")),
                    }
                    self.deepen_top(depth, at)?;
                }
                b's' => {
                    let (value, value_depth) = self.pop(at)?;
                    let (key, key_depth) = self.pop(at)?;
                    match self.stack.last_mut() {
                        Some(Value::Dict(dict)) => dict.push((key, value)),
                        _ => return Err(malformed(at, "SETITEM on something that is not a dict")),
                    }
                    self.deepen_top(value_depth.max(key_depth), at)?;
                }
                b'u' => {
                    let (items, depth) = self.pop_mark(at)?;
                    let items = pairs(items, at)?;
                    match self.stack.last_mut() {
                        Some(Value::Dict(dict)) => dict.extend(items),
                        _ => return Err(malformed(at, "SETITEMS on something that is not a dict")),
                    }
                    self.deepen_top(depth, at)?;
                }
                b'c' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    self.push(Value::Global { module, name });
                }
                0x93 => {
                    let (name, _) = self.pop(at)?;
                    let (module, _) = self.pop(at)?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => self.push(Value::Global { module, name }),
                        _ => return Err(malformed(at, "STACK_GLOBAL without two strings")),
                    }
                }
                b'R' | 0x81 => {
                    let (args, args_depth) = self.pop(at)?;
                    let (callable, callable_depth) = self.pop(at)?;
                    self.push_nested(call(callable, args, at)?, args_depth.max(callable_depth), at)?;
                }
                b'b' => {
                    // BUILD sets attributes (a state dict's `_metadata`); the tensors do not need them.
                    self.pop(at)?;
                }
                b'Q' => {
                    let (pid, depth) = self.pop(at)?;
                    self.push_nested(persistent_load(pid, at)?, depth, at)?;
                }
                b'q' => {
                    let index = self.take(1)?[0] as u32;
                    self.memoize(index, at)?;
                }
                b'r' => {
                    let index = u32::from_le_bytes(self.array::<4>()?);
                    self.memoize(index, at)?;
                }
                0x94 => {
                    let index = self.memo.len() as u32;
                    self.memoize(index, at)?;
                }
                b'h' => {
                    let index = self.take(1)?[0] as u32;
                    self.recall(index, at)?;
                }
                b'j' => {
                    let index = u32::from_le_bytes(self.array::<4>()?);
                    self.recall(index, at)?;
                }
                b'0' => {
                    self.pop(at)?;
                }
                b'2' => {
                    let top = self.stack.last().ok_or_else(|| malformed(at, "DUP on an empty stack"))?;
                    let depth = self.depths.last().copied().unwrap_or(0);
                    charge_copy(&mut self.copy_budget, top, at)?;
                    let top = top.clone();
                    self.stack.push(top);
                    self.depths.push(depth);
                }
                _ => return Err(PickleError::Opcode { opcode, at }),
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(PickleError::Truncated(self.bytes.len()))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PickleError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn utf8(&mut self, n: usize, at: usize) -> Result<String, PickleError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed(at, "string is not UTF-8"))
    }

    /// A newline-terminated ASCII argument (GLOBAL's module and name).
    fn line(&mut self, at: usize) -> Result<String, PickleError> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or(PickleError::Truncated(self.bytes.len()))?;
        let text = self.utf8(n, at)?;
        self.pos += 1;
        Ok(text)
    }

    /// A scalar or an empty container.
    fn push(&mut self, value: Value) {
        self.stack.push(value);
        self.depths.push(0);
    }

    /// A value holding others whose deepest nesting is `inner`.
    fn push_nested(&mut self, value: Value, inner: u32, at: usize) -> Result<(), PickleError> {
        let depth = checked_depth(inner, at)?;
        self.stack.push(value);
        self.depths.push(depth);
        Ok(())
    }

    /// The top container received values whose deepest nesting is `inner`.
    fn deepen_top(&mut self, inner: u32, at: usize) -> Result<(), PickleError> {
        let depth = checked_depth(inner, at)?;
        if let Some(top) = self.depths.last_mut() {
            *top = (*top).max(depth);
        }
        Ok(())
    }

    fn pop(&mut self, at: usize) -> Result<(Value, u32), PickleError> {
        let value = self.stack.pop().ok_or_else(|| malformed(at, "pop from an empty stack"))?;
        Ok((value, self.depths.pop().unwrap_or(0)))
    }

    /// The values above the last MARK and their deepest nesting.
    fn pop_mark(&mut self, at: usize) -> Result<(Vec<Value>, u32), PickleError> {
        let height = self.marks.pop().ok_or_else(|| malformed(at, "no MARK to pop to"))?;
        if height > self.stack.len() {
            return Err(malformed(at, "MARK above the stack"));
        }
        let depth = self.depths.split_off(height).into_iter().max().unwrap_or(0);
        Ok((self.stack.split_off(height), depth))
    }

    fn memoize(&mut self, index: u32, at: usize) -> Result<(), PickleError> {
        let top = self.stack.last().ok_or_else(|| malformed(at, "memoize an empty stack"))?;
        charge_copy(&mut self.copy_budget, top, at)?;
        let entry = (top.clone(), self.depths.last().copied().unwrap_or(0));
        self.memo.insert(index, entry);
        Ok(())
    }

    fn recall(&mut self, index: u32, at: usize) -> Result<(), PickleError> {
        let (value, depth) = self.memo.get(&index).ok_or_else(|| malformed(at, &format!("memo {index} is unset")))?;
        let depth = *depth;
        charge_copy(&mut self.copy_budget, value, at)?;
        let value = value.clone();
        self.stack.push(value);
        self.depths.push(depth);
        Ok(())
    }
}

/// Copies cost their size, from a budget proportional to the input (see [`COPY_BUDGET_PER_INPUT_BYTE`]).
fn charge_copy(budget: &mut usize, value: &Value, at: usize) -> Result<(), PickleError> {
    let cost = weight_within(value, *budget)
        .ok_or_else(|| malformed(at, "memo copies grow beyond any real checkpoint (a pickle bomb?)"))?;
    *budget -= cost;
    Ok(())
}

fn checked_depth(inner: u32, at: usize) -> Result<u32, PickleError> {
    let depth = inner + 1;
    if depth > MAX_DEPTH {
        return Err(malformed(at, &format!("containers nested deeper than {MAX_DEPTH}")));
    }
    Ok(depth)
}

/// The size of `value` in nodes and bytes, or None once it exceeds `limit` (counted without recursion, so
/// that the count stops early and no nesting overflows the stack).
fn weight_within(value: &Value, limit: usize) -> Option<usize> {
    let mut total = 0usize;
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        total += 1 + match value {
            Value::BigInt(bytes) | Value::Bytes(bytes) => bytes.len(),
            Value::Str(text) => text.len(),
            Value::Global { module, name } => module.len() + name.len(),
            Value::Tuple(items) | Value::List(items) => {
                pending.extend(items);
                0
            }
            Value::Dict(entries) => {
                pending.extend(entries.iter().flat_map(|(key, value)| [key, value]));
                0
            }
            Value::Object { callable, args } => {
                pending.extend([&**callable, &**args]);
                0
            }
            Value::Storage(storage) => storage.key.len(),
            Value::Tensor(tensor) => tensor.storage.key.len() + 8 * (tensor.size.len() + tensor.stride.len()),
            Value::None | Value::Bool(_) | Value::Int(_) | Value::Float(_) => 0,
        };
        if total > limit {
            return None;
        }
    }
    Some(total)
}

fn malformed(at: usize, reason: &str) -> PickleError {
    PickleError::Malformed { at, reason: reason.to_string() }
}

fn long_value(digits: Vec<u8>) -> Value {
    if digits.len() <= 8 {
        let negative = digits.last().is_some_and(|&b| b & 0x80 != 0);
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..digits.len()].copy_from_slice(&digits);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        Value::BigInt(digits)
    }
}

fn pairs(items: Vec<Value>, at: usize) -> Result<Vec<(Value, Value)>, PickleError> {
    if !items.len().is_multiple_of(2) {
        return Err(malformed(at, "odd number of items for a dict"));
    }
    let mut iter = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Resolves the calls that make up a state dict; keeps any other call inert.
fn call(callable: Value, args: Value, at: usize) -> Result<Value, PickleError> {
    let Value::Global { module, name } = &callable else {
        return Ok(Value::Object { callable: Box::new(callable), args: Box::new(args) });
    };
    let Value::Tuple(items) = &args else {
        return Ok(Value::Object { callable: Box::new(callable), args: Box::new(args) });
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") if items.is_empty() => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let (Some(Value::Storage(storage)), Some(Value::Int(offset)), Some(size), Some(stride)) =
                (items.first(), items.get(1), items.get(2), items.get(3))
            else {
                return Err(malformed(at, "_rebuild_tensor_v2 without (storage, offset, size, stride)"));
            };
            Ok(Value::Tensor(TensorRef {
                storage: storage.clone(),
                offset: u64::try_from(*offset).map_err(|_| malformed(at, "negative storage offset"))?,
                size: ints(size, at)?,
                stride: ints(stride, at)?,
            }))
        }
        // An nn.Parameter saved instead of its data: the data is all we need.
        ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
            items.first().cloned().ok_or_else(|| malformed(at, "_rebuild_parameter without data"))
        }
        _ => Ok(Value::Object { callable: Box::new(callable), args: Box::new(args) }),
    }
}

fn ints(value: &Value, at: usize) -> Result<Vec<i64>, PickleError> {
    match value {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|v| match v {
                Value::Int(i) => Ok(*i),
                _ => Err(malformed(at, "tensor shape holds a non-integer")),
            })
            .collect(),
        _ => Err(malformed(at, "tensor shape is not a tuple")),
    }
}

/// `('storage', StorageClass, key, location, numel[, view_metadata])`, the persistent id of both formats.
fn persistent_load(pid: Value, at: usize) -> Result<Value, PickleError> {
    let Value::Tuple(items) = pid else {
        return Err(malformed(at, "persistent id is not a tuple"));
    };
    let (
        Some(Value::Str(kind)),
        Some(Value::Global { name: class, .. }),
        Some(Value::Str(key)),
        Some(Value::Int(numel)),
    ) = (items.first(), items.get(1), items.get(2), items.get(4))
    else {
        return Err(malformed(at, "persistent id is not ('storage', type, key, location, numel)"));
    };
    if kind != "storage" {
        return Err(malformed(at, &format!("persistent id of kind {kind:?}, expected 'storage'")));
    }
    let dtype = StorageType::from_class(class)
        .ok_or_else(|| malformed(at, &format!("unsupported storage type torch.{class}")))?;
    let view_of = match items.get(5) {
        Some(Value::Tuple(view)) => match (view.first(), view.get(1), view.get(2)) {
            (Some(Value::Str(root)), Some(Value::Int(offset)), Some(Value::Int(size))) => {
                Some((root.clone(), *offset as u64, *size as u64))
            }
            _ => return Err(malformed(at, "storage view metadata is not (key, offset, size)")),
        },
        _ => None,
    };
    let numel = u64::try_from(*numel).map_err(|_| malformed(at, "negative storage size"))?;
    Ok(Value::Storage(StorageRef { dtype, key: key.clone(), numel, view_of }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_containers_and_memo() {
        // pickle.dumps({'a': [1, 2**40, -3], 'b': ('x', True, None, 1.5)}, protocol=2)
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01\x8a\x06\x00\x00\x00\x00\x00\x01J\xfd\xff\xff\xffeX\x01\x00\x00\x00bq\x03(X\x01\x00\x00\x00xq\x04\x88NG?\xf8\x00\x00\x00\x00\x00\x00tq\x05u.";
        let (value, used) = load(bytes).unwrap();
        assert_eq!(used, bytes.len());
        let expected = Value::Dict(vec![
            (Value::Str("a".into()), Value::List(vec![Value::Int(1), Value::Int(1 << 40), Value::Int(-3)])),
            (
                Value::Str("b".into()),
                Value::Tuple(vec![Value::Str("x".into()), Value::Bool(true), Value::None, Value::Float(1.5)]),
            ),
        ]);
        assert_eq!(value, expected);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let bytes: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01";
        for end in 0..bytes.len() {
            assert!(load(&bytes[..end]).is_err(), "prefix of {end} bytes");
        }
    }

    /// Before: every memo recall deep-copied, so this 400-byte pickle (a list of the memoised list twice,
    /// memoised again, sixty times) asked for 2^60 nodes.
    #[test]
    fn a_memo_bomb_is_refused_with_bounded_work() {
        let mut bytes = b"\x80\x02]q\x00".to_vec();
        for _ in 0..60 {
            bytes.extend_from_slice(b"(h\x00h\x00lq\x00");
        }
        bytes.push(b'.');
        let err = load(&bytes).unwrap_err().to_string();
        assert!(err.contains("pickle bomb"), "{err}");
    }

    /// Before: a million nested tuples (one byte each) were built, and dropping them overflowed the stack.
    #[test]
    fn nesting_deeper_than_any_checkpoint_is_refused() {
        let mut bytes = b"\x80\x02N".to_vec();
        bytes.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        bytes.push(b'.');
        let err = load(&bytes).unwrap_err().to_string();
        assert!(err.contains(&format!("nested deeper than {MAX_DEPTH}")), "{err}");
        let mut shallow = b"\x80\x02N".to_vec();
        shallow.extend(std::iter::repeat_n(0x85u8, 50));
        shallow.push(b'.');
        assert!(load(&shallow).is_ok());
    }

    #[test]
    fn unknown_opcodes_name_their_position() {
        let err = load(b"\x80\x02\xff.").unwrap_err();
        assert!(matches!(err, PickleError::Opcode { opcode: 0xff, at: 2 }), "{err}");
    }
}
