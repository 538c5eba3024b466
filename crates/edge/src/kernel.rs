//! The convolution inner loop: a register-blocked tile of up to
//! [`TILE_PIXELS`] output pixels of one output row × [`TILE_CHANNELS`]
//! output channels, computed straight from a zero-padded HWC input (no
//! im2col copy) with weights packed per channel block, bias loaded into the
//! accumulators and the block's epilogue (ReLU, residual add) applied
//! before the one store. On x86-64 with AVX2 and FMA the tile lives in 12
//! ymm registers (6 pixels × 2 × 8 lanes), chosen at run time; elsewhere a
//! portable loop computes the same sums.

/// Output channels per tile: two 8-lane vectors.
pub const TILE_CHANNELS: usize = 16;
/// Output pixels per tile: with 2 vectors per pixel, 12 accumulators leave
/// registers for the 2 weight vectors and the broadcast input.
pub const TILE_PIXELS: usize = 6;

/// What happens to the accumulated sums (bias included) before they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// Store them.
    Store,
    /// Store `sum + out`.
    Add,
    /// Store `max(0, sum)`.
    Relu,
    /// Store `max(0, sum) + out`, `out` being what the output held (the
    /// residual block's skip branch, computed first into the same place).
    ReluAdd,
}

impl Epilogue {
    /// The stored value for `sum`, where the output held `old`.
    pub fn apply(self, sum: f32, old: f32) -> f32 {
        match self {
            Epilogue::Store => sum,
            Epilogue::Add => sum + old,
            Epilogue::Relu => sum.max(0.0),
            Epilogue::ReluAdd => sum.max(0.0) + old,
        }
    }
}

/// One tile's operands. Offsets are in floats.
#[derive(Debug, Clone, Copy)]
pub struct Tile {
    /// The first tap (`ky = kx = c = 0`) of the tile's first pixel.
    pub input: *const f32,
    /// From one output pixel's first tap to the next one's: `stride × channels`.
    pub pixel_step: usize,
    /// From one padded input row to the next.
    pub row_step: usize,
    /// Kernel rows.
    pub kernel: usize,
    /// Contiguous taps per kernel row: `kernel × in_channels`.
    pub row_len: usize,
    /// The channel block's weights, `[ky][kx·c_in + c][TILE_CHANNELS]`.
    pub weights: *const f32,
    /// The channel block's biases, `TILE_CHANNELS` of them (zero-padded).
    pub bias: *const f32,
    /// The first output pixel's first channel of this block.
    pub out: *mut f32,
    /// From one output pixel to the next.
    pub out_step: usize,
    /// Channels of the block that exist (the rest is padding, not stored).
    pub channels: usize,
    /// What to do before storing.
    pub epilogue: Epilogue,
}

/// Computes `pixels` (1 to [`TILE_PIXELS`]) output pixels of `tile`.
///
/// # Safety
/// Every input tap of every pixel, `TILE_CHANNELS × kernel × row_len`
/// weights, `TILE_CHANNELS` biases and `channels` floats at each of the
/// `pixels` outputs must be valid to read (and the outputs to write), and
/// the outputs must not overlap the inputs or weights.
pub unsafe fn compute(tile: &Tile, pixels: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        match pixels {
            1 => avx2::tile::<1>(tile),
            2 => avx2::tile::<2>(tile),
            3 => avx2::tile::<3>(tile),
            4 => avx2::tile::<4>(tile),
            5 => avx2::tile::<5>(tile),
            _ => avx2::tile::<6>(tile),
        }
        return;
    }
    portable(tile, pixels.min(TILE_PIXELS));
}

