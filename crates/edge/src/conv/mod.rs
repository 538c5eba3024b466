//! One 2-D convolution, computed directly on a zero-padded HWC buffer
//! ([`PaddedHwc`]) by the register-blocked tiles of [`crate::kernel`], its
//! weights repacked once at load time from PyTorch's `[out, in, kh, kw]`;
//! and the faster forms of g_a's convolutions: a block's two convolutions
//! folded into one ([`folded`]), and Winograd's F(2×2, 3×3) ([`winograd`]).

use anyhow::{bail, Result};

use crate::kernel::{self, Epilogue, Tile, TILE_CHANNELS};
use crate::pool::split_rows;
use crate::tensor::PaddedHwc;

pub mod folded;
pub mod winograd;

/// One 2-D convolution with bias, `padding = kernel / 2` as in the reference.
#[derive(Debug, Clone)]
pub struct Conv {
    in_channels: usize,
    // Also read by `crate::encoder`'s blocks, for the buffers they need.
    pub(crate) out_channels: usize,
    pub(crate) kernel: usize,
    stride: usize,
    /// `[(ky, kx, c_in), c_out]`, row-major: what folding and the border
    /// correction read.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The tiles' layout: per block of [`TILE_CHANNELS`] output channels,
    /// `[ky][kx·c_in + c][TILE_CHANNELS]`, zero-padded to whole blocks.
    blocked: Vec<f32>,
    /// Biases zero-padded to whole blocks.
    blocked_bias: Vec<f32>,
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
        let mut matrix = vec![0f32; weight.len()];
        for o in 0..out_channels {
            for i in 0..in_channels {
                for ky in 0..k {
                    for kx in 0..k {
                        let row = (ky * k + kx) * in_channels + i;
                        matrix[row * out_channels + o] = weight[((o * in_channels + i) * k + ky) * k + kx];
                    }
                }
            }
        }
        Ok(Self::from_matrix(
            in_channels,
            out_channels,
            k,
            stride,
            matrix,
            bias.to_vec(),
        ))
    }

    /// From the `[(ky, kx, c_in), c_out]` matrix.
    fn from_matrix(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
    ) -> Self {
        let blocks = out_channels.div_ceil(TILE_CHANNELS);
        let depth = kernel * kernel * in_channels;
        let mut blocked = vec![0f32; blocks * depth * TILE_CHANNELS];
        for (row, taps) in weight.chunks_exact(out_channels).enumerate() {
            for (o, &w) in taps.iter().enumerate() {
                let (block, lane) = (o / TILE_CHANNELS, o % TILE_CHANNELS);
                blocked[(block * depth + row) * TILE_CHANNELS + lane] = w;
            }
        }
        let mut blocked_bias = bias.clone();
        blocked_bias.resize(blocks * TILE_CHANNELS, 0.0);
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            weight,
            bias,
            blocked,
            blocked_bias,
        }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Kernel side.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// Stride.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The taps as the `[(ky, kx, c_in), c_out]` matrix.
    pub fn weight_matrix(&self) -> &[f32] {
        &self.weight
    }

    /// Biases.
    pub fn bias(&self) -> &[f32] {
        &self.bias
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

    /// The convolution of an unpadded HWC `x` of `side × side`, as HWC.
    pub fn forward(&self, x: &[f32], side: usize, threads: usize) -> Vec<f32> {
        let input = PaddedHwc::from_hwc(x, side, self.in_channels, self.kernel / 2);
        let mut output = PaddedHwc::new(self.output_side(side), 0, self.out_channels);
        self.run(&input, &mut output, Epilogue::Store, threads);
        output.data
    }

    /// Writes the convolution of `input` into the interior of `output`
    /// through `epilogue`. With `threads > 1` the output rows are split
    /// into up to that many parts (see [`split_rows`]), as far as each part
    /// keeps the pool's `MIN_MACS_PER_THREAD`; every row is computed the
    /// same way either way.
    ///
    /// Panics unless `input` has this convolution's input channels and a
    /// border of at least `kernel / 2`, and `output` its output side and channels.
    pub fn run(&self, input: &PaddedHwc, output: &mut PaddedHwc, epilogue: Epilogue, threads: usize) {
        assert!(
            input.channels == self.in_channels
                && input.pad >= self.kernel / 2
                && output.side == self.output_side(input.side)
                && output.channels == self.out_channels,
            "activations do not fit the convolution"
        );
        let out_side = output.side;
        let row_step = output.row_step();
        let out_pad = output.pad;
        let body = output.rows_mut(0..out_side);
        let work = (threads, self.macs(input.side));
        split_rows(body, out_side, row_step, work, |rows, chunk| {
            self.rows(input, rows, chunk, out_pad, epilogue)
        });
    }

    /// Output rows `rows` into `out`, which starts at the first of them
    /// (border columns of `out_pad` pixels included).
    fn rows(
        &self,
        input: &PaddedHwc,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        out_pad: usize,
        epilogue: Epilogue,
    ) {
        let out_side = self.output_side(input.side);
        let out_step = (out_side + 2 * out_pad) * self.out_channels;
        for (oy, row) in rows.zip(out.chunks_exact_mut(out_step)) {
            let pixels = &mut row[out_pad * self.out_channels..][..out_side * self.out_channels];
            self.span(input, oy as isize, 0, out_side, pixels, epilogue);
        }
    }

    /// Output pixels `(oy, ox + i)` for `i < count` into `out` (HWC, `count
    /// × out_channels`). They may lie outside the output grid — what a
    /// larger padding would compute there — as far as `input`'s border
    /// reaches; panics beyond it.
    fn span(&self, input: &PaddedHwc, oy: isize, ox: isize, count: usize, out: &mut [f32], epilogue: Epilogue) {
        let line = Line {
            from: (oy, ox),
            count,
            down: false,
            out_step: self.out_channels,
        };
        self.line(input, line, out, epilogue);
    }

    /// The output pixels of `line` into `out`, where pixel `i` starts at
    /// `i · line.out_step`; as [`Conv::span`], also outside the grid.
    fn line(&self, input: &PaddedHwc, line: Line, out: &mut [f32], epilogue: Epilogue) {
        let (k, s, cin, cout) = (self.kernel, self.stride, self.in_channels, self.out_channels);
        let Line {
            from: (oy, ox),
            count,
            down,
            out_step,
        } = line;
        let shift = input.pad as isize - (k / 2) as isize;
        let (top, left) = (oy * s as isize + shift, ox * s as isize + shift);
        let padded = (input.side + 2 * input.pad) as isize;
        let extent = ((count.max(1) - 1) * s) as isize;
        let (bottom, right) = if down {
            (top + extent + k as isize, left + k as isize)
        } else {
            (top + k as isize, left + extent + k as isize)
        };
        assert!(
            top >= 0
                && left >= 0
                && bottom <= padded
                && right <= padded
                && out_step >= cout
                && out.len() >= (count.max(1) - 1) * out_step + cout,
            "outputs {line:?} read beyond the input's border"
        );
        let in_step = input.row_step();
        let first = top as usize * in_step + left as usize * cin;
        let pixel_step = if down { s * in_step } else { s * cin };
        let depth = k * k * cin;
        let first_tile = Tile {
            input: input.data[first..].as_ptr(),
            pixel_step,
            row_step: in_step,
            kernel: k,
            row_len: k * cin,
            weights: self.blocked.as_ptr(),
            bias: self.blocked_bias.as_ptr(),
            out: out.as_mut_ptr(),
            out_step,
            channels: TILE_CHANNELS,
            epilogue,
        };
        // SAFETY: the taps span padded rows `top..bottom` and columns
        // `left..right`, inside `input` (asserted); the weights and biases
        // are whole blocks of `depth` taps; the outputs are `cout` floats of
        // each pixel, inside `out` (asserted), which is not `input`.
        unsafe { kernel::compute_line(&first_tile, count, cout, depth * TILE_CHANNELS) };
    }
}

/// Output pixels in a row or a column: `count` of them from `from` (which
/// may lie outside the grid), to the right or `down`; in the output
/// buffer, `out_step` floats apart.
#[derive(Debug, Clone, Copy)]
struct Line {
    from: (isize, isize),
    count: usize,
    down: bool,
    out_step: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::MIN_MACS_PER_THREAD;
    use crate::test_values as values;

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
    fn threads_split_the_rows_without_changing_the_result() {
        // 16 → 32 channels: 17–42 M multiply-adds, enough for several threads.
        let conv = Conv::from_torch(&values(32 * 16 * 9, 15), &[32, 16, 3, 3], &values(32, 16), 1).unwrap();
        for side in [64, 61, 96] {
            assert!(conv.macs(side) >= 4 * MIN_MACS_PER_THREAD);
            let x = values(side * side * 16, 17);
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
