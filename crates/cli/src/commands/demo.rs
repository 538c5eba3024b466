//! `frankensplit demo`: the whole system on the built-in scenes benchmark,
//! with no download: a freshly generated test set (a seed no training or
//! tuning used), the built-in trained compressors evaluated on it against
//! JPEG, WebP and PNG (top-1 with bootstrap intervals, and the mean byte
//! ratio at equal accuracy), one small compressor trained for a minute to
//! show the training path (stage 1 head distillation + stage 2
//! saliency-guided, against the built-in teacher), the latency model, and
//! the server and client over loopback. Each step is one of the CLI's own
//! commands, printed before it runs, so the demo doubles as a tutorial; the
//! run file it trains from is written next to the run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use frankensplit_models::Bundle;
use frankensplit_serve::{start, ServeConfig};
use frankensplit_train::run::RunConfig;
use tch::Device;

/// The recipe of the built-in compressors (`configs/scenes/`): the demo's
/// one-minute run trains it with fewer images.
const COMPRESSOR_RUN: &str = include_str!("../../../../configs/scenes/compressor-l0.64.toml");

/// The seed of the demo's test set: used by no training or tuning run (the
/// validation set is seed 0, the training streams seeds 1 and 2).
pub const TEST_SEED: u64 = 7;

/// Marks a directory as the demo's, so that a rerun may replace it.
const MARKER: &str = ".frankensplit-demo";

