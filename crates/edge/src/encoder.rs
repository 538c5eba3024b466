//! The edge encoder g_a without a tensor framework: three residual blocks
//! (3×3 stride-2 conv, 3×3 conv, ReLU, plus a 1×1 stride-2 skip), computed
//! on HWC activations as convolutions lowered to matrix products
//! (im2col, then `matrixmultiply`'s packed, runtime-dispatched sgemm).
//! Weights are repacked once at load time from PyTorch's `[out, in, kh, kw]`.
//!
//! The released reference has no activation between a block's two
//! convolutions, so `conv2 ∘ conv1` is one linear map: a 7×7 stride-2
//! convolution, exact up to a correction on the border (where conv2 reads
//! its zero padding, not conv1's output). Where that costs fewer
//! multiply-adds — the first block: 276 M → 89 M of g_a's 530 M at 224² —
//! the block runs folded ([`FoldedPair`]).

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// g_a's shape: the `[compressor]` fields of a bundle's architecture that
/// the encoder needs (the others are ignored when reading).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EncoderSpec {
    /// Input side in pixels (square).
    pub input_size: usize,
    /// Widths after the first two blocks.
    pub encoder_hidden: [usize; 2],
    /// Latent channels.
    pub latent_channels: usize,
    /// ReLU between each block's convolutions (the released reference has none).
    pub act_after_conv1: bool,
}

/// Below this many output pixels per thread a convolution stays on one thread.
const MIN_PIXELS_PER_THREAD: usize = 256;

