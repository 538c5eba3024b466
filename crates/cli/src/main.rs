//! The `frankensplit` command line: model bundles (convert, classify, info),
//! the inference server, payload inspection, and benchmarks.

mod bench;
mod edge;
mod models;
mod serve;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use frankensplit_codec::Payload;

#[derive(Parser)]
#[command(
    name = "frankensplit",
    version,
    about = "FrankenSplit split inference: saliency-guided neural feature compression"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a model bundle from a reference (PyTorch) checkpoint.
    Convert(models::ConvertArgs),
    /// Classify images through the whole split pipeline (encode, entropy-code,
    /// decode, backbone tail) and print the top classes.
    Classify(models::ClassifyArgs),
    /// Describe a model bundle: fingerprint, latent, parameter counts.
    Info(models::InfoArgs),
    /// Edge side: encode images into payload files.
    Encode(edge::EncodeArgs),
    /// Serve split inference over HTTP: POST payloads to /v1/classify.
    Serve(serve::ServeArgs),
    /// Edge side against a server: encode, send, print predictions and a
    /// latency breakdown (edge, network, server); --repeat/--concurrency for load runs.
    Client(edge::ClientArgs),
    /// Measure performance; see `frankensplit bench codec --help`.
    Bench {
        #[command(subcommand)]
        target: bench::Target,
    },
    /// Print the header of a FrankenSplit payload file (model fingerprint,
    /// latent shape, string size and bits per 224×224 input pixel).
    Inspect {
        /// Payload files written by the edge encoder.
        #[arg(required = true)]
        payloads: Vec<PathBuf>,
        /// Print one JSON object per payload instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Convert(args) => models::run_convert(args),
        Command::Classify(args) => models::run_classify(args),
        Command::Info(args) => models::run_info(args),
        Command::Encode(args) => edge::run_encode(args),
        Command::Serve(args) => serve::run(args),
        Command::Client(args) => edge::run_client(args),
        Command::Bench { target } => bench::run(target),
        Command::Inspect { payloads, json } => {
            for path in payloads {
                let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                let payload =
                    Payload::parse(&bytes).with_context(|| format!("{} is not a valid payload", path.display()))?;
                let header = bytes.len() - payload.string.len();
                let bpp = bytes.len() as f64 * 8.0 / (224.0 * 224.0);
                if json {
                    let line = serde_json::json!({
                        "path": path,
                        "fingerprint": payload.fingerprint.to_string(),
                        "shape": payload.shape,
                        "string_bytes": payload.string.len(),
                        "header_bytes": header,
                        "total_bytes": bytes.len(),
                        "bpp_224": bpp,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{}: model {} latent {} string {} B + header {} B = {} B ({bpp:.4} bpp at 224×224)",
                        path.display(),
                        payload.fingerprint,
                        payload.shape,
                        payload.string.len(),
                        header,
                        bytes.len()
                    );
                }
            }
            Ok(())
        }
    }
}
