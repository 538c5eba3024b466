//! `convert`, `classify` and `info`: model bundles from the command line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use frankensplit_api::Prediction;
use frankensplit_codec::LikelihoodFormula;
use frankensplit_edge::{for_each_image, write_atomically, EdgeModel};
use frankensplit_models::convert::{convert, ConvertOptions};
use frankensplit_models::{Architecture, Bundle};
use frankensplit_preprocess::RgbImage;
use serde::Serialize;
use tch::{Device, Kind};

use super::placement::Placement;

/// Which CompressAI pmf formula rebuilt tables follow.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Formula {
    /// CompressAI ≥ 1.2.5.
    Direct,
    /// CompressAI ≤ 1.2.4 (the reference pins 1.2.2).
    SignFlipped,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Reference checkpoint: torch.save file (.pt/.pth/.ckpt; torchdistill's
    /// `model` entry is used when present) or .safetensors, original key names.
    #[arg(long)]
    checkpoint: PathBuf,
    /// timm weights of the whole backbone (.pth or .safetensors, timm 0.8 or
    /// ≥ 0.9 layout): needed when the checkpoint has no backbone.* keys, and
    /// the source of the stages before the split, which let the server
    /// classify whole images (/v1/classify-image, the offloading baseline).
    #[arg(long)]
    backbone_weights: Option<PathBuf>,
    /// Store only the backbone after the split, even when the whole backbone
    /// is at hand (smaller bundle; no image classification).
    #[arg(long)]
    tail_only: bool,
    /// Architecture file (TOML with [compressor], [backbone] and split_stage);
    /// default: the reference's compressor with swin_s3_base_224.
    #[arg(long)]
    arch: Option<PathBuf>,
    /// Backbone preset when no --arch is given.
    #[arg(long, default_value = "swin_s3_base_224")]
    backbone: String,
    /// pmf formula for rebuilding the entropy tables when the checkpoint has
    /// none; default: sign-flipped for CompressAI ≤ 1.2.6 names, else direct.
    #[arg(long, value_enum)]
    likelihood_formula: Option<Formula>,
    /// Class names, one per line, in class-index order.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Output bundle directory. An existing bundle there is replaced in one
    /// step (a crash leaves the old or the new); a directory holding anything
    /// else is refused unless --force.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace the output even when it is not a bundle directory.
    #[arg(long)]
    force: bool,
    /// Most bytes of tensor data the checkpoint may make the reader load (the
    /// file is untrusted input: a few compressed bytes can declare terabytes).
    #[arg(long, default_value_t = frankensplit_models::convert::CheckpointLimits::default().max_data_bytes, value_name = "BYTES")]
    max_checkpoint_bytes: u64,
}

pub fn run_convert(args: ConvertArgs) -> Result<()> {
    let architecture = match &args.arch {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Architecture::from_toml(&text)
                .with_context(|| format!("{} is not a valid architecture file", path.display()))?
        }
        None => {
            let backbone = frankensplit_models::SwinConfig::preset(&args.backbone).with_context(|| {
                format!(
                    "unknown backbone {:?}; presets: {}",
                    args.backbone,
                    frankensplit_models::SwinConfig::PRESETS.join(", ")
                )
            })?;
            Architecture {
                backbone: frankensplit_models::BackboneConfig::Swin(backbone),
                ..Architecture::default()
            }
        }
    };
    let labels = match &args.labels {
        Some(path) => read_labels(path)?,
        None => Vec::new(),
    };
    let options = ConvertOptions {
        checkpoint: args.checkpoint.clone(),
        backbone_weights: args.backbone_weights.clone(),
        tail_only: args.tail_only,
        architecture,
        likelihood_formula: args.likelihood_formula.map(|f| match f {
            Formula::Direct => LikelihoodFormula::Direct,
            Formula::SignFlipped => LikelihoodFormula::SignFlipped,
        }),
        labels,
        checkpoint_limits: frankensplit_models::convert::CheckpointLimits {
            max_data_bytes: args.max_checkpoint_bytes,
        },
        force: args.force,
    };
    let report = convert(&options, &args.output)?;
    println!(
        "wrote {} (model {}, {} tensors read, entropy tables {:?}, pmf formula {:?}, {})",
        args.output.display(),
        report.fingerprint,
        report.tensors_read,
        report.tables,
        report.likelihood_formula,
        if report.backbone_head {
            "whole backbone: images can be classified too"
        } else {
            "backbone after the split only"
        }
    );
    Ok(())
}

fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

#[derive(Args)]
pub struct ClassifyArgs {
    /// Model bundle directory (from `frankensplit convert` or training).
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Images (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[command(flatten)]
    placement: Placement,
    /// Classes to report per image.
    #[arg(long, default_value_t = 5)]
    top_k: i64,
    /// Print one JSON object per image, with the logits.
    #[arg(long)]
    json: bool,
    /// Also write each image's payload to DIR/<image stem>.fsp.
    #[arg(long, value_name = "DIR")]
    save_payloads: Option<PathBuf>,
    /// Which backbone of a bundle that serves several classifies (its
    /// first by default; `frankensplit info` lists them).
    #[arg(long, value_name = "NAME")]
    backbone: Option<String>,
}

#[derive(Serialize)]
struct ClassifyReport {
    image: PathBuf,
    model: String,
    payload_bytes: usize,
    bpp: f64,
    encode_ms: f64,
    decode_and_classify_ms: f64,
    top_k: Vec<Prediction>,
    logits: Vec<f32>,
}

/// Runs the whole split pipeline locally: preprocess, encode, entropy-code
/// to a payload, decode, restore the features, classify with the backbone tail.
pub fn run_classify(args: ClassifyArgs) -> Result<()> {
    let bundle = args.placement.open(&args.model)?;
    // The device's encoder, on the kernels devices run, not libtorch's g_a.
    let edge = EdgeModel::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    let pipeline = bundle.manifest.preprocess.clone();
    let backbone = match &args.backbone {
        Some(name) => bundle.backbone_index(name)?,
        None => 0,
    };
    for_each_image(&args.images, |path| {
        let report = (|| -> Result<ClassifyReport> {
            let image = RgbImage::open(path)?;
            let input = pipeline.apply(&image)?;
            let start = Instant::now();
            let payload = edge.compress(&input)?;
            let encode_ms = start.elapsed().as_secs_f64() * 1e3;
            if let Some(dir) = &args.save_payloads {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "payload".into());
                write_atomically(&dir.join(format!("{stem}.fsp")), &payload)?;
            }
            let start = Instant::now();
            let features = bundle.decompress_for(backbone, &payload)?;
            let logits = bundle
                .classify_features_for(backbone, &features)?
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .view([-1]);
            let decode_ms = start.elapsed().as_secs_f64() * 1e3;
            let probabilities = logits.softmax(0, Kind::Float);
            let k = args.top_k.clamp(1, logits.size()[0]);
            let (values, indices) = probabilities.topk(k, 0, true, true);
            let top_k = (0..k)
                .map(|i| {
                    let class = indices.int64_value(&[i]) as usize;
                    Prediction {
                        class,
                        label: bundle.manifest.labels.get(class).cloned(),
                        probability: values.double_value(&[i]),
                        logit: logits.double_value(&[class as i64]) as f32,
                    }
                })
                .collect();
            let crop = f64::from(pipeline.crop);
            Ok(ClassifyReport {
                image: path.to_path_buf(),
                model: bundle.fingerprint.to_string(),
                payload_bytes: payload.len(),
                bpp: payload.len() as f64 * 8.0 / (crop * crop),
                encode_ms,
                decode_and_classify_ms: decode_ms,
                top_k,
                logits: Vec::<f32>::try_from(&logits)?,
            })
        })()?;
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "{}: {} bytes ({:.4} bpp)",
                report.image.display(),
                report.payload_bytes,
                report.bpp
            );
            for p in &report.top_k {
                let name = p.label.clone().unwrap_or_else(|| format!("class {}", p.class));
                println!("  {:>6.2}%  {name}", p.probability * 100.0);
            }
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct InfoArgs {
    /// Model bundle directory.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info {
    /// The bundle directory (a built-in model's unpacked copy).
    path: PathBuf,
    fingerprint: String,
    latent_shape: String,
    backbone_split_stage: usize,
    entropy_tables: String,
    likelihood_formula: String,
    parameters: Vec<(String, i64)>,
    /// Every backbone served, the first first.
    backbones: Vec<BackboneInfo>,
}

#[derive(Serialize)]
struct BackboneInfo {
    name: String,
    family: String,
    split_stage: usize,
    decoder_parameters: i64,
    tail_parameters: i64,
}

pub fn run_info(args: InfoArgs) -> Result<()> {
    let bundle = Bundle::open(&args.model, Device::Cpu)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    let count = |vars: &tch::nn::VarStore, prefix: &str| -> i64 {
        vars.variables()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, t)| t.numel() as i64)
            .sum()
    };
    let c = &bundle.compressor_vars;
    let mut parameters = vec![
        ("encoder (g_a)".to_string(), count(c, "g_a.")),
        ("entropy bottleneck".to_string(), count(c, "entropy_bottleneck.")),
        (
            "decoder (g_s, without the reconstruction layer)".to_string(),
            count(c, "g_s.") - count(c, "g_s.final_layer."),
        ),
        ("reconstruction layer".to_string(), count(c, "g_s.final_layer.")),
        ("compression module".to_string(), count(c, "")),
    ];
    let backbone = &bundle.backbone_vars;
    let arch = &bundle.manifest.architecture;
    let head_names = frankensplit_models::Backbone::head_names(&arch.backbone, arch.split_stage);
    let head: i64 = backbone
        .variables()
        .iter()
        .filter(|(k, _)| head_names.contains(*k))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    parameters.push(("backbone tail".to_string(), count(backbone, "") - head));
    let names = bundle.backbone_names();
    let mut backbones = vec![BackboneInfo {
        name: names[0].clone(),
        family: arch.backbone.family().into(),
        split_stage: arch.split_stage,
        decoder_parameters: count(c, "g_s."),
        tail_parameters: count(backbone, "") - head,
    }];
    for more in &bundle.more {
        let a = &more.spec.architecture;
        backbones.push(BackboneInfo {
            name: more.spec.name.clone(),
            family: a.backbone.family().into(),
            split_stage: a.split_stage,
            decoder_parameters: count(&more.vars, "compressor."),
            tail_parameters: count(&more.vars, "backbone."),
        });
    }
    if bundle.backbone_head.is_some() {
        parameters.push(("backbone head (image offloading)".to_string(), head));
    }
    let info = Info {
        path: std::path::absolute(&args.model).unwrap_or_else(|_| args.model.clone()),
        fingerprint: bundle.fingerprint.to_string(),
        latent_shape: bundle.latent_shape().to_string(),
        backbone_split_stage: bundle.manifest.architecture.split_stage,
        entropy_tables: format!("{:?}", bundle.manifest.tables),
        likelihood_formula: format!("{:?}", bundle.manifest.likelihood_formula),
        parameters,
        backbones,
    };
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("model {} ({})", info.fingerprint, args.model.display());
        println!(
            "latent {}; backbone tail from stage {}",
            info.latent_shape, info.backbone_split_stage
        );
        println!("entropy tables: {} ({})", info.entropy_tables, info.likelihood_formula);
        for (name, n) in &info.parameters {
            println!("  {n:>12}  {name}");
        }
        if info.backbones.len() > 1 {
            println!("serves {} backbones from the same payloads:", info.backbones.len());
            for b in &info.backbones {
                println!(
                    "  {} ({}, from stage {}): decoder {} + tail {} parameters",
                    b.name, b.family, b.split_stage, b.decoder_parameters, b.tail_parameters
                );
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// The bundles, as NAME=DIR (or a built-in model's name for DIR); the
    /// first is the default backbone. All must share the edge encoder: the
    /// first's, with decoders for the others trained by `decoder` stages.
    #[arg(required = true, value_parser = parse_named_bundle)]
    bundles: Vec<(String, PathBuf)>,
    /// Output bundle directory.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace an output directory that holds something other than a bundle.
    #[arg(long)]
    force: bool,
}

fn parse_named_bundle(text: &str) -> Result<(String, PathBuf), String> {
    let (name, dir) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: give NAME=DIR, e.g. resnet=runs/decoder-resnet/bundle"))?;
    let dir = crate::builtin::parse_model(dir)?;
    Ok((name.to_string(), dir))
}

pub fn run_merge(args: MergeArgs) -> Result<()> {
    let fingerprint = frankensplit_models::bundle::merge_bundles(&args.output, &args.bundles, args.force)
        .with_context(|| format!("cannot merge into {}", args.output.display()))?;
    let names: Vec<&str> = args.bundles.iter().map(|(name, _)| name.as_str()).collect();
    println!(
        "wrote {} (model {fingerprint}): backbones {}, default {}",
        args.output.display(),
        names.join(", "),
        names[0]
    );
    Ok(())
}
