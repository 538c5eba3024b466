//! The convolution inner loop: a register-blocked tile of up to
//! [`TILE_PIXELS`] output pixels of one output row × [`TILE_CHANNELS`]
//! output channels, computed straight from a zero-padded HWC input (no
//! im2col copy) with weights packed per channel block, bias loaded into the
//! accumulators and the block's epilogue (ReLU, residual add) applied
//! before the one store. On x86-64 with AVX2 and FMA the tile lives in 12
//! ymm registers (6 pixels × 2 × 8 lanes), or 14 zmm ones with AVX-512,
//! chosen at run time (with AVX-512, where a line has two whole channel
//! blocks, one tile of 32 channels in 28 zmm registers computes both, each
//! broadcast input feeding two FMAs); on 64-bit ARM in 24 NEON registers
//! (6 pixels × 4 × 4 lanes); elsewhere a portable loop computes the same
//! sums. The int8 tile ([`QuantizedTile`]) has the same shape over u8
//! inputs and s8 weights, 4 taps per 32-bit lane, with exact i32 sums
//! scaled to floats before the same epilogue, by VNNI's `vpdpbusd` where
//! the machine has it, else by AVX2, and by `sdot` on ARM cores with the
//! dot-product extension.

/// Output channels per tile: two 8-lane vectors.
pub const TILE_CHANNELS: usize = 16;
/// Output pixels per tile: with 2 vectors per pixel, 12 accumulators leave
/// registers for the 2 weight vectors and the broadcast input.
pub const TILE_PIXELS: usize = 6;

/// Calls the tile function `$module::$tile::<P>($operands)` with `P` =
/// `$pixels`: one monomorphised tile per width, the widths listed (1 to 5
/// unless given), larger counts taking the last width.
macro_rules! by_pixels {
    ($pixels:expr, $module:ident::$tile:ident $operands:tt) => {
        by_pixels!($pixels, $module::$tile $operands, 1 2 3 4 5; 6)
    };
    ($pixels:expr, $module:ident::$tile:ident $operands:tt, $($width:literal)*; $widest:literal) => {
        match $pixels {
            $($width => $module::$tile::<$width> $operands,)*
            _ => $module::$tile::<$widest> $operands,
        }
    };
}

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
    /// Store `sum + max(0, out)`: the skip branch added to a folded pair's
    /// output, computed first into the same place.
    AddToRelu,
}

impl Epilogue {
    /// Every epilogue.
    #[cfg(test)]
    pub(crate) const ALL: [Epilogue; 5] = [
        Epilogue::Store,
        Epilogue::Add,
        Epilogue::Relu,
        Epilogue::ReluAdd,
        Epilogue::AddToRelu,
    ];

