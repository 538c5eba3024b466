//! The factorized prior (CompressAI's `EntropyBottleneck`): a per-channel
//! monotone density model, the CDF tables `update()` derives from it, and
//! coding of a latent with median-centred rounding.
//!
//! Table building follows `update()` operation by operation in `f32` so the
//! tables equal CompressAI's; see [`LikelihoodFormula`] for the one place where
//! CompressAI versions differ.

use serde::{Deserialize, Serialize};

use crate::cdf::{pmf_to_quantized_cdf, CdfTables};
use crate::coder::{decode_symbol, encode_symbol};
use crate::error::{CodecError, Result};
use crate::rans::{RansDecoder, RansEncoder};
use crate::{DecodeLimits, LatentShape};

/// Widest hidden layer accepted (CompressAI's default is 3).
const MAX_WIDTH: usize = 16;

/// How `update()` turns the cumulative logits into a pmf. The two formulas are
/// equal in exact arithmetic but round differently in `f32`, so a table must be
/// built with the formula of the CompressAI version on the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LikelihoodFormula {
    /// `sigmoid(upper) - sigmoid(lower)`: CompressAI 1.2.5 and later.
    #[default]
    Direct,
    /// `|sigmoid(s·upper) - sigmoid(s·lower)|` with `s = -sign(lower + upper)`:
    /// CompressAI up to 1.2.4, the version FrankenSplit's release pins (1.2.2).
    SignFlipped,
}

/// Parameters of CompressAI's factorized density: for each channel a chain of
/// `filters.len() + 1` layers `x ← softplus(M)·x + b`, each but the last
/// followed by `x ← x + tanh(f)·tanh(x)`, mapping a value to the logit of its CDF.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorizedDensity {
    channels: usize,
    /// Layer widths including the scalar input and output, `(1, 3, 3, 3, 3, 1)` by default.
    widths: Vec<usize>,
    /// `softplus(matrices[i])`, row-major `channels × widths[i+1] × widths[i]`,
    /// precomputed because only the softplus is ever used.
    weights: Vec<Vec<f32>>,
    /// `channels × widths[i+1]`.
    biases: Vec<Vec<f32>>,
    /// `tanh(factors[i])`, `channels × widths[i+1]`, for every layer but the last.
    gates: Vec<Vec<f32>>,
    /// `channels × 3`: lower tail, median, upper tail.
    quantiles: Vec<f32>,
}

