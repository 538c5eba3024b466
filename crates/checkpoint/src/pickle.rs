//! A pickle interpreter for what `torch.save` writes (protocol 2–5): it
//! builds values, resolves `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter` and `collections.OrderedDict`, and represents every
//! other call as an opaque [`Value::Object`]. Nothing is ever executed.

use crate::{DType, Error, Result};

/// A storage reference: `('storage', torch.FloatStorage, key, location, numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// Member name under `data/` in the archive.
    pub key: String,
    /// Element type, from the storage class.
    pub dtype: DType,
    /// Elements the pickle says the storage holds (its fifth field), when given.
    pub elements: Option<usize>,
}

/// A tensor view onto a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// The storage.
    pub storage: StorageRef,
    /// Offset in elements.
    pub offset: usize,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// An unpickled value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`
    None,
    /// `bool`
    Bool(bool),
    /// `int` (up to 64 bits)
    Int(i64),
    /// `float`
    Float(f64),
    /// `str`
    Str(String),
    /// `bytes`
    Bytes(Vec<u8>),
    /// `list`
    List(Vec<Value>),
    /// `tuple`
    Tuple(Vec<Value>),
    /// `dict` / `OrderedDict`, in insertion order
    Dict(Vec<(Value, Value)>),
    /// A global reference, `module.name`
    Global(String, String),
    /// A persistent id (storage reference before resolution)
    PersistentId(Box<Value>),
    /// A tensor
    Tensor(TensorRef),
    /// Any other object: its constructor, arguments and state, kept inert.
    Object(Box<Value>, Box<Value>, Option<Box<Value>>),
}

