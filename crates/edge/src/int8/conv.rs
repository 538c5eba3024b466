//! One convolution in int8 ([`QuantizedConv`]): the weights of a [`Conv`]
//! in s8 with one scale per output channel, the zero point's share of each
//! sum folded into the bias, computed by the int8 tiles of [`crate::kernel`]
//! on u8 inputs.

use super::quantize::{quantize_row, QuantizedPaddedHwc, Quantizer};
use crate::conv::Conv;
use crate::kernel::{self, Epilogue, QuantizedTile, QUANTIZED_GROUP, TILE_CHANNELS};
use crate::pool::{split_row_pairs, split_rows};
use crate::tensor::PaddedHwc;

/// Largest weight magnitude (see [`crate::int8`]).
pub const WEIGHT_LEVELS: f32 = 63.0;

/// int8 multiply-adds take about a third of the time of f32 ones (87–92
/// against 28–36 G/s on an AVX2 machine, more with VNNI), so a part of a
/// split convolution needs three times as many to be worth a thread.
pub(super) const INT8_MACS_PER_F32_MAC: usize = 3;

/// A convolution in int8: the weights of a [`Conv`] quantized per output
/// channel, for inputs quantized by a given [`Quantizer`].
#[derive(Debug, Clone)]
pub struct QuantizedConv {
    in_channels: usize,
    // Also read by `super`'s blocks, for their buffers.
    pub(super) out_channels: usize,
    pub(super) kernel: usize,
    stride: usize,
    /// Tap groups per kernel row.
    groups: usize,
    /// Per block of [`TILE_CHANNELS`] outputs: `[ky][group][TILE_CHANNELS][QUANTIZED_GROUP]`.
    weights: Vec<i8>,
    /// Per output channel (zero-padded to whole blocks): input scale × weight scale.
    scale: Vec<f32>,
    /// Per output channel: bias − scale · zero point · Σ weights.
    offset: Vec<f32>,
    /// Per output channel (zero-padded): Σ weights.
    weight_sums: Vec<i32>,
}

impl QuantizedConv {
    /// Quantizes `conv`'s weights for inputs quantized by `input`.
    pub fn new(conv: &Conv, input: Quantizer) -> Self {
        let (cin, cout, k) = (conv.in_channels(), conv.out_channels(), conv.kernel());
        let matrix = conv.weight_matrix();
        let row_len = k * cin;
        let groups = row_len.div_ceil(QUANTIZED_GROUP);
        let blocks = cout.div_ceil(TILE_CHANNELS);
        let block_len = k * groups * TILE_CHANNELS * QUANTIZED_GROUP;
        let mut weights = vec![0i8; blocks * block_len];
        let mut scale = vec![0f32; blocks * TILE_CHANNELS];
        let mut offset = vec![0f32; blocks * TILE_CHANNELS];
        let mut weight_sums = vec![0i32; blocks * TILE_CHANNELS];
        for o in 0..cout {
            let taps = || matrix.iter().skip(o).step_by(cout);
            let largest = taps().fold(0f32, |m, w| m.max(w.abs()));
            let weight_scale = if largest > 0.0 { largest / WEIGHT_LEVELS } else { 1.0 };
            let (block, lane) = (o / TILE_CHANNELS, o % TILE_CHANNELS);
            let mut sum = 0i32;
            for (row, &w) in taps().enumerate() {
                let q = (w / weight_scale).round().clamp(-WEIGHT_LEVELS, WEIGHT_LEVELS) as i8;
                sum += i32::from(q);
                let (ky, j) = (row / row_len, row % row_len);
                let (group, within) = (j / QUANTIZED_GROUP, j % QUANTIZED_GROUP);
                let at = ((ky * groups + group) * TILE_CHANNELS + lane) * QUANTIZED_GROUP + within;
                weights[block * block_len + at] = q;
            }
            let unit = f64::from(input.scale) * f64::from(weight_scale);
            scale[o] = unit as f32;
            offset[o] = (f64::from(conv.bias()[o]) - unit * f64::from(input.zero) * f64::from(sum)) as f32;
            weight_sums[o] = sum;
        }
        Self {
            in_channels: cin,
            out_channels: cout,
            kernel: k,
            stride: conv.stride(),
            groups,
            weights,
            scale,
            offset,
            weight_sums,
        }
    }

