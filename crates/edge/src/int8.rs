//! g_a in 8-bit integers: u8 activations (asymmetric, one scale and zero
//! point per tensor, from ranges observed on calibration images) times s8
//! weights (symmetric, one scale per output channel), summed exactly in
//! i32 by the int8 tiles of [`crate::kernel`] and turned back into floats
//! for the bias, ReLU and residual add. Each convolution quantizes the rows
//! it writes into the next convolution's input while they are in the
//! cache, so every 3×3 convolution reads bytes. The 1×1 skip convolutions
//! of unfolded blocks stay in f32 (see `Skip`): 3 % of the multiply-adds,
//! most of the int8 encoder's loss of accuracy where they were int8.
//!
//! Weights keep 7 bits (±63): without VNNI, `vpmaddubsw` adds two u8·s8
//! products in i16, and 2·255·63 is the largest sum that cannot saturate.
//! Padding holds the zero point, which is exactly the real zero, so the
//! zero point's share of every sum is the same constant, folded into the
//! bias. The first block, where cheaper, runs folded as in the f32 encoder,
//! its border correction in f32 from the unquantized image.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::encoder::{split_row_pairs, split_rows, Activation, Conv, Encoder, FoldedPair};
use crate::kernel::{self, Epilogue, QuantizedTile, QUANTIZED_GROUP, TILE_CHANNELS};

/// Largest weight magnitude (see the module's doc).
pub const WEIGHT_LEVELS: f32 = 63.0;

/// int8 multiply-adds take about a third of the time of f32 ones (87–92
/// against 28–36 G/s on an AVX2 machine, more with VNNI), so a part of a
/// split convolution needs three times as many to be worth a thread.
const INT8_MACS_PER_F32_MAC: usize = 3;

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
    scale: f32,
    inverse: f32,
    zero: u8,
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
/// point (real zero), laid out as [`Activation`].
#[derive(Debug, Clone)]
pub struct QuantizedActivation {
    side: usize,
    pad: usize,
    channels: usize,
    quantizer: Quantizer,
    /// Padded rows, then [`SLACK`] bytes.
    data: Vec<u8>,
}

impl QuantizedActivation {
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

    fn row_step(&self) -> usize {
        (self.side + 2 * self.pad) * self.channels
    }

