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
    let cli = Cli::parse();
    if !matches!(cli.command, commands::Command::Serve(_)) {
        end_quietly_on_closed_pipes();
    }
    commands::dispatch(cli.command)
}

/// Rust starts programs with SIGPIPE ignored, so printing into a closed pipe
/// (`frankensplit info … | head -1`) panics; a command-line tool should end
/// quietly there, as `cat` does. The server keeps it ignored: a peer that
/// hangs up is an error its connection handles, not a reason to stop.
fn end_quietly_on_closed_pipes() {
    // SAFETY: restores one signal's default disposition, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
