//! Pillow's `Image.resize(size, BILINEAR)` for 8-bit RGB, bit for bit (Pillow
//! ≤ 12, the reference's era): a separable triangle filter widened by the
//! scale factor when shrinking (antialiasing), coefficients in 22-bit fixed
//! point, a horizontal pass over only the rows the vertical pass reads, then
//! the vertical pass; each pass rounds and clips to 8 bits.
//!
//! Pillow 13 runs the vertical pass first when the height shrinks much more
//! than the width; that changes some pixels by one level for such distorted
//! resizes, never for the aspect-preserving `Resize(256)` of evaluation.

use crate::RgbImage;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, number of taps, and fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    taps: usize,
    weights: Vec<i32>,
}

fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * taps];
    let mut k = vec![0f64; taps];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let inv = 1.0 / filter_scale;
        // C's (int) truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = triangle((x as f64 + xmin as f64 - center + 0.5) * inv);
            *kx = w;
            total += w;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let w = if total != 0.0 { kx / total } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * taps + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients { bounds, taps, weights }
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes `image` to `width × height` exactly as Pillow's bilinear resize.
pub fn resize_bilinear(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (image.width as usize, image.height as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let horizontal = coefficients(in_w, out_w);
    let mut vertical = coefficients(in_h, out_h);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;

    let (source, src_w) = if need_horizontal {
        // Only the rows the vertical pass will read.
        let first = vertical.bounds[0].0;
        let last = vertical.bounds[out_h - 1].0 + vertical.bounds[out_h - 1].1;
        for b in &mut vertical.bounds {
            b.0 -= first;
        }
        let rows = last - first;
        let mut temp = vec![0u8; rows * out_w * 3];
        for y in 0..rows {
            let row = &image.pixels[(y + first) * in_w * 3..(y + first + 1) * in_w * 3];
            for (xx, &(xmin, taps)) in horizontal.bounds.iter().enumerate() {
                let k = &horizontal.weights[xx * horizontal.taps..xx * horizontal.taps + taps];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &w) in k.iter().enumerate() {
                    let px = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i32::from(px[c]) * w;
                    }
                }
                for c in 0..3 {
                    temp[(y * out_w + xx) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        (temp, out_w)
    } else {
        (image.pixels.clone(), in_w)
    };

    if !need_vertical {
        return RgbImage {
            width,
            height,
            pixels: source,
        };
    }
    let mut out = vec![0u8; out_h * src_w * 3];
    for (yy, &(ymin, taps)) in vertical.bounds.iter().enumerate() {
        let k = &vertical.weights[yy * vertical.taps..yy * vertical.taps + taps];
        for xx in 0..src_w {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (y, &w) in k.iter().enumerate() {
                let px = &source[((ymin + y) * src_w + xx) * 3..((ymin + y) * src_w + xx) * 3 + 3];
                for c in 0..3 {
                    acc[c] += i32::from(px[c]) * w;
                }
            }
            for c in 0..3 {
                out[(yy * src_w + xx) * 3 + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels: out,
    }
}