    /// The stored value for `sum`, where the output held `old`.
    pub fn apply(self, sum: f32, old: f32) -> f32 {
        match self {
            Epilogue::Store => sum,
            Epilogue::Add => sum + old,
            Epilogue::Relu => sum.max(0.0),
            Epilogue::ReluAdd => sum.max(0.0) + old,
            Epilogue::AddToRelu => sum + old.max(0.0),
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

/// Computes `pixels` (1 to [`f32_tile_pixels`]) output pixels of `tile`.
///
/// # Safety
/// Every input tap of every pixel, `TILE_CHANNELS × kernel × row_len`
/// weights, `TILE_CHANNELS` biases and `channels` floats at each of the
/// `pixels` outputs must be valid to read (and the outputs to write), and
/// the outputs must not overlap the inputs or weights.
pub unsafe fn compute(tile: &Tile, pixels: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        if std::is_x86_feature_detected!("avx512f") {
            by_pixels!(pixels, avx512::tile(tile), 1 2 3 4 5 6 7 8 9 10 11 12 13; 14);
            return;
        }
        by_pixels!(pixels, avx2::tile(tile));
        return;
    }
    #[cfg(target_arch = "aarch64")]
    by_pixels!(pixels, neon::tile(tile));
    #[cfg(not(target_arch = "aarch64"))]
    portable(tile, pixels.min(TILE_PIXELS));
}

/// Computes the tiles of `count` output pixels × `out_channels` channels
/// that `first` (the first pixel's tile of the first channel block)
/// starts: each next pixel `pixel_step` further in the input and
/// `out_step` in the output, each next block `weight_block` floats further
/// in the weights and [`TILE_CHANNELS`] in the biases and outputs. With
/// AVX-512, pairs of whole blocks go through the 32-channel tile.
///
/// # Safety
/// As [`compute`], for every pixel's taps and outputs and every block's
/// weights and biases.
pub unsafe fn compute_line(first: &Tile, count: usize, out_channels: usize, weight_block: usize) {
    let pixels = f32_tile_pixels();
    let tile = |block: usize, i: usize| Tile {
        input: first.input.add(i * first.pixel_step),
        weights: first.weights.add(block * weight_block),
        bias: first.bias.add(block * TILE_CHANNELS),
        out: first.out.add(i * first.out_step + block * TILE_CHANNELS),
        channels: (out_channels - block * TILE_CHANNELS).min(TILE_CHANNELS),
        ..*first
    };
    let wide = cfg!(target_arch = "x86_64") && pixels == AVX512_TILE_PIXELS;
    by_tiles(count, out_channels, pixels, wide, |block, i, n, two_blocks| {
        if two_blocks {
            #[cfg(target_arch = "x86_64")]
            by_pixels!(n, avx512::wide_tile(&tile(block, i), weight_block), 1 2 3 4 5 6 7 8 9 10 11 12 13; 14);
        } else {
            compute(&tile(block, i), n);
        }
    });
}

/// Calls `tile(block, first_pixel, pixels, two_blocks)` for every tile of
/// a line of `count` pixels × `out_channels` channels, `pixels_per_tile`
/// at a time: first over pairs of whole blocks (`two_blocks`) where `wide`,
/// then over the blocks left, one at a time.
fn by_tiles(
    count: usize,
    out_channels: usize,
    pixels_per_tile: usize,
    wide: bool,
    mut tile: impl FnMut(usize, usize, usize, bool),
) {
    let pairs = if wide { out_channels / (2 * TILE_CHANNELS) } else { 0 };
    for pair in 0..pairs {
        for i in (0..count).step_by(pixels_per_tile) {
            tile(2 * pair, i, (count - i).min(pixels_per_tile), true);
        }
    }
    for block in 2 * pairs..out_channels.div_ceil(TILE_CHANNELS) {
        for i in (0..count).step_by(pixels_per_tile) {
            tile(block, i, (count - i).min(pixels_per_tile), false);
        }
    }
}

/// Output pixels per f32 tile with AVX-512: a divisor of g_a's sides 112,
/// 56 and 28; the 32-channel tile's 28 zmm accumulators leave registers
/// for its two weight vectors and the broadcast input.
const AVX512_TILE_PIXELS: usize = 14;

/// Output pixels per f32 tile on this machine: with AVX-512 a pixel's 16
/// channels are one zmm accumulator, 14 pixels; else 6.
pub fn f32_tile_pixels() -> usize {
    #[cfg(target_arch = "x86_64")]
    if vectorised() && std::is_x86_feature_detected!("avx512f") {
        return AVX512_TILE_PIXELS;
    }
    TILE_PIXELS
}

/// The instructions of the f32 tiles on this machine, for reports.
pub fn f32_kernels() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        return "NEON";
    }
    match (vectorised(), f32_tile_pixels() > TILE_PIXELS) {
        (true, true) => "AVX-512",
        (true, false) => "AVX2/FMA",
        _ => "portable",
    }
}

/// Whether [`compute`] runs a vector tile on this machine: AVX2/FMA (or
/// AVX-512) on x86-64, NEON (always there) on 64-bit ARM.
pub fn vectorised() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        cfg!(target_arch = "aarch64")
    }
}

/// Input channels read together by the int8 tile: `vpmaddubsw` multiplies
/// byte pairs and `vpmaddwd` sums two pairs, so each 32-bit lane takes 4
/// consecutive taps.
pub const QUANTIZED_GROUP: usize = 4;

/// One int8 tile's operands: u8 inputs (asymmetric, zero point included in
/// `offset`), s8 weights, i32 sums turned into floats by a per-channel
/// `scale` and `offset` before the epilogue. Offsets are in bytes for the
/// input, in floats for the output.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedTile {
    /// The first tap of the tile's first pixel.
    pub input: *const u8,
    /// From one output pixel's first tap to the next one's.
    pub pixel_step: usize,
    /// From one padded input row to the next.
    pub row_step: usize,
    /// Kernel rows.
    pub kernel: usize,
    /// Groups of [`QUANTIZED_GROUP`] taps per kernel row (`kernel × in_channels`
    /// rounded up; the taps past the row have zero weights).
    pub groups: usize,
    /// The channel block's weights, `[ky][group][TILE_CHANNELS][QUANTIZED_GROUP]`.
    pub weights: *const i8,
    /// Per channel of the block: the value of one unit of the sum.
    pub scale: *const f32,
    /// Per channel of the block: bias minus the zero point's share of the sum.
    pub offset: *const f32,
    /// Per channel of the block: the sum of its weights, for the tiles
    /// whose instructions multiply signed bytes only (`sdot`).
    pub weight_sums: *const i32,
    /// The first output pixel's first channel of this block.
    pub out: *mut f32,
    /// From one output pixel to the next.
    pub out_step: usize,
    /// Channels of the block that exist.
    pub channels: usize,
    /// What to do before storing.
    pub epilogue: Epilogue,
}

