//! Why a bundle could not be read or written.

use std::path::PathBuf;

use thiserror::Error;

/// Why a bundle could not be read or written, with a message that says what to fix.
#[derive(Debug, Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        /// What was tried: "read", "write".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the system said (in the message, not chained, so it shows once).
        error: std::io::Error,
    },
    /// The entropy tables do not make a coder.
    #[error(transparent)]
    Codec(#[from] frankensplit_codec::CodecError),
    /// Anything else about the bundle: its manifest, architecture or tensors.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn read(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            action: "read",
            path: path.into(),
            error,
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            action: "write",
            path: path.into(),
            error,
        }
    }
}

/// Result alias for bundle operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
