//! Reads PyTorch checkpoints written by `torch.save` (the zip format of
//! PyTorch ≥ 1.6) into named tensors, without Python, libtorch or executing
//! anything: the pickle is interpreted by a small stack machine that knows
//! how PyTorch rebuilds tensors and `OrderedDict`s and keeps every other
//! object (optimizer state, `argparse.Namespace`, …) as an opaque value.
//!
//! Typical use: the state dict inside a torchdistill checkpoint
//! (`{"model": state_dict, "optimizer": …, "args": Namespace(…)}`):
//!
//! ```no_run
//! let ckpt = frankensplit_checkpoint::Checkpoint::open("student_model.ckpt".as_ref())?;
//! for tensor in ckpt.tensors_under(&["model"])? {
//!     println!("{} {:?} {:?}", tensor.name, tensor.dtype, tensor.shape);
//! }
//! # Ok::<(), frankensplit_checkpoint::Error>(())
//! ```

mod pickle;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::path::Path;

pub use pickle::{load as unpickle, StorageRef, TensorRef, Value};
use thiserror::Error;

/// Why a checkpoint could not be read.
#[derive(Debug, Error)]
pub enum Error {
    /// File system error.
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The file is not a zip archive, or a member is unreadable.
    #[error("not a PyTorch zip checkpoint ({0}); legacy (pre-1.6, non-zip) files must be re-saved with a current torch.save")]
    Zip(String),
    /// The pickle is malformed or uses something this reader does not support.
    #[error("cannot interpret the checkpoint's pickle: {0}")]
    Pickle(String),
    /// A tensor's storage is missing or too short for its view.
    #[error("tensor {name}: {why}")]
    Storage { name: String, why: String },
    /// The requested entry is absent or is not a dict of tensors.
    #[error("{0}")]
    Layout(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// `float32`
    F32,
    /// `float64`
    F64,
    /// `float16`
    F16,
    /// `bfloat16`
    BF16,
    /// `int64`
    I64,
    /// `int32`
    I32,
    /// `int16`
    I16,
    /// `int8`
    I8,
    /// `uint8`
    U8,
    /// `bool`
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub(crate) fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// A tensor read from a checkpoint: contiguous little-endian bytes in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Dotted name (the state-dict key).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` bytes.
    pub data: Vec<u8>,
}

/// An opened checkpoint: the unpickled object and the archive's storages.
#[derive(Debug)]
pub struct Checkpoint {
    root: Value,
    storages: HashMap<String, Vec<u8>>,
}

/// Largest pickle accepted (the tensors live outside it; real ones are a few MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

impl Checkpoint {
    /// Reads a checkpoint file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_reader(file)
    }

    /// Reads a checkpoint from any seekable source.
    pub fn from_reader<R: Read + Seek>(reader: R) -> Result<Self> {
        let mut archive = zip::ZipArchive::new(reader).map_err(|e| Error::Zip(e.to_string()))?;
        let pickle_name = (0..archive.len())
            .filter_map(|i| archive.name_for_index(i).map(str::to_string))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .ok_or_else(|| Error::Zip("no data.pkl member".into()))?;
        let prefix = pickle_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
        let pickle_bytes = read_member(&mut archive, &pickle_name, MAX_PICKLE_BYTES)?;
        let root = pickle::load(&pickle_bytes)?;
        let mut storages = HashMap::new();
        for key in pickle::storage_keys(&root) {
            let name = format!("{prefix}data/{key}");
            if let Ok(bytes) = read_member(&mut archive, &name, u64::MAX) {
                storages.insert(key, bytes);
            }
        }
        Ok(Self { root, storages })
    }

