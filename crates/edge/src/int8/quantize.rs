//! f32 ↔ u8: the ranges a calibration observes ([`Range`],
//! [`BlockRanges`]), the [`Quantizer`] a range gives, and the u8 buffer the
//! int8 convolutions read ([`QuantizedPaddedHwc`]), quantized a row at a
//! time ([`quantize_row`]).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::kernel::QUANTIZED_GROUP;
use crate::pool::split_rows;
use crate::tensor::PaddedHwc;

/// Bytes past an activation's end that a kernel row's last tap group may
/// read (their weights are zero).
const SLACK: usize = QUANTIZED_GROUP - 1;

/// Smallest and largest value seen of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    /// The range of nothing: what [`Range::include`] starts from.
    pub const EMPTY: Range = Range {
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
    };

    /// Widens the range to `values`.
    pub fn include(&mut self, values: &[f32]) {
        for &v in values {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }
}

/// The ranges the int8 encoder quantizes with, per block: its input and
/// the output of conv1 (not quantized where the block runs folded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRanges {
    pub input: Range,
    pub middle: Range,
}

/// f32 ↔ u8 for one tensor: `value = scale · (q − zero)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    pub(super) scale: f32,
    inverse: f32,
    pub(super) zero: u8,
}

impl Quantizer {
    /// Maps `range`, widened to include 0 (so that zero padding is exact),
    /// onto 0..=255.
    pub fn new(range: Range) -> Result<Self> {
        if !(range.min.is_finite() && range.max.is_finite() && range.min <= range.max) {
            bail!("cannot quantize the range {range:?}: calibrate on at least one image with finite values");
        }
        let (min, max) = (range.min.min(0.0), range.max.max(0.0));
        let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
        let zero = (-min / scale).round().clamp(0.0, 255.0) as u8;
        Ok(Self {
            scale,
            inverse: 1.0 / scale,
            zero,
        })
    }

    /// The nearest level of `value` (ties to even), clamped to the range.
    #[inline(always)]
    pub fn quantize(&self, value: f32) -> u8 {
        // Adding and subtracting 1.5·2²³ rounds to an integer, ties to even,
        // in plain float arithmetic that vectorises (`round_ties_even` is a
        // library call without SSE4.1); the clamp keeps it exact.
        const ROUND: f32 = 12_582_912.0;
        let levels = (value * self.inverse).clamp(-256.0, 256.0);
        ((levels + ROUND - ROUND) + f32::from(self.zero)).clamp(0.0, 255.0) as u8
    }

    /// The value level `q` stands for.
    pub fn value(&self, q: u8) -> f32 {
        self.scale * (f32::from(q) - f32::from(self.zero))
    }

    /// The level of 0.
    pub fn zero(&self) -> u8 {
        self.zero
    }

    /// The value of one level.
    pub fn scale(&self) -> f32 {
        self.scale
    }
}

/// A square HWC activation of u8 levels inside a border holding the zero
/// point (real zero), laid out as [`PaddedHwc`].
#[derive(Debug, Clone)]
pub struct QuantizedPaddedHwc {
    // The int8 convolutions (`super::conv`) index the buffer in place.
    pub(super) side: usize,
    pub(super) pad: usize,
    pub(super) channels: usize,
    pub(super) quantizer: Quantizer,
    /// Padded rows, then [`SLACK`] bytes.
    pub(super) data: Vec<u8>,
}

impl QuantizedPaddedHwc {
    /// All levels at the zero point.
    pub fn new(side: usize, pad: usize, channels: usize, quantizer: Quantizer) -> Self {
        let padded = side + 2 * pad;
        Self {
            side,
            pad,
            channels,
            quantizer,
            data: vec![quantizer.zero; padded * padded * channels + SLACK],
        }
    }

    pub(super) fn row_step(&self) -> usize {
        (self.side + 2 * self.pad) * self.channels
    }

    /// Quantizes the interior of `values` (same side and channels) into
    /// the interior, rows split over up to `threads` threads.
    pub fn quantize(&mut self, values: &PaddedHwc, threads: usize) {
        assert!(
            values.side() == self.side && values.channels() == self.channels,
            "a {}×{} activation quantized into a {}×{} one",
            values.side(),
            values.channels(),
            self.side,
            self.channels
        );
        let (from_step, to_step) = (values.row_step(), self.row_step());
        let width = self.side * self.channels;
        let (from_start, to_start) = (values.pad() * values.channels(), self.pad * self.channels);
        let source = &values.data()[values.pad() * from_step..];
        let q = self.quantizer;
        let body = &mut self.data[self.pad * to_step..][..self.side * to_step];
        // A byte per value: about one multiply-add's worth of work each.
        let work = (threads, self.side * width);
        split_rows(body, self.side, to_step, work, |rows, chunk| {
            for (y, row) in rows.zip(chunk.chunks_exact_mut(to_step)) {
                quantize_row(
                    q,
                    &source[y * from_step + from_start..][..width],
                    &mut row[to_start..][..width],
                );
            }
        });
    }
}

/// `to[i] = q.quantize(from[i])`, 8 at a time with AVX2 where the machine has it.
pub(super) fn quantize_row(q: Quantizer, from: &[f32], to: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        unsafe { quantize_row_avx2(q, from, to) };
        return;
    }
    for (t, &v) in to.iter_mut().zip(from) {
        *t = q.quantize(v);
    }
}

/// [`Quantizer::quantize`] in vectors: the same clamp, `vcvtps2dq` rounding
/// ties to even as the scalar trick does, saturating packs for the final clamp.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(q: Quantizer, from: &[f32], to: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = from.len().min(to.len());
    let inverse = _mm256_set1_ps(q.inverse);
    let (low, high) = (_mm256_set1_ps(-256.0), _mm256_set1_ps(256.0));
    let zero = _mm256_set1_epi32(i32::from(q.zero));
    let whole = n / 8 * 8;
    for i in (0..whole).step_by(8) {
        // `max` returns its second operand for NaN: NaN becomes level 0, as in the scalar form.
        let levels = _mm256_min_ps(
            _mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(from.as_ptr().add(i)), inverse), low),
            high,
        );
        let shifted = _mm256_add_epi32(_mm256_cvtps_epi32(levels), zero);
        let words = _mm_packs_epi32(_mm256_castsi256_si128(shifted), _mm256_extracti128_si256::<1>(shifted));
        _mm_storel_epi64(to.as_mut_ptr().add(i) as *mut __m128i, _mm_packus_epi16(words, words));
    }
    for i in whole..n {
        to[i] = q.quantize(from[i]);
    }
}
