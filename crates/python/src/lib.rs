//! The Python package `frankensplit`: FrankenSplit's CompressAI-compatible
//! entropy coder and its edge encoder for numpy users, with no torch.
//!
//! - [`EntropyBottleneck`]: `compress` / `decompress` with the strings of
//!   CompressAI's `EntropyBottleneck` byte for byte, built from a CompressAI
//!   state dict (either naming, either pmf formula), its tables, or a bundle;
//!   a batch is coded on several threads with the GIL released.
//! - [`Encoder`]: a bundle's edge encoder, image → payload (our container).
//! - [`Payload`]: the container of `docs/format.md` and the raw string inside.
//!
//! Arrays cross as numpy arrays; every size they declare is checked before
//! anything is allocated, and every failure is a Python exception
//! (`ValueError` for bad input, `OSError` for files).

use std::path::PathBuf;

use frankensplit_bundle::VerifiedBundle;
use frankensplit_codec::{
    CdfTables, DecodeLimits, FactorizedDensity, LatentShape, LikelihoodFormula, ModelFingerprint, ParamTensor,
};
use frankensplit_edge::{load_calibration, EdgeModel};
use frankensplit_preprocess::{RgbImage, MAX_PIXELS};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray4, PyArrayMethods, PyReadonlyArray4, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyMapping};

/// A `ValueError` carrying `e`'s message.
fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Runs `f` on each item, on up to the machine's cores, in order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let f = &f;
                scope.spawn(move || part.iter().map(f).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a coding thread panicked"))
            .collect()
    })
}

/// `numpy.ascontiguousarray(value, dtype)`: any array-like (a numpy array,
/// a list, an object with `__array__` such as a CPU torch tensor).
fn as_contiguous<'py>(value: &Bound<'py, PyAny>, dtype: &str) -> PyResult<Bound<'py, PyAny>> {
    let numpy = value.py().import("numpy")?;
    numpy.call_method1("ascontiguousarray", (value, numpy.getattr(dtype)?))
}

/// An array-like's values, in C order, and its shape.
fn values<T: numpy::Element + Copy>(value: &Bound<'_, PyAny>, dtype: &str) -> PyResult<(Vec<T>, Vec<usize>)> {
    let array = as_contiguous(value, dtype)?;
    let array: PyReadonlyArrayDyn<'_, T> = array.extract()?;
    let data = array.as_slice().map_err(value_error)?.to_vec();
    Ok((data, array.shape().to_vec()))
}

/// An array-like as `f32` values and its shape.
fn floats(value: &Bound<'_, PyAny>) -> PyResult<ParamTensor> {
    let (data, shape) = values(value, "float32")?;
    Ok(ParamTensor { shape, data })
}

/// An array-like as `i32` values and its shape.
fn ints(value: &Bound<'_, PyAny>) -> PyResult<(Vec<i32>, Vec<usize>)> {
    values(value, "int32")
}

/// `(H, W)` as CompressAI's `decompress(strings, size)` takes it, or `(C, H, W)`.
fn latent_shape(channels: usize, size: Vec<usize>) -> PyResult<LatentShape> {
    let (c, h, w) = match size[..] {
        [h, w] => (channels, h, w),
        [c, h, w] => (c, h, w),
        _ => {
            return Err(value_error(format!(
                "size is (H, W) or (C, H, W), not {} numbers",
                size.len()
            )))
        }
    };
    if c != channels {
        return Err(value_error(format!(
            "the latent has {c} channels, this entropy bottleneck {channels}"
        )));
    }
    let dim = |v: usize, what: &str| {
        u32::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| value_error(format!("{what} {v} is not a positive 32-bit size")))
    };
    let shape = LatentShape::new(dim(c, "channels")?, dim(h, "height")?, dim(w, "width")?);
    DecodeLimits::default().check(shape).map_err(value_error)?;
    Ok(shape)
}

/// The pmf formula by name.
fn formula(name: &str) -> PyResult<LikelihoodFormula> {
    match name {
        "direct" => Ok(LikelihoodFormula::Direct),
        "sign-flipped" | "sign_flipped" => Ok(LikelihoodFormula::SignFlipped),
        other => Err(value_error(format!(
            "unknown pmf formula {other:?}: \"direct\" (CompressAI >= 1.2.5) or \"sign-flipped\" (<= 1.2.4)"
        ))),
    }
}

