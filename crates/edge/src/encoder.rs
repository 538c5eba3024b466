//! The edge encoder g_a without a tensor framework: three residual blocks
//! (3×3 stride-2 conv, 3×3 conv, ReLU, plus a 1×1 stride-2 skip), computed
//! as direct convolutions on zero-padded HWC activations by the
//! register-blocked tiles of [`crate::kernel`]. Weights are repacked once
//! at load time from PyTorch's `[out, in, kh, kw]`; the buffers of one
//! image size live in a [`Workspace`], so encoding allocates only the result.
//!
//! The released reference has no activation between a block's two
//! convolutions, so `conv2 ∘ conv1` is one linear map: a 7×7 stride-2
//! convolution, exact up to a correction on the border (where conv2 reads
//! its zero padding, not conv1's output). Where that costs fewer
//! multiply-adds — the first block: 276 M → 89 M of g_a's 530 M at 224² —
//! the block runs folded ([`FoldedPair`]).

use std::sync::{Mutex, OnceLock, PoisonError};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::kernel::{self, Epilogue, Tile, TILE_CHANNELS};
use crate::pool::Helpers;
use crate::winograd::Winograd;

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

/// Below this many multiply-adds per thread (≈ 0.1 ms) a convolution stays
/// on fewer threads: handing rows to another thread (a wake-up, cold
/// caches) would cost more than it saves.
pub const MIN_MACS_PER_THREAD: usize = 4_000_000;

/// Runs `work(rows, chunk)` over the `rows` rows of `body` (`row_len`
/// values each), split into at most `threads` runs of whole rows (no more
/// than the machine's cores), the calling thread computing the first and
/// kept helpers ([`crate::pool`]) the others, and into fewer where each
/// would get less than [`MIN_MACS_PER_THREAD`] of the `macs` the whole work
/// executes.
pub(crate) fn split_rows<T: Send>(
    body: &mut [T],
    rows: usize,
    row_len: usize,
    work_size: (usize, usize),
    work: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let mut nothing = vec![(); rows];
    split_row_pairs((body, row_len), (&mut nothing, 1), rows, work_size, |rows, chunk, _| {
        work(rows, chunk)
    });
}

/// [`split_rows`] over two buffers of `rows` rows each (`a_len` and
/// `b_len` values a row), split alike: `work(rows, a_chunk, b_chunk)`.
pub(crate) fn split_row_pairs<A: Send, B: Send>(
    (a, a_len): (&mut [A], usize),
    (b, b_len): (&mut [B], usize),
    rows: usize,
    (threads, macs): (usize, usize),
    work: impl Fn(std::ops::Range<usize>, &mut [A], &mut [B]) + Sync,
) {
    let threads = threads.min(macs / MIN_MACS_PER_THREAD).min(cores());
    let Some(helpers) = (threads > 1).then(|| helpers(threads)).flatten() else {
        work(0..rows, a, b);
        return;
    };
    let threads = threads.min(helpers.threads());
    let per_thread = rows.div_ceil(threads);
    /// A part's rows of both buffers, taken by the thread that computes them.
    type Part<'a, A, B> = Mutex<Option<(&'a mut [A], &'a mut [B])>>;
    let chunks: Vec<Part<A, B>> = a
        .chunks_mut(per_thread * a_len)
        .zip(b.chunks_mut(per_thread * b_len))
        .map(|pair| Mutex::new(Some(pair)))
        .collect();
    helpers.run(chunks.len(), &|part| {
        let taken = chunks[part].lock().unwrap_or_else(PoisonError::into_inner).take();
        let (a_chunk, b_chunk) = taken.expect("each part runs once");
        let start = part * per_thread;
        work(start..(start + per_thread).min(rows), a_chunk, b_chunk);
    });
}

/// The machine's cores: more threads than that would only make the
/// spinning helpers take turns with the caller.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The kept threads that help the calling one when work is split
/// `threads` ways: `threads − 1` of them (fewer if the system refuses some:
/// see [`Helpers::threads`]), made once per thread count. None if not one
/// can be started, which is also remembered: the work then stays on one
/// thread.
fn helpers(threads: usize) -> Option<&'static Helpers> {
    static POOLS: Mutex<Vec<(usize, Option<&'static Helpers>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&(_, pool)) = pools.iter().find(|(n, _)| *n == threads) {
        return pool;
    }
    let pool = Helpers::start(threads - 1).map(|helpers| &*Box::leak(Box::new(helpers)));
    pools.push((threads, pool));
    pool
}

/// A square HWC activation inside a zero border of `pad` pixels, so that
/// convolutions read their padding instead of testing bounds. Convolutions
/// write only the interior, so the border stays zero (the folded pair's
/// ring is the one buffer whose border holds values).
#[derive(Debug, Clone)]
pub struct Activation {
    side: usize,
    pad: usize,
    channels: usize,
    data: Vec<f32>,
}

