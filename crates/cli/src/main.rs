//! The `frankensplit` command line: the demo, model bundles (convert,
//! classify, info), training, evaluation, the inference server and its
//! client, payload inspection, and benchmarks. This file parses the command
//! line and hands the command to [`commands::dispatch`]; each command lives
//! in its own file under `commands/`.

mod builtin;
mod commands;
mod plot;
mod stats;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "frankensplit",
    version,
    about = "FrankenSplit split inference: saliency-guided neural feature compression"
)]
struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

fn main() -> Result<()> {
    commands::dispatch(Cli::parse().command)
}
