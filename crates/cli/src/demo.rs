//! `frankensplit demo`: the whole system on the built-in synthetic dataset,
//! from nothing: data, a teacher, compressors at three rates (stage 1 head
//! distillation + stage 2 saliency-guided), evaluation against JPEG and WebP,
//! the latency model, and the server and client over loopback. Each step is
//! one of the CLI's own commands, printed before it runs, so the demo doubles
//! as a tutorial; the run files it trains from are written next to the runs.
//! It also packs its bundles as `models/demo/` stores them (see
//! [`crate::builtin`]), which is how the committed demo models are made.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};
use frankensplit_models::Bundle;
use frankensplit_serve::{start, ServeConfig};
use frankensplit_train::run::{RunConfig, StageKind};
use tch::Device;

/// The run files of `configs/synthetic/`: the demo trains exactly these
/// recipes (with its own paths, and fewer steps under `--quick`).
const TEACHER_RUN: &str = include_str!("../../../configs/synthetic/teacher.toml");
const COMPRESSOR_RUN: &str = include_str!("../../../configs/synthetic/compressor-l0.2.toml");

/// Marks a directory as the demo's, so that a rerun may replace it.
const MARKER: &str = ".frankensplit-demo";

#[derive(Args)]
pub struct DemoArgs {
    /// Working directory for the data, run files, runs and reports; a
    /// previous demo's directory is replaced, any other must be empty.
    #[arg(short, long, default_value = "runs/demo")]
    output: PathBuf,
    /// A small version for tests (seconds): few images and steps, so its
    /// accuracies mean nothing.
    #[arg(long)]
    quick: bool,
    /// Rate weights λ, one compressor each.
    #[arg(long, value_delimiter = ',', default_value = "0.025,0.2,1.6")]
    lambdas: Vec<f64>,
    /// Where to train: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The sizes of one demo flavour.
struct Plan {
    train_per_class: usize,
    val_per_class: usize,
    /// Epochs of every stage; `None` keeps the run files'.
    epochs: Option<usize>,
    codecs: &'static str,
    latency_iterations: usize,
    loopback_images: usize,
}

const FULL: Plan = Plan {
    train_per_class: 500,
    val_per_class: 40,
    epochs: None,
    codecs: "jpeg:q=5,jpeg:q=20,jpeg:q=50,jpeg:q=90,webp:q=0,webp:q=20,webp:q=50,webp:q=90,png",
    latency_iterations: 10,
    loopback_images: 4,
};

const QUICK: Plan = Plan {
    train_per_class: 12,
    val_per_class: 3,
    epochs: Some(1),
    codecs: "jpeg:q=20,webp:q=20,png",
    latency_iterations: 2,
    loopback_images: 2,
};

/// Runs one `frankensplit` command line, echoed first.
fn step(args: &[String]) -> Result<()> {
    println!("\n$ frankensplit {}", shell_words(args));
    let cli = crate::Cli::try_parse_from(std::iter::once("frankensplit".to_string()).chain(args.iter().cloned()))
        .map_err(|e| anyhow::anyhow!("internal command line rejected: {e}"))?;
    crate::dispatch(cli.command)
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

/// Writes a run file for the demo: the embedded recipe with absolute paths
/// into `root`, the stages cut down when `epochs` is given.
fn write_run_file(
    template: &str,
    root: &Path,
    output: &str,
    lmbda: Option<f64>,
    epochs: Option<usize>,
    file: &Path,
) -> Result<PathBuf> {
    let mut config: RunConfig = toml::from_str(template).context("embedded run file")?;
    config.output = root.join("runs").join(output);
    config.data.train = root.join("data/train");
    config.data.val = root.join("data/val");
    if config.data.saliency.is_some() {
        config.data.saliency = Some(root.join("saliency"));
    }
    if config.teacher.weights.is_some() {
        config.teacher.weights = Some(root.join("runs/teacher/teacher.safetensors"));
    }
    for stage in &mut config.stages {
        if let Some(lmbda) = lmbda {
            if stage.kind != StageKind::Teacher {
                stage.lmbda = lmbda;
            }
        }
        if let Some(epochs) = epochs {
            stage.epochs = epochs;
        }
    }
    let text = format!(
        "# Written by `frankensplit demo` from configs/synthetic/; rerun with\n#   frankensplit train --config {}\n{}",
        file.display(),
        toml::to_string(&config).context("run file")?
    );
    std::fs::create_dir_all(file.parent().unwrap_or(root))?;
    frankensplit_edge::write_atomically(file, text.as_bytes())?;
    Ok(file.to_path_buf())
}

/// `l0.2`-style names.
fn lambda_name(lmbda: f64) -> String {
    format!("l{lmbda}")
}

pub fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let plan = if args.quick { &QUICK } else { &FULL };
    if args.lambdas.is_empty() || args.lambdas.iter().any(|l| !(l.is_finite() && *l > 0.0)) {
        bail!("--lambdas needs positive rate weights");
    }
    let root =
        std::path::absolute(&args.output).with_context(|| format!("cannot resolve {}", args.output.display()))?;
    prepare_output(&root)?;
    println!(
        "FrankenSplit demo{} in {}: synthetic data → teacher → {} compressors → evaluation → latency → server and client",
        if args.quick { " (--quick)" } else { "" },
        root.display(),
        args.lambdas.len()
    );

    step(&strings([
        "synth-data",
        "-o",
        &path_arg(&root.join("data")),
        "--size",
        "72",
        "--train-per-class",
        &plan.train_per_class.to_string(),
        "--val-per-class",
        &plan.val_per_class.to_string(),
    ]))?;

    let configs = root.join("configs");
    let teacher = write_run_file(
        TEACHER_RUN,
        &root,
        "teacher",
        None,
        plan.epochs,
        &configs.join("teacher.toml"),
    )?;
    step(&strings([
        "train",
        "--config",
        &path_arg(&teacher),
        "--device",
        &args.device,
    ]))?;

    let mut bundles = Vec::new();
    let mut packed = Vec::new();
    for &lmbda in &args.lambdas {
        let name = format!("compressor-{}", lambda_name(lmbda));
        let file = write_run_file(
            COMPRESSOR_RUN,
            &root,
            &name,
            Some(lmbda),
            plan.epochs,
            &configs.join(format!("{name}.toml")),
        )?;
        step(&strings([
            "train",
            "--config",
            &path_arg(&file),
            "--device",
            &args.device,
        ]))?;
        let bundle = root.join("runs").join(&name).join("bundle");
        packed.push((lambda_name(lmbda), bundle.clone()));
        bundles.push(bundle);
    }
    let models = root.join("models/demo");
    crate::builtin::pack(&packed, &models)?;

    let mut eval = strings(["eval"]);
    for bundle in &bundles {
        eval.extend(strings(["--model", &path_arg(bundle)]));
    }
    let results = root.join("results.md");
    let rate_plots = [root.join("rate-accuracy.png"), root.join("rate-accuracy.svg")];
    eval.extend(strings([
        "--data",
        &path_arg(&root.join("data/val")),
        "--codec",
        plan.codecs,
        "--int8-calibration",
        &path_arg(&root.join("data/train")),
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

    let middle = &bundles[bundles.len() / 2];
    let images = sample_images(&root.join("data/val"), plan.loopback_images)?;
    let latency_plots = [root.join("latency.png"), root.join("latency.svg")];
    let mut latency = strings([
        "latency",
        "--model",
        &path_arg(middle),
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

    loopback(middle, &images)?;

    println!(
        "\ndemo finished in {:.0} s. Rate vs accuracy (validation set, real entropy coding):\n",
        started.elapsed().as_secs_f64()
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
    ] {
        println!("  {what:<28} {}", path.display());
    }
    for bundle in &bundles {
        println!("  {:<28} {}", "bundle", bundle.display());
    }
    println!("  {:<28} {}", "run files", configs.display());
    println!(
        "  {:<28} {} (the committed models/demo/ layout)",
        "bundles, packed",
        models.display()
    );
    Ok(())
}

/// `n` validation images, one per class in turn.
fn sample_images(val: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let folder = frankensplit_train::data::ImageFolder::open(val)?;
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
        queue_capacity: 64,
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(30),
        top_k: 5,
        max_image_pixels: 4096 * 4096,
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
