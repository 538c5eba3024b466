//! Training FrankenSplit's compressor the way the paper does: Shallow
//! Variational Bottleneck Injection (stage 1, distil the teacher's shallow
//! features through the rate-constrained bottleneck) and saliency-guided
//! distortion (stage 2), plus training a Swin teacher from scratch when no
//! pretrained one is at hand. Owns the data pipeline, the optimiser with its
//! saveable state, checkpoints that survive being killed, and the run loop.

mod config;
pub mod data;
pub mod distributed;
mod loss;
mod metrics;
pub mod npy;
pub mod optim;
pub mod run;
pub mod saliency;
mod state;
pub mod synthetic;

/// Why training could not go on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Dataset or file problems.
    #[error("{0}")]
    Data(String),
    /// An image could not be read or prepared.
    #[error(transparent)]
    Image(#[from] frankensplit_preprocess::Error),
    /// A model problem (weights, bundles).
    #[error(transparent)]
    Model(#[from] frankensplit_models::Error),
    /// A bundle or architecture problem.
    #[error(transparent)]
    Bundle(#[from] frankensplit_bundle::Error),
    /// A libtorch error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// The run configuration is wrong.
    #[error("{0}")]
    Config(String),
    /// A codec problem (building entropy tables).
    #[error(transparent)]
    Codec(#[from] frankensplit_codec::CodecError),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