    /// Output side for a square input of `side` pixels.
    pub fn output_side(&self, side: usize) -> usize {
        (side + 2 * (self.kernel / 2) - self.kernel) / self.stride + 1
    }

    /// Multiply-adds executed for a `side × side` input (taps padded to groups included).
    pub fn macs(&self, side: usize) -> usize {
        let out = self.output_side(side);
        out * out * self.kernel * self.groups * QUANTIZED_GROUP * self.out_channels
    }

    /// Writes the convolution of `input` into the interior of `output`
    /// through `epilogue`, output rows split over up to `threads` threads;
    /// with `levels` (of the output's side and channels), each row is also
    /// quantized into it as soon as it is computed, while in the cache.
    ///
    /// Panics unless the activations fit (as [`Conv::run`]).
    pub fn run(
        &self,
        input: &QuantizedPaddedHwc,
        output: &mut PaddedHwc,
        levels: Option<&mut QuantizedPaddedHwc>,
        epilogue: Epilogue,
        threads: usize,
    ) {
        assert!(
            input.channels == self.in_channels
                && input.pad >= self.kernel / 2
                && output.side() == self.output_side(input.side)
                && output.channels() == self.out_channels
                && levels
                    .as_ref()
                    .is_none_or(|l| l.side == output.side() && l.channels == self.out_channels),
            "activations do not fit the int8 convolution"
        );
        let (out_side, cout) = (output.side(), self.out_channels);
        let (row_step, out_pad) = (output.row_step(), output.pad());
        let body = output.rows_mut(0..out_side);
        let work = (threads, self.macs(input.side) / INT8_MACS_PER_F32_MAC);
        let interior = out_pad * cout..(out_pad + out_side) * cout;
        match levels {
            None => split_rows(body, out_side, row_step, work, |rows, chunk| {
                for (oy, row) in rows.zip(chunk.chunks_exact_mut(row_step)) {
                    self.row(input, oy, &mut row[interior.clone()], epilogue);
                }
            }),
            Some(levels) => {
                let (q, level_step, level_start) = (levels.quantizer, levels.row_step(), levels.pad * cout);
                let level_rows = &mut levels.data[levels.pad * level_step..][..out_side * level_step];
                let pairs = ((body, row_step), (level_rows, level_step));
                split_row_pairs(pairs.0, pairs.1, out_side, work, |rows, chunk, level_chunk| {
                    let rows = rows.zip(chunk.chunks_exact_mut(row_step));
                    for ((oy, row), level_row) in rows.zip(level_chunk.chunks_exact_mut(level_step)) {
                        let out = &mut row[interior.clone()];
                        self.row(input, oy, out, epilogue);
                        quantize_row(q, out, &mut level_row[level_start..][..out_side * cout]);
                    }
                });
            }
        }
    }

    /// Output row `oy` into `out` (HWC, no border).
    fn row(&self, input: &QuantizedPaddedHwc, oy: usize, out: &mut [f32], epilogue: Epilogue) {
        let (k, s, cin, cout) = (self.kernel, self.stride, self.in_channels, self.out_channels);
        let count = self.output_side(input.side);
        let in_step = input.row_step();
        let top = oy * s + input.pad - k / 2;
        let first = top * in_step + (input.pad - k / 2) * cin;
        let block_len = k * self.groups * TILE_CHANNELS * QUANTIZED_GROUP;
        let tile = QuantizedTile {
            input: input.data[first..].as_ptr(),
            pixel_step: s * cin,
            row_step: in_step,
            kernel: k,
            groups: self.groups,
            weights: self.weights.as_ptr(),
            scale: self.scale.as_ptr(),
            offset: self.offset.as_ptr(),
            weight_sums: self.weight_sums.as_ptr(),
            out: out.as_mut_ptr(),
            out_step: cout,
            channels: TILE_CHANNELS,
            epilogue,
        };
        // SAFETY: the output side and the border (asserted in `run`) keep
        // every tap inside the padded input, the last group's overrun
        // inside its slack; weights, scales, offsets and weight sums are
        // whole blocks; the outputs are `cout` floats of each pixel inside
        // `out`, which is not the input.
        unsafe { kernel::compute_quantized_line(&tile, count, cout, block_len) };
    }
}
