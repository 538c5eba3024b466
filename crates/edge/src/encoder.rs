//! The edge encoder g_a without a tensor framework: three residual blocks
//! (3×3 stride-2 conv, 3×3 conv, ReLU, plus a 1×1 stride-2 skip), computed
//! by the convolutions of [`crate::conv`] on zero-padded HWC buffers; the
//! buffers of one image size live in a [`Workspace`], so encoding allocates
//! only the result.
//!
//! The released reference has no activation between a block's two
//! convolutions, so they fold into one ([`FoldedPair`]). Where that costs
//! fewer multiply-adds — the first block: 276 M → 89 M of g_a's 530 M at
//! 224² — the block runs folded.

use anyhow::{bail, Context, Result};
use frankensplit_bundle::CompressorConfig;

use crate::conv::folded::FoldedPair;
use crate::conv::winograd::Winograd;
use crate::conv::Conv;
use crate::kernel::Epilogue;
use crate::tensor::PaddedHwc;

/// FrankenSplit's `ResidualBlockWithStride` with ReLU:
/// `relu(conv2(act(conv1(x)))) + skip(x)`.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    /// 3×3, stride 2.
    pub conv1: Conv,
    /// 3×3, stride 1.
    pub conv2: Conv,
    /// 1×1, stride 2.
    pub skip: Conv,
    /// ReLU between conv1 and conv2 (the released reference has none).
    pub act_after_conv1: bool,
    /// conv2 ∘ conv1 as one convolution, when that is cheaper (see [`ResidualBlock::fold`]).
    pub folded: Option<FoldedPair>,
    /// conv2 by Winograd's F(2×2, 3×3), where chosen (see [`ResidualBlock::use_winograd`]).
    pub winograd: Option<Winograd>,
}

impl ResidualBlock {
    /// A block computed as written.
    pub fn new(conv1: Conv, conv2: Conv, skip: Conv, act_after_conv1: bool) -> Self {
        Self {
            conv1,
            conv2,
            skip,
            act_after_conv1,
            folded: None,
            winograd: None,
        }
    }

    /// Computes conv2 by Winograd's F(2×2, 3×3) when the block is not
    /// folded and conv2's side (conv1's output for inputs of `side`) is even.
    pub fn use_winograd(&mut self, side: usize) {
        let out = self.conv1.output_side(side);
        self.winograd = (self.folded.is_none() && Winograd::applies_to(out))
            .then(|| Winograd::new(&self.conv2))
            .flatten();
    }

    /// Folds conv2 ∘ conv1 into one convolution when there is no activation
    /// between them and the folded one costs fewer multiply-adds at `side`.
    pub fn fold(&mut self, side: usize) {
        self.folded = None;
        if self.act_after_conv1 {
            return;
        }
        if let Some(pair) = FoldedPair::new(&self.conv1, &self.conv2) {
            let out = self.conv1.output_side(side);
            if pair.macs(side) < self.conv1.macs(side) + self.conv2.macs(out) {
                self.folded = Some(pair);
            }
        }
    }

    /// Border the block's input needs.
    fn input_pad(&self) -> usize {
        self.folded
            .as_ref()
            .map_or(self.conv1.kernel / 2, FoldedPair::input_pad)
    }

    /// The scratch the block needs for inputs of `side`.
    fn scratch(&self, side: usize) -> Scratch {
        let out = self.conv1.output_side(side);
        match &self.folded {
            Some(pair) => Scratch::Ring(pair.ring(out)),
            None => Scratch::Middle(PaddedHwc::new(out, self.conv2.kernel / 2, self.conv1.out_channels)),
        }
    }

    /// `output = relu(conv2(act(conv1(x)))) + skip(x)`. Unfolded, the skip
    /// branch is written first so that conv2's tiles add to it as they
    /// store; folded, the pair is, and the skip's tiles add its ReLU.
    fn run(&self, x: &PaddedHwc, scratch: &mut Scratch, output: &mut PaddedHwc, threads: usize) {
        match (&self.folded, scratch) {
            (Some(pair), Scratch::Ring(ring)) => {
                pair.run(x, ring, output, threads);
                self.skip.run(x, output, Epilogue::AddToRelu, threads);
            }
            (None, Scratch::Middle(middle)) => {
                self.skip.run(x, output, Epilogue::Store, threads);
                let epilogue = if self.act_after_conv1 {
                    Epilogue::Relu
                } else {
                    Epilogue::Store
                };
                self.conv1.run(x, middle, epilogue, threads);
                match &self.winograd {
                    Some(winograd) => winograd.run(middle, output, Epilogue::ReluAdd, threads),
                    None => self.conv2.run(middle, output, Epilogue::ReluAdd, threads),
                }
            }
            _ => unreachable!("Encoder::run checks that the workspace fits"),
        }
    }

