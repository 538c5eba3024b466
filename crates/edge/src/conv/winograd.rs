//! 3×3 stride-1 convolutions by Winograd's F(2×2, 3×3): each 2×2 block of
//! outputs comes from a 4×4 input patch with 16 multiplies per channel
//! pair instead of 36 (2.25× fewer). Patches are transformed (`Bᵀ d B`),
//! multiplied per transform position by the transformed weights (`G g Gᵀ`,
//! computed once at load time in f64) with the same register-blocked tiles
//! as the direct convolutions, and transformed back (`Aᵀ m A`) with the
//! bias and the epilogue. F(2×2, 3×3)'s transforms only add and subtract
//! (and halve, in `G`), so it stays within float rounding of the direct sum;
//! the larger F(4×4, 3×3) would save more but loses digits.
//!
//! One row of 2×2 tiles is transformed, multiplied and written back at a
//! time, so that the transformed values stay in the cache.

use super::Conv;
use crate::kernel::{self, Epilogue, Tile, TILE_CHANNELS};
use crate::pool::split_rows;
use crate::tensor::PaddedHwc;

/// Transform positions: a 4×4 patch.
const POSITIONS: usize = 16;

/// A 3×3 stride-1 convolution with padding 1, computed by F(2×2, 3×3).
#[derive(Debug, Clone)]
pub struct Winograd {
    in_channels: usize,
    out_channels: usize,
    /// Per position, per block of [`TILE_CHANNELS`] outputs: `[c_in][TILE_CHANNELS]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
    /// What the tiles add before the inverse transform (the bias comes
    /// after it): a zero per output channel, blocks padded.
    zeros: Vec<f32>,
}

impl Winograd {
    /// The Winograd form of `conv`, if it is a 3×3 stride-1 convolution.
    pub fn new(conv: &Conv) -> Option<Self> {
        if conv.kernel() != 3 || conv.stride() != 1 {
            return None;
        }
        let (cin, cout) = (conv.in_channels(), conv.out_channels());
        let blocks = cout.div_ceil(TILE_CHANNELS);
        const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
        let mut weights = vec![0f32; POSITIONS * blocks * cin * TILE_CHANNELS];
        let taps = conv.weight_matrix();
        for c in 0..cin {
            for o in 0..cout {
                let g = |y: usize, x: usize| f64::from(taps[((y * 3 + x) * cin + c) * cout + o]);
                for (i, gi) in G.iter().enumerate() {
                    for (j, gj) in G.iter().enumerate() {
                        let mut u = 0f64;
                        for (y, a) in gi.iter().enumerate() {
                            for (x, b) in gj.iter().enumerate() {
                                u += a * g(y, x) * b;
                            }
                        }
                        let (block, lane) = (o / TILE_CHANNELS, o % TILE_CHANNELS);
                        let at = (((i * 4 + j) * blocks + block) * cin + c) * TILE_CHANNELS + lane;
                        weights[at] = u as f32;
                    }
                }
            }
        }
        Some(Self {
            in_channels: cin,
            out_channels: cout,
            weights,
            bias: conv.bias().to_vec(),
            zeros: vec![0.0; blocks * TILE_CHANNELS],
        })
    }

    /// Whether it computes a `side × side` input: tiles of 2×2 cover an even side.
    pub fn applies_to(side: usize) -> bool {
        side.is_multiple_of(2) && side > 0
    }

    /// Multiplies executed for a `side × side` input (transforms excluded).
    pub fn macs(&self, side: usize) -> usize {
        (side / 2) * (side / 2) * POSITIONS * self.in_channels * self.out_channels
    }

