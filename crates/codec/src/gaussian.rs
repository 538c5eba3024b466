//! CompressAI's `GaussianConditional`: a table of zero-mean Gaussians of
//! increasing scale, each quantised to a CDF row, used by the mean-scale
//! hyperprior models (bmshj2018-hyperprior, mbt2018-mean) whose latents carry
//! a predicted scale (and mean) per element.

use crate::cdf::{pmf_to_quantized_cdf, CdfTables, MAX_CDF_LENGTH};
use crate::coder::{decode_with_indexes, encode_with_indexes};
use crate::error::{CodecError, Result};
use crate::factorized::quantize_value;
use crate::DecodeLimits;

/// CompressAI's default scale table bounds and size (`SCALES_MIN`, `SCALES_MAX`, `SCALES_LEVELS`).
pub const SCALES_MIN: f32 = 0.11;
/// Largest scale of the default table.
pub const SCALES_MAX: f32 = 256.0;
/// Number of scales in the default table.
pub const SCALES_LEVELS: usize = 64;
/// Default tail mass left outside each row (coded by escape).
pub const DEFAULT_TAIL_MASS: f64 = 1e-9;

/// The default table: `exp(linspace(ln 0.11, ln 256, 64))` in `f32`, as
/// `compressai.models.base.get_scale_table` computes it. Checkpoints store the
/// table they were built with (`gaussian_conditional.scale_table`); prefer it.
pub fn default_scale_table() -> Vec<f32> {
    let start = SCALES_MIN.ln();
    let end = SCALES_MAX.ln();
    let steps = SCALES_LEVELS;
    let step = (end - start) / (steps - 1) as f32;
    // torch.linspace fills the first half from the start and the second half
    // from the end, so both endpoints are exact.
    (0..steps)
        .map(|i| {
            if i < steps / 2 {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .map(f32::exp)
        .collect()
}

/// A Gaussian conditional entropy model with its CDF tables.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianConditional {
    scale_table: Vec<f32>,
    scale_bound: f32,
    tables: CdfTables,
}

impl GaussianConditional {
    /// Builds the tables for `scale_table` as CompressAI's `update()` does;
    /// scales below `scale_bound` (CompressAI: 0.11) are raised to it.
    pub fn new(scale_table: Vec<f32>, scale_bound: f32, tail_mass: f64) -> Result<Self> {
        let bad = |why: String| Err(CodecError::InvalidParameters(why));
        if scale_table.is_empty() {
            return bad("empty scale table".into());
        }
        if scale_table.iter().any(|s| !s.is_finite() || *s <= 0.0) || scale_table.windows(2).any(|w| w[0] > w[1]) {
            return bad("scale table must hold positive, finite, ascending scales".into());
        }
        if !(scale_bound.is_finite() && scale_bound > 0.0) {
            return bad(format!("scale bound {scale_bound} must be positive"));
        }
        if !(tail_mass > 0.0 && tail_mass < 1.0) {
            return bad(format!("tail mass {tail_mass} must lie in (0, 1)"));
        }
        let multiplier = -standard_normal_quantile(tail_mass / 2.0) as f32;
        let const_neg_inv_sqrt2 = -std::f32::consts::FRAC_1_SQRT_2;
        let cumulative = |x: f32| 0.5 * libm::erfcf(const_neg_inv_sqrt2 * x);
        let mut rows = Vec::with_capacity(scale_table.len());
        let mut offsets = Vec::with_capacity(scale_table.len());
        for &scale in &scale_table {
            let center = (scale * multiplier).ceil();
            if 2.0 * center + 3.0 > MAX_CDF_LENGTH as f32 {
                return bad(format!("scale {scale} needs a row longer than a 16-bit table can hold"));
            }
            let center = center as i32;
            let length = 2 * center + 1;
            let mut tail = 0.0;
            let mut pmf: Vec<f32> = (0..length)
                .map(|k| {
                    let sample = (k - center).abs() as f32;
                    let upper = cumulative((0.5 - sample) / scale);
                    let lower = cumulative((-0.5 - sample) / scale);
                    if k == 0 {
                        tail = 2.0 * lower;
                    }
                    upper - lower
                })
                .collect();
            pmf.push(tail);
            rows.push(pmf_to_quantized_cdf(&pmf)?);
            offsets.push(-center);
        }
        Ok(Self {
            tables: CdfTables::new(rows, offsets)?,
            scale_table,
            scale_bound,
        })
    }

    /// The CDF tables.
    pub fn tables(&self) -> &CdfTables {
        &self.tables
    }

    /// The scale table.
    pub fn scale_table(&self) -> &[f32] {
        &self.scale_table
    }

    /// The table row for each scale: `len - 1 - #{t in table[..len-1] : max(scale, bound) <= t}`
    /// (`GaussianConditional.build_indexes`).
    pub fn build_indexes(&self, scales: &[f32]) -> Vec<u32> {
        let last = self.scale_table.len() - 1;
        let candidates = &self.scale_table[..last];
        scales
            .iter()
            .map(|&s| {
                // torch.max keeps NaN, and NaN compares false: it lands in the widest row.
                let s = if s.is_nan() { s } else { s.max(self.scale_bound) };
                (last - candidates.iter().filter(|&&t| s <= t).count()) as u32
            })
            .collect()
    }

    /// Compresses `values` (centred on `means` when given) with the rows in `indexes`.
    pub fn compress(&self, values: &[f32], indexes: &[u32], means: Option<&[f32]>) -> Result<Vec<u8>> {
        check_means(means, values.len())?;
        let symbols = values
            .iter()
            .enumerate()
            .map(|(i, &v)| quantize_value(i, v, means.map_or(0.0, |m| m[i])))
            .collect::<Result<Vec<i32>>>()?;
        encode_with_indexes(&symbols, indexes, &self.tables)
    }

    /// Decodes one value per index, adding `means` back when given.
    pub fn decompress(
        &self,
        bytes: &[u8],
        indexes: &[u32],
        means: Option<&[f32]>,
        limits: DecodeLimits,
    ) -> Result<Vec<f32>> {
        limits.check_count(indexes.len() as u64)?;
        check_means(means, indexes.len())?;
        let symbols = decode_with_indexes(bytes, indexes, &self.tables)?;
        Ok(symbols
            .into_iter()
            .enumerate()
            .map(|(i, s)| s as f32 + means.map_or(0.0, |m| m[i]))
            .collect())
    }
}

fn check_means(means: Option<&[f32]>, len: usize) -> Result<()> {
    match means {
        Some(m) if m.len() != len => Err(CodecError::ShapeMismatch(format!("{len} values but {} means", m.len()))),
        _ => Ok(()),
    }
}

/// The standard normal quantile Φ⁻¹(p) to double precision (scipy's `ndtri`),
/// from a rational first guess refined by Halley steps on `erfc`.
fn standard_normal_quantile(p: f64) -> f64 {
    debug_assert!(p > 0.0 && p < 1.0);
    // Acklam's rational approximation (relative error < 1.2e-9).
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.38357751867269e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    let mut x = if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    for _ in 0..3 {
        let error = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) - p;
        let u = error * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
        x -= u / (1.0 + x * u / 2.0);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_matches_known_values() {
        // Φ⁻¹(0.025) = -1.959963984540054, Φ⁻¹(5e-10) = -6.109410204869..., Φ⁻¹(0.5) = 0.
        assert!((standard_normal_quantile(0.025) + 1.959963984540054).abs() < 1e-13);
        assert!((standard_normal_quantile(5e-10) + 6.109410204869032).abs() < 1e-12);
        assert!(standard_normal_quantile(0.5).abs() < 1e-15);
    }

    #[test]
    fn indexes_pick_the_smallest_row_at_least_as_wide() {
        let gc = GaussianConditional::new(vec![0.5, 1.0, 2.0, 4.0], 0.11, DEFAULT_TAIL_MASS).unwrap();
        assert_eq!(
            gc.build_indexes(&[0.01, 0.5, 0.6, 1.0, 3.9, 4.0, 100.0, f32::NAN]),
            [0, 0, 1, 1, 3, 3, 3, 3]
        );
    }

    #[test]
    fn values_round_trip_with_means_and_escapes() {
        let gc = GaussianConditional::new(default_scale_table(), 0.11, DEFAULT_TAIL_MASS).unwrap();
        let values: Vec<f32> = (0..300).map(|i| ((i * 7919) % 201) as f32 - 100.0 + 0.25).collect();
        let means: Vec<f32> = (0..300).map(|i| (i % 5) as f32 * 0.5).collect();
        let scales: Vec<f32> = (0..300).map(|i| 0.05 + (i % 40) as f32 * 0.3).collect();
        let indexes = gc.build_indexes(&scales);
        let bytes = gc.compress(&values, &indexes, Some(&means)).unwrap();
        let decoded = gc
            .decompress(&bytes, &indexes, Some(&means), DecodeLimits::default())
            .unwrap();
        for ((v, m), d) in values.iter().zip(&means).zip(&decoded) {
            assert_eq!(*d, (v - m).round_ties_even() + m);
        }
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(GaussianConditional::new(vec![], 0.11, 1e-9).is_err());
        assert!(GaussianConditional::new(vec![2.0, 1.0], 0.11, 1e-9).is_err());
        assert!(GaussianConditional::new(vec![1.0, f32::INFINITY], 0.11, 1e-9).is_err());
        assert!(GaussianConditional::new(vec![1.0], 0.0, 1e-9).is_err());
        assert!(GaussianConditional::new(vec![1e6], 0.11, 1e-9).is_err());
    }
}
