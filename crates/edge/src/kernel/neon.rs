//! The tiles on 128-bit NEON registers, which every 64-bit ARM core has: a
//! pixel's 16 channels are 4 vectors, so 6 pixels take 24 accumulators and
//! leave 8 registers for the weights and the input.

use std::arch::aarch64::*;

use super::{store_lanes, Epilogue, QuantizedTile, Tile, QUANTIZED_GROUP, TILE_CHANNELS};

/// `P` pixels × 16 channels of f32 in 4·P accumulators: per tap 4 weight
/// vectors and, per pixel, 4 FMAs by the input (`fmla` by element).
/// Each lane runs the x86 tiles' FMAs in the same order: the same sums.
pub unsafe fn tile<const P: usize>(t: &Tile) {
    let mut acc = [load(t.bias); P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.row_len * TILE_CHANNELS);
        for j in 0..t.row_len {
            let weights = load(w);
            w = w.add(TILE_CHANNELS);
            for (p, a) in acc.iter_mut().enumerate() {
                let x = *row.add(p * t.pixel_step + j);
                for (a, &w) in a.iter_mut().zip(&weights) {
                    *a = vfmaq_n_f32(*a, w, x);
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        store(*a, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// 16 floats from `from`.
#[inline(always)]
unsafe fn load(from: *const f32) -> [float32x4_t; 4] {
    [
        vld1q_f32(from),
        vld1q_f32(from.add(4)),
        vld1q_f32(from.add(8)),
        vld1q_f32(from.add(12)),
    ]
}

/// `acc` plus, in each 32-bit lane, the dot product of its 4 signed
/// bytes in `x` and `w`. The `sdot` intrinsic is not stable Rust yet, so
/// the one instruction is written out.
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, x: int8x16_t, w: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    std::arch::asm!(
        "sdot {acc:v}.4s, {x:v}.16b, {w:v}.16b",
        acc = inout(vreg) acc,
        x = in(vreg) x,
        w = in(vreg) w,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// `P` pixels × 16 channels in 4·P i32 accumulators. `sdot` multiplies
/// signed bytes, so each u8 input `x` enters as `x − 128` (its top bit
/// flipped) and the tile adds back `128 · Σ w` per channel: the same
/// exact sums as the x86 tiles.
#[target_feature(enable = "dotprod")]
pub unsafe fn quantized_tile<const P: usize>(t: &QuantizedTile) {
    const BLOCK: usize = TILE_CHANNELS * QUANTIZED_GROUP;
    let weight_vectors = |at: *const i8| [0, 16, 32, 48].map(|i| vld1q_s8(at.add(i)));
    let flip = vdupq_n_u32(0x8080_8080);
    let mut acc = [[vdupq_n_s32(0); 4]; P];
    for ky in 0..t.kernel {
        let row = t.input.add(ky * t.row_step);
        let mut w = t.weights.add(ky * t.groups * BLOCK);
        for g in 0..t.groups {
            let weights = weight_vectors(w);
            w = w.add(BLOCK);
            for (p, a) in acc.iter_mut().enumerate() {
                let taps = (row.add(p * t.pixel_step + g * QUANTIZED_GROUP) as *const u32).read_unaligned();
                let x = vreinterpretq_s8_u32(veorq_u32(vdupq_n_u32(taps), flip));
                for (a, &w) in a.iter_mut().zip(&weights) {
                    *a = sdot(*a, x, w);
                }
            }
        }
    }
    let scale = load(t.scale);
    let offset = load(t.offset);
    let shift_back = [0, 4, 8, 12].map(|i| vshlq_n_s32::<7>(vld1q_s32(t.weight_sums.add(i))));
    for (p, a) in acc.iter().enumerate() {
        let mut sums = [vdupq_n_f32(0.0); 4];
        for (i, s) in sums.iter_mut().enumerate() {
            let exact = vaddq_s32(a[i], shift_back[i]);
            *s = vaddq_f32(vmulq_f32(vcvtq_f32_s32(exact), scale[i]), offset[i]);
        }
        store(sums, t.out.add(p * t.out_step), t.channels, t.epilogue);
    }
}

/// Applies `epilogue` to one pixel's 16 sums and stores its first
/// `channels` at `out`.
#[inline(always)]
unsafe fn store(sums: [float32x4_t; 4], out: *mut f32, channels: usize, epilogue: Epilogue) {
    let zero = vdupq_n_f32(0.0);
    let mut v = sums;
    if matches!(epilogue, Epilogue::Relu | Epilogue::ReluAdd) {
        v = v.map(|s| vmaxq_f32(s, zero));
    }
    if channels == TILE_CHANNELS {
        for (i, v) in v.iter_mut().enumerate() {
            let o = out.add(4 * i);
            match epilogue {
                Epilogue::Add | Epilogue::ReluAdd => *v = vaddq_f32(*v, vld1q_f32(o)),
                Epilogue::AddToRelu => *v = vaddq_f32(*v, vmaxq_f32(vld1q_f32(o), zero)),
                Epilogue::Store | Epilogue::Relu => {}
            }
            vst1q_f32(o, *v);
        }
    } else {
        let mut lanes = [0f32; TILE_CHANNELS];
        for (i, v) in v.iter().enumerate() {
            vst1q_f32(lanes.as_mut_ptr().add(4 * i), *v);
        }
        store_lanes(&lanes, out, channels, epilogue);
    }
}