impl Value {
    /// The entry for string key `key` when this is a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Guards against hostile pickles: deep nesting, huge stacks or memos.
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 22;
const MAX_DEPTH: usize = 256;
const MAX_COPIED_NODES: usize = 1 << 21;

/// Interprets a pickle.
pub fn load(bytes: &[u8]) -> Result<Value> {
    let mut vm = Machine {
        input: bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Vec::new(),
        copied_nodes: std::cell::Cell::new(0),
    };
    vm.run()
}

/// The storages tensors in `value` refer to, each once (by key; the
/// largest declared size when tensors disagree).
pub fn storages(value: &Value) -> Vec<StorageRef> {
    let mut found: Vec<StorageRef> = Vec::new();
    let mut index = std::collections::HashMap::new();
    visit(value, &mut |v| {
        if let Value::Tensor(t) = v {
            match index.get(&t.storage.key) {
                Some(&i) => {
                    let known: &mut StorageRef = &mut found[i];
                    known.elements = known.elements.max(t.storage.elements);
                }
                None => {
                    index.insert(t.storage.key.clone(), found.len());
                    found.push(t.storage.clone());
                }
            }
        }
        true
    });
    found
}

/// Calls `f` on every node of `value` until it returns `false`, without recursion.
fn visit(value: &Value, f: &mut impl FnMut(&Value) -> bool) {
    let mut todo = vec![value];
    while let Some(v) = todo.pop() {
        if !f(v) {
            return;
        }
        match v {
            Value::List(items) | Value::Tuple(items) => todo.extend(items),
            Value::Dict(items) => todo.extend(items.iter().flat_map(|(k, v)| [k, v])),
            Value::PersistentId(inner) => todo.push(inner),
            Value::Object(a, b, c) => {
                todo.push(a);
                todo.push(b);
                todo.extend(c.as_deref());
            }
            _ => {}
        }
    }
}

/// A value with its nesting depth, tracked so that hostile pickles cannot
/// build structures deep enough to overflow the stack when cloned or dropped.
type Slot = (Value, usize);

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    marks: Vec<usize>,
    memo: Vec<Option<Slot>>,
    copied_nodes: std::cell::Cell<usize>,
}

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Pickle(msg.into()))
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        match end {
            Some(end) => {
                let s = &self.input[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => err(format!("pickle ends early (wanted {n} bytes at offset {})", self.pos)),
        }
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.input[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| Error::Pickle("unterminated text argument".into()))?;
        let s =
            String::from_utf8(rest[..end].to_vec()).map_err(|_| Error::Pickle("text argument is not UTF-8".into()))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| Error::Pickle("string is not UTF-8".into()))
    }

    /// Pushes a leaf value.
    fn push(&mut self, v: Value) -> Result<()> {
        self.push_slot((v, 1))
    }

    /// Pushes a value whose deepest child has depth `child_depth`.
    fn push_parent(&mut self, v: Value, child_depth: usize) -> Result<()> {
        self.push_slot((v, child_depth + 1))
    }

    fn push_slot(&mut self, slot: Slot) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return err("stack too deep");
        }
        if slot.1 > MAX_DEPTH {
            return err("value nested too deeply");
        }
        self.stack.push(slot);
        Ok(())
    }

    fn pop_slot(&mut self) -> Result<Slot> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return err("pop across a mark");
        }
        self.stack.pop().ok_or_else(|| Error::Pickle("stack underflow".into()))
    }

    fn pop(&mut self) -> Result<Value> {
        Ok(self.pop_slot()?.0)
    }

    /// The value on top of the stack, about to receive a child of depth `child_depth`.
    fn top_with_child(&mut self, child_depth: usize) -> Result<&mut Value> {
        if child_depth + 1 > MAX_DEPTH {
            return err("value nested too deeply");
        }
        let slot = self
            .stack
            .last_mut()
            .ok_or_else(|| Error::Pickle("stack underflow".into()))?;
        slot.1 = slot.1.max(child_depth + 1);
        Ok(&mut slot.0)
    }

    fn pop_mark(&mut self) -> Result<(Vec<Value>, usize)> {
        let mark = self.marks.pop().ok_or_else(|| Error::Pickle("no mark".into()))?;
        if mark > self.stack.len() {
            return err("mark above the stack");
        }
        let slots = self.stack.split_off(mark);
        let depth = slots.iter().map(|s| s.1).max().unwrap_or(0);
        Ok((slots.into_iter().map(|s| s.0).collect(), depth))
    }

    fn memo_put(&mut self, index: usize) -> Result<()> {
        if index >= MAX_MEMO {
            return err("memo index too large");
        }
        let top = self
            .stack
            .last()
            .ok_or_else(|| Error::Pickle("memoize on an empty stack".into()))?;
        let slot = self.copy(top)?;
        if self.memo.len() <= index {
            self.memo.resize(index + 1, None);
        }
        self.memo[index] = Some(slot);
        Ok(())
    }

    fn memo_get(&mut self, index: usize) -> Result<()> {
        let Some(Some(slot)) = self.memo.get(index) else {
            return err(format!("memo {index} is empty"));
        };
        let slot = self.copy(slot)?;
        self.push_slot(slot)
    }

    /// A copy of `slot`, counted: memo stores and fetches and DUP all copy
    /// values, so the total copied is bounded and no sequence of them (a list
    /// doubled by DUP + APPEND, say) can grow memory exponentially.
    fn copy(&self, slot: &Slot) -> Result<Slot> {
        let budget = MAX_COPIED_NODES.saturating_sub(self.copied_nodes.get());
        let size = node_count(&slot.0, budget);
        if size >= budget {
            return err("values are copied too often (memo or DUP)");
        }
        self.copied_nodes.set(self.copied_nodes.get() + size);
        Ok(slot.clone())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                } // PROTO
                0x95 => {
                    self.u64()?;
                } // FRAME
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    if self.marks.len() >= MAX_STACK {
                        return err("too many marks");
                    }
                    self.marks.push(self.stack.len());
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return err("integer wider than 64 bits");
                    }
                    let mut buf = [if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        0xFF
                    } else {
                        0
                    }; 8];
                    buf[..n].copy_from_slice(b);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| Error::Pickle("string too long".into()))?;
                    let s = self.string(n)?;
                    self.push(s)?
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => usize::try_from(self.u64()?).map_err(|_| Error::Pickle("bytes too long".into()))?,
                    };
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b't' => {
                    let (items, depth) = self.pop_mark()?;
                    self.push_parent(Value::Tuple(items), depth)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n || self.marks.last().is_some_and(|&m| m > self.stack.len() - n) {
                        return err("tuple across a mark");
                    }
                    let slots = self.stack.split_off(self.stack.len() - n);
                    let depth = slots.iter().map(|s| s.1).max().unwrap_or(0);
                    self.push_parent(Value::Tuple(slots.into_iter().map(|s| s.0).collect()), depth)?
                }
                b'q' => {
                    let i = self.u8()? as usize;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()? as usize;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len();
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as usize;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()? as usize;
                    self.memo_get(i)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self
                        .stack
                        .last()
                        .ok_or_else(|| Error::Pickle("stack underflow".into()))?;
                    let slot = self.copy(top)?;
                    self.push_slot(slot)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(module, name))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(Value::Global(m, n))?,
                        _ => return err("STACK_GLOBAL needs two strings"),
                    }
                }
                b'Q' => {
                    let (id, depth) = self.pop_slot()?;
                    self.push_parent(Value::PersistentId(Box::new(id)), depth)?
                }
                b'R' => {
                    let (args, a) = self.pop_slot()?;
                    let (callable, c) = self.pop_slot()?;
                    let v = reduce(callable, args)?;
                    self.push_parent(v, a.max(c))?
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?;
                    }
                    let (args, a) = self.pop_slot()?;
                    let (class, c) = self.pop_slot()?;
                    self.push_parent(Value::Object(Box::new(class), Box::new(args), None), a.max(c))?
                }
                b'b' => {
                    let (state, depth) = self.pop_slot()?;
                    match self.top_with_child(depth)? {
                        Value::Object(_, _, slot) => *slot = Some(Box::new(state)),
                        // OrderedDict's instance dict (`_metadata`) and other states on
                        // dicts carry no tensors we need.
                        Value::Dict(_) => {}
                        _ => return err("BUILD on a value that is not an object"),
                    }
                }
                b's' => {
                    let (v, dv) = self.pop_slot()?;
                    let (k, dk) = self.pop_slot()?;
                    match self.top_with_child(dv.max(dk))? {
                        Value::Dict(items) => items.push((k, v)),
                        _ => return err("SETITEM on a non-dict"),
                    }
                }
                b'u' => {
                    let (items, depth) = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return err("SETITEMS with an odd number of items");
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top_with_child(depth)? {
                        Value::Dict(d) => d.extend(pairs),
                        _ => return err("SETITEMS on a non-dict"),
                    }
                }
                b'a' => {
                    let (v, depth) = self.pop_slot()?;
                    match self.top_with_child(depth)? {
                        Value::List(l) => l.push(v),
                        _ => return err("APPEND on a non-list"),
                    }
                }
                b'e' => {
                    let (items, depth) = self.pop_mark()?;
                    match self.top_with_child(depth)? {
                        Value::List(l) => l.extend(items),
                        _ => return err("APPENDS on a non-list"),
                    }
                }
                0x8f => self.push(Value::List(Vec::new()))?,
                0x90 => {
                    let (items, depth) = self.pop_mark()?;
                    match self.top_with_child(depth)? {
                        Value::List(l) => l.extend(items),
                        _ => return err("ADDITEMS on a non-set"),
                    }
                }
                0x91 => {
                    let (items, depth) = self.pop_mark()?;
                    self.push_parent(Value::List(items), depth)?
                }
                other => return err(format!("unsupported opcode 0x{other:02x} at offset {}", self.pos - 1)),
            }
        }
    }
}

