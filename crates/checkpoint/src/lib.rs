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
    limits: Limits,
}

/// Largest pickle accepted (the tensors live outside it; real ones are a few MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// How much a checkpoint may make the reader allocate: a file is untrusted
/// input, and a few hundred compressed bytes can declare terabytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of tensor data read from the archive's storages, and
    /// separately most bytes of tensors one [`Checkpoint::tensors_under`]
    /// builds. Default 8 GiB (Swin-B's checkpoint holds 0.35 GiB).
    pub max_data_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_data_bytes: 8 << 30,
        }
    }
}

impl Checkpoint {
    /// Reads a checkpoint file with the default [`Limits`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, Limits::default())
    }

    /// Reads a checkpoint file within `limits`.
    pub fn open_with(path: &Path, limits: Limits) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_reader_with(file, limits)
    }

    /// Reads a checkpoint from any seekable source with the default [`Limits`].
    pub fn from_reader<R: Read + Seek>(reader: R) -> Result<Self> {
        Self::from_reader_with(reader, Limits::default())
    }

    /// Reads a checkpoint from any seekable source within `limits`. Each
    /// storage is read up to the size its tensors' pickle declares, never
    /// past what its zip entry declares, and their total is bounded before
    /// anything is allocated.
    pub fn from_reader_with<R: Read + Seek>(reader: R, limits: Limits) -> Result<Self> {
        let mut archive = zip::ZipArchive::new(reader).map_err(|e| Error::Zip(e.to_string()))?;
        let pickle_name = (0..archive.len())
            .filter_map(|i| archive.name_for_index(i).map(str::to_string))
            .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
            .ok_or_else(|| Error::Zip("no data.pkl member".into()))?;
        let prefix = pickle_name.strip_suffix("data.pkl").unwrap_or_default().to_string();
        let pickle_bytes = read_member(&mut archive, &pickle_name, MAX_PICKLE_BYTES)?;
        let root = pickle::load(&pickle_bytes)?;
        let mut storages = HashMap::new();
        let mut total = 0u64;
        for storage in pickle::storages(&root) {
            let name = format!("{prefix}data/{}", storage.key);
            let Ok(member) = archive.by_name(&name) else {
                // Reported when a tensor on it is materialised.
                continue;
            };
            let declared = match storage.elements {
                Some(n) => (n as u64)
                    .checked_mul(storage.dtype.size() as u64)
                    .ok_or_else(|| Error::Zip(format!("{name}: declared size overflows")))?,
                None => member.size(),
            };
            if declared > member.size() {
                return Err(Error::Zip(format!(
                    "{name} holds {} bytes, its tensors declare {declared}",
                    member.size()
                )));
            }
            total = total.saturating_add(declared);
            if total > limits.max_data_bytes {
                return Err(Error::Zip(format!(
                    "tensor data of more than {} bytes (the limit; raise it if this checkpoint is trusted)",
                    limits.max_data_bytes
                )));
            }
            drop(member);
            storages.insert(storage.key, read_member(&mut archive, &name, declared)?);
        }
        Ok(Self { root, storages, limits })
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
        let mut budget = self.limits.max_data_bytes;
        self.collect(node, String::new(), &mut out, &mut budget)?;
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

    fn collect(&self, value: &Value, name: String, out: &mut Vec<NamedTensor>, budget: &mut u64) -> Result<()> {
        match value {
            Value::Tensor(t) => out.push(self.materialize(&name, t, budget)?),
            Value::Dict(items) => {
                for (k, v) in items {
                    if let Value::Str(k) = k {
                        let child = if name.is_empty() {
                            k.clone()
                        } else {
                            format!("{name}.{k}")
                        };
                        self.collect(v, child, out, budget)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Copies a tensor's view out of its storage, after checking that the
    /// view lies inside the storage and fits `budget` (bytes left to build).
    fn materialize(&self, name: &str, t: &TensorRef, budget: &mut u64) -> Result<NamedTensor> {
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
        // Views that read an element more than once (stride 0) are not
        // supported: without them a tensor is never larger than its storage.
        if numel > elements {
            return Err(bad(format!(
                "view of {numel} elements over a storage of {elements} elements"
            )));
        }
        let bytes = (numel * size) as u64;
        if bytes > *budget {
            return Err(bad(format!(
                "tensors of more than {} bytes in all (the limit)",
                self.limits.max_data_bytes
            )));
        }
        *budget -= bytes;
        let mut data = Vec::with_capacity(numel * size);
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

/// The first `limit` bytes of member `name` (all of it when shorter), never
/// more: a member's stream may inflate past the size its entry declares.
fn read_member<R: Read + Seek>(archive: &mut zip::ZipArchive<R>, name: &str, limit: u64) -> Result<Vec<u8>> {
    let file = archive.by_name(name).map_err(|e| Error::Zip(format!("{name}: {e}")))?;
    let declared = file.size();
    if declared > limit && name.ends_with("data.pkl") {
        return Err(Error::Zip(format!(
            "{name} is {declared} bytes, over the {limit}-byte limit"
        )));
    }
    let want = declared.min(limit);
    let mut bytes = Vec::with_capacity(usize::try_from(want).unwrap_or(usize::MAX).min(1 << 30));
    file.take(want)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Zip(format!("{name}: {e}")))?;
    if (bytes.len() as u64) < want {
        return Err(Error::Zip(format!(
            "{name} ends after {} of its {want} bytes",
            bytes.len()
        )));
    }
    Ok(bytes)
}
