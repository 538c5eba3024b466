//! The tiles against the portable loops and against their sums written out,
//! on every instruction set this machine has: pixel counts, partial channel
//! blocks, epilogues, lines of several blocks.

use super::*;
use crate::test_values as values;

/// The dispatched tile (AVX2, AVX-512 or NEON where the machine has
/// them) against the portable loop and against sums written out, for
/// every pixel count, partial channel blocks and each epilogue; vector
/// tiles and the portable loop equal bit for bit to the same sums by
/// fused multiply-adds (one payload on every machine).
#[test]
fn tiles_compute_the_sums_through_each_epilogue() {
    let (kernel, cin, stride) = (3, 5, 2);
    let row_len = kernel * cin;
    let row_step = 160; // room for the widest tile (14 pixels on zmm)
    let input = values(kernel * row_step, 1);
    let weights = values(kernel * row_len * TILE_CHANNELS, 2);
    let bias = values(TILE_CHANNELS, 3);
    for epilogue in Epilogue::ALL {
        for channels in [TILE_CHANNELS, 7] {
            for pixels in 1..=f32_tile_pixels() {
                let before = values(14 * 20, 4);
                let mut want = before.clone();
                // The vector tiles' order: one fused multiply-add per tap, from the bias.
                let mut fused = before.clone();
                for p in 0..pixels {
                    for c in 0..channels {
                        let (mut sum, mut fused_sum) = (bias[c], bias[c]);
                        for ky in 0..kernel {
                            for j in 0..row_len {
                                let x = input[ky * row_step + p * stride * cin + j];
                                let w = weights[(ky * row_len + j) * TILE_CHANNELS + c];
                                sum += x * w;
                                fused_sum = x.mul_add(w, fused_sum);
                            }
                        }
                        let o = &mut want[p * 20 + c];
                        *o = match epilogue {
                            Epilogue::Store => sum,
                            Epilogue::Add => sum + *o,
                            Epilogue::Relu => sum.max(0.0),
                            Epilogue::ReluAdd => sum.max(0.0) + *o,
                            Epilogue::AddToRelu => sum + o.max(0.0),
                        };
                        let o = &mut fused[p * 20 + c];
                        *o = epilogue.apply(fused_sum, *o);
                    }
                }
                let mut dispatched = before.clone();
                let mut plain = before.clone();
                // The portable loop takes up to TILE_PIXELS (what it is given where it runs).
                let portable_too = pixels <= TILE_PIXELS;
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
                    // SAFETY: the taps reach `2·row_step + 13·10 + 14 < 3·row_step`;
                    // weights, biases and outputs have the sizes the tile reads.
                    unsafe {
                        if vectorised {
                            compute(&tile, pixels);
                        } else if portable_too {
                            portable(&tile, pixels);
                        }
                    }
                }
                if vectorised() {
                    // Bit for bit, so that every machine writes the same payloads.
                    assert_eq!(dispatched, fused, "{epilogue:?}, {channels} channels, {pixels} pixels");
                }
                if portable_too {
                    assert_eq!(
                        plain, fused,
                        "{epilogue:?}, {channels} channels, {pixels} pixels (portable)"
                    );
                }
                let checked = if portable_too { 2 } else { 1 };
                for got in [&dispatched, &plain].into_iter().take(checked) {
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

/// The int8 tile against the portable loop and against the sums
/// written out, for every pixel count, partial channel blocks, each
/// epilogue, and a row of taps that is not a whole number of groups
/// (the bytes past it have zero weights).
#[test]
fn int8_tiles_compute_the_scaled_sums_through_each_epilogue() {
    let (kernel, cin, stride) = (3, 5, 2);
    let row_len: usize = kernel * cin;
    let groups = row_len.div_ceil(QUANTIZED_GROUP);
    // Room for the widest tile (8 pixels on zmm).
    let row_step = 100;
    let bytes =
        |n: usize, seed: u32| -> Vec<u8> { values(n, seed).iter().map(|v| ((v + 0.5) * 255.0) as u8).collect() };
    let input = bytes(kernel * row_step + QUANTIZED_GROUP, 5);
    let mut weights = vec![0i8; kernel * groups * TILE_CHANNELS * QUANTIZED_GROUP];
    let taps = values(kernel * row_len * TILE_CHANNELS, 6);
    let weight = |ky: usize, j: usize, c: usize| (taps[(ky * row_len + j) * TILE_CHANNELS + c] * 126.0).round() as i8;
    for ky in 0..kernel {
        for j in 0..row_len {
            for c in 0..TILE_CHANNELS {
                let (g, b) = (j / QUANTIZED_GROUP, j % QUANTIZED_GROUP);
                weights[((ky * groups + g) * TILE_CHANNELS + c) * QUANTIZED_GROUP + b] = weight(ky, j, c);
            }
        }
    }
    let weight_sums: Vec<i32> = (0..TILE_CHANNELS)
        .map(|c| {
            (0..kernel)
                .flat_map(|ky| (0..row_len).map(move |j| (ky, j)))
                .map(|(ky, j)| i32::from(weight(ky, j, c)))
                .sum()
        })
        .collect();
    let scale: Vec<f32> = values(TILE_CHANNELS, 7).iter().map(|v| (v + 0.75) * 1e-3).collect();
    let offset = values(TILE_CHANNELS, 8);
    for epilogue in Epilogue::ALL {
        for channels in [TILE_CHANNELS, 7] {
            for pixels in 1..=int8_instructions().tile_pixels() {
                let before = values(8 * 20, 9);
                let mut want = before.clone();
                for p in 0..pixels {
                    for c in 0..channels {
                        let mut sum = 0i32;
                        for ky in 0..kernel {
                            for j in 0..row_len {
                                let x = input[ky * row_step + p * stride * cin + j];
                                sum += i32::from(x) * i32::from(weight(ky, j, c));
                            }
                        }
                        let o = &mut want[p * 20 + c];
                        *o = epilogue.apply(sum as f32 * scale[c] + offset[c], *o);
                    }
                }
                let mut dispatched = before.clone();
                let mut plain = before.clone();
                // The portable loop takes up to TILE_PIXELS (what it is given where it runs).
                let portable_too = pixels <= TILE_PIXELS;
                for (out, vectorised) in [(&mut dispatched, true), (&mut plain, false)] {
                    let tile = QuantizedTile {
                        input: input.as_ptr(),
                        pixel_step: stride * cin,
                        row_step,
                        kernel,
                        groups,
                        weights: weights.as_ptr(),
                        scale: scale.as_ptr(),
                        offset: offset.as_ptr(),
                        weight_sums: weight_sums.as_ptr(),
                        out: out.as_mut_ptr(),
                        out_step: 20,
                        channels,
                        epilogue,
                    };
                    // SAFETY: the taps, with the last group's overrun, reach
                    // `2·row_step + 7·10 + 16 < input.len()`; weights, scales,
                    // offsets and outputs have the sizes the tile reads.
                    unsafe {
                        if vectorised {
                            compute_quantized(&tile, pixels);
                        } else if portable_too {
                            portable_quantized(&tile, pixels);
                        }
                    }
                }
                assert_eq!(dispatched, want, "{epilogue:?}, {channels} channels, {pixels} pixels");
                if portable_too {
                    assert_eq!(
                        plain, want,
                        "{epilogue:?}, {channels} channels, {pixels} pixels (portable)"
                    );
                }
            }
        }
    }
}

/// Lines of several channel blocks (whole pairs, a whole block alone, a
/// partial block) for every pixel count up to three tiles and more: the
/// f32 line gives each channel the fused sums of its own weights bit for
/// bit (the vector tiles), the int8 line the exact sums; on AVX-512
/// through the 32-channel tiles.
#[test]
fn lines_of_several_blocks_compute_each_channel_alike() {
    let (kernel, cin, stride) = (3usize, 5, 2);
    let row_len = kernel * cin;
    let groups = row_len.div_ceil(QUANTIZED_GROUP);
    let longest = 3 * f32_tile_pixels().max(int8_instructions().tile_pixels()) + 1;
    let row_step = (longest * stride + kernel) * cin + QUANTIZED_GROUP;
    let input = values(kernel * row_step, 11);
    let bytes: Vec<u8> = input.iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
    let epilogue = Epilogue::ReluAdd;
    for cout in [64usize, 53] {
        let blocks = cout.div_ceil(TILE_CHANNELS);
        let block_len = kernel * row_len * TILE_CHANNELS;
        let quantized_block_len = kernel * groups * TILE_CHANNELS * QUANTIZED_GROUP;
        let weights = values(blocks * block_len, 12);
        let bias = values(blocks * TILE_CHANNELS, 13);
        let weight = |o: usize, ky: usize, j: usize| {
            weights[(o / TILE_CHANNELS) * block_len + (ky * row_len + j) * TILE_CHANNELS + o % TILE_CHANNELS]
        };
        let weight8 = |o: usize, ky: usize, j: usize| (weight(o, ky, j) * 126.0).round() as i8;
        let mut weights8 = vec![0i8; blocks * quantized_block_len];
        let mut weight_sums = vec![0i32; blocks * TILE_CHANNELS];
        for (o, sum) in weight_sums.iter_mut().enumerate().take(cout) {
            for ky in 0..kernel {
                for j in 0..row_len {
                    let (g, b) = (j / QUANTIZED_GROUP, j % QUANTIZED_GROUP);
                    let at = (o / TILE_CHANNELS) * quantized_block_len
                        + ((ky * groups + g) * TILE_CHANNELS + o % TILE_CHANNELS) * QUANTIZED_GROUP
                        + b;
                    weights8[at] = weight8(o, ky, j);
                    *sum += i32::from(weight8(o, ky, j));
                }
            }
        }
        let scale: Vec<f32> = values(blocks * TILE_CHANNELS, 14)
            .iter()
            .map(|v| (v + 0.75) * 1e-3)
            .collect();
        for count in 1..=longest {
            let before = values(count * cout, 15);
            let (mut got, mut got8) = (before.clone(), before.clone());
            let first = Tile {
                input: input.as_ptr(),
                pixel_step: stride * cin,
                row_step,
                kernel,
                row_len,
                weights: weights.as_ptr(),
                bias: bias.as_ptr(),
                out: got.as_mut_ptr(),
                out_step: cout,
                channels: TILE_CHANNELS,
                epilogue,
            };
            let first8 = QuantizedTile {
                input: bytes.as_ptr(),
                pixel_step: stride * cin,
                row_step,
                kernel,
                groups,
                weights: weights8.as_ptr(),
                scale: scale.as_ptr(),
                offset: bias.as_ptr(),
                weight_sums: weight_sums.as_ptr(),
                out: got8.as_mut_ptr(),
                out_step: cout,
                channels: TILE_CHANNELS,
                epilogue,
            };
            // SAFETY: the taps reach `2·row_step + (longest − 1)·10 + 15
            // (+ 1 byte of the last group) < input.len()`; weights,
            // biases, scales and sums are whole blocks; the outputs hold
            // `count × cout` floats.
            unsafe {
                compute_line(&first, count, cout, block_len);
                compute_quantized_line(&first8, count, cout, quantized_block_len);
            }
            for p in 0..count {
                for o in 0..cout {
                    let (mut sum, mut sum8) = (bias[o], 0i32);
                    for ky in 0..kernel {
                        for j in 0..row_len {
                            let at = ky * row_step + p * stride * cin + j;
                            sum = input[at].mul_add(weight(o, ky, j), sum);
                            sum8 += i32::from(bytes[at]) * i32::from(weight8(o, ky, j));
                        }
                    }
                    let (old, at) = (before[p * cout + o], p * cout + o);
                    let want = epilogue.apply(sum, old);
                    if vectorised() {
                        assert_eq!(got[at], want, "{cout} channels, {count} pixels, pixel {p} channel {o}");
                    } else {
                        assert!((got[at] - want).abs() <= 1e-5, "{cout} channels, {count} pixels: {at}");
                    }
                    let want8 = epilogue.apply(sum8 as f32 * scale[o] + bias[o], old);
                    assert_eq!(
                        got8[at], want8,
                        "int8, {cout} channels, {count} pixels, pixel {p} channel {o}"
                    );
                }
            }
        }
    }
}
