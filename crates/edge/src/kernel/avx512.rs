//! The tiles on zmm registers, where a channel block's 16 channels are one
//! vector (of floats, or of 4 int8 taps each: one `vpdpbusd` per pixel and
//! tap group).

use std::arch::x86_64::*;

use super::avx2::store;
use super::{Epilogue, QuantizedTile, Tile, QUANTIZED_GROUP, TILE_CHANNELS};

/// `P` pixels × 16 channels of f32 in P zmm accumulators: per tap one
/// weight vector and, per pixel, one FMA with the input broadcast. Each
/// lane runs the AVX2 tile's FMAs in the same order: the same sums.
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn tile<const P: usize>(t: &Tile) {
    let bias = _mm512_loadu_ps(t.bias);
    let mut acc = [bias; P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.row_len * TILE_CHANNELS);
        for j in 0..t.row_len {
            let weights = _mm512_loadu_ps(w);
            w = w.add(TILE_CHANNELS);
            for (p, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(p * t.pixel_step + j)), weights, *a);
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        store_block(*a, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// `P` pixels × 32 channels (two whole blocks, the second one's weights
/// `weight_block` floats after the first's) in 2·P zmm accumulators.
/// Each broadcast input feeds two FMAs, so a tap costs P + 2 loads for
/// 2·P FMAs where the 16-channel tile needs P + 1 for P: the FMA ports,
/// not the load ports, set the pace. The same FMAs in the same order per
/// lane as the other tiles: the same sums.
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn wide_tile<const P: usize>(t: &Tile, weight_block: usize) {
    let bias = [_mm512_loadu_ps(t.bias), _mm512_loadu_ps(t.bias.add(TILE_CHANNELS))];
    let mut acc = [bias; P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.row_len * TILE_CHANNELS);
        for j in 0..t.row_len {
            let weights = [_mm512_loadu_ps(w), _mm512_loadu_ps(w.add(weight_block))];
            w = w.add(TILE_CHANNELS);
            for (p, a) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*row.add(p * t.pixel_step + j));
                a[0] = _mm512_fmadd_ps(x, weights[0], a[0]);
                a[1] = _mm512_fmadd_ps(x, weights[1], a[1]);
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        let out = t.out.add(p * t.out_step);
        store_block(a[0], out, TILE_CHANNELS, t.epilogue);
        store_block(a[1], out.add(TILE_CHANNELS), TILE_CHANNELS, t.epilogue);
    }
}

/// One pixel's 16 sums through the epilogue, as the AVX2 tile stores its two halves.
#[inline(always)]
unsafe fn store_block(sums: __m512, out: *mut f32, channels: usize, epilogue: Epilogue) {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sums)));
    store([_mm512_castps512_ps256(sums), high], out, channels, epilogue);
}

/// `P` pixels × 16 channels in P zmm accumulators.
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
pub unsafe fn quantized_tile<const P: usize>(t: &QuantizedTile) {
    let mut acc = [_mm512_setzero_si512(); P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.groups * TILE_CHANNELS * QUANTIZED_GROUP);
        for g in 0..t.groups {
            let weights = _mm512_loadu_si512(w as *const __m512i);
            w = w.add(TILE_CHANNELS * QUANTIZED_GROUP);
            for (p, a) in acc.iter_mut().enumerate() {
                let taps = row.add(p * t.pixel_step + g * QUANTIZED_GROUP) as *const i32;
                *a = _mm512_dpbusd_epi32(*a, _mm512_set1_epi32(taps.read_unaligned()), weights);
            }
        }
    }
    let scale = _mm512_loadu_ps(t.scale);
    let offset = _mm512_loadu_ps(t.offset);
    for (p, a) in acc.iter().enumerate() {
        let sums = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(*a), scale), offset);
        store_block(sums, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// `P` pixels × 32 channels (two whole blocks, the second one's weights
/// `weight_block` bytes after the first's) in 2·P zmm accumulators: one
/// broadcast of 4 input bytes feeds two `vpdpbusd`s.
#[target_feature(enable = "avx2,fma,avx512f,avx512vnni")]
pub unsafe fn quantized_wide_tile<const P: usize>(t: &QuantizedTile, weight_block: usize) {
    let mut acc = [[_mm512_setzero_si512(); 2]; P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.groups * TILE_CHANNELS * QUANTIZED_GROUP);
        for g in 0..t.groups {
            let weights = [
                _mm512_loadu_si512(w as *const __m512i),
                _mm512_loadu_si512(w.add(weight_block) as *const __m512i),
            ];
            w = w.add(TILE_CHANNELS * QUANTIZED_GROUP);
            for (p, a) in acc.iter_mut().enumerate() {
                let taps = row.add(p * t.pixel_step + g * QUANTIZED_GROUP) as *const i32;
                let x = _mm512_set1_epi32(taps.read_unaligned());
                a[0] = _mm512_dpbusd_epi32(a[0], x, weights[0]);
                a[1] = _mm512_dpbusd_epi32(a[1], x, weights[1]);
            }
        }
    }
    for half in 0..2 {
        let scale = _mm512_loadu_ps(t.scale.add(half * TILE_CHANNELS));
        let offset = _mm512_loadu_ps(t.offset.add(half * TILE_CHANNELS));
        for (p, a) in acc.iter().enumerate() {
            let sums = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a[half]), scale), offset);
            let out = t.out.add(p * t.out_step + half * TILE_CHANNELS);
            store_block(sums, out, TILE_CHANNELS, t.epilogue);
        }
    }
}