/// `(quantized_cdf, cdf_length, offset)` as numpy arrays.
type Tables<'py> = (
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<i32>>,
);

/// CompressAI's `EntropyBottleneck` for coding: its CDF tables and
/// per-channel medians. `compress` and `decompress` give and take exactly
/// the strings of CompressAI 1.2.x (`compressai.entropy_models.EntropyBottleneck`).
#[pyclass(module = "frankensplit", frozen)]
struct EntropyBottleneck {
    inner: frankensplit_codec::EntropyBottleneck,
}

#[pymethods]
impl EntropyBottleneck {
    /// From a CompressAI model's state dict (a mapping of names to numpy
    /// arrays, or to anything `numpy.asarray` takes: CPU torch tensors too).
    ///
    /// The tensors under `prefix` are read in either CompressAI naming
    /// (`matrices.0` since 1.2.7, `_matrix0` before). With `formula=None`,
    /// the tables the state dict holds (`_quantized_cdf`, `_cdf_length`,
    /// `_offset`, written by `update()`) are used as they are; without them,
    /// or with `formula` given, the tables are built from the density as
    /// `update()` builds them: `"direct"` (CompressAI >= 1.2.5; the default
    /// for new names) or `"sign-flipped"` (<= 1.2.4; the default for old names).
    #[staticmethod]
    #[pyo3(signature = (state_dict, prefix = "entropy_bottleneck.", formula = None))]
    fn from_state_dict(state_dict: &Bound<'_, PyAny>, prefix: &str, formula: Option<&str>) -> PyResult<Self> {
        let state = state_dict
            .cast::<PyMapping>()
            .map_err(|_| value_error("state_dict must be a mapping of names to arrays, e.g. model.state_dict()"))?;
        let get = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
            if state.contains(name)? {
                Ok(Some(state.get_item(name)?))
            } else {
                Ok(None)
            }
        };
        let quantiles = get(&format!("{prefix}quantiles"))?.ok_or_else(|| {
            value_error(format!(
                "no {prefix}quantiles in the state dict: is {prefix:?} the entropy bottleneck's prefix?"
            ))
        })?;
        let quantiles = floats(&quantiles)?;
        let medians: Vec<f32> = quantiles
            .data
            .chunks(3)
            .map(|q| q.get(1).copied().unwrap_or(f32::NAN))
            .collect();
        let stored = ["_quantized_cdf", "_cdf_length", "_offset"]
            .map(|n| get(&format!("{prefix}{n}")))
            .into_iter()
            .collect::<PyResult<Vec<_>>>()?;
        if formula.is_none() {
            if let [Some(cdf), Some(lengths), Some(offsets)] = &stored[..] {
                let (cdf, cdf_shape) = ints(cdf)?;
                if !cdf.is_empty() {
                    let width = cdf_shape.last().copied().unwrap_or(0);
                    let tables = CdfTables::from_compressai(&cdf, width, &ints(lengths)?.0, &ints(offsets)?.0)
                        .map_err(value_error)?;
                    return Self::from_parts(tables, medians);
                }
            }
        }
        let mut missing = None;
        let mut legacy = false;
        let density = FactorizedDensity::from_state_dict(prefix, |name| {
            let tensor = get(name).ok().flatten()?;
            legacy |= name[prefix.len()..].starts_with('_');
            match floats(&tensor) {
                Ok(t) => Some(t),
                Err(e) => {
                    missing = Some(e);
                    None
                }
            }
        });
        if let Some(e) = missing {
            return Err(e);
        }
        let density = density.map_err(value_error)?;
        let formula = match formula {
            Some(name) => self::formula(name)?,
            None if legacy => LikelihoodFormula::SignFlipped,
            None => LikelihoodFormula::Direct,
        };
        let inner = frankensplit_codec::EntropyBottleneck::from_density(&density, formula).map_err(value_error)?;
        Ok(Self { inner })
    }

    /// From CompressAI's tables: `quantized_cdf` `(C, W)` (rows padded with
    /// zeros), `cdf_length` `(C,)`, `offset` `(C,)`, and the medians `(C,)`
    /// (`quantiles[:, 0, 1]`).
    #[staticmethod]
    fn from_tables(
        quantized_cdf: &Bound<'_, PyAny>,
        cdf_length: &Bound<'_, PyAny>,
        offset: &Bound<'_, PyAny>,
        medians: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let (cdf, shape) = ints(quantized_cdf)?;
        if shape.len() != 2 {
            return Err(value_error(format!("quantized_cdf must be 2-D (C, W), not {shape:?}")));
        }
        let tables =
            CdfTables::from_compressai(&cdf, shape[1], &ints(cdf_length)?.0, &ints(offset)?.0).map_err(value_error)?;
        Self::from_parts(tables, floats(medians)?.data)
    }

    /// The coder of a FrankenSplit bundle directory (its manifest and
    /// weights checked as the edge and the server check them).
    #[staticmethod]
    fn from_bundle(path: PathBuf) -> PyResult<Self> {
        let codec = VerifiedBundle::open(&path)
            .and_then(|b| b.payload_codec())
            .map_err(|e| PyOSError::new_err(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner: codec.coder().clone(),
        })
    }

    /// Number of latent channels.
    #[getter]
    fn channels(&self) -> usize {
        self.inner.channels()
    }

    /// Per-channel medians the latent is rounded around, `float32 (C,)`.
    #[getter]
    fn medians<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        self.inner.medians().to_vec().into_pyarray(py)
    }

    /// The tables as CompressAI's buffers: `(quantized_cdf (C, W), cdf_length (C,), offset (C,))`, `int32`.
    fn tables<'py>(&self, py: Python<'py>) -> PyResult<Tables<'py>> {
        let (cdf, width, lengths, offsets) = self.inner.tables().to_compressai();
        let rows = lengths.len();
        let cdf = cdf.into_pyarray(py).reshape([rows, width])?;
        Ok((cdf, lengths.into_pyarray(py), offsets.into_pyarray(py)))
    }

    /// `y (N, C, H, W)` → one string per latent, as CompressAI's
    /// `EntropyBottleneck.compress(y)` returns them.
    fn compress<'py>(&self, py: Python<'py>, y: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let array = as_contiguous(y, "float32")?;
        let array: PyReadonlyArray4<'py, f32> = array
            .extract()
            .map_err(|_| value_error("y must be a 4-D array (N, C, H, W)"))?;
        let [n, c, h, w] = <[usize; 4]>::try_from(array.shape()).expect("4-D");
        let shape = latent_shape(self.inner.channels(), vec![c, h, w])?;
        let values = array.as_slice().map_err(value_error)?;
        // `latent_shape` refused empty sides, so every chunk is one whole latent.
        let latents: Vec<&[f32]> = values.chunks(shape.len()).collect();
        debug_assert_eq!(latents.len(), n);
        let strings = py.detach(|| parallel_map(&latents, |latent| self.inner.compress(latent, shape)));
        let strings = strings
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(value_error)?;
        PyList::new(py, strings.iter().map(|s| PyBytes::new(py, s)))
    }

    /// Strings → the dequantised latents `float32 (N, C, H, W)`, as
    /// CompressAI's `decompress(strings, size)`; `size` is `(H, W)` or `(C, H, W)`.
    fn decompress<'py>(
        &self,
        py: Python<'py>,
        strings: Vec<Vec<u8>>,
        size: Vec<usize>,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        let shape = latent_shape(self.inner.channels(), size)?;
        let limits = DecodeLimits::default();
        let latents = py.detach(|| parallel_map(&strings, |s| self.inner.decompress(s, shape, limits)));
        batch(py, latents, shape)
    }

    /// Strings → the integer symbols `int32 (N, C, H, W)` before the medians
    /// are added back (CompressAI's `quantize(y, "symbols", medians)`).
    fn decompress_symbols<'py>(
        &self,
        py: Python<'py>,
        strings: Vec<Vec<u8>>,
        size: Vec<usize>,
    ) -> PyResult<Bound<'py, PyArray4<i32>>> {
        let shape = latent_shape(self.inner.channels(), size)?;
        let limits = DecodeLimits::default();
        let symbols = py.detach(|| parallel_map(&strings, |s| self.inner.decompress_symbols(s, shape, limits)));
        batch(py, symbols, shape)
    }

    fn __repr__(&self) -> String {
        format!("EntropyBottleneck(channels={})", self.inner.channels())
    }
}

