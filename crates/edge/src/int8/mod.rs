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

use crate::conv::folded::FoldedPair;
use crate::conv::Conv;
use crate::encoder::Encoder;
use crate::kernel::Epilogue;
use crate::tensor::PaddedHwc;

mod conv;
mod quantize;
#[cfg(test)]
mod tests;

pub use conv::{QuantizedConv, WEIGHT_LEVELS};
pub use quantize::{BlockRanges, QuantizedPaddedHwc, Quantizer, Range};

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
    image: PaddedHwc,
    blocks: Vec<BlockBuffers>,
}

#[derive(Debug, Clone)]
struct BlockBuffers {
    input: QuantizedPaddedHwc,
    scratch: Scratch,
    output: PaddedHwc,
}

#[derive(Debug, Clone)]
enum Scratch {
    /// conv1's output in f32 and quantized (unfolded blocks).
    Middle(PaddedHwc, QuantizedPaddedHwc),
    /// The folded pair's ring.
    Ring(PaddedHwc),
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
            let mut x = PaddedHwc::new(side, 1, channels);
            x.fill_from_chw(image)?;
            let mut side = side;
            for (block, range) in plain.blocks.iter().zip(&mut ranges) {
                range.input.include(x.data());
                let out = block.conv1.output_side(side);
                let mut middle = PaddedHwc::new(out, 1, block.conv1.out_channels());
                let epilogue = if block.act_after_conv1 {
                    Epilogue::Relu
                } else {
                    Epilogue::Store
                };
                block.conv1.run(&x, &mut middle, epilogue, threads);
                range.middle.include(middle.data());
                let mut output = PaddedHwc::new(out, 1, block.conv2.out_channels());
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
        let image = PaddedHwc::new(side, f32_pad(0), self.input_channels);
        let mut blocks = Vec::new();
        let (mut side, mut channels) = (side, self.input_channels);
        for (i, block) in self.blocks.iter().enumerate() {
            let input_pad = match &block.pair {
                QuantizedPair::Folded { folded, .. } => folded.kernel / 2,
                QuantizedPair::Separate { conv1, .. } => conv1.kernel / 2,
            };
            let input = QuantizedPaddedHwc::new(side, input_pad, channels, block.input);
            let out = block.skip.output_side(side);
            let scratch = match &block.pair {
                QuantizedPair::Folded { exact, .. } => Scratch::Ring(exact.ring(out)),
                QuantizedPair::Separate {
                    conv1, middle, conv2, ..
                } => Scratch::Middle(
                    PaddedHwc::new(out, 0, conv1.out_channels),
                    QuantizedPaddedHwc::new(out, conv2.kernel / 2, conv1.out_channels, *middle),
                ),
            };
            blocks.push(BlockBuffers {
                input,
                scratch,
                output: PaddedHwc::new(out, f32_pad(i + 1), block.out_channels),
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
