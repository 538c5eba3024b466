//! The edge encoder g_a without a tensor framework: three residual blocks
//! (3×3 stride-2 conv, 3×3 conv, ReLU, plus a 1×1 stride-2 skip), computed
//! on HWC activations as convolutions lowered to matrix products
//! (im2col, then `matrixmultiply`'s packed, runtime-dispatched sgemm).
//! Weights are repacked once at load time from PyTorch's `[out, in, kh, kw]`.

use anyhow::{bail, Result};

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

    /// `x`: HWC, `side × side × in_channels`; returns HWC of the output side.
    pub fn forward(&self, x: &[f32], side: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), side * side * self.in_channels);
        let out_side = self.output_side(side);
        let pixels = out_side * out_side;
        let depth = self.kernel * self.kernel * self.in_channels;
        let cols = self.im2col(x, side, out_side);
        let mut out: Vec<f32> = self
            .bias
            .iter()
            .copied()
            .cycle()
            .take(pixels * self.out_channels)
            .collect();
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
        out
    }

    /// One row per output pixel: the `k × k × in_channels` input patch it
    /// sees, zeros where the patch leaves the image.
    fn im2col(&self, x: &[f32], side: usize, out_side: usize) -> Vec<f32> {
        let (k, c, pad) = (self.kernel, self.in_channels, self.kernel / 2);
        let depth = k * k * c;
        let mut cols = vec![0f32; out_side * out_side * depth];
        for oy in 0..out_side {
            for ox in 0..out_side {
                let row = &mut cols[(oy * out_side + ox) * depth..][..depth];
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
}

impl ResidualBlock {
    fn forward(&self, x: &[f32], side: usize) -> (Vec<f32>, usize) {
        let mut h = self.conv1.forward(x, side);
        let out_side = self.conv1.output_side(side);
        if self.act_after_conv1 {
            relu(&mut h);
        }
        let mut y = self.conv2.forward(&h, out_side);
        relu(&mut y);
        let skip = self.skip.forward(x, side);
        for (a, b) in y.iter_mut().zip(&skip) {
            *a += b;
        }
        (y, out_side)
    }

    fn macs(&self, side: usize) -> usize {
        let out = self.conv1.output_side(side);
        self.conv1.macs(side) + self.conv2.macs(out) + self.skip.macs(side)
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
    /// Runs on one CHW image of `3 × side × side`; returns the CHW latent and its side.
    pub fn forward(&self, image_chw: &[f32], side: usize) -> Result<(Vec<f32>, usize)> {
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
            (x, side) = block.forward(&x, side);
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
            let got = hwc_to_chw(&conv.forward(&chw_to_hwc(&x, i, side), side), o, out_side);
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
    fn malformed_weights_are_refused() {
        assert!(Conv::from_torch(&[0.0; 8], &[2, 1, 2, 2], &[0.0; 2], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3, 3], &[0.0; 2], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3], &[0.0; 1], 1).is_err());
        assert!(Conv::from_torch(&[0.0; 9], &[1, 1, 3, 3], &[0.0; 1], 0).is_err());
    }
}