impl EntropyBottleneck {
    fn from_parts(tables: CdfTables, medians: Vec<f32>) -> PyResult<Self> {
        let inner = frankensplit_codec::EntropyBottleneck::from_tables(tables, medians).map_err(value_error)?;
        Ok(Self { inner })
    }
}

/// Per-latent results stacked into one `(N, C, H, W)` array.
fn batch<'py, T: numpy::Element, E: std::fmt::Display>(
    py: Python<'py>,
    items: Vec<Result<Vec<T>, E>>,
    shape: LatentShape,
) -> PyResult<Bound<'py, PyArray4<T>>> {
    let n = items.len();
    let mut all = Vec::with_capacity(n * shape.len());
    for (i, item) in items.into_iter().enumerate() {
        all.extend(item.map_err(|e| value_error(format!("string {i}: {e}")))?);
    }
    let dims = [n, shape.channels as usize, shape.height as usize, shape.width as usize];
    all.into_pyarray(py).reshape(dims)
}

/// An image given as a path or as an `uint8 (H, W, 3)` RGB array.
fn image(value: &Bound<'_, PyAny>) -> PyResult<RgbImage> {
    if let Ok(path) = value.extract::<PathBuf>() {
        return RgbImage::open(&path).map_err(|e| PyOSError::new_err(e.to_string()));
    }
    // The shape is checked on numpy's view, before anything is copied.
    let array = value.py().import("numpy")?.call_method1("asarray", (value,))?;
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    let [height, width, 3] = shape[..] else {
        return Err(value_error(format!(
            "an image array is uint8 (H, W, 3) RGB, not of shape {shape:?}"
        )));
    };
    // The bound every decoded image file is held to.
    let side = |v: usize| u32::try_from(v).ok().filter(|&v| v > 0);
    let (Some(width), Some(height)) = (side(width), side(height)) else {
        return Err(value_error(format!(
            "an image of {height}×{width} pixels has an empty or huge side"
        )));
    };
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(value_error(format!(
            "an image of {height}×{width} pixels is larger than {MAX_PIXELS} pixels"
        )));
    }
    let (pixels, _) = values(&array, "uint8")?;
    Ok(RgbImage { width, height, pixels })
}