impl Activation {
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

    fn pixel(&self, y: usize, x: usize) -> &[f32] {
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

/// One 2-D convolution with bias, `padding = kernel / 2` as in the reference.
#[derive(Debug, Clone)]
pub struct Conv {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
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
        let input = Activation::from_hwc(x, side, self.in_channels, self.kernel / 2);
        let mut output = Activation::new(self.output_side(side), 0, self.out_channels);
        self.run(&input, &mut output, Epilogue::Store, threads);
        output.data
    }

    /// Writes the convolution of `input` into the interior of `output`
    /// through `epilogue`. With `threads > 1` the output rows are split
    /// into up to that many parts (see [`split_rows`]), as far as each part
    /// keeps [`MIN_MACS_PER_THREAD`]; every row is computed the same way
    /// either way.
    ///
    /// Panics unless `input` has this convolution's input channels and a
    /// border of at least `kernel / 2`, and `output` its output side and channels.
    pub fn run(&self, input: &Activation, output: &mut Activation, epilogue: Epilogue, threads: usize) {
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
        input: &Activation,
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
    fn span(&self, input: &Activation, oy: isize, ox: isize, count: usize, out: &mut [f32], epilogue: Epilogue) {
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
    fn line(&self, input: &Activation, line: Line, out: &mut [f32], epilogue: Epilogue) {
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
    pub(crate) fn ring(&self, side: usize) -> Activation {
        Activation::new(side, 1, self.conv1.out_channels)
    }

    /// `conv2(conv1(x))` of an unpadded HWC `x` of `side × side`, as HWC.
    pub fn forward(&self, x: &[f32], side: usize, threads: usize) -> Vec<f32> {
        let input = Activation::from_hwc(x, side, self.folded.in_channels, self.input_pad());
        let out_side = self.folded.output_side(side);
        let mut output = Activation::new(out_side, 0, self.folded.out_channels);
        self.run(&input, &mut self.ring(out_side), &mut output, threads);
        output.data
    }

    /// Writes `conv2(conv1(x))` into the interior of `output`, with
    /// `ring` (from [`FoldedPair::ring`]) as scratch.
    fn run(&self, x: &Activation, ring: &mut Activation, output: &mut Activation, threads: usize) {
        self.folded.run(x, output, Epilogue::Store, threads);
        self.correct_border(x, ring, output);
    }

    /// Subtracts from the folded convolution's `output` of `x` what it
    /// counted of conv1 outside its grid (see [`FoldedPair`]).
    pub(crate) fn correct_border(&self, x: &Activation, ring: &mut Activation, output: &mut Activation) {
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
        ring: &Activation,
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
            None => Scratch::Middle(Activation::new(out, self.conv2.kernel / 2, self.conv1.out_channels)),
        }
    }

    /// `output = relu(conv2(act(conv1(x)))) + skip(x)`. Unfolded, the skip
    /// branch is written first so that conv2's tiles add to it as they
    /// store; folded, the pair is, and the skip's tiles add its ReLU.
    fn run(&self, x: &Activation, scratch: &mut Scratch, output: &mut Activation, threads: usize) {
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
    Middle(Activation),
    /// conv1's values just outside its grid (folded blocks).
    Ring(Activation),
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
    inputs: Vec<Activation>,
    scratch: Vec<Scratch>,
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
            inputs.push(Activation::new(side, block.input_pad(), channels));
            scratch.push(block.scratch(side));
            side = block.conv1.output_side(side);
            channels = block.conv2.out_channels();
        }
        inputs.push(Activation::new(side, 0, channels));
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
    fn a_folded_pair_equals_the_two_convolutions() {
        for (cin, mid, cout, side) in [(3, 8, 8, 16), (3, 5, 4, 9), (2, 3, 3, 2), (4, 6, 5, 1), (3, 4, 4, 7)] {
            let conv1 = Conv::from_torch(&values(mid * cin * 9, 4), &[mid, cin, 3, 3], &values(mid, 5), 2).unwrap();
            let conv2 = Conv::from_torch(&values(cout * mid * 9, 6), &[cout, mid, 3, 3], &values(cout, 7), 1).unwrap();
            let x = values(side * side * cin, 8);
            let pair = FoldedPair::new(&conv1, &conv2).unwrap();
            let want = conv2.forward(&conv1.forward(&x, side, 1), conv1.output_side(side), 1);
            let got = pair.forward(&x, side, 1);
            // Into an output with a border (the next block's), as in the encoder.
            let input = Activation::from_hwc(&x, side, cin, pair.input_pad());
            let out_side = conv1.output_side(side);
            let mut bordered = Activation::new(out_side, 1, cout);
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
