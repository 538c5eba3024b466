//! The tiles on 256-bit ymm registers, where the CPU has AVX2 and FMA: f32
//! in 12 accumulators (6 pixels × 2 × 8 lanes), int8 by `vpmaddubsw` +
//! `vpmaddwd` or by AVX-VNNI's `vpdpbusd`. Its `store` also ends the
//! AVX-512 tiles.

use std::arch::x86_64::*;

use super::{store_lanes, Epilogue, QuantizedTile, Tile, QUANTIZED_GROUP, TILE_CHANNELS};

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
    for (p, a) in acc.iter().enumerate() {
        store(*a, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// Adds the 4 u8·s8 products of each 32-bit lane of `x` and `w` to `acc`.
pub(crate) trait DotAdd {
    unsafe fn dot_add(acc: __m256i, x: __m256i, w: __m256i) -> __m256i;
}

/// `vpmaddubsw` (byte pairs to i16, which cannot saturate with weights
/// in ±63), `vpmaddwd` by ones (pairs of those to i32), `vpaddd`.
pub(crate) struct PairsThenQuads;

impl DotAdd for PairsThenQuads {
    #[inline(always)]
    unsafe fn dot_add(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI's `vpdpbusd`: the same in one instruction.
pub(crate) struct VexDot;

impl DotAdd for VexDot {
    #[inline(always)]
    unsafe fn dot_add(acc: __m256i, x: __m256i, w: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, x, w)
    }
}

/// `P` pixels × 16 channels in 2·P i32 accumulators, by AVX2.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantized_tile<const P: usize>(t: &QuantizedTile) {
    quantized::<PairsThenQuads, P>(t)
}

/// The same by AVX-VNNI.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn quantized_tile_avx_vnni<const P: usize>(t: &QuantizedTile) {
    quantized::<VexDot, P>(t)
}

/// The int8 tile's body, inlined into each instruction set's entry.
#[inline(always)]
unsafe fn quantized<D: DotAdd, const P: usize>(t: &QuantizedTile) {
    let mut acc = [[_mm256_setzero_si256(); 2]; P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.groups * TILE_CHANNELS * QUANTIZED_GROUP);
        for g in 0..t.groups {
            let w0 = _mm256_loadu_si256(w as *const __m256i);
            let w1 = _mm256_loadu_si256(w.add(32) as *const __m256i);
            w = w.add(TILE_CHANNELS * QUANTIZED_GROUP);
            for (p, a) in acc.iter_mut().enumerate() {
                let taps = row.add(p * t.pixel_step + g * QUANTIZED_GROUP) as *const i32;
                let x = _mm256_set1_epi32(taps.read_unaligned());
                a[0] = D::dot_add(a[0], x, w0);
                a[1] = D::dot_add(a[1], x, w1);
            }
        }
    }
    let scale = [_mm256_loadu_ps(t.scale), _mm256_loadu_ps(t.scale.add(8))];
    let offset = [_mm256_loadu_ps(t.offset), _mm256_loadu_ps(t.offset.add(8))];
    for (p, a) in acc.iter().enumerate() {
        let sums = [
            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[0]), scale[0]), offset[0]),
            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[1]), scale[1]), offset[1]),
        ];
        store(sums, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// Applies `epilogue` to one pixel's 16 sums and stores its first
/// `channels` at `out` (also what the int8 tiles end with).
#[inline(always)]
pub(crate) unsafe fn store(sums: [__m256; 2], out: *mut f32, channels: usize, epilogue: Epilogue) {
    let mut v = sums;
    if matches!(epilogue, Epilogue::Relu | Epilogue::ReluAdd) {
        let zero = _mm256_setzero_ps();
        v = [_mm256_max_ps(v[0], zero), _mm256_max_ps(v[1], zero)];
    }
    if channels == TILE_CHANNELS {
        match epilogue {
            Epilogue::Add | Epilogue::ReluAdd => {
                let old = [_mm256_loadu_ps(out), _mm256_loadu_ps(out.add(8))];
                v = [_mm256_add_ps(v[0], old[0]), _mm256_add_ps(v[1], old[1])];
            }
            Epilogue::AddToRelu => {
                let old = [_mm256_loadu_ps(out), _mm256_loadu_ps(out.add(8))];
                let zero = _mm256_setzero_ps();
                v = [
                    _mm256_add_ps(v[0], _mm256_max_ps(old[0], zero)),
                    _mm256_add_ps(v[1], _mm256_max_ps(old[1], zero)),
                ];
            }
            Epilogue::Store | Epilogue::Relu => {}
        }
        _mm256_storeu_ps(out, v[0]);
        _mm256_storeu_ps(out.add(8), v[1]);
    } else {
        let mut lanes = [0f32; TILE_CHANNELS];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v[0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), v[1]);
        store_lanes(&lanes, out, channels, epilogue);
    }
}
