//! `train` and `synth-data`: training runs and the built-in synthetic dataset.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use frankensplit_train::run::{train, RunConfig, TrainOptions};
use frankensplit_train::synthetic::{generate, SyntheticConfig, CLASSES};
use tch::Device;

#[derive(Args)]
pub struct TrainArgs {
    /// Run file (TOML: output, [data], [teacher], [compressor], [[stages]]); see configs/.
    #[arg(long)]
    config: PathBuf,
    /// Continue the run from its last checkpoint (same learning rate, data order and noise).
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Parses `cpu`, `cuda`, `cuda:N`, checking that CUDA is there.
pub fn parse_device(text: &str) -> Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown device {text:?}: cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(n) = device {
        if !tch::Cuda::is_available() {
            bail!(
                "CUDA is not available to this build: build with `--features cuda` and run where libtorch_cuda and a GPU are present"
            );
        }
        if n >= tch::Cuda::device_count() as usize {
            bail!("cuda:{n} does not exist ({} CUDA devices)", tch::Cuda::device_count());
        }
    }
    Ok(device)
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    let config = RunConfig::from_file(&args.config).with_context(|| format!("invalid run file {}", args.config.display()))?;
    let options = TrainOptions {
        resume: args.resume,
        device: parse_device(&args.device)?,
        progress: !args.quiet,
        stop_after_steps: None,
    };
    let summary = train(&config, &options)?;
    if let Some(teacher) = &summary.teacher {
        println!(
            "teacher: {} (best val top-1 {:.2} %)",
            teacher.display(),
            summary.progress.best_teacher_top1.unwrap_or(f64::NAN)
        );
    }
    if let Some(bundle) = &summary.bundle {
        println!(
            "compressor bundle: {} (best val top-1 {:.2} %); metrics in {}",
            bundle.display(),
            summary.progress.best_top1.unwrap_or(f64::NAN),
            config.output.join("metrics.jsonl").display()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory (train/ and val/ ImageFolders).
    #[arg(short, long)]
    output: PathBuf,
    /// Number of classes (at most 10).
    #[arg(long, default_value_t = CLASSES.len())]
    classes: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 100)]
    train_per_class: usize,
    /// Validation images per class.
    #[arg(long, default_value_t = 20)]
    val_per_class: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 96)]
    size: u32,
    /// Seed (same seed, same images).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write JPEG (quality 90) instead of PNG.
    #[arg(long)]
    jpeg: bool,
}

pub fn run_synth(args: SynthArgs) -> Result<()> {
    let config = SyntheticConfig {
        classes: args.classes,
        train_per_class: args.train_per_class,
        val_per_class: args.val_per_class,
        size: args.size,
        seed: args.seed,
        jpeg: args.jpeg,
    };
    let written = generate(&args.output, &config)?;
    println!(
        "wrote {written} images of {} classes to {}/{{train,val}}",
        args.classes,
        args.output.display()
    );
    Ok(())
}
