//! The quantizer, the int8 convolutions and the int8 encoder, against
//! their f32 counterparts and on any number of threads.

use super::conv::INT8_MACS_PER_F32_MAC;
use super::quantize::quantize_row;
use super::*;
use crate::encoder::ResidualBlock;
use crate::pool::MIN_MACS_PER_THREAD;
use crate::test_values as values;

fn range(min: f32, max: f32) -> Range {
    Range { min, max }
}

#[test]
fn levels_round_trip_and_zero_is_exact() {
    for (min, max) in [(-2.1, 2.6), (0.5, 7.0), (-3.0, -1.0), (0.0, 0.0), (-1e-3, 40.0)] {
        let q = Quantizer::new(range(min, max)).unwrap();
        assert_eq!(q.value(q.zero()), 0.0, "[{min}, {max}]");
        assert_eq!(q.quantize(0.0), q.zero(), "[{min}, {max}]");
        for level in 0..=255u8 {
            assert_eq!(q.quantize(q.value(level)), level, "[{min}, {max}] level {level}");
        }
        // Values between levels go to the nearest; beyond the range, to its ends.
        let v = q.value(100) + 0.4 * q.scale();
        assert_eq!(q.quantize(v), 100);
        assert_eq!(q.quantize(q.value(0) - 10.0 * q.scale()), 0);
        assert_eq!(q.quantize(q.value(255) + 10.0 * q.scale()), 255);
    }
    assert!(Quantizer::new(Range::EMPTY).is_err());
    assert!(Quantizer::new(range(f32::NAN, 1.0)).is_err());
}

/// The vectorised rows give the scalar levels, ties, NaN, infinities and
/// lengths off the vector width included.
#[test]
fn rows_quantize_as_single_values_do() {
    let q = Quantizer::new(range(-1.0, 1.55)).unwrap();
    let mut from: Vec<f32> = values(203, 20).iter().map(|v| v * 4.0).collect();
    for (i, level) in (-5..5).enumerate() {
        from[i] = (level as f32 + 0.5) * q.scale();
    }
    from[20..24].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30]);
    for len in [203, 8, 7, 0] {
        let mut to = vec![0u8; len];
        quantize_row(q, &from[..len], &mut to);
        let want: Vec<u8> = from[..len].iter().map(|&v| q.quantize(v)).collect();
        assert_eq!(to, want, "{len} values");
    }
}

/// With weights and inputs on the quantization grid, the int8
/// convolution is the f32 one up to float rounding: any slip in
/// packing, offsets or zero points shows.
#[test]
fn int8_convolutions_are_exact_on_the_grid() {
    for (cout, cin, k, stride, side) in [
        (20, 3, 7, 2, 15),
        (7, 5, 3, 1, 9),
        (16, 16, 3, 2, 12),
        (33, 3, 1, 2, 10),
    ] {
        let mut weight = vec![0f32; cout * cin * k * k];
        for (o, taps) in weight.chunks_exact_mut(cin * k * k).enumerate() {
            let step = 2f32.powi(-(o as i32 % 5) - 4);
            for (t, v) in taps.iter_mut().zip(values(cin * k * k, 30 + o as u32)) {
                *t = (v * 126.0).round() * step;
            }
            taps[o % taps.len()] = if o % 2 == 0 { 63.0 } else { -63.0 } * step;
        }
        let bias = values(cout, 31);
        let conv = Conv::from_torch(&weight, &[cout, cin, k, k], &bias, stride).unwrap();
        let q = Quantizer::new(range(-1.3, 2.2)).unwrap();
        let levels: Vec<f32> = values(side * side * cin, 32)
            .iter()
            .map(|v| q.value(((v + 0.5) * 255.0) as u8))
            .collect();
        let want = conv.forward(&levels, side, 1);
        let plain = PaddedHwc::from_hwc(&levels, side, cin, k / 2);
        let mut input = QuantizedPaddedHwc::new(side, k / 2, cin, q);
        input.quantize(&plain, 1);
        let quantized = QuantizedConv::new(&conv, q);
        let out_side = conv.output_side(side);
        let mut got = PaddedHwc::new(out_side, 0, cout);
        quantized.run(&input, &mut got, None, Epilogue::Store, 1);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.data().iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "{cout}×{cin}×{k}² stride {stride}: {g} vs {w}"
            );
        }
    }
}

fn block(cin: usize, cout: usize, act: bool, seed: u32) -> ResidualBlock {
    let conv = |o: usize, i: usize, k: usize, s: usize, seed: u32| {
        let w: Vec<f32> = values(o * i * k * k, seed).iter().map(|v| v / (i * k) as f32).collect();
        Conv::from_torch(&w, &[o, i, k, k], &values(o, seed + 1), s).unwrap()
    };
    ResidualBlock::new(
        conv(cout, cin, 3, 2, seed),
        conv(cout, cout, 3, 1, seed + 2),
        conv(cout, cin, 1, 2, seed + 4),
        act,
    )
}

