//! A block's two convolutions as one: without an activation between them
//! (the released reference has none), `conv2 ∘ conv1` is one linear map, a
//! 7×7 stride-2 convolution, exact up to a correction on the border (where
//! conv2 reads its zero padding, not conv1's output). [`crate::encoder`]
//! folds the blocks where that costs fewer multiply-adds.

use super::{Conv, Line};
use crate::kernel::{self, Epilogue, Tile, TILE_CHANNELS};
use crate::tensor::PaddedHwc;

/// `conv2 ∘ conv1` of a block without activation between them (3×3 stride 2,
/// then 3×3 stride 1, both padded by 1) as one 7×7 stride-2 convolution
/// padded by 3: `W[2d + e] = Σ W2[d]·W1[e]`, `b = b2 + Σ_d W2[d]·b1`.
/// That equals the pair wherever conv2's 3×3 window lies inside conv1's
/// output; on the border it also counts conv1 at the positions just outside
/// (where conv2 reads zeros). [`FoldedPair::run`] subtracts those terms:
/// conv1 on that ring (the input's border is wide enough to compute it
/// there), convolved with `-W2` at the border pixels — by the one row or
/// column of `-W2` that meets each side of the ring.
#[derive(Debug, Clone)]
pub struct FoldedPair {
    folded: Conv,
    conv1: Conv,
    /// conv2's taps negated, without bias: its first and last kernel rows
    /// correct the output's first and last rows.
    correction: Conv,
    /// conv2's first and last kernel columns negated, per channel block
    /// `[ky][c_in][TILE_CHANNELS]`: they correct the first and last columns.
    columns: [Vec<f32>; 2],
}