    /// Writes the convolution of `input` into the interior of `output`
    /// through `epilogue`, rows of tiles split among up to `threads` threads.
    ///
    /// Panics unless the side is even, `input` has a border and the
    /// channels fit.
    pub fn run(&self, input: &PaddedHwc, output: &mut PaddedHwc, epilogue: Epilogue, threads: usize) {
        let side = input.side();
        assert!(
            Self::applies_to(side)
                && input.pad() >= 1
                && input.channels() == self.in_channels
                && output.side() == side
                && output.channels() == self.out_channels,
            "activations do not fit the Winograd convolution"
        );
        let tile_rows = side / 2;
        let row_step = output.row_step();
        let out_pad = output.pad();
        let body = output.rows_mut(0..side);
        let work = (threads, self.macs(side));
        split_rows(body, tile_rows, 2 * row_step, work, |rows, chunk| {
            self.tile_rows(input, rows, chunk, out_pad, epilogue)
        });
    }

    /// Rows of tiles `rows` into `out`, which starts at output row `2 · rows.start`.
    fn tile_rows(
        &self,
        input: &PaddedHwc,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        out_pad: usize,
        epilogue: Epilogue,
    ) {
        let (cin, cout, side) = (self.in_channels, self.out_channels, input.side());
        let tiles = side / 2;
        // Scratch kept per thread, so that the encoder's own thread never
        // allocates it twice.
        thread_local! {
            static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
        }
        SCRATCH.with_borrow_mut(|(transformed, products)| {
            transformed.resize(POSITIONS * tiles * cin, 0.0);
            products.resize(POSITIONS * tiles * cout, 0.0);
            self.tile_rows_in(input, rows, out, out_pad, epilogue, transformed, products);
        });
    }

    /// [`Winograd::tile_rows`] with its scratch (at least the sizes it needs).
    #[allow(clippy::too_many_arguments)]
    fn tile_rows_in(
        &self,
        input: &PaddedHwc,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
        out_pad: usize,
        epilogue: Epilogue,
        transformed: &mut [f32],
        products: &mut [f32],
    ) {
        let (cin, cout, side) = (self.in_channels, self.out_channels, input.side());
        let tiles = side / 2;
        let blocks = cout.div_ceil(TILE_CHANNELS);
        let out_step = (side + 2 * out_pad) * cout;
        let in_step = input.row_step();
        for ty in rows.clone() {
            let top = (2 * ty + input.pad() - 1) * in_step;
            for tx in 0..tiles {
                let patch = top + (2 * tx + input.pad() - 1) * cin;
                transforms::input(&input.data()[patch..], in_step, cin, transformed, tiles * cin, tx * cin);
            }
            // One product per position: tiles × c_in by c_in × c_out.
            for position in 0..POSITIONS {
                let source = &transformed[position * tiles * cin..][..tiles * cin];
                let target = &mut products[position * tiles * cout..][..tiles * cout];
                let tile = Tile {
                    input: source.as_ptr(),
                    pixel_step: cin,
                    row_step: 0,
                    kernel: 1,
                    row_len: cin,
                    weights: self.weights[position * blocks * cin * TILE_CHANNELS..].as_ptr(),
                    bias: self.zeros.as_ptr(),
                    out: target.as_mut_ptr(),
                    out_step: cout,
                    channels: TILE_CHANNELS,
                    epilogue: Epilogue::Store,
                };
                // SAFETY: the tiles read `cin` values of each transformed
                // tile inside `source`, the position's blocks of weights
                // (`cin × TILE_CHANNELS` each) and zeros, and write `cout`
                // values of each tile inside `target`, a different buffer.
                unsafe { kernel::compute_line(&tile, tiles, cout, cin * TILE_CHANNELS) };
            }
            let row = &mut out[2 * (ty - rows.start) * out_step..][..2 * out_step];
            for tx in 0..tiles {
                let at = (out_pad + 2 * tx) * cout;
                transforms::output(
                    products,
                    tiles * cout,
                    tx * cout,
                    &self.bias,
                    epilogue,
                    row,
                    out_step,
                    at,
                );
            }
        }
    }
}

/// The transforms, eight channels at a time as `[f32; 8]` arrays, which
/// the compiler turns into one vector operation each; compiled twice, for
/// AVX2 and for the baseline, and chosen at run time.
mod transforms {
    use crate::kernel::Epilogue;

