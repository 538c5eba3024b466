//! The padded buffer of the f32 convolutions: a square HWC tensor inside a
//! zero border, so that a convolution reads its padding instead of testing
//! bounds (the int8 encoder's bytes, laid out alike, are in
//! [`crate::int8::QuantizedPaddedHwc`]).

use anyhow::{bail, Result};

/// A square HWC activation inside a zero border of `pad` pixels, so that
/// convolutions read their padding instead of testing bounds. Convolutions
/// write only the interior, so the border stays zero (the folded pair's
/// ring is the one buffer whose border holds values).
#[derive(Debug, Clone)]
pub struct PaddedHwc {
    // Read and written in place by the convolutions and the encoder.
    pub(crate) side: usize,
    pub(crate) pad: usize,
    pub(crate) channels: usize,
    pub(crate) data: Vec<f32>,
}

impl PaddedHwc {
    /// Zeros.
    pub fn new(side: usize, pad: usize, channels: usize) -> Self {
        let padded = side + 2 * pad;
        Self {
            side,
            pad,
            channels,
            data: vec![0.0; padded * padded * channels],
        }
    }

    /// HWC values of `side × side × channels` inside a border of `pad`.
    pub fn from_hwc(hwc: &[f32], side: usize, channels: usize, pad: usize) -> Self {
        let mut a = Self::new(side, pad, channels);
        for y in 0..side {
            let start = a.offset(y, 0);
            a.data[start..][..side * channels].copy_from_slice(&hwc[y * side * channels..][..side * channels]);
        }
        a
    }

    /// The values without the border, CHW (PyTorch's layout).
    pub fn to_chw(&self) -> Vec<f32> {
        let plane = self.side * self.side;
        let mut out = vec![0f32; plane * self.channels];
        for y in 0..self.side {
            for x in 0..self.side {
                for (c, &v) in self.pixel(y, x).iter().enumerate() {
                    out[c * plane + y * self.side + x] = v;
                }
            }
        }
        out
    }

    /// Side of the interior.
    pub fn side(&self) -> usize {
        self.side
    }

    /// Width of the zero border.
    pub fn pad(&self) -> usize {
        self.pad
    }

    /// Channels per pixel.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// All values, border included, row by padded row.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Interior rows `rows`, each with its border columns.
    pub(crate) fn rows_mut(&mut self, rows: std::ops::Range<usize>) -> &mut [f32] {
        let step = self.row_step();
        &mut self.data[(self.pad + rows.start) * step..(self.pad + rows.end) * step]
    }

    /// Floats from one padded row to the next.
    pub fn row_step(&self) -> usize {
        (self.side + 2 * self.pad) * self.channels
    }

    /// Where pixel `(y, x)` of the interior starts.
    fn offset(&self, y: usize, x: usize) -> usize {
        (y + self.pad) * self.row_step() + (x + self.pad) * self.channels
    }

    pub(crate) fn pixel(&self, y: usize, x: usize) -> &[f32] {
        &self.data[self.offset(y, x)..][..self.channels]
    }

    fn pixel_mut(&mut self, y: usize, x: usize) -> &mut [f32] {
        let start = self.offset(y, x);
        &mut self.data[start..][..self.channels]
    }

    /// Sets the interior to a CHW image of this activation's side and channels.
    pub(crate) fn fill_from_chw(&mut self, chw: &[f32]) -> Result<()> {
        let (side, channels) = (self.side, self.channels);
        if chw.len() != channels * side * side {
            bail!("expected a {channels}×{side}×{side} input, got {} values", chw.len());
        }
        let plane = side * side;
        for y in 0..side {
            for x in 0..side {
                for (c, v) in self.pixel_mut(y, x).iter_mut().enumerate() {
                    *v = chw[c * plane + y * side + x];
                }
            }
        }
        Ok(())
    }
}