/// One 2-D convolution with bias, `padding = kernel / 2` as in the reference.
#[derive(Debug, Clone)]
pub struct Conv {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    /// `[(ky, kx, c_in), c_out]`, row-major: the right-hand matrix of the product.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Conv {
    /// Takes PyTorch's `weight` of shape `[out, in, k, k]` and `bias` `[out]`.
    pub fn from_torch(weight: &[f32], shape: &[usize], bias: &[f32], stride: usize) -> Result<Self> {
        let &[out_channels, in_channels, kh, kw] = shape else {
            bail!("a convolution weight has 4 dimensions, not {shape:?}");
        };
        if kh != kw || kh % 2 == 0 {
            bail!("expected a square, odd kernel, got {kh}×{kw}");
        }
        if weight.len() != out_channels * in_channels * kh * kw || bias.len() != out_channels || stride == 0 {
            bail!(
                "weight of {} values for shape {shape:?}, bias of {} for {out_channels} channels, stride {stride}",
                weight.len(),
                bias.len()
            );
        }
        let k = kh;
        let mut packed = vec![0f32; weight.len()];
        for o in 0..out_channels {
            for i in 0..in_channels {
                for ky in 0..k {
                    for kx in 0..k {
                        let row = (ky * k + kx) * in_channels + i;
                        packed[row * out_channels + o] = weight[((o * in_channels + i) * k + ky) * k + kx];
                    }
                }
            }
        }
        Ok(Self {
            in_channels,
            out_channels,
            kernel: k,
            stride,
            weight: packed,
            bias: bias.to_vec(),
        })
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Output side for a square input of `side` pixels.
    pub fn output_side(&self, side: usize) -> usize {
        let pad = self.kernel / 2;
        (side + 2 * pad - self.kernel) / self.stride + 1
    }

    /// Multiply-adds for a square input of `side` pixels.
    pub fn macs(&self, side: usize) -> usize {
        let out = self.output_side(side);
        out * out * self.kernel * self.kernel * self.in_channels * self.out_channels
    }

    /// `x`: HWC, `side × side × in_channels`; returns HWC of the output
    /// side. With `threads > 1` the output rows are split among that many
    /// scoped threads (each lowering and multiplying its own rows), when
    /// there are enough of them to pay for the threads.
    pub fn forward(&self, x: &[f32], side: usize, threads: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), side * side * self.in_channels);
        let out_side = self.output_side(side);
        let mut out: Vec<f32> = self
            .bias
            .iter()
            .copied()
            .cycle()
            .take(out_side * out_side * self.out_channels)
            .collect();
        let threads = threads.clamp(1, (out_side * out_side / MIN_PIXELS_PER_THREAD).max(1));
        if threads == 1 {
            self.rows(x, side, out_side, 0..out_side, &mut out);
            return out;
        }
        let rows_per_thread = out_side.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, chunk) in out
                .chunks_mut(rows_per_thread * out_side * self.out_channels)
                .enumerate()
            {
                let start = i * rows_per_thread;
                let rows = start..(start + rows_per_thread).min(out_side);
                scope.spawn(move || self.rows(x, side, out_side, rows, chunk));
            }
        });
        out
    }

    /// Output rows `rows` into `out` (which holds their biases): im2col, then one sgemm.
    fn rows(&self, x: &[f32], side: usize, out_side: usize, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let pixels = rows.len() * out_side;
        let depth = self.kernel * self.kernel * self.in_channels;
        let cols = self.im2col(x, side, out_side, rows);
        debug_assert_eq!(out.len(), pixels * self.out_channels);
        // SAFETY: the strides describe row-major `pixels × depth`,
        // `depth × out_channels` and `pixels × out_channels` matrices, which
        // is exactly the lengths of `cols`, `self.weight` and `out`.
        unsafe {
            matrixmultiply::sgemm(
                pixels,
                depth,
                self.out_channels,
                1.0,
                cols.as_ptr(),
                depth as isize,
                1,
                self.weight.as_ptr(),
                self.out_channels as isize,
                1,
                1.0,
                out.as_mut_ptr(),
                self.out_channels as isize,
                1,
            );
        }
    }

    /// The output at `(oy, ox)`, which may lie outside the output grid (the
    /// input is zero-padded without bound): what a larger padding would compute there.
    fn at(&self, x: &[f32], side: usize, oy: isize, ox: isize) -> Vec<f32> {
        let (k, c, pad) = (self.kernel as isize, self.in_channels, (self.kernel / 2) as isize);
        let mut out = self.bias.clone();
        for ky in 0..k {
            let iy = oy * self.stride as isize + ky - pad;
            if iy < 0 || iy >= side as isize {
                continue;
            }
            for kx in 0..k {
                let ix = ox * self.stride as isize + kx - pad;
                if ix < 0 || ix >= side as isize {
                    continue;
                }
                let pixel = &x[(iy as usize * side + ix as usize) * c..][..c];
                for (i, &v) in pixel.iter().enumerate() {
                    let row = &self.weight[((ky * k + kx) as usize * c + i) * self.out_channels..][..self.out_channels];
                    for (o, w) in out.iter_mut().zip(row) {
                        *o += v * w;
                    }
                }
            }
        }
        out
    }

    /// One row per output pixel of output rows `rows`: the
    /// `k × k × in_channels` input patch it sees, zeros where the patch
    /// leaves the image.
    fn im2col(&self, x: &[f32], side: usize, out_side: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
        let (k, c, pad) = (self.kernel, self.in_channels, self.kernel / 2);
        let depth = k * k * c;
        let first = rows.start;
        let mut cols = vec![0f32; rows.len() * out_side * depth];
        for oy in rows {
            for ox in 0..out_side {
                let row = &mut cols[((oy - first) * out_side + ox) * depth..][..depth];
                for ky in 0..k {
                    let Some(iy) = (oy * self.stride + ky).checked_sub(pad).filter(|&y| y < side) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(ix) = (ox * self.stride + kx).checked_sub(pad).filter(|&x| x < side) else {
                            continue;
                        };
                        row[(ky * k + kx) * c..][..c].copy_from_slice(&x[(iy * side + ix) * c..][..c]);
                    }
                }
            }
        }
        cols
    }
}