    type Lanes = [f32; 8];

    #[inline(always)]
    fn add(mut a: Lanes, b: Lanes) -> Lanes {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
        a
    }

    #[inline(always)]
    fn sub(mut a: Lanes, b: Lanes) -> Lanes {
        for (a, b) in a.iter_mut().zip(b) {
            *a -= b;
        }
        a
    }

    /// The first `n` (at most 8) values of `from`, zeros after them; a
    /// whole group is one vector load.
    #[inline(always)]
    fn load(from: &[f32], n: usize) -> Lanes {
        if let Some(whole) = from.first_chunk::<8>().filter(|_| n == 8) {
            return *whole;
        }
        let mut lanes = [0f32; 8];
        lanes[..n].copy_from_slice(&from[..n]);
        lanes
    }

    #[inline(always)]
    fn store(to: &mut [f32], lanes: &Lanes, n: usize) {
        match to.first_chunk_mut::<8>().filter(|_| n == 8) {
            Some(whole) => *whole = *lanes,
            None => to[..n].copy_from_slice(&lanes[..n]),
        }
    }

    /// Calls `group(first, n)` for the channel groups `first..first + n` of
    /// 8 (the last one shorter); with `n` a constant in the whole groups,
    /// their loads and stores are single vector moves.
    #[inline(always)]
    fn by_groups(channels: usize, mut group: impl FnMut(usize, usize)) {
        for first in (0..channels).step_by(8) {
            match channels - first {
                8.. => group(first, 8),
                n => group(first, n),
            }
        }
    }

    /// Defines the function `$name` with `$body` compiled twice — for AVX2 +
    /// FMA, used where the CPU has them (the `[f32; 8]` arithmetic becomes one
    /// instruction per operation), and for the baseline elsewhere.
    macro_rules! dispatched {
        ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
            $(#[$meta])*
            #[allow(clippy::too_many_arguments)]
            pub fn $name($($arg: $ty),*) {
                #[inline(always)]
                #[allow(clippy::too_many_arguments)]
                fn body($($arg: $ty),*) $body

                #[cfg(target_arch = "x86_64")]
                if crate::kernel::vectorised() {
                    #[target_feature(enable = "avx2,fma")]
                    #[allow(clippy::too_many_arguments)]
                    unsafe fn avx2($($arg: $ty),*) {
                        body($($arg),*)
                    }
                    // SAFETY: the CPU has AVX2 and FMA (checked above).
                    unsafe { avx2($($arg),*) };
                    return;
                }
                body($($arg),*)
            }
        };
    }

    dispatched! {
        /// `Bᵀ d B` of the 4×4 patch whose top-left pixel starts `input`
        /// (rows `row_step` apart, pixels `channels` apart), written to
        /// `transformed[position · position_step + at + c]`.
        fn input(
            input: &[f32],
            row_step: usize,
            channels: usize,
            transformed: &mut [f32],
            position_step: usize,
            at: usize,
        ) {
            by_groups(
                channels,
                #[inline(always)]
                |first, n| {
                    let mut d = [[[0f32; 8]; 4]; 4];
                    for (y, row) in d.iter_mut().enumerate() {
                        for (x, lanes) in row.iter_mut().enumerate() {
                            *lanes = load(&input[y * row_step + x * channels + first..], n);
                        }
                    }
                    // Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] on the rows…
                    let mut t = [[[0f32; 8]; 4]; 4];
                    for (x, column) in t.iter_mut().enumerate() {
                        *column = [
                            sub(d[0][x], d[2][x]),
                            add(d[1][x], d[2][x]),
                            sub(d[2][x], d[1][x]),
                            sub(d[1][x], d[3][x]),
                        ];
                    }
                    // …then on the columns (`t` is indexed by column first).
                    for i in 0..4 {
                        let v = [
                            sub(t[0][i], t[2][i]),
                            add(t[1][i], t[2][i]),
                            sub(t[2][i], t[1][i]),
                            sub(t[1][i], t[3][i]),
                        ];
                        for (j, lanes) in v.iter().enumerate() {
                            store(&mut transformed[(i * 4 + j) * position_step + at + first..], lanes, n);
                        }
                    }
                },
            );
        }
    }