    /// The unpickled object.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The tensors of the dict reached by following `path` (string keys)
    /// from the root; tensors nested in sub-dicts get dotted names. Non-tensor
    /// entries are skipped.
    pub fn tensors_under(&self, path: &[&str]) -> Result<Vec<NamedTensor>> {
        let mut node = &self.root;
        for (depth, key) in path.iter().enumerate() {
            node = node.get(key).ok_or_else(|| {
                Error::Layout(format!(
                    "checkpoint has no entry {:?} (looked for {})",
                    key,
                    path[..=depth].join(" → ")
                ))
            })?;
        }
        let mut out = Vec::new();
        self.collect(node, String::new(), &mut out)?;
        if out.is_empty() {
            return Err(Error::Layout(format!(
                "no tensors under {}",
                if path.is_empty() {
                    "the root".into()
                } else {
                    path.join(" → ")
                }
            )));
        }
        Ok(out)
    }

    fn collect(&self, value: &Value, name: String, out: &mut Vec<NamedTensor>) -> Result<()> {
        match value {
            Value::Tensor(t) => out.push(self.materialize(&name, t)?),
            Value::Dict(items) => {
                for (k, v) in items {
                    if let Value::Str(k) = k {
                        let child = if name.is_empty() {
                            k.clone()
                        } else {
                            format!("{name}.{k}")
                        };
                        self.collect(v, child, out)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn materialize(&self, name: &str, t: &TensorRef) -> Result<NamedTensor> {
        let bad = |why: String| Error::Storage {
            name: name.to_string(),
            why,
        };
        let storage = self
            .storages
            .get(&t.storage.key)
            .ok_or_else(|| bad(format!("storage {} is missing from the archive", t.storage.key)))?;
        let size = t.storage.dtype.size();
        let elements = storage.len() / size;
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        let mut data = Vec::with_capacity(numel.checked_mul(size).ok_or_else(|| bad("shape overflows".into()))?);
        let contiguous: Vec<usize> = t
            .shape
            .iter()
            .rev()
            .scan(1usize, |acc, &d| {
                let s = *acc;
                *acc = acc.saturating_mul(d);
                Some(s)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if numel > 0 && t.stride == contiguous {
            let start = t.offset.checked_mul(size);
            let end = t.offset.checked_add(numel).and_then(|e| e.checked_mul(size));
            match (start, end) {
                (Some(start), Some(end)) if end <= storage.len() => data.extend_from_slice(&storage[start..end]),
                _ => {
                    return Err(bad(format!(
                        "view of {numel} elements at offset {} exceeds its storage of {elements} elements",
                        t.offset
                    )))
                }
            }
        } else if numel > 0 {
            // The last element's index must lie inside the storage.
            let last = t
                .shape
                .iter()
                .zip(&t.stride)
                .try_fold(t.offset, |acc, (&d, &s)| acc.checked_add((d - 1).checked_mul(s)?));
            match last {
                Some(last) if last < elements => {}
                _ => {
                    return Err(bad(format!(
                        "view {:?}/{:?}+{} exceeds its storage of {elements} elements",
                        t.shape, t.stride, t.offset
                    )))
                }
            }
            let mut index = vec![0usize; t.shape.len()];
            for _ in 0..numel {
                let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
                data.extend_from_slice(&storage[at * size..(at + 1) * size]);
                for d in (0..index.len()).rev() {
                    index[d] += 1;
                    if index[d] < t.shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        Ok(NamedTensor {
            name: name.to_string(),
            dtype: t.storage.dtype,
            shape: t.shape.clone(),
            data,
        })
    }
}

fn read_member<R: Read + Seek>(archive: &mut zip::ZipArchive<R>, name: &str, limit: u64) -> Result<Vec<u8>> {
    let mut file = archive.by_name(name).map_err(|e| Error::Zip(format!("{name}: {e}")))?;
    if file.size() > limit {
        return Err(Error::Zip(format!(
            "{name} is {} bytes, over the {limit}-byte limit",
            file.size()
        )));
    }
    let mut bytes = Vec::with_capacity(file.size().min(1 << 30) as usize);
    file.read_to_end(&mut bytes)
        .map_err(|e| Error::Zip(format!("{name}: {e}")))?;
    Ok(bytes)
}