/// `conv2 ∘ conv1` of a block without activation between them (3×3 stride 2,
/// then 3×3 stride 1, both padded by 1) as one 7×7 stride-2 convolution
/// padded by 3: `W[2d + e] = Σ W2[d]·W1[e]`, `b = b2 + Σ_d W2[d]·b1`.
/// That equals the pair wherever conv2's 3×3 window lies inside conv1's
/// output; on the border it also counts conv1 at the positions just outside
/// (where conv2 reads zeros), whose terms [`FoldedPair::forward`] subtracts.
#[derive(Debug, Clone)]
pub struct FoldedPair {
    folded: Conv,
    conv1: Conv,
    /// conv2's taps, `[(dy, dx, c_mid), c_out]`.
    conv2_weight: Vec<f32>,
}

impl FoldedPair {
    /// The folded pair, when the shapes allow folding.
    pub fn new(conv1: &Conv, conv2: &Conv) -> Option<Self> {
        if (conv1.kernel, conv1.stride, conv2.kernel, conv2.stride) != (3, 2, 3, 1)
            || conv1.out_channels != conv2.in_channels
        {
            return None;
        }
        let (cin, mid, cout) = (conv1.in_channels, conv1.out_channels, conv2.out_channels);
        let mut weight = vec![0f32; 49 * cin * cout];
        for (d, w2) in conv2.weight.chunks_exact(mid * cout).enumerate() {
            let (dy, dx) = (d / 3, d % 3);
            for (e, w1) in conv1.weight.chunks_exact(cin * mid).enumerate() {
                let (ey, ex) = (e / 3, e % 3);
                let k = (2 * dy + ey) * 7 + (2 * dx + ex);
                let target = &mut weight[k * cin * cout..][..cin * cout];
                for i in 0..cin {
                    for m in 0..mid {
                        let a = w1[i * mid + m];
                        let row = &w2[m * cout..][..cout];
                        for (t, b) in target[i * cout..][..cout].iter_mut().zip(row) {
                            *t += a * b;
                        }
                    }
                }
            }
        }
        let mut bias = conv2.bias.clone();
        for w2 in conv2.weight.chunks_exact(mid * cout) {
            for (m, b1) in conv1.bias.iter().enumerate() {
                for (b, w) in bias.iter_mut().zip(&w2[m * cout..][..cout]) {
                    *b += b1 * w;
                }
            }
        }
        Some(Self {
            folded: Conv {
                in_channels: cin,
                out_channels: cout,
                kernel: 7,
                stride: 2,
                weight,
                bias,
            },
            conv1: conv1.clone(),
            conv2_weight: conv2.weight.clone(),
        })
    }

    /// Multiply-adds for a square input of `side` pixels (the border correction excluded).
    pub fn macs(&self, side: usize) -> usize {
        self.folded.macs(side)
    }

    /// `conv2(conv1(x))` for HWC `x` of `side × side`.
    pub fn forward(&self, x: &[f32], side: usize, threads: usize) -> Vec<f32> {
        let mut out = self.folded.forward(x, side, threads);
        let n = self.folded.output_side(side) as isize;
        let (mid, cout) = (self.conv1.out_channels, self.folded.out_channels);
        // conv1 at each position just outside its output grid, computed once.
        let mut ring = std::collections::HashMap::new();
        for q in border(n) {
            for dy in 0..3isize {
                for dx in 0..3isize {
                    let p = (q.0 + dy - 1, q.1 + dx - 1);
                    if (0..n).contains(&p.0) && (0..n).contains(&p.1) {
                        continue;
                    }
                    let y1 = ring.entry(p).or_insert_with(|| self.conv1.at(x, side, p.0, p.1));
                    let taps = &self.conv2_weight[((dy * 3 + dx) as usize) * mid * cout..][..mid * cout];
                    let target = &mut out[((q.0 * n + q.1) as usize) * cout..][..cout];
                    for (m, &v) in y1.iter().enumerate() {
                        for (t, w) in target.iter_mut().zip(&taps[m * cout..][..cout]) {
                            *t -= v * w;
                        }
                    }
                }
            }
        }
        out
    }
}