    dispatched! {
        /// `Aᵀ m A` of the products `products[position · position_step + at + c]`,
        /// plus the bias, through `epilogue` into the 2×2 pixels starting at
        /// `out[start]` (rows `out_step` apart).
        fn output(
            products: &[f32],
            position_step: usize,
            at: usize,
            bias: &[f32],
            epilogue: Epilogue,
            out: &mut [f32],
            out_step: usize,
            start: usize,
        ) {
            let channels = bias.len();
            by_groups(
                channels,
                #[inline(always)]
                |first, n| {
                    let mut m = [[0f32; 8]; 16];
                    for (position, lanes) in m.iter_mut().enumerate() {
                        *lanes = load(&products[position * position_step + at + first..], n);
                    }
                    let b = load(&bias[first..], n);
                    // Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]] on the rows…
                    let mut s = [[[0f32; 8]; 4]; 2];
                    for j in 0..4 {
                        s[0][j] = add(add(m[j], m[4 + j]), m[8 + j]);
                        s[1][j] = sub(sub(m[4 + j], m[8 + j]), m[12 + j]);
                    }
                    // …then on the columns.
                    for (i, r) in s.iter().enumerate() {
                        let y = [add(add(r[0], r[1]), r[2]), sub(sub(r[1], r[2]), r[3])];
                        for (j, lanes) in y.iter().enumerate() {
                            let target = &mut out[start + i * out_step + j * channels + first..];
                            let sum = add(*lanes, b);
                            // A loop, not `map`: that one is not inlined into the AVX2 copy.
                            let relu = |mut r: [f32; 8]| {
                                for v in &mut r {
                                    *v = v.max(0.0);
                                }
                                r
                            };
                            let value = match epilogue {
                                Epilogue::Store => sum,
                                Epilogue::Add => add(sum, load(target, n)),
                                Epilogue::Relu => relu(sum),
                                Epilogue::ReluAdd => add(relu(sum), load(target, n)),
                                Epilogue::AddToRelu => add(sum, relu(load(target, n))),
                            };
                            store(target, &value, n);
                        }
                    }
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// Against the direct convolution: channel counts off the 8- and
    /// 16-lane groups, borders wider than needed, every epilogue, threads.
    #[test]
    fn winograd_equals_the_direct_convolution() {
        // The last, 32 → 32 channels at 64², is work enough for several threads.
        for (cin, cout, side, pad) in [
            (5, 7, 6, 1),
            (16, 24, 10, 2),
            (8, 16, 2, 1),
            (13, 33, 14, 1),
            (32, 32, 64, 1),
        ] {
            let conv = Conv::from_torch(&values(cout * cin * 9, 1), &[cout, cin, 3, 3], &values(cout, 2), 1).unwrap();
            let winograd = Winograd::new(&conv).unwrap();
            let input = PaddedHwc::from_hwc(&values(side * side * cin, 3), side, cin, pad);
            let before = PaddedHwc::from_hwc(&values(side * side * cout, 4), side, cout, 1);
            for epilogue in Epilogue::ALL {
                let mut want = before.clone();
                conv.run(&input, &mut want, epilogue, 1);
                for threads in [1, 3] {
                    let mut got = before.clone();
                    winograd.run(&input, &mut got, epilogue, threads);
                    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{cin}→{cout} at {side}², {epilogue:?}, {threads} threads, value {i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
        let strided = Conv::from_torch(&values(36, 5), &[2, 2, 3, 3], &values(2, 6), 2).unwrap();
        assert!(Winograd::new(&strided).is_none());
        assert!(!Winograd::applies_to(7));
    }
}