/// A bundle's edge encoder (no torch): an image is resized and cropped as
/// the bundle says, run through g_a and entropy-coded into a payload,
/// byte-identical to `frankensplit-edge encode`'s.
#[pyclass(module = "frankensplit", frozen)]
struct Encoder {
    model: EdgeModel,
}

#[pymethods]
impl Encoder {
    /// Opens `bundle` (a directory). `int8=True` runs g_a in 8-bit integers
    /// with the bundle's calibration (`frankensplit-edge calibrate`), or the
    /// file `calibration`; `threads` is g_a's thread count.
    #[new]
    #[pyo3(signature = (bundle, int8 = false, calibration = None, threads = 1))]
    fn new(bundle: PathBuf, int8: bool, calibration: Option<PathBuf>, threads: usize) -> PyResult<Self> {
        let os_error = |e: anyhow::Error| PyOSError::new_err(format!("{}: {e:#}", bundle.display()));
        let mut model = EdgeModel::open(&bundle).map_err(os_error)?;
        model.threads = threads.max(1);
        if int8 {
            let calibration = load_calibration(&bundle, calibration.as_deref()).map_err(os_error)?;
            model.use_int8(&calibration).map_err(os_error)?;
        }
        Ok(Self { model })
    }

    /// The model's fingerprint, as payloads carry it (8 hex digits).
    #[getter]
    fn fingerprint(&self) -> String {
        self.model.fingerprint.to_string()
    }

    /// Shape `(C, H, W)` of one image's latent.
    #[getter]
    fn latent_shape(&self) -> (u32, u32, u32) {
        let s = self.model.latent_shape();
        (s.channels, s.height, s.width)
    }

    /// Side of the square crop g_a takes.
    #[getter]
    fn input_size(&self) -> usize {
        self.model.input_size()
    }

    /// The bundle's entropy coder.
    #[getter]
    fn entropy_bottleneck(&self) -> EntropyBottleneck {
        EntropyBottleneck {
            inner: self.model.coder().clone(),
        }
    }