/// One side's part of the border correction: `rows` kernel rows of
/// `row_len` taps, per channel block `block_len` floats apart.
struct EdgeKernel<'a> {
    weights: &'a [f32],
    block_len: usize,
    rows: usize,
    row_len: usize,
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
        let negated = conv2.weight.iter().map(|w| -w).collect();
        let blocks = cout.div_ceil(TILE_CHANNELS);
        let columns = [0, 2].map(|dx| {
            let mut blocked = vec![0f32; blocks * 3 * mid * TILE_CHANNELS];
            for ky in 0..3 {
                for c in 0..mid {
                    let taps = &conv2.weight[((ky * 3 + dx) * mid + c) * cout..][..cout];
                    for (o, w) in taps.iter().enumerate() {
                        let (block, lane) = (o / TILE_CHANNELS, o % TILE_CHANNELS);
                        blocked[((block * 3 + ky) * mid + c) * TILE_CHANNELS + lane] = -w;
                    }
                }
            }
            blocked
        });
        Some(Self {
            folded: Conv::from_matrix(cin, cout, 7, 2, weight, bias),
            conv1: conv1.clone(),
            correction: Conv::from_matrix(mid, cout, 3, 1, negated, vec![0.0; cout]),
            columns,
        })
    }

    /// Multiply-adds for a square input of `side` pixels (the border correction excluded).
    pub fn macs(&self, side: usize) -> usize {
        self.folded.macs(side)
    }

    /// The folded convolution (exact away from the border).
    pub(crate) fn folded(&self) -> &Conv {
        &self.folded
    }

    /// Border the input needs: the folded kernel's, which also covers
    /// conv1 one position outside its grid.
    pub(crate) fn input_pad(&self) -> usize {
        self.folded.kernel / 2
    }

    /// The scratch for conv1's values just outside its `side × side`
    /// output: a zero interior inside a border of one.
    pub(crate) fn ring(&self, side: usize) -> PaddedHwc {
        PaddedHwc::new(side, 1, self.conv1.out_channels)
    }

    /// `conv2(conv1(x))` of an unpadded HWC `x` of `side × side`, as HWC.
    pub fn forward(&self, x: &[f32], side: usize, threads: usize) -> Vec<f32> {
        let input = PaddedHwc::from_hwc(x, side, self.folded.in_channels, self.input_pad());
        let out_side = self.folded.output_side(side);
        let mut output = PaddedHwc::new(out_side, 0, self.folded.out_channels);
        self.run(&input, &mut self.ring(out_side), &mut output, threads);
        output.data
    }

    /// Writes `conv2(conv1(x))` into the interior of `output`, with
    /// `ring` (from [`FoldedPair::ring`]) as scratch.
    pub(crate) fn run(&self, x: &PaddedHwc, ring: &mut PaddedHwc, output: &mut PaddedHwc, threads: usize) {
        self.folded.run(x, output, Epilogue::Store, threads);
        self.correct_border(x, ring, output);
    }

    /// Subtracts from the folded convolution's `output` of `x` what it
    /// counted of conv1 outside its grid (see [`FoldedPair`]).
    pub(crate) fn correct_border(&self, x: &PaddedHwc, ring: &mut PaddedHwc, output: &mut PaddedHwc) {
        let n = output.side;
        let (mid, cout) = (self.conv1.out_channels, self.folded.out_channels);
        let step = ring.row_step();
        let last = n as isize;
        // The columns first: conv1 on the ring's left and right columns
        // (down, so that the tiles hold 6 pixels, not one), its corners
        // zeroed so that the columns' correction leaves them to the rows'.
        for (column, at) in [(-1, step), (last, step + (n + 1) * mid)] {
            let line = Line {
                from: (0, column),
                count: n,
                down: true,
                out_step: step,
            };
            self.conv1.line(x, line, &mut ring.data[at..], Epilogue::Store);
        }
        for corner in [0, (n + 1) * mid, (n + 1) * step, (n + 1) * (step + mid)] {
            ring.data[corner..][..mid].fill(0.0);
        }
        let (out_step, pad) = (output.row_step(), output.pad);
        let interior = |y: usize, x: usize| (y + pad) * out_step + (x + pad) * cout;
        for (weights, ring_column, x) in [(&self.columns[0], 0, 0), (&self.columns[1], n + 1, n - 1)] {
            let edge = EdgeKernel {
                weights,
                block_len: 3 * mid * TILE_CHANNELS,
                rows: 3,
                row_len: mid,
            };
            let out = &mut output.data[interior(0, x)..];
            self.correct_edge(ring, edge, (ring_column * mid, step), n, out, out_step);
        }
        // Then the rows, corners included: conv1 on the ring's first and
        // last rows, and the output's first and last rows corrected by the
        // first and last kernel rows of −W2.
        self.conv1
            .span(x, -1, -1, n + 2, &mut ring.data[..step], Epilogue::Store);
        self.conv1
            .span(x, last, -1, n + 2, &mut ring.data[(n + 1) * step..], Epilogue::Store);
        let kernel_row = 3 * mid * TILE_CHANNELS;
        for (dy, ring_row, y) in [(0, 0, 0), (2, n + 1, n - 1)] {
            let edge = EdgeKernel {
                weights: &self.correction.blocked[dy * kernel_row..],
                block_len: 9 * mid * TILE_CHANNELS,
                rows: 1,
                row_len: 3 * mid,
            };
            let out = &mut output.data[interior(y, 0)..];
            self.correct_edge(ring, edge, (ring_row * step, mid), n, out, cout);
        }
    }

    /// Adds `edge`'s convolution of `ring` to `count` outputs, the first
    /// reading from `first` on, each next one `pixel_step` further on the
    /// ring and `out_step` further in `out`.
    fn correct_edge(
        &self,
        ring: &PaddedHwc,
        edge: EdgeKernel<'_>,
        (first, pixel_step): (usize, usize),
        count: usize,
        out: &mut [f32],
        out_step: usize,
    ) {
        let cout = self.folded.out_channels;
        let step = ring.row_step();
        assert!(
            count > 0
                && first + (count - 1) * pixel_step + (edge.rows - 1) * step + edge.row_len <= ring.data.len()
                && out.len() >= (count - 1) * out_step + cout,
            "a border correction beyond its buffers"
        );
        let first_tile = Tile {
            input: ring.data[first..].as_ptr(),
            pixel_step,
            row_step: step,
            kernel: edge.rows,
            row_len: edge.row_len,
            weights: edge.weights.as_ptr(),
            bias: self.correction.blocked_bias.as_ptr(),
            out: out.as_mut_ptr(),
            out_step,
            channels: TILE_CHANNELS,
            epilogue: Epilogue::Add,
        };
        // SAFETY: every tap lies inside the ring and every output inside
        // `out` (asserted); the weights hold whole blocks of `rows × row_len`
        // taps, `block_len` apart; the biases (zeros) are whole blocks; `out`
        // is not the ring.
        unsafe { kernel::compute_line(&first_tile, count, cout, edge.block_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    #[test]
    fn a_folded_pair_equals_the_two_convolutions() {
        for (cin, mid, cout, side) in [(3, 8, 8, 16), (3, 5, 4, 9), (2, 3, 3, 2), (4, 6, 5, 1), (3, 4, 4, 7)] {
            let conv1 = Conv::from_torch(&values(mid * cin * 9, 4), &[mid, cin, 3, 3], &values(mid, 5), 2).unwrap();
            let conv2 = Conv::from_torch(&values(cout * mid * 9, 6), &[cout, mid, 3, 3], &values(cout, 7), 1).unwrap();
            let x = values(side * side * cin, 8);
            let pair = FoldedPair::new(&conv1, &conv2).unwrap();
            let want = conv2.forward(&conv1.forward(&x, side, 1), conv1.output_side(side), 1);
            let got = pair.forward(&x, side, 1);
            // Into an output with a border (the next block's), as in the encoder.
            let input = PaddedHwc::from_hwc(&x, side, cin, pair.input_pad());
            let out_side = conv1.output_side(side);
            let mut bordered = PaddedHwc::new(out_side, 1, cout);
            pair.run(&input, &mut pair.ring(out_side), &mut bordered, 1);
            let interior: Vec<f32> = (0..out_side * out_side)
                .flat_map(|p| bordered.pixel(p / out_side, p % out_side).to_vec())
                .collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().chain(&interior).zip(want.iter().chain(&want)) {
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
}
