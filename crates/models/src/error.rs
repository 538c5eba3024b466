//! Errors of model construction, weight loading and inference.

use thiserror::Error;

/// Why a model could not be built, loaded or run.
#[derive(Debug, Error)]
pub enum Error {
    /// An error from libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// An error from the entropy codec.
    #[error(transparent)]
    Codec(#[from] frankensplit_codec::CodecError),
    /// A bundle that cannot be read or written.
    #[error(transparent)]
    Bundle(#[from] frankensplit_bundle::Error),
    /// Weights do not fit the model.
    #[error("weights do not fit the model:\n{0}")]
    WeightMismatch(String),
    /// Anything else about the input, with a message that says what to fix.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for model operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
