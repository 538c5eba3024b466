//! `frankensplit-edge`: the device-side program: encode, calibrate, inspect,
//! bench, and with the `client` feature send.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "frankensplit-edge",
    version,
    about = "FrankenSplit on the device: images to compact payloads for a frankensplit server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Encode images into payload files and report bytes, bpp and encode time.
    Encode(frankensplit_edge::EncodeArgs),
    /// Measure g_a's value ranges on a few images, for `encode --int8`.
    Calibrate(frankensplit_edge::CalibrateArgs),
    /// Print the header of payload files; with --model, decode them: symbols (.npy), per-channel stats, the raw CompressAI string.
    Inspect(frankensplit_edge::InspectArgs),
    /// Time the encoder (each step: as written, folded, + Winograd, int8) and the entropy coder on this device.
    Bench(frankensplit_edge::bench::BenchArgs),
    /// Send images to a `frankensplit serve`: encoded here (split mode) or
    /// compressed with an image codec (the offloading baseline); prints the
    /// answers and the latency per request.
    #[cfg(feature = "client")]
    Send(frankensplit_edge::client::ClientArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Encode(args) => frankensplit_edge::run_encode(args),
        Command::Calibrate(args) => frankensplit_edge::run_calibrate(args),
        Command::Inspect(args) => frankensplit_edge::run_inspect(args),
        Command::Bench(args) => frankensplit_edge::bench::run_bench(args),
        #[cfg(feature = "client")]
        Command::Send(args) => frankensplit_edge::client::run_client(args),
    }
}