/// Number of nodes in `value`, counting no further than `cap`.
fn node_count(value: &Value, cap: usize) -> usize {
    let mut count = 0;
    visit(value, &mut |_| {
        count += 1;
        count < cap
    });
    count
}

fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(module, name) = &callable else {
        return Ok(Value::Object(Box::new(callable), Box::new(args), None));
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(args),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args {
            Value::Tuple(mut items) if !items.is_empty() => Ok(items.swap_remove(0)),
            _ => err("_rebuild_parameter without a tensor"),
        },
        ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
        _ => Ok(Value::Object(Box::new(callable), Box::new(args), None)),
    }
}

fn usize_of(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        _ => err(format!("{what} is not a non-negative integer")),
    }
}

fn usizes(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|i| usize_of(i, what)).collect(),
        _ => err(format!("{what} is not a tuple")),
    }
}

fn rebuild_tensor(args: Value) -> Result<Value> {
    let Value::Tuple(items) = args else {
        return err("tensor arguments are not a tuple");
    };
    if items.len() < 4 {
        return err("too few tensor arguments");
    }
    let Value::PersistentId(id) = &items[0] else {
        return err("tensor storage is not a persistent id");
    };
    let Value::Tuple(id) = id.as_ref() else {
        return err("storage id is not a tuple");
    };
    let (Some(Value::Str(kind)), Some(Value::Global(_, class)), Some(key)) = (id.first(), id.get(1), id.get(2)) else {
        return err("storage id is not ('storage', type, key, ...)");
    };
    if kind != "storage" {
        return err(format!("unknown persistent id kind {kind:?}"));
    }
    let key = match key {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => return err("storage key is not a string"),
    };
    if key.contains('/') || key.contains("..") {
        return err("storage key is not a plain name");
    }
    let dtype =
        DType::from_storage_class(class).ok_or_else(|| Error::Pickle(format!("unsupported storage type {class}")))?;
    let shape = usizes(&items[2], "tensor size")?;
    let stride = usizes(&items[3], "tensor stride")?;
    if shape.len() != stride.len() {
        return err("tensor size and stride differ in length");
    }
    let elements = match id.get(4) {
        Some(n) => Some(usize_of(n, "storage size")?),
        None => None,
    };
    Ok(Value::Tensor(TensorRef {
        storage: StorageRef { key, dtype, elements },
        offset: usize_of(&items[1], "storage offset")?,
        shape,
        stride,
    }))
}