/// The positions on the edge of an `n × n` grid, each once.
fn border(n: isize) -> impl Iterator<Item = (isize, isize)> {
    (0..n).flat_map(move |y| {
        let xs: Vec<isize> = if y == 0 || y == n - 1 {
            (0..n).collect()
        } else if n > 1 {
            vec![0, n - 1]
        } else {
            vec![0]
        };
        xs.into_iter().map(move |x| (y, x))
    })
}

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
        }
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

    fn forward(&self, x: &[f32], side: usize, threads: usize) -> (Vec<f32>, usize) {
        let out_side = self.conv1.output_side(side);
        let mut y = match &self.folded {
            Some(pair) => pair.forward(x, side, threads),
            None => {
                let mut h = self.conv1.forward(x, side, threads);
                if self.act_after_conv1 {
                    relu(&mut h);
                }
                self.conv2.forward(&h, out_side, threads)
            }
        };
        relu(&mut y);
        let skip = self.skip.forward(x, side, threads);
        for (a, b) in y.iter_mut().zip(&skip) {
            *a += b;
        }
        (y, out_side)
    }

    fn macs(&self, side: usize) -> usize {
        let out = self.conv1.output_side(side);
        let pair = match &self.folded {
            Some(pair) => pair.macs(side),
            None => self.conv1.macs(side) + self.conv2.macs(out),
        };
        pair + self.skip.macs(side)
    }
}

fn relu(values: &mut [f32]) {
    for v in values {
        *v = v.max(0.0);
    }
}

/// g_a: the residual blocks in order.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// `rb1`, `rb2`, `rb3`.
    pub blocks: Vec<ResidualBlock>,
}