    /// Quantizes the interior of `values` (same side and channels) into
    /// the interior, rows split over up to `threads` threads.
    pub fn quantize(&mut self, values: &Activation, threads: usize) {
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
fn quantize_row(q: Quantizer, from: &[f32], to: &mut [u8]) {
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

/// A convolution in int8: the weights of a [`Conv`] quantized per output
/// channel, for inputs quantized by a given [`Quantizer`].
#[derive(Debug, Clone)]
pub struct QuantizedConv {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
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
        input: &QuantizedActivation,
        output: &mut Activation,
        levels: Option<&mut QuantizedActivation>,
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
    fn row(&self, input: &QuantizedActivation, oy: usize, out: &mut [f32], epilogue: Epilogue) {
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

/// A block's two convolutions in int8.
#[derive(Debug, Clone)]
enum QuantizedPair {
    /// conv2 ∘ conv1 as one int8 convolution, corrected on the border in f32.
    Folded {
        folded: QuantizedConv,
        exact: Box<FoldedPair>,
    },
    /// conv1, its output quantized by `middle`, conv2.
    Separate {
        conv1: QuantizedConv,
        middle: Quantizer,
        conv2: QuantizedConv,
        act_after_conv1: bool,
    },
}

#[derive(Debug, Clone)]
struct QuantizedBlock {
    input: Quantizer,
    skip: Skip,
    pair: QuantizedPair,
    out_channels: usize,
}

/// A block's 1×1 skip convolution. Its sum reaches the latent without a
/// ReLU to damp its rounding, and it costs a few percent of the
/// multiply-adds, so unfolded blocks run it in f32 from their f32 input.
/// The folded block keeps it in int8: its tiles quantize the block's output
/// for the next block as they store it, and its input is the image.
#[derive(Debug, Clone)]
enum Skip {
    Float(Conv),
    Quantized(QuantizedConv),
}

impl Skip {
    fn output_side(&self, side: usize) -> usize {
        match self {
            Skip::Float(conv) => conv.output_side(side),
            Skip::Quantized(conv) => conv.output_side(side),
        }
    }

    fn macs(&self, side: usize) -> usize {
        match self {
            Skip::Float(conv) => conv.macs(side),
            Skip::Quantized(conv) => conv.macs(side),
        }
    }
}

/// g_a in int8 (see the module's doc), made from the f32 [`Encoder`] as it
/// is folded and the ranges of a calibration.
#[derive(Debug, Clone)]
pub struct QuantizedEncoder {
    blocks: Vec<QuantizedBlock>,
    input_channels: usize,
}

/// The buffers of one image size for [`QuantizedEncoder::run`].
#[derive(Debug, Clone)]
pub struct QuantizedWorkspace {
    /// The image in f32 (the folded block's border correction reads it).
    image: Activation,
    blocks: Vec<BlockBuffers>,
}

#[derive(Debug, Clone)]
struct BlockBuffers {
    input: QuantizedActivation,
    scratch: Scratch,
    output: Activation,
}

#[derive(Debug, Clone)]
enum Scratch {
    /// conv1's output in f32 and quantized (unfolded blocks).
    Middle(Activation, QuantizedActivation),
    /// The folded pair's ring.
    Ring(Activation),
}

impl QuantizedEncoder {
    /// The ranges to quantize `encoder`'s tensors with, observed on
    /// `images` (CHW, `3 × side × side`) by the f32 encoder as written.
    pub fn calibrate(encoder: &Encoder, images: &[Vec<f32>], side: usize, threads: usize) -> Result<Vec<BlockRanges>> {
        if images.is_empty() {
            bail!("calibration needs at least one image");
        }
        let plain = encoder.unfolded();
        let mut ranges = vec![
            BlockRanges {
                input: Range::EMPTY,
                middle: Range::EMPTY,
            };
            plain.blocks.len()
        ];
        for image in images {
            let channels = plain.blocks.first().map_or(0, |b| b.conv1.in_channels());
            let mut x = Activation::new(side, 1, channels);
            x.fill_from_chw(image)?;
            let mut side = side;
            for (block, range) in plain.blocks.iter().zip(&mut ranges) {
                range.input.include(x.data());
                let out = block.conv1.output_side(side);
                let mut middle = Activation::new(out, 1, block.conv1.out_channels());
                let epilogue = if block.act_after_conv1 {
                    Epilogue::Relu
                } else {
                    Epilogue::Store
                };
                block.conv1.run(&x, &mut middle, epilogue, threads);
                range.middle.include(middle.data());
                let mut output = Activation::new(out, 1, block.conv2.out_channels());
                block.skip.run(&x, &mut output, Epilogue::Store, threads);
                block.conv2.run(&middle, &mut output, Epilogue::ReluAdd, threads);
                x = output;
                side = out;
            }
        }
        Ok(ranges)
    }

    /// Quantizes `encoder` (folded where it is: see [`Encoder::fold`]) with
    /// `ranges` from [`QuantizedEncoder::calibrate`].
    pub fn new(encoder: &Encoder, ranges: &[BlockRanges]) -> Result<Self> {
        if ranges.len() != encoder.blocks.len() {
            bail!(
                "the calibration has {} blocks, the encoder {}",
                ranges.len(),
                encoder.blocks.len()
            );
        }
        let blocks = encoder
            .blocks
            .iter()
            .zip(ranges)
            .map(|(block, range)| {
                let input = Quantizer::new(range.input)?;
                let skip = match &block.folded {
                    Some(_) => Skip::Quantized(QuantizedConv::new(&block.skip, input)),
                    None => Skip::Float(block.skip.clone()),
                };
                let pair = match &block.folded {
                    Some(exact) => QuantizedPair::Folded {
                        folded: QuantizedConv::new(exact.folded(), input),
                        exact: Box::new(exact.clone()),
                    },
                    None => {
                        let middle = Quantizer::new(range.middle)?;
                        QuantizedPair::Separate {
                            conv1: QuantizedConv::new(&block.conv1, input),
                            middle,
                            conv2: QuantizedConv::new(&block.conv2, middle),
                            act_after_conv1: block.act_after_conv1,
                        }
                    }
                };
                Ok(QuantizedBlock {
                    input,
                    skip,
                    pair,
                    out_channels: block.conv2.out_channels(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            input_channels: encoder.blocks.first().map_or(0, |b| b.conv1.in_channels()),
        })
    }

    /// The buffers for `side × side` images.
    pub fn workspace(&self, side: usize) -> QuantizedWorkspace {
        // The f32 input a folded block's border correction reads needs its border.
        let f32_pad = |i: usize| match self.blocks.get(i).map(|b| &b.pair) {
            Some(QuantizedPair::Folded { exact, .. }) => exact.input_pad(),
            _ => 0,
        };
        let image = Activation::new(side, f32_pad(0), self.input_channels);
        let mut blocks = Vec::new();
        let (mut side, mut channels) = (side, self.input_channels);
        for (i, block) in self.blocks.iter().enumerate() {
            let input_pad = match &block.pair {
                QuantizedPair::Folded { folded, .. } => folded.kernel / 2,
                QuantizedPair::Separate { conv1, .. } => conv1.kernel / 2,
            };
            let input = QuantizedActivation::new(side, input_pad, channels, block.input);
            let out = block.skip.output_side(side);
            let scratch = match &block.pair {
                QuantizedPair::Folded { exact, .. } => Scratch::Ring(exact.ring(out)),
                QuantizedPair::Separate {
                    conv1, middle, conv2, ..
                } => Scratch::Middle(
                    Activation::new(out, 0, conv1.out_channels),
                    QuantizedActivation::new(out, conv2.kernel / 2, conv1.out_channels, *middle),
                ),
            };
            blocks.push(BlockBuffers {
                input,
                scratch,
                output: Activation::new(out, f32_pad(i + 1), block.out_channels),
            });
            side = out;
            channels = block.out_channels;
        }
        QuantizedWorkspace { image, blocks }
    }

    /// Runs on one CHW image of `3 × side × side` in `workspace` (from
    /// [`QuantizedEncoder::workspace`] for that side): the CHW latent and its side.
    pub fn run(
        &self,
        workspace: &mut QuantizedWorkspace,
        image_chw: &[f32],
        threads: usize,
    ) -> Result<(Vec<f32>, usize)> {
        if workspace.blocks.len() != self.blocks.len() {
            bail!("the workspace was made for another encoder");
        }
        workspace.image.fill_from_chw(image_chw)?;
        if let Some(first) = workspace.blocks.first_mut() {
            first.input.quantize(&workspace.image, threads);
        }
        // Each block writes its output in f32 and, quantized row by row,
        // into the next block's input.
        for i in 0..self.blocks.len() {
            let block = &self.blocks[i];
            let (done, rest) = workspace.blocks.split_at_mut(i);
            let (buffers, after) = rest.split_first_mut().expect("one buffer set per block");
            let next = after.first_mut().map(|b| &mut b.input);
            // The block's input in f32.
            let input_f32 = match done.last() {
                Some(previous) => &previous.output,
                None => &workspace.image,
            };
            match (&block.pair, &mut buffers.scratch, &block.skip) {
                (QuantizedPair::Folded { folded, exact }, Scratch::Ring(ring), Skip::Quantized(skip)) => {
                    folded.run(&buffers.input, &mut buffers.output, None, Epilogue::Store, threads);
                    exact.correct_border(input_f32, ring, &mut buffers.output);
                    let (input, output) = (&buffers.input, &mut buffers.output);
                    skip.run(input, output, next, Epilogue::AddToRelu, threads);
                }
                (
                    QuantizedPair::Separate {
                        conv1,
                        conv2,
                        act_after_conv1,
                        ..
                    },
                    Scratch::Middle(middle, levels),
                    Skip::Float(skip),
                ) => {
                    let (input, output) = (&buffers.input, &mut buffers.output);
                    skip.run(input_f32, output, Epilogue::Store, threads);
                    let epilogue = if *act_after_conv1 {
                        Epilogue::Relu
                    } else {
                        Epilogue::Store
                    };
                    conv1.run(input, middle, Some(levels), epilogue, threads);
                    conv2.run(levels, output, next, Epilogue::ReluAdd, threads);
                }
                _ => bail!("the workspace was made for another encoder"),
            }
        }
        let latent = &workspace.blocks.last().expect("an encoder has blocks").output;
        Ok((latent.to_chw(), latent.side()))
    }

    /// Multiply-adds executed for one `side × side` image (the folded
    /// block's f32 border correction excluded).
    pub fn macs(&self, side: usize) -> usize {
        let mut total = 0;
        let mut side = side;
        for block in &self.blocks {
            let out = block.skip.output_side(side);
            total += block.skip.macs(side)
                + match &block.pair {
                    QuantizedPair::Folded { folded, .. } => folded.macs(side),
                    QuantizedPair::Separate { conv1, conv2, .. } => conv1.macs(side) + conv2.macs(out),
                };
            side = out;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::ResidualBlock;
    use crate::test_values as values;

    fn range(min: f32, max: f32) -> Range {
        Range { min, max }
    }

    #[test]
    fn levels_round_trip_and_zero_is_exact() {
        for (min, max) in [(-2.1, 2.6), (0.5, 7.0), (-3.0, -1.0), (0.0, 0.0), (-1e-3, 40.0)] {
            let q = Quantizer::new(range(min, max)).unwrap();
            assert_eq!(q.value(q.zero()), 0.0, "[{min}, {max}]");
            assert_eq!(q.quantize(0.0), q.zero(), "[{min}, {max}]");
            for level in 0..=255u8 {
                assert_eq!(q.quantize(q.value(level)), level, "[{min}, {max}] level {level}");
            }
            // Values between levels go to the nearest; beyond the range, to its ends.
            let v = q.value(100) + 0.4 * q.scale();
            assert_eq!(q.quantize(v), 100);
            assert_eq!(q.quantize(q.value(0) - 10.0 * q.scale()), 0);
            assert_eq!(q.quantize(q.value(255) + 10.0 * q.scale()), 255);
        }
        assert!(Quantizer::new(Range::EMPTY).is_err());
        assert!(Quantizer::new(range(f32::NAN, 1.0)).is_err());
    }

    /// The vectorised rows give the scalar levels, ties, NaN, infinities and
    /// lengths off the vector width included.
    #[test]
    fn rows_quantize_as_single_values_do() {
        let q = Quantizer::new(range(-1.0, 1.55)).unwrap();
        let mut from: Vec<f32> = values(203, 20).iter().map(|v| v * 4.0).collect();
        for (i, level) in (-5..5).enumerate() {
            from[i] = (level as f32 + 0.5) * q.scale();
        }
        from[20..24].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30]);
        for len in [203, 8, 7, 0] {
            let mut to = vec![0u8; len];
            quantize_row(q, &from[..len], &mut to);
            let want: Vec<u8> = from[..len].iter().map(|&v| q.quantize(v)).collect();
            assert_eq!(to, want, "{len} values");
        }
    }

    /// With weights and inputs on the quantization grid, the int8
    /// convolution is the f32 one up to float rounding: any slip in
    /// packing, offsets or zero points shows.
    #[test]
    fn int8_convolutions_are_exact_on_the_grid() {
        for (cout, cin, k, stride, side) in [
            (20, 3, 7, 2, 15),
            (7, 5, 3, 1, 9),
            (16, 16, 3, 2, 12),
            (33, 3, 1, 2, 10),
        ] {
            let mut weight = vec![0f32; cout * cin * k * k];
            for (o, taps) in weight.chunks_exact_mut(cin * k * k).enumerate() {
                let step = 2f32.powi(-(o as i32 % 5) - 4);
                for (t, v) in taps.iter_mut().zip(values(cin * k * k, 30 + o as u32)) {
                    *t = (v * 126.0).round() * step;
                }
                taps[o % taps.len()] = if o % 2 == 0 { 63.0 } else { -63.0 } * step;
            }
            let bias = values(cout, 31);
            let conv = Conv::from_torch(&weight, &[cout, cin, k, k], &bias, stride).unwrap();
            let q = Quantizer::new(range(-1.3, 2.2)).unwrap();
            let levels: Vec<f32> = values(side * side * cin, 32)
                .iter()
                .map(|v| q.value(((v + 0.5) * 255.0) as u8))
                .collect();
            let want = conv.forward(&levels, side, 1);
            let plain = Activation::from_hwc(&levels, side, cin, k / 2);
            let mut input = QuantizedActivation::new(side, k / 2, cin, q);
            input.quantize(&plain, 1);
            let quantized = QuantizedConv::new(&conv, q);
            let out_side = conv.output_side(side);
            let mut got = Activation::new(out_side, 0, cout);
            quantized.run(&input, &mut got, None, Epilogue::Store, 1);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in got.data().iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * scale,
                    "{cout}×{cin}×{k}² stride {stride}: {g} vs {w}"
                );
            }
        }
    }

    fn block(cin: usize, cout: usize, act: bool, seed: u32) -> ResidualBlock {
        let conv = |o: usize, i: usize, k: usize, s: usize, seed: u32| {
            let w: Vec<f32> = values(o * i * k * k, seed).iter().map(|v| v / (i * k) as f32).collect();
            Conv::from_torch(&w, &[o, i, k, k], &values(o, seed + 1), s).unwrap()
        };
        ResidualBlock::new(
            conv(cout, cin, 3, 2, seed),
            conv(cout, cout, 3, 1, seed + 2),
            conv(cout, cin, 1, 2, seed + 4),
            act,
        )
    }

    /// The int8 encoder stays close to the f32 one (within a few levels of
    /// the latent's range), folded or not, and gives the same bits on any
    /// number of threads.
    #[test]
    fn the_int8_encoder_follows_the_f32_one() {
        let side = 64;
        for act in [false, true] {
            let encoder = Encoder {
                blocks: vec![block(3, 24, act, 40), block(24, 32, act, 50), block(32, 16, act, 60)],
            };
            let images: Vec<Vec<f32>> = (0..3)
                .map(|i| values(3 * side * side, 70 + i).iter().map(|v| v * 4.0).collect())
                .collect();
            let ranges = QuantizedEncoder::calibrate(&encoder, &images, side, 1).unwrap();
            for folded in [false, true] {
                let mut f32_encoder = encoder.clone();
                if folded {
                    f32_encoder.prepare(side);
                }
                assert_eq!(f32_encoder.blocks[0].folded.is_some(), folded && !act);
                let quantized = QuantizedEncoder::new(&f32_encoder, &ranges).unwrap();
                let mut workspace = quantized.workspace(side);
                for image in &images {
                    let (want, latent_side) = f32_encoder.forward(image, side, 1).unwrap();
                    let (got, got_side) = quantized.run(&mut workspace, image, 1).unwrap();
                    assert_eq!(got_side, latent_side);
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let error = want.iter().zip(&got).fold(0f32, |m, (w, g)| m.max((w - g).abs()));
                    assert!(
                        error <= 0.03 * scale,
                        "act {act}, folded {folded}: error {error} of {scale}"
                    );
                    let (threaded, _) = quantized.run(&mut workspace, image, 3).unwrap();
                    assert_eq!(threaded, got, "act {act}, folded {folded}: 3 threads");
                }
            }
        }
    }

    /// An unfolded block's skip runs in f32 from the f32 input: with conv1
    /// and conv2 all zeros the block is its skip, and the int8 encoder
    /// gives the f32 sums (an int8 skip would be off by about a level).
    #[test]
    fn unfolded_skips_run_in_f32() {
        let (cin, cout, side) = (8, 16, 16);
        let zeros = |o: usize, i: usize, k: usize, s: usize| {
            Conv::from_torch(&vec![0.0; o * i * k * k], &[o, i, k, k], &vec![0.0; o], s).unwrap()
        };
        let skip = Conv::from_torch(&values(cout * cin, 80), &[cout, cin, 1, 1], &values(cout, 81), 2).unwrap();
        let encoder = Encoder {
            blocks: vec![ResidualBlock::new(
                zeros(cout, cin, 3, 2),
                zeros(cout, cout, 3, 1),
                skip,
                false,
            )],
        };
        let image = values(cin * side * side, 82);
        let ranges = QuantizedEncoder::calibrate(&encoder, std::slice::from_ref(&image), side, 1).unwrap();
        let quantized = QuantizedEncoder::new(&encoder, &ranges).unwrap();
        let (want, _) = encoder.forward(&image, side, 1).unwrap();
        let (got, _) = quantized.run(&mut quantized.workspace(side), &image, 1).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * scale, "value {i}: {g} vs {w}");
        }
    }

    /// A convolution big enough to be split (even at int8's lower cost per
    /// multiply-add) gives the same floats and levels on any number of threads.
    #[test]
    fn threads_split_int8_rows_without_changing_the_result() {
        let (cin, cout, side) = (32, 32, 64);
        let conv = Conv::from_torch(&values(cout * cin * 9, 90), &[cout, cin, 3, 3], &values(cout, 91), 1).unwrap();
        let q = Quantizer::new(range(-2.0, 2.0)).unwrap();
        let quantized = QuantizedConv::new(&conv, q);
        assert!(quantized.macs(side) / INT8_MACS_PER_F32_MAC >= 3 * crate::encoder::MIN_MACS_PER_THREAD);
        let mut input = QuantizedActivation::new(side, 1, cin, q);
        input.quantize(&Activation::from_hwc(&values(side * side * cin, 92), side, cin, 0), 1);
        let next = Quantizer::new(range(-5.0, 5.0)).unwrap();
        let run = |threads: usize| {
            let mut output = Activation::new(side, 0, cout);
            let mut levels = QuantizedActivation::new(side, 1, cout, next);
            quantized.run(&input, &mut output, Some(&mut levels), Epilogue::Relu, threads);
            (output.data().to_vec(), levels.data)
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{threads} threads");
        }
    }

    #[test]
    fn calibrations_that_do_not_fit_are_refused() {
        let encoder = Encoder {
            blocks: vec![block(3, 8, false, 80), block(8, 8, false, 90)],
        };
        assert!(QuantizedEncoder::calibrate(&encoder, &[], 16, 1).is_err());
        let ranges = QuantizedEncoder::calibrate(&encoder, &[values(3 * 16 * 16, 3)], 16, 1).unwrap();
        assert!(QuantizedEncoder::new(&encoder, &ranges[..1]).is_err());
        assert!(QuantizedEncoder::calibrate(&encoder, &[values(10, 3)], 16, 1).is_err());
        let mut empty = ranges.clone();
        empty[1].middle = Range::EMPTY;
        assert!(QuantizedEncoder::new(&encoder, &empty).is_err());
    }
}