/// Whether [`compute`] runs the AVX2/FMA tile on this machine.
pub fn vectorised() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The same sums in plain Rust, for machines without AVX2/FMA.
unsafe fn portable(tile: &Tile, pixels: usize) {
    let bias = std::slice::from_raw_parts(tile.bias, TILE_CHANNELS);
    let mut acc = [[0f32; TILE_CHANNELS]; TILE_PIXELS];
    for a in &mut acc[..pixels] {
        a.copy_from_slice(bias);
    }
    for ky in 0..tile.kernel {
        let row = tile.input.add(ky * tile.row_step);
        let weights = std::slice::from_raw_parts(
            tile.weights.add(ky * tile.row_len * TILE_CHANNELS),
            tile.row_len * TILE_CHANNELS,
        );
        for (j, w) in weights.chunks_exact(TILE_CHANNELS).enumerate() {
            for (p, a) in acc[..pixels].iter_mut().enumerate() {
                let x = *row.add(p * tile.pixel_step + j);
                for (a, w) in a.iter_mut().zip(w) {
                    *a += x * w;
                }
            }
        }
    }
    for (p, a) in acc[..pixels].iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(tile.out.add(p * tile.out_step), tile.channels);
        for (o, &v) in out.iter_mut().zip(a) {
            *o = tile.epilogue.apply(v, *o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Epilogue, Tile, TILE_CHANNELS};

    /// `P` pixels × 16 channels in 2·P accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const P: usize>(t: &Tile) {
        let b0 = _mm256_loadu_ps(t.bias);
        let b1 = _mm256_loadu_ps(t.bias.add(8));
        let mut acc = [[b0, b1]; P];
        for ky in 0..t.kernel {
            let row = t.input.add(ky * t.row_step);
            let mut w = t.weights.add(ky * t.row_len * TILE_CHANNELS);
            for j in 0..t.row_len {
                let w0 = _mm256_loadu_ps(w);
                let w1 = _mm256_loadu_ps(w.add(8));
                w = w.add(TILE_CHANNELS);
                for (p, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*row.add(p * t.pixel_step + j));
                    a[0] = _mm256_fmadd_ps(x, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, w1, a[1]);
                }
            }
        }
        let zero = _mm256_setzero_ps();
        for (p, a) in acc.iter().enumerate() {
            let out = t.out.add(p * t.out_step);
            let mut v = *a;
            if matches!(t.epilogue, Epilogue::Relu | Epilogue::ReluAdd) {
                v = [_mm256_max_ps(v[0], zero), _mm256_max_ps(v[1], zero)];
            }
            let add = matches!(t.epilogue, Epilogue::Add | Epilogue::ReluAdd);
            if t.channels == TILE_CHANNELS {
                if add {
                    v = [
                        _mm256_add_ps(v[0], _mm256_loadu_ps(out)),
                        _mm256_add_ps(v[1], _mm256_loadu_ps(out.add(8))),
                    ];
                }
                _mm256_storeu_ps(out, v[0]);
                _mm256_storeu_ps(out.add(8), v[1]);
            } else {
                let mut lanes = [0f32; TILE_CHANNELS];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), v[1]);
                for (c, &value) in lanes[..t.channels].iter().enumerate() {
                    let o = out.add(c);
                    *o = if add { value + *o } else { value };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// The dispatched tile (AVX2 where the machine has it) against the
    /// portable loop and against sums written out, for every pixel count,
    /// partial channel blocks and each epilogue.
    #[test]
    fn tiles_compute_the_sums_through_each_epilogue() {
        let (kernel, cin, stride) = (3, 5, 2);
        let row_len = kernel * cin;
        let row_step = 80;
        let input = values(kernel * row_step, 1);
        let weights = values(kernel * row_len * TILE_CHANNELS, 2);
        let bias = values(TILE_CHANNELS, 3);
        for epilogue in [Epilogue::Store, Epilogue::Add, Epilogue::Relu, Epilogue::ReluAdd] {
            for channels in [TILE_CHANNELS, 7] {
                for pixels in 1..=TILE_PIXELS {
                    let before = values(TILE_PIXELS * 20, 4);
                    let mut want = before.clone();
                    for p in 0..pixels {
                        for c in 0..channels {
                            let mut sum = bias[c];
                            for ky in 0..kernel {
                                for j in 0..row_len {
                                    sum += input[ky * row_step + p * stride * cin + j]
                                        * weights[(ky * row_len + j) * TILE_CHANNELS + c];
                                }
                            }
                            let o = &mut want[p * 20 + c];
                            *o = match epilogue {
                                Epilogue::Store => sum,
                                Epilogue::Add => sum + *o,
                                Epilogue::Relu => sum.max(0.0),
                                Epilogue::ReluAdd => sum.max(0.0) + *o,
                            };
                        }
                    }
                    let mut dispatched = before.clone();
                    let mut plain = before.clone();
                    for (out, vectorised) in [(&mut dispatched, true), (&mut plain, false)] {
                        let tile = Tile {
                            input: input.as_ptr(),
                            pixel_step: stride * cin,
                            row_step,
                            kernel,
                            row_len,
                            weights: weights.as_ptr(),
                            bias: bias.as_ptr(),
                            out: out.as_mut_ptr(),
                            out_step: 20,
                            channels,
                            epilogue,
                        };
                        // SAFETY: the taps reach `2·row_step + 5·10 + 14 < 3·row_step`;
                        // weights, biases and outputs have the sizes the tile reads.
                        unsafe {
                            if vectorised {
                                compute(&tile, pixels);
                            } else {
                                portable(&tile, pixels);
                            }
                        }
                    }
                    for got in [&dispatched, &plain] {
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - w).abs() <= 1e-5,
                                "{epilogue:?}, {channels} channels, {pixels} pixels, value {i}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
