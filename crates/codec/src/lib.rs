//! Entropy coding for FrankenSplit, byte-compatible with CompressAI 1.2.x.
//!
//! This crate owns the bytes on the wire and nothing else: it links no tensor
//! framework, so an edge device can carry it alone. It is split the way
//! CompressAI is:
//!
//! * entropy models know probabilities: [`factorized`] (the `EntropyBottleneck`
//!   density and the tables its `update()` builds) and [`gaussian`] (the
//!   `GaussianConditional` scale table);
//! * [`cdf`] turns probabilities into 16-bit quantised CDF rows
//!   (`pmf_to_quantized_cdf`);
//! * the coder knows bytes: [`rans`] is Rans64, and [`coder`] is CompressAI's
//!   indexed scheme with 4-bit bypass escapes on top of it;
//! * [`container`] frames one compressed latent with a model fingerprint and
//!   its shape (see `docs/format.md`), and [`payload`] is one model's
//!   payloads both ways: latent → container → latent.
//!
//! Every decoding entry point returns `Ok` or a [`CodecError`] for any input
//! bytes; none panics, loops without bound, or allocates beyond the declared
//! shape (capped by [`DecodeLimits`]).

pub mod cdf;
pub mod coder;
pub mod container;
pub mod error;
pub mod factorized;
#[doc(hidden)]
pub mod fuzz_harness;
pub mod gaussian;
pub mod payload;
pub mod rans;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use cdf::{pmf_to_quantized_cdf, CdfTables};
pub use coder::{decode_with_indexes, encode_with_indexes, symbol_cost, SymbolCost};
pub use container::{ModelFingerprint, Payload};
pub use error::{CodecError, Result};
pub use factorized::{EntropyBottleneck, FactorizedDensity, LikelihoodFormula, ParamTensor};
pub use gaussian::GaussianConditional;
pub use payload::PayloadCodec;

/// Shape of one latent, `channels × height × width` (CompressAI's per-image tensor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LatentShape {
    /// Channels (one CDF row each for the factorized prior).
    pub channels: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

impl LatentShape {
    /// A `channels × height × width` shape.
    pub const fn new(channels: u32, height: u32, width: u32) -> Self {
        Self {
            channels,
            height,
            width,
        }
    }

    /// Number of symbols, `C·H·W`, saturating at `u64::MAX` (three 32-bit
    /// dimensions can exceed 64 bits).
    pub fn num_symbols(&self) -> u64 {
        u64::from(self.channels)
            .saturating_mul(u64::from(self.height))
            .saturating_mul(u64::from(self.width))
    }

    /// Number of symbols as a `usize` (saturating on 32-bit hosts).
    pub fn len(&self) -> usize {
        usize::try_from(self.num_symbols()).unwrap_or(usize::MAX)
    }

    /// Whether the shape holds no symbol.
    pub fn is_empty(&self) -> bool {
        self.num_symbols() == 0
    }

    /// Symbols per channel, `H·W`.
    pub fn plane(&self) -> usize {
        usize::try_from(u64::from(self.height) * u64::from(self.width)).unwrap_or(usize::MAX)
    }
}

impl fmt::Display for LatentShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{}×{}", self.channels, self.height, self.width)
    }
}

/// Hard caps a decoder applies before allocating for a declared shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest number of symbols one string may declare.
    pub max_symbols: u64,
}

impl Default for DecodeLimits {
    /// 2^24 symbols (64 MiB of `f32` output): a 48-channel latent of a
    /// 4096×4096 image; FrankenSplit's 224² latent has 37,632.
    fn default() -> Self {
        Self { max_symbols: 1 << 24 }
    }
}

impl DecodeLimits {
    /// Fails if `shape` exceeds the cap.
    pub fn check(&self, shape: LatentShape) -> Result<()> {
        self.check_count(shape.num_symbols())
    }

    /// Fails if `count` symbols exceed the cap.
    pub fn check_count(&self, count: u64) -> Result<()> {
        if count > self.max_symbols {
            return Err(CodecError::TooLarge {
                requested: count,
                limit: self.max_symbols,
            });
        }
        Ok(())
    }
}
