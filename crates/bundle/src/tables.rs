//! Reading a bundle's tensors without a tensor framework: the little-endian
//! `f32`/`i32` tensors of `weights.safetensors`, the entropy coder's CDF
//! tables (`entropy_tables.*`, CompressAI's `_quantized_cdf`, `_cdf_length`,
//! `_offset`) and the per-channel medians of the entropy bottleneck.

use frankensplit_codec::{CdfTables, EntropyBottleneck};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::names;

fn view<'a>(tensors: &'a SafeTensors<'a>, name: &str, dtype: Dtype) -> Result<TensorView<'a>> {
    let view = tensors
        .tensor(name)
        .map_err(|_| Error::Invalid(format!("the bundle lacks {name}")))?;
    if view.dtype() != dtype {
        return Err(Error::Invalid(format!(
            "{name} is {:?}, expected {dtype:?}",
            view.dtype()
        )));
    }
    Ok(view)
}

/// A 4-byte little-endian tensor's values and shape.
fn read<T>(
    tensors: &SafeTensors<'_>,
    name: &str,
    dtype: Dtype,
    from_bytes: fn([u8; 4]) -> T,
) -> Result<(Vec<T>, Vec<usize>)> {
    let view = view(tensors, name, dtype)?;
    let values = view
        .data()
        .chunks_exact(4)
        .map(|b| from_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((values, view.shape().to_vec()))
}

/// The `f32` tensor `name`: values (row-major) and shape.
pub fn floats(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    read(tensors, name, Dtype::F32, f32::from_le_bytes)
}

/// The `i32` tensor `name`: values (row-major) and shape.
pub fn ints(tensors: &SafeTensors<'_>, name: &str) -> Result<(Vec<i32>, Vec<usize>)> {
    read(tensors, name, Dtype::I32, i32::from_le_bytes)
}

/// The entropy coder's quantised CDF tables.
pub fn cdf_tables(tensors: &SafeTensors<'_>) -> Result<CdfTables> {
    let (cdf, cdf_shape) = ints(tensors, names::QUANTIZED_CDF)?;
    let (lengths, _) = ints(tensors, names::CDF_LENGTH)?;
    let (offsets, _) = ints(tensors, names::OFFSET)?;
    let width = cdf_shape.last().copied().unwrap_or(0);
    Ok(CdfTables::from_compressai(&cdf, width, &lengths, &offsets)?)
}

/// The entropy bottleneck's per-channel medians (`quantiles[:, 0, 1]`), which
/// the latent is rounded against.
pub fn medians(tensors: &SafeTensors<'_>, channels: usize) -> Result<Vec<f32>> {
    let (quantiles, shape) = floats(tensors, names::QUANTILES)?;
    if shape != [channels, 1, 3] {
        return Err(Error::Invalid(format!(
            "{} has shape {shape:?}, expected [{channels}, 1, 3]",
            names::QUANTILES
        )));
    }
    Ok(quantiles.chunks_exact(3).map(|q| q[1]).collect())
}

/// The entropy coder of a bundle: its tables and its medians.
pub fn entropy_coder(tensors: &SafeTensors<'_>, channels: usize) -> Result<EntropyBottleneck> {
    Ok(EntropyBottleneck::from_tables(
        cdf_tables(tensors)?,
        medians(tensors, channels)?,
    )?)
}