/// A tensor as read from a checkpoint: shape and `f32` data in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl FactorizedDensity {
    /// Builds the density from CompressAI's parameter tensors found through
    /// `lookup`, under `prefix` (e.g. `"entropy_bottleneck."`). Both namings
    /// are accepted: `matrices.0`/`biases.0`/`factors.0` (CompressAI ≥ 1.2.7)
    /// and `_matrix0`/`_bias0`/`_factor0` (earlier releases).
    pub fn from_state_dict(prefix: &str, mut lookup: impl FnMut(&str) -> Option<ParamTensor>) -> Result<Self> {
        let mut find = |new: String, old: String| {
            lookup(&new)
                .or_else(|| lookup(&old))
                .ok_or_else(|| CodecError::InvalidParameters(format!("missing tensor {new} (or {old})")))
        };
        let quantiles = find(format!("{prefix}quantiles"), format!("{prefix}quantiles"))?;
        let [channels, 1, 3] = quantiles.shape[..] else {
            return Err(CodecError::InvalidParameters(format!(
                "{prefix}quantiles has shape {:?}, expected (C, 1, 3)",
                quantiles.shape
            )));
        };
        let mut matrices = Vec::new();
        let mut biases = Vec::new();
        let mut factors = Vec::new();
        for i in 0.. {
            let Ok(matrix) = find(format!("{prefix}matrices.{i}"), format!("{prefix}_matrix{i}")) else {
                break;
            };
            matrices.push(matrix);
            biases.push(find(format!("{prefix}biases.{i}"), format!("{prefix}_bias{i}"))?);
        }
        for i in 0..matrices.len().saturating_sub(1) {
            factors.push(find(format!("{prefix}factors.{i}"), format!("{prefix}_factor{i}"))?);
        }
        Self::new(channels, matrices, biases, factors, quantiles.data)
    }

    /// Builds the density from its raw tensors (`matrices[i]`: `C × out × in`,
    /// `biases[i]`: `C × out × 1`, `factors[i]`: `C × out × 1`, `quantiles`: `C × 1 × 3`).
    pub fn new(
        channels: usize,
        matrices: Vec<ParamTensor>,
        biases: Vec<ParamTensor>,
        factors: Vec<ParamTensor>,
        quantiles: Vec<f32>,
    ) -> Result<Self> {
        let bad = |why: String| Err(CodecError::InvalidParameters(why));
        if channels == 0 || matrices.is_empty() {
            return bad("a factorized density needs at least one channel and one layer".into());
        }
        if biases.len() != matrices.len() || factors.len() + 1 != matrices.len() {
            return bad(format!(
                "{} matrices need as many biases and one factor fewer; got {} biases, {} factors",
                matrices.len(),
                biases.len(),
                factors.len()
            ));
        }
        if quantiles.len() != channels * 3 {
            return bad(format!(
                "quantiles hold {} values, expected {}",
                quantiles.len(),
                channels * 3
            ));
        }
        if let Some(i) = quantiles.iter().position(|q| !q.is_finite()) {
            return bad(format!("quantile {} of channel {} is not finite", i % 3, i / 3));
        }
        let mut widths = vec![1usize];
        for (i, m) in matrices.iter().enumerate() {
            let [c, out, inp] = m.shape[..] else {
                return bad(format!("matrix {i} has shape {:?}, expected 3 dimensions", m.shape));
            };
            if c != channels || inp != widths[i] || out == 0 || out > MAX_WIDTH || m.data.len() != c * out * inp {
                return bad(format!(
                    "matrix {i} has shape {:?}, expected ({channels}, 1..={MAX_WIDTH}, {})",
                    m.shape, widths[i]
                ));
            }
            widths.push(out);
        }
        if widths.last() != Some(&1) {
            return bad(format!("the last layer has width {:?}, expected 1", widths.last()));
        }
        let check_vector = |kind: &str, i: usize, t: &ParamTensor| {
            let expected = [channels, widths[i + 1], 1];
            if t.shape[..] != expected || t.data.len() != channels * widths[i + 1] {
                return Err(CodecError::InvalidParameters(format!(
                    "{kind} {i} has shape {:?}, expected {expected:?}",
                    t.shape
                )));
            }
            Ok(())
        };
        for (i, b) in biases.iter().enumerate() {
            check_vector("bias", i, b)?;
        }
        for (i, f) in factors.iter().enumerate() {
            check_vector("factor", i, f)?;
        }
        Ok(Self {
            channels,
            widths,
            weights: matrices
                .iter()
                .map(|m| m.data.iter().map(|&v| softplus(v)).collect())
                .collect(),
            biases: biases.into_iter().map(|b| b.data).collect(),
            gates: factors
                .iter()
                .map(|f| f.data.iter().map(|v| v.tanh()).collect())
                .collect(),
            quantiles,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The learned median of each channel (`quantiles[:, 0, 1]`).
    pub fn medians(&self) -> Vec<f32> {
        self.quantiles.chunks_exact(3).map(|q| q[1]).collect()
    }

    /// The cumulative logit of `x` in channel `c` (`_logits_cumulative`).
    pub fn logits_cumulative(&self, c: usize, x: f32) -> f32 {
        let mut current = [0f32; MAX_WIDTH];
        let mut next = [0f32; MAX_WIDTH];
        current[0] = x;
        let layers = self.weights.len();
        for layer in 0..layers {
            let (inp, out) = (self.widths[layer], self.widths[layer + 1]);
            let weights = &self.weights[layer][c * out * inp..(c + 1) * out * inp];
            let biases = &self.biases[layer][c * out..(c + 1) * out];
            for o in 0..out {
                let row = &weights[o * inp..(o + 1) * inp];
                let mut acc = row[0] * current[0];
                for k in 1..inp {
                    acc += row[k] * current[k];
                }
                let mut v = acc + biases[o];
                if layer + 1 < layers {
                    v += self.gates[layer][c * out + o] * v.tanh();
                }
                next[o] = v;
            }
            std::mem::swap(&mut current, &mut next);
        }
        current[0]
    }

    /// The CDF tables and offsets that CompressAI's `update()` computes, using
    /// the pmf `formula` of the CompressAI version the peer runs.
    ///
    /// Every step is CompressAI's in `f32`, but `exp`, `log1p` and `tanh` come
    /// from Rust's libm rather than PyTorch's SLEEF kernels, which differ in the
    /// last bit now and then. A bin whose probability·2^16 lies within that
    /// error of a half-integer can therefore round the other way; tables that
    /// must match a Python peer's exactly should be taken from its checkpoint
    /// (`_quantized_cdf`, see [`EntropyBottleneck::from_tables`]).
    pub fn build_tables(&self, formula: LikelihoodFormula) -> Result<CdfTables> {
        let (offsets, pmfs) = self.update_pmfs(formula)?;
        let rows = pmfs
            .iter()
            .enumerate()
            .map(|(c, pmf)| {
                pmf_to_quantized_cdf(pmf).map_err(|e| CodecError::InvalidParameters(format!("channel {c}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        CdfTables::new(rows, offsets)
    }

    /// The per-channel offsets and `f32` pmfs (tail mass last) that `update()`
    /// quantises into CDF rows.
    pub fn update_pmfs(&self, formula: LikelihoodFormula) -> Result<(Vec<i32>, Vec<Vec<f32>>)> {
        let ranges: Vec<(i32, i32)> = self
            .quantiles
            .chunks_exact(3)
            .map(|q| {
                let median = q[1];
                let minima = ceil_to_i32(median - q[0]).max(0);
                let maxima = ceil_to_i32(q[2] - median).max(0);
                (minima, maxima)
            })
            .collect();
        let lengths: Vec<usize> = ranges
            .iter()
            .map(|&(lo, hi)| usize::try_from(i64::from(lo) + i64::from(hi) + 1).unwrap_or(usize::MAX))
            .collect();
        let max_length = *lengths.iter().max().expect("at least one channel");
        if max_length + 2 > crate::cdf::MAX_CDF_LENGTH {
            return Err(CodecError::InvalidParameters(format!(
                "quantiles span {max_length} values, more than a 16-bit table can hold"
            )));
        }
        let pmfs = ranges
            .iter()
            .zip(&lengths)
            .enumerate()
            .map(|(c, (&(minima, _), &length))| {
                let pmf_start = self.quantiles[3 * c + 1] - minima as f32;
                let mut pmf = Vec::with_capacity(length + 1);
                let mut first_lower = 0.0;
                let mut last_upper = 0.0;
                for k in 0..max_length {
                    let sample = k as f32 + pmf_start;
                    let lower = self.logits_cumulative(c, sample - 0.5);
                    let upper = self.logits_cumulative(c, sample + 0.5);
                    if k == 0 {
                        first_lower = lower;
                    }
                    // CompressAI takes the upper tail at the last sample of the
                    // longest channel, for every channel; so do we.
                    if k + 1 == max_length {
                        last_upper = upper;
                    }
                    if k < length {
                        pmf.push(formula.pmf(lower, upper));
                    }
                }
                pmf.push(sigmoid(first_lower) + sigmoid(-last_upper));
                pmf
            })
            .collect();
        Ok((ranges.iter().map(|&(minima, _)| -minima).collect(), pmfs))
    }
}

impl LikelihoodFormula {
    #[inline]
    fn pmf(self, lower: f32, upper: f32) -> f32 {
        match self {
            Self::Direct => sigmoid(upper) - sigmoid(lower),
            Self::SignFlipped => {
                let sum = lower + upper;
                // torch.sign: -1, 0 or 1 (and NaN stays NaN, caught later).
                let sign = if sum > 0.0 {
                    -1.0
                } else if sum < 0.0 {
                    1.0
                } else {
                    0.0
                };
                (sigmoid(sign * upper) - sigmoid(sign * lower)).abs()
            }
        }
    }
}

/// `torch.nn.functional.softplus` with its default threshold of 20.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `torch.ceil(x).int()`, saturating instead of wrapping.
fn ceil_to_i32(x: f32) -> i32 {
    x.ceil() as i32
}

/// A ready-to-code factorized prior: CDF tables plus the per-channel medians
/// the latent is centred on before rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct EntropyBottleneck {
    tables: CdfTables,
    medians: Vec<f32>,
}

impl EntropyBottleneck {
    /// Builds the coder from a density model, as CompressAI's `update()` does.
    pub fn from_density(density: &FactorizedDensity, formula: LikelihoodFormula) -> Result<Self> {
        Self::from_tables(density.build_tables(formula)?, density.medians())
    }

    /// Uses tables a checkpoint already holds (`_quantized_cdf`, `_cdf_length`,
    /// `_offset`) with the medians from its `quantiles`.
    pub fn from_tables(tables: CdfTables, medians: Vec<f32>) -> Result<Self> {
        if tables.num_rows() != medians.len() {
            return Err(CodecError::ShapeMismatch(format!(
                "{} CDF rows but {} channel medians",
                tables.num_rows(),
                medians.len()
            )));
        }
        if let Some(c) = medians.iter().position(|m| !m.is_finite()) {
            return Err(CodecError::InvalidParameters(format!(
                "median of channel {c} is not finite"
            )));
        }
        Ok(Self { tables, medians })
    }

    /// Number of latent channels.
    pub fn channels(&self) -> usize {
        self.medians.len()
    }

    /// The CDF tables.
    pub fn tables(&self) -> &CdfTables {
        &self.tables
    }

    /// Per-channel medians.
    pub fn medians(&self) -> &[f32] {
        &self.medians
    }

    /// The integer symbols of a `C×H×W` latent: `round_half_even(y - median_c)`.
    pub fn quantize(&self, latent: &[f32], shape: LatentShape) -> Result<Vec<i32>> {
        self.check_shape(latent.len(), shape)?;
        let plane = shape.plane();
        latent
            .iter()
            .enumerate()
            .map(|(i, &y)| quantize_value(i, y, self.medians[i / plane]))
            .collect()
    }

    /// Compresses one `C×H×W` latent to a CompressAI string: the bytes
    /// `EntropyBottleneck.compress` returns for it.
    pub fn compress(&self, latent: &[f32], shape: LatentShape) -> Result<Vec<u8>> {
        self.check_shape(latent.len(), shape)?;
        let plane = shape.plane();
        let mut enc = RansEncoder::with_capacity(latent.len() / 4);
        for (c, values) in latent.chunks_exact(plane).enumerate().rev() {
            let row = self.tables.row(c);
            let median = self.medians[c];
            for (j, &y) in values.iter().enumerate().rev() {
                encode_symbol(&mut enc, row, quantize_value(c * plane + j, y, median)?);
            }
        }
        Ok(enc.finish())
    }

    /// Decodes a CompressAI string to the symbols of a `C×H×W` latent.
    pub fn decompress_symbols(&self, bytes: &[u8], shape: LatentShape, limits: DecodeLimits) -> Result<Vec<i32>> {
        limits.check(shape)?;
        self.check_shape(shape.len(), shape)?;
        let plane = shape.plane();
        let mut dec = RansDecoder::new(bytes)?;
        let mut symbols = Vec::with_capacity(shape.len());
        for c in 0..self.channels() {
            let row = self.tables.row(c);
            for _ in 0..plane {
                symbols.push(decode_symbol(&mut dec, row)?);
            }
        }
        dec.finish()?;
        Ok(symbols)
    }

    /// Decodes a CompressAI string to the dequantised latent `symbol + median_c`.
    pub fn decompress(&self, bytes: &[u8], shape: LatentShape, limits: DecodeLimits) -> Result<Vec<f32>> {
        let symbols = self.decompress_symbols(bytes, shape, limits)?;
        let plane = shape.plane();
        Ok(symbols
            .into_iter()
            .enumerate()
            .map(|(i, s)| s as f32 + self.medians[i / plane])
            .collect())
    }

    fn check_shape(&self, len: usize, shape: LatentShape) -> Result<()> {
        if shape.channels as usize != self.channels() || shape.len() != len {
            return Err(CodecError::ShapeMismatch(format!(
                "latent of {len} values with shape {shape} does not fit a {}-channel entropy bottleneck",
                self.channels()
            )));
        }
        Ok(())
    }
}

/// `torch.round(y - median).int()` for a value that must fit an `i32`.
#[inline]
pub(crate) fn quantize_value(index: usize, y: f32, mean: f32) -> Result<i32> {
    let r = round_ties_even(y - mean);
    // 2^31 is exactly representable; every f32 below it in magnitude fits.
    if r.is_finite() && (-2_147_483_648.0..2_147_483_648.0).contains(&r) {
        Ok(r as i32)
    } else {
        Err(CodecError::UnquantisableValue { index, value: y })
    }
}

/// `v.round_ties_even()`, which is a library call on x86-64 without
/// SSE4.1 (about half of compressing's time): below 2^22 in magnitude,
/// adding and subtracting 1.5·2^23 (an even integer) rounds to an integer,
/// ties to even, in float arithmetic itself; larger values, infinities and
/// NaN take the library.
#[inline]
fn round_ties_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        (v + SHIFT) - SHIFT
    } else {
        v.round_ties_even()
    }
}

impl EntropyBottleneck {
    /// A deterministic stand-in for a trained bottleneck: channel `c` is a
    /// discretised Laplacian whose scale grows from 0.3 to 6 across channels,
    /// centred on a fractional median, with a ±(12·scale + 8) table. Used to
    /// benchmark and fuzz the coder without shipping weights.
    pub fn synthetic(channels: usize) -> Self {
        let mut rows = Vec::with_capacity(channels);
        let mut offsets = Vec::with_capacity(channels);
        let mut medians = Vec::with_capacity(channels);
        for c in 0..channels {
            let scale = 0.3 + 5.7 * c as f64 / channels.max(2).saturating_sub(1) as f64;
            let half_width = (12.0 * scale) as i32 + 8;
            let laplace_cdf = |x: f64| {
                if x < 0.0 {
                    0.5 * (x / scale).exp()
                } else {
                    1.0 - 0.5 * (-x / scale).exp()
                }
            };
            let mut pmf: Vec<f32> = (-half_width..=half_width)
                .map(|v| (laplace_cdf(v as f64 + 0.5) - laplace_cdf(v as f64 - 0.5)) as f32)
                .collect();
            pmf.push((2.0 * laplace_cdf(-half_width as f64 - 0.5)) as f32);
            rows.push(pmf_to_quantized_cdf(&pmf).expect("a Laplacian pmf is valid"));
            offsets.push(-half_width);
            medians.push(((c * 37) % 11) as f32 / 11.0 - 0.5);
        }
        let tables = CdfTables::new(rows, offsets).expect("rows from pmf_to_quantized_cdf are valid");
        Self { tables, medians }
    }

    /// A latent that follows [`EntropyBottleneck::synthetic`]'s distribution,
    /// from a fixed seed, with about one value in 500 far outside the tables
    /// (escapes). Values are `median + symbol + fraction` with the fraction a
    /// multiple of 1/16, so every language computes the same `f32`s.
    pub fn synthetic_latent(&self, shape: LatentShape, seed: u64) -> Vec<f32> {
        let plane = shape.plane();
        let mut state = seed;
        let mut next = move || {
            // SplitMix64.
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        (0..shape.len())
            .map(|i| {
                let c = i / plane;
                let r = next();
                // Geometric magnitude: trailing zeros of random bits, scaled per channel.
                let magnitude = ((r >> 8).trailing_zeros() as u64 * (1 + c as u64 * 4 / self.channels() as u64)) as i64;
                let sign = if r & 1 == 1 { -1 } else { 1 };
                let escape = if (r >> 1) % 500 == 0 { 1000 } else { 0 };
                let fraction = ((r >> 2) & 15) as f32 / 16.0 - 0.5;
                self.medians[c] + (sign * (magnitude + escape)) as f32 + fraction
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::round_ties_even;

    /// The float-arithmetic rounding equals the library's on ties, their
    /// neighbours, both signs, around the 2^22 switch and beyond it.
    #[test]
    fn rounding_equals_the_library_ties_to_even() {
        let mut values = vec![0.0f32, -0.0, 0.49999997, 0.5, 1.5, 2.5, f32::INFINITY, f32::NAN, 1e30];
        for k in (0..1 << 12).chain((1 << 21) - 64..(1 << 22) + 64) {
            let tie = k as f32 + 0.5;
            values.extend([tie, tie.next_down(), tie.next_up(), k as f32, k as f32 + 0.25]);
        }
        values.extend([4_194_303.5, 4_194_304.0, 8_388_607.5, 8_388_608.0, 16_777_217.0]);
        for v in values.clone() {
            values.push(-v);
        }
        for v in values {
            let (got, want) = (round_ties_even(v), v.round_ties_even());
            assert!(got == want || (got.is_nan() && want.is_nan()), "{v}: {got} vs {want}");
        }
    }
}