/// The int8 encoder stays close to the f32 one (within a few levels of
/// the latent's range), folded or not, and gives the same bits on any
/// number of threads.
#[test]
fn the_int8_encoder_follows_the_f32_one() {
    let side = 64;
    for act in [false, true] {
        let encoder = Encoder {
            blocks: vec![block(3, 24, act, 40), block(24, 32, act, 50), block(32, 16, act, 60)],
        };
        let images: Vec<Vec<f32>> = (0..3)
            .map(|i| values(3 * side * side, 70 + i).iter().map(|v| v * 4.0).collect())
            .collect();
        let ranges = QuantizedEncoder::calibrate(&encoder, &images, side, 1).unwrap();
        for folded in [false, true] {
            let mut f32_encoder = encoder.clone();
            if folded {
                f32_encoder.prepare(side);
            }
            assert_eq!(f32_encoder.blocks[0].folded.is_some(), folded && !act);
            let quantized = QuantizedEncoder::new(&f32_encoder, &ranges).unwrap();
            let mut workspace = quantized.workspace(side);
            for image in &images {
                let (want, latent_side) = f32_encoder.forward(image, side, 1).unwrap();
                let (got, got_side) = quantized.run(&mut workspace, image, 1).unwrap();
                assert_eq!(got_side, latent_side);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let error = want.iter().zip(&got).fold(0f32, |m, (w, g)| m.max((w - g).abs()));
                assert!(
                    error <= 0.03 * scale,
                    "act {act}, folded {folded}: error {error} of {scale}"
                );
                let (threaded, _) = quantized.run(&mut workspace, image, 3).unwrap();
                assert_eq!(threaded, got, "act {act}, folded {folded}: 3 threads");
            }
        }
    }
}

/// An unfolded block's skip runs in f32 from the f32 input: with conv1
/// and conv2 all zeros the block is its skip, and the int8 encoder
/// gives the f32 sums (an int8 skip would be off by about a level).
#[test]
fn unfolded_skips_run_in_f32() {
    let (cin, cout, side) = (8, 16, 16);
    let zeros = |o: usize, i: usize, k: usize, s: usize| {
        Conv::from_torch(&vec![0.0; o * i * k * k], &[o, i, k, k], &vec![0.0; o], s).unwrap()
    };
    let skip = Conv::from_torch(&values(cout * cin, 80), &[cout, cin, 1, 1], &values(cout, 81), 2).unwrap();
    let encoder = Encoder {
        blocks: vec![ResidualBlock::new(
            zeros(cout, cin, 3, 2),
            zeros(cout, cout, 3, 1),
            skip,
            false,
        )],
    };
    let image = values(cin * side * side, 82);
    let ranges = QuantizedEncoder::calibrate(&encoder, std::slice::from_ref(&image), side, 1).unwrap();
    let quantized = QuantizedEncoder::new(&encoder, &ranges).unwrap();
    let (want, _) = encoder.forward(&image, side, 1).unwrap();
    let (got, _) = quantized.run(&mut quantized.workspace(side), &image, 1).unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * scale, "value {i}: {g} vs {w}");
    }
}

/// A convolution big enough to be split (even at int8's lower cost per
/// multiply-add) gives the same floats and levels on any number of threads.
#[test]
fn threads_split_int8_rows_without_changing_the_result() {
    let (cin, cout, side) = (32, 32, 64);
    let conv = Conv::from_torch(&values(cout * cin * 9, 90), &[cout, cin, 3, 3], &values(cout, 91), 1).unwrap();
    let q = Quantizer::new(range(-2.0, 2.0)).unwrap();
    let quantized = QuantizedConv::new(&conv, q);
    assert!(quantized.macs(side) / INT8_MACS_PER_F32_MAC >= 3 * MIN_MACS_PER_THREAD);
    let mut input = QuantizedPaddedHwc::new(side, 1, cin, q);
    input.quantize(&PaddedHwc::from_hwc(&values(side * side * cin, 92), side, cin, 0), 1);
    let next = Quantizer::new(range(-5.0, 5.0)).unwrap();
    let run = |threads: usize| {
        let mut output = PaddedHwc::new(side, 0, cout);
        let mut levels = QuantizedPaddedHwc::new(side, 1, cout, next);
        quantized.run(&input, &mut output, Some(&mut levels), Epilogue::Relu, threads);
        (output.data().to_vec(), levels.data)
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(run(threads) == one, "{threads} threads");
    }
}

#[test]
fn calibrations_that_do_not_fit_are_refused() {
    let encoder = Encoder {
        blocks: vec![block(3, 8, false, 80), block(8, 8, false, 90)],
    };
    assert!(QuantizedEncoder::calibrate(&encoder, &[], 16, 1).is_err());
    let ranges = QuantizedEncoder::calibrate(&encoder, &[values(3 * 16 * 16, 3)], 16, 1).unwrap();
    assert!(QuantizedEncoder::new(&encoder, &ranges[..1]).is_err());
    assert!(QuantizedEncoder::calibrate(&encoder, &[values(10, 3)], 16, 1).is_err());
    let mut empty = ranges.clone();
    empty[1].middle = Range::EMPTY;
    assert!(QuantizedEncoder::new(&encoder, &empty).is_err());
}