    /// An image (a path, or `uint8 (H, W, 3)` RGB) → its payload (our container).
    fn encode<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let image = self::image(image)?;
        let payload = py.detach(|| -> anyhow::Result<Vec<u8>> {
            let input = self.model.preprocess.apply(&image)?;
            self.model.compress(&input)
        });
        Ok(PyBytes::new(py, &payload.map_err(|e| value_error(format!("{e:#}")))?))
    }

    /// An image → g_a's latent `float32 (C, H, W)`, before rounding.
    fn encode_latent<'py>(&self, py: Python<'py>, image: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let image = self::image(image)?;
        let latent = py.detach(|| -> anyhow::Result<Vec<f32>> {
            let input = self.model.preprocess.apply(&image)?;
            self.model.encode_latent(&input)
        });
        let latent = latent.map_err(|e| value_error(format!("{e:#}")))?;
        let (c, h, w) = self.latent_shape();
        Ok(latent
            .into_pyarray(py)
            .reshape([c as usize, h as usize, w as usize])?
            .into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "Encoder(fingerprint={:?}, latent_shape={:?}, int8={})",
            self.fingerprint(),
            self.latent_shape(),
            self.model.is_int8()
        )
    }
}

/// FrankenSplit's payload container (`docs/format.md`): the model's
/// fingerprint, the latent shape and the raw CompressAI string.
#[pyclass(module = "frankensplit", frozen, eq)]
#[derive(PartialEq)]
struct Payload {
    /// The model's fingerprint (8 hex digits).
    #[pyo3(get)]
    fingerprint: String,
    /// The latent shape `(C, H, W)`.
    #[pyo3(get)]
    shape: (u32, u32, u32),
    string: Vec<u8>,
}

#[pymethods]
impl Payload {
    /// A payload of `string` (a raw CompressAI string) for the model
    /// `fingerprint` (8 hex digits) and a latent of `shape` `(C, H, W)`.
    #[new]
    fn new(fingerprint: &str, shape: (u32, u32, u32), string: Vec<u8>) -> PyResult<Self> {
        parse_fingerprint(fingerprint)?;
        if shape.0 == 0 || shape.1 == 0 || shape.2 == 0 {
            return Err(value_error(format!("latent shape {shape:?} has an empty side")));
        }
        Ok(Self {
            fingerprint: fingerprint.to_ascii_lowercase(),
            shape,
            string,
        })
    }

    /// Parses a payload's bytes (refused with `ValueError` if malformed).
    #[staticmethod]
    fn parse(data: &[u8]) -> PyResult<Self> {
        let parsed = frankensplit_codec::Payload::parse(data).map_err(value_error)?;
        Ok(Self {
            fingerprint: parsed.fingerprint.to_string(),
            shape: (parsed.shape.channels, parsed.shape.height, parsed.shape.width),
            string: parsed.string.to_vec(),
        })
    }

    /// The bytes of a payload of `string` for `fingerprint` and `shape`.
    #[staticmethod]
    fn build<'py>(
        py: Python<'py>,
        fingerprint: &str,
        shape: (u32, u32, u32),
        string: Vec<u8>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        Self::new(fingerprint, shape, string)?.to_bytes(py)
    }

    /// The raw CompressAI string inside.
    #[getter]
    fn string<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.string)
    }

    /// The payload's bytes.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let payload = frankensplit_codec::Payload {
            fingerprint: parse_fingerprint(&self.fingerprint)?,
            shape: LatentShape::new(self.shape.0, self.shape.1, self.shape.2),
            string: &self.string,
        };
        Ok(PyBytes::new(py, &payload.to_bytes()))
    }

    fn __repr__(&self) -> String {
        format!(
            "Payload(fingerprint={:?}, shape={:?}, string=<{} bytes>)",
            self.fingerprint,
            self.shape,
            self.string.len()
        )
    }
}

fn parse_fingerprint(text: &str) -> PyResult<ModelFingerprint> {
    if text.len() != 8 {
        return Err(value_error(format!("a fingerprint is 8 hex digits, not {text:?}")));
    }
    u32::from_str_radix(text, 16)
        .map(ModelFingerprint)
        .map_err(|_| value_error(format!("a fingerprint is 8 hex digits, not {text:?}")))
}

/// FrankenSplit's CompressAI-compatible entropy coder and edge encoder.
#[pymodule]
fn frankensplit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EntropyBottleneck>()?;
    m.add_class::<Encoder>()?;
    m.add_class::<Payload>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
