//! The `frankensplit` commands: [`Command`] lists them (its doc comments are
//! their `--help` text) and [`dispatch`] runs one. Each command's flags and
//! work live in its own file here; `encode`, `client` and `inspect` are the
//! device crate's (`frankensplit-edge`), with `--model` resolving the
//! built-in models first.

mod bench;
mod bundle;
mod demo;
mod eval;
mod export_onnx;
mod latency;
mod pack_models;
mod placement;
mod serve;
mod train;

use anyhow::Result;
use clap::Subcommand;

use crate::builtin;

#[derive(Subcommand)]
pub enum Command {
    /// The whole system in minutes on the built-in scenes benchmark: the
    /// built-in compressors against JPEG, WebP and PNG on a fresh test set
    /// (byte ratio at equal top-1, bootstrap intervals), a compressor trained
    /// for a minute, the latency model, and classification over loopback
    /// HTTP (the default job).
    Demo(demo::DemoArgs),
    /// Build a model bundle from a reference (PyTorch) checkpoint.
    Convert(bundle::ConvertArgs),
    /// Classify images through the whole split pipeline (encode on the
    /// device's kernels, entropy-code, decode, backbone tail) and print the
    /// top classes.
    Classify(bundle::ClassifyArgs),
    /// Describe a model bundle: fingerprint, latent, parameter counts, the
    /// backbones it serves.
    Info(bundle::InfoArgs),
    /// Join bundles that share one edge encoder into one bundle serving all
    /// their backbones from the same payloads (`serve` then answers
    /// `/v1/classify?backbone=NAME` or `?backbone=all`).
    Merge(bundle::MergeArgs),
    /// Edge side: encode images into payload files.
    Encode(frankensplit_edge::EncodeArgs),
    /// Serve split inference over HTTP: POST payloads to /v1/classify, whole
    /// images to /v1/classify-image (the offloading baseline).
    Serve(serve::ServeArgs),
    /// Edge side against a server: encode (or compress the image with
    /// --mode jpeg|png|webp), send, print predictions and a latency breakdown
    /// (edge, network, server); --throttle paces uploads; --repeat/--concurrency for load runs.
    Client(frankensplit_edge::client::ClientArgs),
    /// End-to-end latency of split inference vs offloading the image, per
    /// network link (BLE, 3G, LTE, 5G, Wi-Fi or --bandwidth/--rtt), from
    /// edge and server times measured here; --plot draws it against bandwidth.
    Latency(latency::LatencyArgs),
    /// Train a compressor (stage 1 head distillation, stage 2 saliency-guided)
    /// or a teacher, from a run file; --resume continues a killed run.
    Train(train::TrainArgs),
    /// XGradCAM saliency maps of a dataset from a teacher, as the reference's
    /// stage 2 needs them (one .npy per image; resumable).
    Saliency(train::SaliencyArgs),
    /// Write the built-in scenes benchmark as ImageFolders (train, val,
    /// test; no download needed).
    SynthData(train::SynthArgs),
    /// Store bundles trained against one teacher in the layout of the
    /// built-in models (models/demo/: the backbone once, then per model its
    /// manifest and compressor), for rebuilding the binary with them.
    PackModels(pack_models::PackArgs),
    /// Rate vs accuracy of bundles (real entropy coding) against JPEG/WebP/PNG
    /// offloading on an ImageFolder: table, JSON, plot.
    Eval(eval::EvalArgs),
    /// Write a bundle's part (encoder, decoder or backbone tail) as an ONNX
    /// graph for other runtimes; --check-data and tools/onnx/check_parts.py check it.
    ExportOnnx(export_onnx::ExportArgs),
    /// Measure performance; see `frankensplit bench codec --help`.
    Bench {
        #[command(subcommand)]
        target: bench::Target,
    },
    /// Print the header of a FrankenSplit payload file (model fingerprint,
    /// latent shape, string size and bits per pixel of the 8×-larger input);
    /// with --model, decode it: its symbols as .npy (--symbols), per-channel
    /// bits, entropy and escapes (--stats), the raw CompressAI string
    /// (--raw); raw CompressAI strings are read with --shape.
    Inspect(frankensplit_edge::InspectArgs),
}

/// Runs `command`.
pub fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Demo(args) => demo::run(args),
        Command::Convert(args) => bundle::run_convert(args),
        Command::Classify(args) => bundle::run_classify(args),
        Command::Info(args) => bundle::run_info(args),
        Command::Merge(args) => bundle::run_merge(args),
        Command::Encode(mut args) => {
            args.model = builtin::model_path(&args.model)?;
            frankensplit_edge::run_encode(args)
        }
        Command::Serve(args) => serve::run(args),
        Command::Client(mut args) => {
            args.model = args.model.as_deref().map(builtin::model_path).transpose()?;
            frankensplit_edge::client::run_client(args)
        }
        Command::Latency(args) => latency::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Train(args) => train::run_train(args),
        Command::SynthData(args) => train::run_synth(args),
        Command::PackModels(args) => pack_models::run(args),
        Command::Saliency(args) => train::run_saliency(args),
        Command::ExportOnnx(args) => export_onnx::run(args),
        Command::Bench { target } => bench::run(target),
        Command::Inspect(mut args) => {
            args.model = args.model.as_deref().map(builtin::model_path).transpose()?;
            frankensplit_edge::run_inspect(args)
        }
    }
}