impl Encoder {
    /// Builds g_a from PyTorch's tensors, named as under `g_a.`
    /// (`rb1.conv1.weight`, …): `tensor(name)` gives values and shape, which
    /// must be those `spec` implies. Not folded; see [`Encoder::fold`].
    pub fn from_torch(spec: &EncoderSpec, tensor: impl Fn(&str) -> Result<(Vec<f32>, Vec<usize>)>) -> Result<Self> {
        let widths = [3, spec.encoder_hidden[0], spec.encoder_hidden[1], spec.latent_channels];
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
                    spec.act_after_conv1,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// The blocks computed as written (no folded pairs).
    pub fn unfolded(&self) -> Self {
        Self {
            blocks: self
                .blocks
                .iter()
                .map(|b| ResidualBlock {
                    folded: None,
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

    /// Runs on one CHW image of `3 × side × side` on up to `threads`
    /// threads; returns the CHW latent and its side.
    pub fn forward(&self, image_chw: &[f32], side: usize, threads: usize) -> Result<(Vec<f32>, usize)> {
        let channels = self.blocks.first().map_or(0, |b| b.conv1.in_channels());
        if image_chw.len() != channels * side * side {
            bail!(
                "expected a {channels}×{side}×{side} input, got {} values",
                image_chw.len()
            );
        }
        let mut x = chw_to_hwc(image_chw, channels, side);
        let mut side = side;
        for block in &self.blocks {
            (x, side) = block.forward(&x, side, threads);
        }
        let channels = self.blocks.last().map_or(channels, |b| b.conv2.out_channels());
        Ok((hwc_to_chw(&x, channels, side), side))
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

fn chw_to_hwc(x: &[f32], channels: usize, side: usize) -> Vec<f32> {
    let plane = side * side;
    let mut out = vec![0f32; x.len()];
    for c in 0..channels {
        for (p, &v) in x[c * plane..][..plane].iter().enumerate() {
            out[p * channels + c] = v;
        }
    }
    out
}

fn hwc_to_chw(x: &[f32], channels: usize, side: usize) -> Vec<f32> {
    let plane = side * side;
    let mut out = vec![0f32; x.len()];
    for (p, pixel) in x.chunks_exact(channels).enumerate() {
        for (c, &v) in pixel.iter().enumerate() {
            out[c * plane + p] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition of a convolution, straight from the indices (CHW).
    fn direct(x: &[f32], side: usize, w: &[f32], shape: [usize; 4], bias: &[f32], stride: usize) -> Vec<f32> {
        let [o, i, k, _] = shape;
        let pad = k / 2;
        let out_side = (side + 2 * pad - k) / stride + 1;
        let mut out = vec![0f32; o * out_side * out_side];
        for co in 0..o {
            for oy in 0..out_side {
                for ox in 0..out_side {
                    let mut acc = f64::from(bias[co]);
                    for ci in 0..i {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (
                                    (oy * stride + ky) as isize - pad as isize,
                                    (ox * stride + kx) as isize - pad as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= side as isize || ix >= side as isize {
                                    continue;
                                }
                                let xv = x[(ci * side + iy as usize) * side + ix as usize];
                                acc += f64::from(xv) * f64::from(w[((co * i + ci) * k + ky) * k + kx]);
                            }
                        }
                    }
                    out[(co * out_side + oy) * out_side + ox] = acc as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: deterministic, no dependency.
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn lowered_convolutions_equal_the_definition() {
        for (shape, stride, side) in [
            ([5, 3, 3, 3], 2, 9),
            ([4, 6, 3, 3], 1, 7),
            ([7, 4, 1, 1], 2, 10),
            ([3, 2, 3, 3], 2, 8),
        ] {
            let [o, i, k, _] = shape;
            let w = values(o * i * k * k, 1);
            let b = values(o, 2);
            let x = values(i * side * side, 3);
            let conv = Conv::from_torch(&w, &shape, &b, stride).unwrap();
            let out_side = conv.output_side(side);
            let got = hwc_to_chw(&conv.forward(&chw_to_hwc(&x, i, side), side, 1), o, out_side);
            let want = direct(&x, side, &w, shape, &b, stride);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{shape:?} stride {stride}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn a_folded_pair_equals_the_two_convolutions() {
        for (cin, mid, cout, side) in [(3, 8, 8, 16), (3, 5, 4, 9), (2, 3, 3, 2), (4, 6, 5, 1), (3, 4, 4, 7)] {
            let conv1 = Conv::from_torch(&values(mid * cin * 9, 4), &[mid, cin, 3, 3], &values(mid, 5), 2).unwrap();
            let conv2 = Conv::from_torch(&values(cout * mid * 9, 6), &[cout, mid, 3, 3], &values(cout, 7), 1).unwrap();
            let x = values(side * side * cin, 8);
            let pair = FoldedPair::new(&conv1, &conv2).unwrap();
            let want = conv2.forward(&conv1.forward(&x, side, 1), conv1.output_side(side), 1);
            let got = pair.forward(&x, side, 1);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{cin}→{mid}→{cout} at {side}²: {g} vs {w}"
                );
            }
        }
        // Folding needs a 3×3 stride-2 then a 3×3 stride-1 convolution.
        let one = Conv::from_torch(&values(4, 9), &[2, 2, 1, 1], &values(2, 10), 2).unwrap();
        let three = Conv::from_torch(&values(36, 11), &[2, 2, 3, 3], &values(2, 12), 1).unwrap();
        assert!(FoldedPair::new(&one, &three).is_none());
        assert!(FoldedPair::new(&three, &three).is_none());
    }

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

    #[test]
    fn threads_split_the_rows_without_changing_the_result() {
        let conv = Conv::from_torch(&values(8 * 3 * 9, 15), &[8, 3, 3, 3], &values(8, 16), 1).unwrap();
        for side in [40, 37, 64] {
            let x = values(side * side * 3, 17);
            let one = conv.forward(&x, side, 1);
            for threads in [2, 3, 7] {
                assert_eq!(conv.forward(&x, side, threads), one, "{side}² on {threads} threads");
            }
        }
    }

    #[test]
    fn malformed_weights_are_refused() {
        assert!(Conv::from_torch(&[0.0; 8], &[2, 1, 2, 2], &[0.0; 2], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3, 3], &[0.0; 2], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3], &[0.0; 1], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3, 3], &[0.0; 1], 0).is_err());
    }
}
