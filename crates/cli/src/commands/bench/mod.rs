//! `frankensplit bench`: its targets with their flags, and the timing they
//! share ([`time`]). `codec` times the entropy coder ([`codec`]), `edge` the
//! device's encoder g_a and coding against libtorch ([`edge`]), `links`
//! split inference and offloading over emulated links ([`links`]).

mod codec;
mod edge;
mod links;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;
use frankensplit_codec::LatentShape;

#[derive(Subcommand)]
pub enum Target {
    /// Entropy coding of a 48×28×28 latent (FrankenSplit at 224×224) with a
    /// synthetic 48-channel factorized prior: median time to compress
    /// (quantise + rANS) and decompress (rANS + dequantise), and symbols/s.
    Codec {
        /// Timed repetitions of each direction.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Untimed repetitions before timing.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        /// Latent shape as C,H,W.
        #[arg(long, default_value = "48,28,28", value_parser = codec::parse_shape)]
        shape: LatentShape,
        /// Write the tables, latent and our string as JSON, for the CompressAI
        /// comparison script to time CompressAI on the very same case.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The edge encoder g_a plus entropy coding at batch 1: ours (no
    /// libtorch) against libtorch 2.11's eager kernels on the same weights
    /// and input, and the machine's peak from a large sgemm.
    Edge {
        /// Bundle to take g_a and the entropy tables from; default: the
        /// reference's encoder (3 → 48 → 64 → 48, 224²) with random weights.
        #[arg(long, value_parser = crate::builtin::parse_model)]
        model: Option<PathBuf>,
        /// Timed runs of each method.
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        /// Untimed runs before timing.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Threads for ours (split over output rows) and libtorch's intra-op threads.
        #[arg(long, default_value_t = 1)]
        threads: i32,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Split inference against image offloading over emulated links: server
    /// and client in network namespaces joined by kernel-shaped veths, with
    /// a packet stage for round trip and loss; measured latency per link
    /// profile, loss rate and method beside the link model's. Needs root,
    /// iproute2 and /dev/net/tun (says so and exits 0 without them).
    Links(links::LinksArgs),
}

pub fn run(target: Target) -> Result<()> {
    match target {
        Target::Codec {
            iterations,
            warmup,
            shape,
            export,
            json,
        } => codec::run(iterations, warmup, shape, export, json),
        Target::Edge {
            model,
            iterations,
            warmup,
            threads,
            json,
        } => edge::run(model, iterations, warmup, threads, json),
        Target::Links(args) => links::run(args),
    }
}

/// Median wall time of `iterations` calls after `warmup` untimed ones.
fn time(warmup: usize, iterations: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..warmup {
        f();
    }
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}