    fn macs(&self, side: usize) -> usize {
        let out = self.conv1.output_side(side);
        let pair = match &self.folded {
            Some(pair) => pair.macs(side),
            None => {
                let conv2 = self.winograd.as_ref().map_or(self.conv2.macs(out), |w| w.macs(out));
                self.conv1.macs(side) + conv2
            }
        };
        pair + self.skip.macs(side)
    }
}

/// What a block computes through besides its input and output.
#[derive(Debug, Clone)]
enum Scratch {
    /// conv1's output, with conv2's border (unfolded blocks).
    Middle(PaddedHwc),
    /// conv1's values just outside its grid (folded blocks).
    Ring(PaddedHwc),
}

/// g_a: the residual blocks in order.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `rb1`, `rb2`, `rb3`.
    pub blocks: Vec<ResidualBlock>,
}

/// The activations of one image size, made once and reused by every
/// [`Encoder::run`]: block `i` reads `inputs[i]` (whose border fits it),
/// goes through `scratch[i]` and writes `inputs[i + 1]`.
#[derive(Debug, Clone)]
pub struct Workspace {
    inputs: Vec<PaddedHwc>,
    scratch: Vec<Scratch>,
}

impl Encoder {
    /// Builds g_a from PyTorch's tensors, named as under `g_a.`
    /// (`rb1.conv1.weight`, …): `tensor(name)` gives values and shape, which
    /// must be those `config` implies (its widths are validated positive
    /// and bounded by the bundle crate). Not folded; see [`Encoder::fold`].
    pub fn from_torch(
        config: &CompressorConfig,
        tensor: impl Fn(&str) -> Result<(Vec<f32>, Vec<usize>)>,
    ) -> Result<Self> {
        let [h1, h2] = config.encoder_hidden.map(|w| w as usize);
        let widths = [3, h1, h2, config.latent_channels as usize];
        let blocks = (0..3)
            .map(|i| {
                let conv = |part: &str, stride: usize, kernel: usize, inputs: usize| -> Result<Conv> {
                    let name = format!("rb{}.{part}", i + 1);
                    let expected = [widths[i + 1], inputs, kernel, kernel];
                    let (weight, shape) = tensor(&format!("{name}.weight"))?;
                    if shape != expected {
                        bail!("{name}.weight has shape {shape:?}, the architecture says {expected:?}");
                    }
                    let (bias, _) = tensor(&format!("{name}.bias"))?;
                    Conv::from_torch(&weight, &shape, &bias, stride).with_context(|| name.clone())
                };
                Ok(ResidualBlock::new(
                    conv("conv1", 2, 3, widths[i])?,
                    conv("conv2", 1, 3, widths[i + 1])?,
                    conv("skip", 2, 1, widths[i])?,
                    config.act_after_conv1,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// The blocks computed as written (no folded pairs, no Winograd).
    pub fn unfolded(&self) -> Self {
        Self {
            blocks: self
                .blocks
                .iter()
                .map(|b| ResidualBlock {
                    folded: None,
                    winograd: None,
                    ..b.clone()
                })
                .collect(),
        }
    }

    /// Folds every block whose convolution pair is cheaper folded, for
    /// inputs of `side` pixels.
    pub fn fold(&mut self, side: usize) {
        let mut side = side;
        for block in &mut self.blocks {
            block.fold(side);
            side = block.conv1.output_side(side);
        }
    }

    /// Computes every unfolded block's conv2 by Winograd's F(2×2, 3×3)
    /// where its side is even, for inputs of `side` pixels.
    pub fn use_winograd(&mut self, side: usize) {
        let mut side = side;
        for block in &mut self.blocks {
            block.use_winograd(side);
            side = block.conv1.output_side(side);
        }
    }

    /// The fastest exact form for inputs of `side` pixels: folded pairs
    /// where cheaper, Winograd for the other blocks' conv2.
    pub fn prepare(&mut self, side: usize) {
        self.fold(side);
        self.use_winograd(side);
    }

    /// This encoder's forms, one optimisation added at a time, named for
    /// benchmarks: as written, folded, folded + Winograd (= [`Encoder::prepare`]).
    pub fn steps(&self, side: usize) -> [(&'static str, Encoder); 3] {
        let written = self.unfolded();
        let mut folded = written.clone();
        folded.fold(side);
        let mut prepared = written.clone();
        prepared.prepare(side);
        [
            ("as written", written),
            ("folded", folded),
            ("folded + Winograd", prepared),
        ]
    }

    /// The buffers for `side × side` images, with the borders this
    /// encoder's blocks (folded or not) read.
    pub fn workspace(&self, side: usize) -> Workspace {
        let mut inputs = Vec::new();
        let mut scratch = Vec::new();
        let mut side = side;
        let mut channels = self.blocks.first().map_or(0, |b| b.conv1.in_channels());
        for block in &self.blocks {
            inputs.push(PaddedHwc::new(side, block.input_pad(), channels));
            scratch.push(block.scratch(side));
            side = block.conv1.output_side(side);
            channels = block.conv2.out_channels();
        }
        inputs.push(PaddedHwc::new(side, 0, channels));
        Workspace { inputs, scratch }
    }

    /// Whether `workspace` has the borders this encoder, folded as it is now, reads.
    pub fn fits(&self, workspace: &Workspace) -> bool {
        self.blocks.len() == workspace.scratch.len()
            && self
                .blocks
                .iter()
                .zip(&workspace.inputs)
                .zip(&workspace.scratch)
                .all(|((block, input), scratch)| {
                    input.pad == block.input_pad() && matches!(scratch, Scratch::Ring(_)) == block.folded.is_some()
                })
    }

    /// Runs on one CHW image of `3 × side × side` on up to `threads`
    /// threads; returns the CHW latent and its side.
    pub fn forward(&self, image_chw: &[f32], side: usize, threads: usize) -> Result<(Vec<f32>, usize)> {
        self.run(&mut self.workspace(side), image_chw, threads)
    }

    /// [`Encoder::forward`] in the buffers of `workspace`, which must have
    /// come from [`Encoder::workspace`] of this encoder, folded as it is now.
    pub fn run(&self, workspace: &mut Workspace, image_chw: &[f32], threads: usize) -> Result<(Vec<f32>, usize)> {
        if !self.fits(workspace) {
            bail!("the workspace was made for another encoder or folding");
        }
        let Some(first) = workspace.inputs.first_mut() else {
            bail!("an encoder without blocks");
        };
        first.fill_from_chw(image_chw)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let (before, after) = workspace.inputs.split_at_mut(i + 1);
            block.run(&before[i], &mut workspace.scratch[i], &mut after[0], threads);
        }
        let latent = workspace.inputs.last().expect("one more input than blocks");
        Ok((latent.to_chw(), latent.side))
    }

    /// Multiply-adds for one `side × side` image.
    pub fn macs(&self, side: usize) -> usize {
        let mut total = 0;
        let mut side = side;
        for block in &self.blocks {
            total += block.macs(side);
            side = block.conv1.output_side(side);
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    #[test]
    fn blocks_fold_only_where_that_saves_work() {
        let block = |cin: usize, cout: usize, act: bool| {
            let conv = |o: usize, i: usize, k: usize, s: usize| {
                Conv::from_torch(&values(o * i * k * k, 13), &[o, i, k, k], &values(o, 14), s).unwrap()
            };
            ResidualBlock::new(
                conv(cout, cin, 3, 2),
                conv(cout, cout, 3, 1),
                conv(cout, cin, 1, 2),
                act,
            )
        };
        // The reference's first block: 3 → 48, 276 M → 89 M multiply-adds at 224².
        let mut first = block(3, 48, false);
        let before = first.macs(224);
        first.fold(224);
        assert!(first.folded.is_some());
        assert_eq!(before - first.macs(224), 112 * 112 * (27 + 432 - 147) * 48);
        // 48 → 64: a 7×7 over 48 channels costs more than the pair.
        let mut second = block(48, 64, false);
        second.fold(112);
        assert!(second.folded.is_none());
        // An activation between the convolutions makes them two maps.
        let mut activated = block(3, 48, true);
        activated.fold(224);
        assert!(activated.folded.is_none());
    }
}
