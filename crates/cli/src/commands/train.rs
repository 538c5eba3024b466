//! `train`, `saliency` and `synth-data`: training runs, the saliency maps
//! stage 2 trains with, and the built-in synthetic dataset.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_models::parse_device;
use frankensplit_train::run::{train, Keep, RunConfig, TrainOptions};
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
    /// cpu, cuda (= cuda:0) or cuda:N (CUDA needs a build with --features cuda and a GPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run_train(args: TrainArgs) -> Result<()> {
    let config =
        RunConfig::from_file(&args.config).with_context(|| format!("invalid run file {}", args.config.display()))?;
    let options = TrainOptions {
        resume: args.resume,
        device: args.device,
        progress: !args.quiet,
        stop_after_steps: None,
    };
    let summary = train(&config, &options)?;
    let kept = match config.keep {
        Keep::Best => "the best epoch",
        Keep::Last => "the last epoch",
    };
    if let Some(teacher) = &summary.teacher {
        println!(
            "teacher: {} ({kept}; best val top-1 {:.2} %)",
            teacher.display(),
            summary.progress.best_teacher_top1.unwrap_or(f64::NAN)
        );
    }
    if let Some(bundle) = &summary.bundle {
        println!(
            "compressor bundle: {} ({kept}; best val top-1 {:.2} %); metrics in {}",
            bundle.display(),
            summary.progress.best_top1.unwrap_or(f64::NAN),
            config.output.join("metrics.jsonl").display()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory (train/, val/ and test/ ImageFolders).
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
    /// Test images per class (generate the test set with a seed that no
    /// training or tuning used).
    #[arg(long, default_value_t = 0)]
    test_per_class: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 112)]
    size: u32,
    /// Seed (same seed, same images; train, val and test images of one seed are unrelated).
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
        test_per_class: args.test_per_class,
        size: args.size,
        seed: args.seed,
        jpeg: args.jpeg,
    };
    let written = generate(&args.output, &config)?;
    let splits: Vec<&str> = [
        ("train", args.train_per_class),
        ("val", args.val_per_class),
        ("test", args.test_per_class),
    ]
    .into_iter()
    .filter_map(|(name, n)| (n > 0).then_some(name))
    .collect();
    println!(
        "wrote {written} images of {} classes to {}/{{{}}}",
        args.classes,
        args.output.display(),
        splits.join(",")
    );
    Ok(())
}

#[derive(Args)]
pub struct SaliencyArgs {
    /// The teacher: a bundle directory holding the whole backbone, or a
    /// timm weights file (.safetensors/.pth) of the --backbone preset.
    #[arg(long)]
    teacher: PathBuf,
    /// Backbone preset when --teacher is a weights file.
    #[arg(long, default_value = "swin_s3_base_224")]
    backbone: String,
    /// ImageFolder to compute maps for (class folders of images).
    #[arg(long)]
    data: PathBuf,
    /// Output directory: one .npy per image, mirroring the data's tree.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write heat-map overlays (PNG) here.
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Stages whose last block's norm1 is read (the reference: 1,2,3).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    stages: Vec<usize>,
    /// Plain XGradCAM (channel sums) instead of the reference's eigen-smoothing.
    #[arg(long)]
    no_eigen_smooth: bool,
    /// Side of the maps; default: the latent grid (input / 8, 28 at 224²).
    #[arg(long)]
    side: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Data-loading threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// cpu, cuda (= cuda:0) or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

pub fn run_saliency(args: SaliencyArgs) -> Result<()> {
    use frankensplit_models::weights::{load_into, select};
    use frankensplit_models::{Backbone, BackboneConfig, Bundle};
    use frankensplit_train::saliency::{generate_maps, MapsConfig, SplitBackbone};

    let device = args.device;
    let dataset = frankensplit_train::data::ImageFolder::open(&args.data)?;
    let maps = |config: &BackboneConfig| MapsConfig {
        stages: args.stages.clone(),
        eigen_smooth: !args.no_eigen_smooth,
        side: args.side.unwrap_or(config.img_size() as usize / 8),
        batch_size: args.batch_size,
        workers: args.workers,
        progress: true,
        overlay: args.overlay.clone(),
    };
    let written = if args.teacher.is_dir() {
        let bundle = Bundle::open(&args.teacher, device)
            .with_context(|| format!("cannot load teacher {}", args.teacher.display()))?;
        let head = bundle.backbone_head.as_ref().with_context(|| {
            format!(
                "{} holds only the backbone after the split; saliency needs the whole backbone",
                args.teacher.display()
            )
        })?;
        let config = bundle.manifest.architecture.backbone.clone();
        let backbone = SplitBackbone {
            head,
            tail: &bundle.backbone,
        };
        generate_maps(
            &backbone,
            &dataset,
            &bundle.manifest.preprocess,
            &args.output,
            &maps(&config),
            device,
        )?
    } else {
        let config = BackboneConfig::preset(&args.backbone).with_context(|| {
            format!(
                "unknown backbone {:?}; presets: {}",
                args.backbone,
                BackboneConfig::preset_names().join(", ")
            )
        })?;
        let mut vars = tch::nn::VarStore::new(device);
        let head = Backbone::new(&vars.root(), &config, 0..1);
        let tail = Backbone::new(&vars.root(), &config, 1..config.num_stages());
        let tensors = frankensplit_models::convert::read_state_dict(&args.teacher, Default::default())?;
        load_into(&mut vars, select(tensors, "", None))
            .with_context(|| format!("{} does not fit {}", args.teacher.display(), args.backbone))?;
        let preprocess = frankensplit_preprocess::Preprocess::for_input(config.img_size() as u32);
        let backbone = SplitBackbone {
            head: &head,
            tail: &tail,
        };
        generate_maps(&backbone, &dataset, &preprocess, &args.output, &maps(&config), device)?
    };
    println!(
        "wrote {written} saliency maps to {} ({} already there)",
        args.output.display(),
        dataset.len() - written
    );
    Ok(())
}