/// Computes `pixels` (1 to [`Int8Instructions::tile_pixels`] of
/// [`int8_instructions`]) output pixels of an int8 `tile`:
/// `scale · Σ x·w + offset`, through the epilogue.
///
/// # Safety
/// As [`compute`], where each kernel row reads `groups × QUANTIZED_GROUP`
/// bytes from its first tap (up to 3 past the taps, which must be readable).
pub unsafe fn compute_quantized(tile: &QuantizedTile, pixels: usize) {
    match int8_instructions() {
        #[cfg(target_arch = "x86_64")]
        Int8Instructions::AvxVnni => by_pixels!(pixels, avx2::quantized_tile_avx_vnni(tile)),
        #[cfg(target_arch = "x86_64")]
        Int8Instructions::Avx512Vnni => by_pixels!(pixels, avx512::quantized_tile(tile), 1 2 3 4 5 6 7; 8),
        #[cfg(target_arch = "x86_64")]
        Int8Instructions::Avx2 => by_pixels!(pixels, avx2::quantized_tile(tile), 1 2 3 4; 5),
        #[cfg(target_arch = "aarch64")]
        Int8Instructions::NeonDot => by_pixels!(pixels, neon::quantized_tile(tile)),
        _ => portable_quantized(tile, pixels.min(TILE_PIXELS)),
    }
}

/// Computes the int8 tiles of `count` output pixels × `out_channels`
/// channels that `first` (the first pixel's tile of the first channel
/// block) starts, as [`compute_line`] does the f32 ones: each next block
/// `weight_block` bytes further in the weights and [`TILE_CHANNELS`] in
/// the scales, offsets, weight sums and outputs. With AVX-512 VNNI, pairs
/// of whole blocks go through the 32-channel tile.
///
/// # Safety
/// As [`compute_quantized`], for every pixel's taps and outputs and every
/// block's weights, scales, offsets and weight sums.
pub unsafe fn compute_quantized_line(first: &QuantizedTile, count: usize, out_channels: usize, weight_block: usize) {
    let instructions = int8_instructions();
    let pixels = instructions.tile_pixels();
    let tile = |block: usize, i: usize| QuantizedTile {
        input: first.input.add(i * first.pixel_step),
        weights: first.weights.add(block * weight_block),
        scale: first.scale.add(block * TILE_CHANNELS),
        offset: first.offset.add(block * TILE_CHANNELS),
        weight_sums: first.weight_sums.add(block * TILE_CHANNELS),
        out: first.out.add(i * first.out_step + block * TILE_CHANNELS),
        channels: (out_channels - block * TILE_CHANNELS).min(TILE_CHANNELS),
        ..*first
    };
    let wide = cfg!(target_arch = "x86_64") && instructions == Int8Instructions::Avx512Vnni;
    by_tiles(count, out_channels, pixels, wide, |block, i, n, two_blocks| {
        if two_blocks {
            #[cfg(target_arch = "x86_64")]
            by_pixels!(n, avx512::quantized_wide_tile(&tile(block, i), weight_block), 1 2 3 4 5 6 7; 8);
        } else {
            compute_quantized(&tile(block, i), n);
        }
    });
}

/// The instructions the int8 tile runs on this machine. All give the same
/// sums: with weights in ±63 no intermediate of AVX2's pair of
/// instructions saturates, and VNNI's `vpdpbusd` has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Instructions {
    /// `vpdpbusd` on ymm registers, VEX-encoded (Alder Lake, Sapphire Rapids, Zen 5).
    AvxVnni,
    /// `vpdpbusd` on zmm registers: 16 channels × 4 taps per instruction
    /// (AVX-512 VNNI: Ice Lake, Sapphire Rapids, Zen 4).
    Avx512Vnni,
    /// `vpmaddubsw` + `vpmaddwd` + `vpaddd`.
    Avx2,
    /// `sdot` on NEON registers, 4 channels × 4 taps per instruction, the
    /// inputs shifted to signed bytes (ARMv8.2 dot product: Cortex-A55/A76
    /// and later, Neoverse, Apple M1 and later). Plain NEON has no product
    /// of 4 bytes, so older ARM cores take the portable int8 loop.
    NeonDot,
    /// Plain Rust.
    Portable,
}

impl Int8Instructions {
    /// Output pixels per int8 tile: 6 on ymm (12 accumulators, 2 weight
    /// vectors, the broadcast input) where one instruction does the dot
    /// product; AVX2's pair also needs its constant and a temporary, and at
    /// 6 pixels the accumulators spill to the stack (measured: 2–3× slower),
    /// so 5; on zmm one accumulator per pixel (two in the 32-channel
    /// tile), 8 pixels.
    pub fn tile_pixels(self) -> usize {
        match self {
            Int8Instructions::Avx2 => 5,
            Int8Instructions::Avx512Vnni => 8,
            _ => TILE_PIXELS,
        }
    }
}

