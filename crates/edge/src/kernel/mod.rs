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

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(test)]
mod tests;

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