#[derive(Args)]
pub struct DemoArgs {
    /// Working directory for the data, run file, run and reports; a
    /// previous demo's directory is replaced, any other must be empty.
    #[arg(short, long, default_value = "runs/demo")]
    output: PathBuf,
    /// A small version for tests (seconds): few images and steps, so its
    /// accuracies mean nothing.
    #[arg(long)]
    quick: bool,
    /// Seed of the generated test set (the default is the one docs/results.md reports).
    #[arg(long, default_value_t = TEST_SEED)]
    seed: u64,
    /// Test images per class (10 classes); default 100, or 3 with --quick.
    #[arg(long)]
    test_per_class: Option<usize>,
    /// Where to train: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The sizes of one demo flavour.
struct Plan {
    test_per_class: usize,
    val_per_class: usize,
    /// Images of the one-minute run's stream per epoch (one epoch a stage).
    train_images: usize,
    codecs: &'static str,
    latency_iterations: usize,
    loopback_images: usize,
}

const FULL: Plan = Plan {
    test_per_class: 100,
    val_per_class: 20,
    train_images: 2048,
    codecs: "jpeg:q=1,jpeg:q=5,jpeg:q=10,jpeg:q=20,jpeg:q=40,jpeg:q=70,jpeg:q=90,\
             webp:q=0,webp:q=5,webp:q=10,webp:q=20,webp:q=40,webp:q=70,webp:q=90,png",
    latency_iterations: 10,
    loopback_images: 4,
};

const QUICK: Plan = Plan {
    test_per_class: 3,
    val_per_class: 1,
    train_images: 16,
    codecs: "jpeg:q=20,webp:q=5,webp:q=50,png",
    latency_iterations: 2,
    loopback_images: 2,
};

/// Runs one `frankensplit` command line, echoed first.
fn step(args: &[String]) -> Result<()> {
    println!("\n$ frankensplit {}", shell_words(args));
    let cli = crate::Cli::try_parse_from(std::iter::once("frankensplit".to_string()).chain(args.iter().cloned()))
        .map_err(|e| anyhow::anyhow!("internal command line rejected: {e}"))?;
    super::dispatch(cli.command)
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains([' ', '\'', '"', '$', '*']) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn strings<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

/// Empties `dir` if it holds a previous demo; refuses anything else that is not empty.
fn prepare_output(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        if !empty {
            if !dir.join(MARKER).exists() {
                bail!(
                    "{} exists and is not a previous demo's directory; pass another --output or empty it",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "made by `frankensplit demo`; a rerun replaces this directory\n",
    )?;
    Ok(())
}

/// Writes the demo's one-minute run file: the built-in recipe against the
/// built-in teacher (`teacher_weights`), `images` stream images an epoch,
/// one epoch a stage, validated on `root/data/val`.
fn write_run_file(root: &Path, teacher_weights: &Path, images: usize, file: &Path) -> Result<PathBuf> {
    let mut config: RunConfig = toml::from_str(COMPRESSOR_RUN).context("embedded run file")?;
    config.output = root.join("runs/compressor");
    config.data.val = root.join("data/val");
    config.teacher.weights = Some(teacher_weights.to_path_buf());
    let stream = config
        .data
        .generate
        .as_mut()
        .context("the embedded recipe trains from the generator")?;
    stream.per_epoch = images;
    for stage in &mut config.stages {
        stage.epochs = 1;
        stage.warmup = stage.warmup.min(images / stage.batch_size / 4);
    }
    let text = format!(
        "# Written by `frankensplit demo` from configs/scenes/ (one epoch a stage of {images} images); rerun with\n#   frankensplit train --config {}\n{}",
        file.display(),
        toml::to_string(&config).context("run file")?
    );
    std::fs::create_dir_all(file.parent().unwrap_or(root))?;
    frankensplit_edge::write_atomically(file, text.as_bytes())?;
    Ok(file.to_path_buf())
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let plan = if args.quick { &QUICK } else { &FULL };
    let test_per_class = args.test_per_class.unwrap_or(plan.test_per_class);
    if test_per_class == 0 {
        bail!("--test-per-class must be at least 1");
    }
    let root =
        std::path::absolute(&args.output).with_context(|| format!("cannot resolve {}", args.output.display()))?;
    prepare_output(&root)?;
    let models = crate::builtin::names();
    println!(
        "FrankenSplit demo{} in {}: fresh test set (seed {}) → {} built-in compressors against JPEG, WebP and PNG → a compressor trained for a minute → latency → server and client",
        if args.quick { " (--quick)" } else { "" },
        root.display(),
        args.seed,
        models.len()
    );

    let data = root.join("data");
    step(&strings([
        "synth-data",
        "-o",
        &path_arg(&data),
        "--seed",
        &args.seed.to_string(),
        "--train-per-class",
        "0",
        "--val-per-class",
        &plan.val_per_class.to_string(),
        "--test-per-class",
        &test_per_class.to_string(),
    ]))?;

    let mut eval = strings(["eval"]);
    for name in &models {
        eval.extend(strings(["--model", name]));
    }
    let results = root.join("results.md");
    let rate_plots = [root.join("rate-accuracy.png"), root.join("rate-accuracy.svg")];
    eval.extend(strings([
        "--data",
        &path_arg(&data.join("test")),
        "--codec",
        &plan.codecs.split_whitespace().collect::<String>(),
        "--int8-calibration",
        &path_arg(&data.join("val")),
        "--report",
        &path_arg(&results),
        "--report",
        &path_arg(&root.join("results.json")),
        "--plot",
        &path_arg(&rate_plots[0]),
        "--plot",
        &path_arg(&rate_plots[1]),
    ]));
    step(&eval)?;

    let middle = crate::builtin::model_path(Path::new("demo"))?;
    let run_file = write_run_file(
        &root,
        &middle.join(frankensplit_bundle::WEIGHTS),
        plan.train_images,
        &root.join("configs/compressor.toml"),
    )?;
    step(&strings([
        "train",
        "--config",
        &path_arg(&run_file),
        "--device",
        &args.device,
    ]))?;

    let images = sample_images(&data.join("test"), plan.loopback_images)?;
    let latency_plots = [root.join("latency.png"), root.join("latency.svg")];
    let mut latency = strings([
        "latency",
        "--model",
        "demo",
        "--codec",
        "jpeg:q=50,webp:q=50,png",
        "--iterations",
        &plan.latency_iterations.to_string(),
        "--plot",
        &path_arg(&latency_plots[0]),
        "--plot",
        &path_arg(&latency_plots[1]),
    ]);
    latency.extend(images.iter().map(|p| path_arg(p)));
    step(&latency)?;

    loopback(&middle, &images)?;

    println!(
        "\ndemo finished in {:.0} s. Rate vs accuracy on the {} test images (real entropy coding; 95 % bootstrap intervals):\n",
        started.elapsed().as_secs_f64(),
        10 * test_per_class
    );
    print!("{}", std::fs::read_to_string(&results)?);
    println!("\nfiles:");
    for (what, path) in [
        ("table", results),
        ("results (JSON)", root.join("results.json")),
        ("accuracy vs bpp", rate_plots[0].clone()),
        ("accuracy vs bpp (SVG)", rate_plots[1].clone()),
        ("latency vs bandwidth", latency_plots[0].clone()),
        ("latency vs bandwidth (SVG)", latency_plots[1].clone()),
        ("one-minute compressor", root.join("runs/compressor/bundle")),
        ("its run file", run_file),
    ] {
        println!("  {what:<28} {}", path.display());
    }
    Ok(())
}

/// `n` images of an ImageFolder, one per class in turn.
fn sample_images(folder: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let folder = frankensplit_train::data::ImageFolder::open(folder)?;
    let classes = folder.classes.len() as i64;
    let mut picked = Vec::new();
    for class in 0..classes {
        if let Some((path, _)) = folder.samples.iter().find(|(_, l)| *l == class) {
            picked.push(path.clone());
        }
        if picked.len() == n {
            break;
        }
    }
    Ok(picked)
}

/// Serves `bundle` on a loopback port in this process and runs the client
/// against it, in split mode and sending WebP images.
fn loopback(bundle_dir: &Path, images: &[PathBuf]) -> Result<()> {
    let bundle =
        Bundle::open(bundle_dir, Device::Cpu).with_context(|| format!("cannot load model {}", bundle_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = ServeConfig {
        max_batch: 8,
        batch_wait: Duration::from_millis(2),
        request_timeout: Duration::from_secs(30),
        ..ServeConfig::default()
    };
    let server = runtime.block_on(start(
        bundle,
        "127.0.0.1:0".parse().expect("loopback address"),
        config,
        async {
            let _ = stopped.await;
        },
    ))?;
    let url = format!("http://{}", server.addr);
    println!("\nserving {} on {url} for the client below", bundle_dir.display());
    let mut result = Ok(());
    for mode in [&["--mode", "split"][..], &["--mode", "webp", "--quality", "50"][..]] {
        let mut client = strings(["client", "--server", &url, "--model", &path_arg(bundle_dir)]);
        client.extend(strings(mode.iter().copied()));
        client.extend(images.iter().map(|p| path_arg(p)));
        result = step(&client);
        if result.is_err() {
            break;
        }
    }
    let _ = stop.send(());
    runtime
        .block_on(server.done)
        .context("server task failed")?
        .context("server failed")?;
    result
}