impl std::fmt::Display for Int8Instructions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Int8Instructions::AvxVnni => "AVX-VNNI",
            Int8Instructions::Avx512Vnni => "AVX-512 VNNI",
            Int8Instructions::Avx2 => "AVX2",
            Int8Instructions::NeonDot => "NEON dot product",
            Int8Instructions::Portable => "portable",
        })
    }
}

/// The best int8 instructions this machine has.
pub fn int8_instructions() -> Int8Instructions {
    #[cfg(target_arch = "x86_64")]
    {
        if vectorised() {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni") {
                return Int8Instructions::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avxvnni") {
                return Int8Instructions::AvxVnni;
            }
            return Int8Instructions::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        return Int8Instructions::NeonDot;
    }
    Int8Instructions::Portable
}

/// The int8 sums in plain Rust (up to [`TILE_PIXELS`] pixels); the
/// integer sums are exact and the float step is the same multiply then
/// add, so the results equal the vector tiles'.
unsafe fn portable_quantized(tile: &QuantizedTile, pixels: usize) {
    const BLOCK: usize = TILE_CHANNELS * QUANTIZED_GROUP;
    let mut acc = [[0i32; TILE_CHANNELS]; TILE_PIXELS];
    for ky in 0..tile.kernel {
        let row = tile.input.add(ky * tile.row_step);
        let weights = std::slice::from_raw_parts(tile.weights.add(ky * tile.groups * BLOCK), tile.groups * BLOCK);
        for (g, w) in weights.chunks_exact(BLOCK).enumerate() {
            for (p, a) in acc[..pixels].iter_mut().enumerate() {
                let x = std::slice::from_raw_parts(row.add(p * tile.pixel_step + g * QUANTIZED_GROUP), QUANTIZED_GROUP);
                for (a, w) in a.iter_mut().zip(w.chunks_exact(QUANTIZED_GROUP)) {
                    *a += x.iter().zip(w).map(|(&x, &w)| i32::from(x) * i32::from(w)).sum::<i32>();
                }
            }
        }
    }
    let scale = std::slice::from_raw_parts(tile.scale, TILE_CHANNELS);
    let offset = std::slice::from_raw_parts(tile.offset, TILE_CHANNELS);
    for (p, a) in acc[..pixels].iter().enumerate() {
        let out = std::slice::from_raw_parts_mut(tile.out.add(p * tile.out_step), tile.channels);
        for (c, o) in out.iter_mut().enumerate() {
            *o = tile.epilogue.apply(a[c] as f32 * scale[c] + offset[c], *o);
        }
    }
}

/// The same sums in plain Rust (up to [`TILE_PIXELS`] pixels), for x86
/// machines without AVX2/FMA and other targets without vector tiles, and
/// as the tests' reference: fused multiply-adds in the vector tiles' order,
/// so that every machine writes the same payloads (where the CPU has no FMA
/// instruction, `mul_add` is computed exactly in software, slowly).
#[cfg_attr(all(target_arch = "aarch64", not(test)), allow(dead_code))]
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
                    *a = x.mul_add(*w, *a);
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

/// A partial channel block's store: the first `channels` of a pixel's 16
/// sums, whose ReLU (if the epilogue has one) the vector code has applied,
/// through the rest of `epilogue` one lane at a time.
///
/// # Safety
/// `channels` floats at `out` must be valid to read and write.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline(always)]
unsafe fn store_lanes(lanes: &[f32; TILE_CHANNELS], out: *mut f32, channels: usize, epilogue: Epilogue) {
    let rest = match epilogue {
        Epilogue::Relu => Epilogue::Store,
        Epilogue::ReluAdd => Epilogue::Add,
        other => other,
    };
    for (c, &value) in lanes[..channels].iter().enumerate() {
        let o = out.add(c);
        *o = rest.apply(value, *o);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
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
}

/// The tiles on zmm registers, where a channel block's 16 channels are one
/// vector (of floats, or of 4 int8 taps each: one `vpdpbusd` per pixel and
/// tap group).
#[cfg(target_arch = "x86_64")]
mod avx512 {
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
}

/// The tiles on 128-bit NEON registers, which every 64-bit ARM core has: a
/// pixel's 16 channels are 4 vectors, so 6 pixels take 24 accumulators and
/// leave 8 registers for the weights and the input.
#[cfg(target_arch = "aarch64")]
mod neon {
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
}

#[cfg(test)]
mod tests {
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
        let weight =
            |ky: usize, j: usize, c: usize| (taps[(ky * row_len + j) * TILE_CHANNELS + c] * 126.0).round() as i8;
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
}
