//! One error type for everything the codec can refuse.

use thiserror::Error;

/// Why an encode, a decode, a table build or a container parse was refused.
///
/// Decoding never panics: every malformed byte string maps to one of these.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CodecError {
    /// The stream ended before all symbols were decoded.
    #[error("bitstream is truncated: it ended after {consumed_bytes} bytes while symbols were still being decoded")]
    Truncated { consumed_bytes: usize },
    /// A Rans64 string is a whole number of 32-bit words and at least the 8-byte flushed state.
    #[error("bitstream length {len} is invalid: a CompressAI rANS string is a multiple of 4 bytes and at least 8 bytes long")]
    BadStreamLength { len: usize },
    /// The decoder state left the interval a valid encoder can produce, or did
    /// not return to the initial state after the last symbol: the bytes are corrupt.
    #[error("bitstream is corrupt: {0}")]
    Corrupt(&'static str),
    /// Words were left over after every symbol was decoded.
    #[error("bitstream has {trailing_bytes} trailing bytes after the last symbol")]
    TrailingData { trailing_bytes: usize },
    /// A decoded escape value does not fit the 32-bit symbol range.
    #[error("decoded symbol {value} is outside the 32-bit symbol range")]
    SymbolOutOfRange { value: i64 },
    /// A latent value cannot be turned into a 32-bit symbol.
    #[error("latent value at index {index} is {value}, which cannot be quantised to a 32-bit symbol")]
    UnquantisableValue { index: usize, value: f32 },
    /// A CDF index points past the table.
    #[error("CDF index {index} at position {position} is out of range: the table has {rows} rows")]
    IndexOutOfRange { position: usize, index: u32, rows: usize },
    /// A probability table is malformed.
    #[error("invalid probability table: {0}")]
    InvalidTable(String),
    /// A probability mass function cannot be quantised.
    #[error("invalid pmf: {0}")]
    InvalidPmf(String),
    /// Density-model parameters are missing or have the wrong shape.
    #[error("invalid entropy-model parameters: {0}")]
    InvalidParameters(String),
    /// Lengths of tensors that must agree do not.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// The declared latent is larger than the decoder's hard cap.
    #[error("declared latent has {requested} symbols, more than the limit of {limit}")]
    TooLarge { requested: u64, limit: u64 },
    /// The payload does not start with the container magic.
    #[error("not a FrankenSplit payload: first byte is {found:#04x}, expected 0xF? (magic nibble 0xF)")]
    BadMagic { found: u8 },
    /// The container was written by a newer format version.
    #[error("payload format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u8, supported: u8 },
    /// The payload was produced by a different model.
    #[error("payload was produced by model {found}, but this decoder serves model {expected}")]
    FingerprintMismatch { expected: String, found: String },
    /// The payload's latent shape is not the one the model produces.
    #[error("payload declares a {declared} latent, this model uses {expected}")]
    LatentShapeMismatch { declared: String, expected: String },
    /// The container header is cut short or malformed.
    #[error("malformed payload header: {0}")]
    BadHeader(&'static str),
}

/// Result alias for codec operations.
pub type Result<T, E = CodecError> = std::result::Result<T, E>;
