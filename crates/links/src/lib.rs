//! Emulated network links for latency measurements (`frankensplit bench
//! links`): a client and a server in network namespaces of their own,
//! joined through a router namespace ([`Testbed`]). The kernel's `tbf`
//! qdiscs set each direction's rate; a packet stage on a TUN device in the
//! router ([`DelayStage`]) adds the round trip and the loss, which this
//! kernel's missing `netem` would otherwise give. Both ends run the kernel's
//! own TCP, so slow start, congestion control and retransmission are real.

pub mod model;
mod stage;
mod testbed;

pub use stage::{DelayStage, StageCounts, StageSettings};
pub use testbed::{unavailable, LinkSettings, Testbed, CLIENT_ADDR, SERVER_ADDR};

/// What can go wrong setting up or running a link.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system command failed.
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    /// The delay and loss stage failed.
    #[error("link stage: {0}")]
    Stage(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
