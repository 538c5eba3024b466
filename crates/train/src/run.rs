//! A training run: a TOML file names the data, the teacher, the compressor
//! and a list of stages; the run writes checkpoints, a metrics log and, for
//! compressor stages, the best model as a bundle.
//!
//! Stages:
//! - `teacher`: trains the whole backbone with cross-entropy (for datasets
//!   without a pretrained teacher, such as the synthetic one);
//! - `distill` (stage 1): `L = Σ(h − h̃)² + λ·Σ bits`;
//! - `saliency` (stage 2): `L = Σ(d + d⊙s)/2 + λ·Σ bits` with `d = (h − h̃)²`
//!   and `s` the image's saliency map, nearest-resized to the token grid.
//!
//! Every step also takes CompressAI's auxiliary (quantile) loss; the
//! learning rate decays per epoch (`ExponentialLR`); each stage starts a
//! fresh optimiser, as torchdistill does. Torch's random generator is
//! re-seeded from the run seed and the step number at every step, and the
//! data order and augmentation depend only on the seed, epoch and sample,
//! so a run resumed from a checkpoint continues exactly as it would have.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use frankensplit_codec::LikelihoodFormula;
use frankensplit_models::bundle::{write_bundle, BundleContents, TableSource};
use frankensplit_models::weights::{load_into, select};
use frankensplit_models::{Architecture, Compressor, CompressorConfig, SwinConfig, SwinTransformer};
use frankensplit_preprocess::Preprocess;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::data::{Augment, ImageFolder, Loader, LoaderConfig, Source, Transform};
use crate::optim::Adam;
use crate::saliency::{generate_maps, xgradcam, Backbone, MapsConfig};
use crate::synthetic::{StreamConfig, SyntheticStream};
use crate::{npy, Error, Result};

/// The backbone: a timm preset name or a full configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackboneSpec {
    /// `swin_s3_base_224`, …
    Preset(String),
    /// Every field of [`SwinConfig`].
    Config(SwinConfig),
}

impl BackboneSpec {
    fn resolve(&self) -> Result<SwinConfig> {
        match self {
            Self::Preset(name) => SwinConfig::preset(name).ok_or_else(|| {
                Error::Config(format!(
                    "unknown backbone preset {name:?}; presets: {}",
                    SwinConfig::PRESETS.join(", ")
                ))
            }),
            Self::Config(config) => Ok(config.clone()),
        }
    }
}

/// `[teacher]`: the backbone whose shallow features the compressor learns to restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherConfig {
    /// Architecture.
    pub backbone: BackboneSpec,
    /// Its weights (timm names, `.safetensors` or `.pth`, or a bundle's
    /// `weights.safetensors` with the whole backbone); absent when a
    /// `teacher` stage trains it from scratch.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// First stage of the backbone that runs on the server; the teacher's
    /// features after stage `split_stage − 1` are the distillation target.
    #[serde(default = "default_split")]
    pub split_stage: usize,
}

fn default_split() -> usize {
    2
}

/// `[data]`: the training images come from a folder (`train`) or from the
/// built-in generator (`[data.generate]`), exactly one of the two.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataConfig {
    /// Training ImageFolder.
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Training images drawn fresh every epoch by the built-in generator.
    #[serde(default)]
    pub generate: Option<StreamConfig>,
    /// Validation ImageFolder.
    pub val: PathBuf,
    /// Saliency maps of the training folder (`frankensplit saliency`
    /// output: one `.npy` per image, mirroring the tree), for `saliency`
    /// stages; maps missing there are computed from the teacher when the
    /// stage starts. Without it, each batch's maps are computed from the
    /// teacher as the batch is drawn (the only way for a generated stream,
    /// whose images are new every epoch).
    #[serde(default)]
    pub saliency: Option<PathBuf>,
    /// Validates on at most this many images, taken evenly across the
    /// (class-ordered) folder so every class keeps its share; all by default.
    #[serde(default)]
    pub val_limit: Option<usize>,
}

/// What a stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageKind {
    /// The backbone, with cross-entropy.
    Teacher,
    /// Stage 1: head distillation with a rate term.
    Distill,
    /// Stage 2: saliency-weighted distillation with a rate term.
    Saliency,
}

/// `[[stages]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageConfig {
    /// What to train.
    pub kind: StageKind,
    /// Epochs.
    pub epochs: usize,
    /// Samples per step.
    pub batch_size: usize,
    /// Adam learning rate at the stage's start.
    pub lr: f64,
    /// Per-epoch decay of the learning rate (`ExponentialLR`).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Rate weight λ (compressor stages).
    #[serde(default)]
    pub lmbda: f64,
    /// Input geometry; default: random resized crops for `teacher` and
    /// `distill`, square resize + centre crop for `saliency` (the reference's).
    #[serde(default)]
    pub augment: Option<Augment>,
    /// How the learning rate moves over the stage.
    #[serde(default)]
    pub schedule: Schedule,
    /// Steps of linear warm-up from `lr / warmup` to `lr` at the stage's start.
    #[serde(default)]
    pub warmup: usize,
    /// Decoupled weight decay (AdamW) of the matrices and kernels; 0 is Adam.
    #[serde(default)]
    pub weight_decay: f64,
    /// Label smoothing of a `teacher` stage's cross-entropy.
    #[serde(default)]
    pub label_smoothing: f64,
}

/// The learning-rate schedule of a stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `lr · gamma^epoch` (PyTorch's `ExponentialLR`, stepped per epoch; the reference's).
    #[default]
    Exponential,
    /// Half a cosine from `lr` to 0 over the stage's steps after the warm-up.
    Cosine,
}

impl StageConfig {
    /// The learning rate of step `batch` of `epoch`, with `batches` steps an epoch.
    pub fn lr_at(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        let step = epoch * batches + batch;
        let base = match self.schedule {
            Schedule::Exponential => self.lr * self.gamma.powi(epoch as i32),
            Schedule::Cosine => {
                let span = (self.epochs * batches).saturating_sub(self.warmup).max(1);
                let t = step.saturating_sub(self.warmup) as f64 / span as f64;
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        };
        if step < self.warmup {
            base.min(self.lr * (step + 1) as f64 / self.warmup as f64)
        } else {
            base
        }
    }
}

fn default_gamma() -> f64 {
    // (1/1000)^(1/14): the reference's decay.
    0.610_540_23
}

/// Which weights a run keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The epoch with the highest validation top-1 (the reference's choice).
    #[default]
    Best,
    /// The last epoch: for short runs whose validation differences are
    /// noise, where "best" would ignore that stage 2 lowers the rate.
    Last,
}

/// A run file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Directory for checkpoints, logs and the resulting bundle.
    pub output: PathBuf,
    /// Seed of everything random.
    #[serde(default)]
    pub seed: u64,
    /// Data-loading threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Steps between checkpoints inside an epoch (0: only at epoch ends).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Mixed precision (autocast) on CUDA.
    #[serde(default)]
    pub mixed_precision: bool,
    /// Which weights the run keeps as its teacher and bundle.
    #[serde(default)]
    pub keep: Keep,
    /// Data.
    pub data: DataConfig,
    /// Teacher.
    pub teacher: TeacherConfig,
    /// The compressor; the reference's by default.
    #[serde(default)]
    pub compressor: CompressorConfig,
    /// Stages, in order.
    pub stages: Vec<StageConfig>,
}

fn default_workers() -> usize {
    2
}

fn default_checkpoint_every() -> usize {
    500
}

impl RunConfig {
    /// Reads and checks a run file; relative paths are taken from the file's directory.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut config: Self = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.output);
        if let Some(p) = config.data.train.as_mut() {
            rebase(p);
        }
        rebase(&mut config.data.val);
        if let Some(p) = config.data.saliency.as_mut() {
            rebase(p);
        }
        if let Some(p) = config.teacher.weights.as_mut() {
            rebase(p);
        }
        config.validate()?;
        Ok(config)
    }

    /// The split architecture the run trains.
    pub fn architecture(&self) -> Result<Architecture> {
        let arch = Architecture {
            compressor: self.compressor.clone(),
            backbone: self.teacher.backbone.resolve()?,
            split_stage: self.teacher.split_stage,
        };
        arch.validate()?;
        Ok(arch)
    }

    fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(Error::Config("the run has no [[stages]]".into()));
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if stage.epochs == 0 || stage.batch_size == 0 || !positive(stage.lr) || !positive(stage.gamma) {
                return Err(Error::Config(format!(
                    "stage {i}: epochs, batch_size, lr and gamma must be positive"
                )));
            }
            if !(0.0..1.0).contains(&stage.label_smoothing) || !(0.0..1.0).contains(&stage.weight_decay) {
                return Err(Error::Config(format!(
                    "stage {i}: label_smoothing and weight_decay must lie in [0, 1)"
                )));
            }
        }
        match (&self.data.train, &self.data.generate) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(Error::Config(
                    "[data] needs exactly one source of training images: `train` (a folder) or [data.generate]".into(),
                ))
            }
        }
        if self.data.generate.is_some() && self.data.saliency.is_some() {
            return Err(Error::Config(
                "[data] saliency holds maps of a training folder; a generated stream's maps are computed per batch, so leave it out".into(),
            ));
        }
        let trains_teacher = self.stages.iter().any(|s| s.kind == StageKind::Teacher);
        if self.teacher.weights.is_none() && !trains_teacher {
            return Err(Error::Config(
                "[teacher] needs weights, or the run needs a `teacher` stage that trains it".into(),
            ));
        }
        self.architecture().map(|_| ())
    }
}

/// Where a run stands; saved inside every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Stage index.
    pub stage: usize,
    /// Epoch within the stage.
    pub epoch: usize,
    /// Next batch within the epoch.
    pub batch: usize,
    /// Steps taken in the whole run.
    pub global_step: u64,
    /// Optimiser steps in this stage.
    pub optimizer_step: i64,
    /// Best validation top-1 of a compressor stage so far.
    pub best_top1: Option<f64>,
    /// Best validation top-1 of the teacher so far.
    pub best_teacher_top1: Option<f64>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsLine {
    /// `train` (a stretch of steps) or `val` (an epoch's validation).
    pub split: String,
    /// Stage index and kind.
    pub stage: usize,
    /// Stage kind.
    pub kind: StageKind,
    /// Epoch within the stage.
    pub epoch: usize,
    /// Steps so far in the run.
    pub global_step: u64,
    /// Learning rate.
    pub lr: f64,
    /// Mean loss (training) over the stretch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Mean distortion term per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distortion: Option<f64>,
    /// Estimated bits per input pixel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpp: Option<f64>,
    /// Validation top-1 (%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// Images per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
}

/// Options of [`train`] that are not part of the run file.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Continue from `output/checkpoint.safetensors`.
    pub resume: bool,
    /// Where to compute.
    pub device: Device,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (as if killed) once this many steps of the run are done and checkpointed.
    pub stop_after_steps: Option<u64>,
}

const CHECKPOINT: &str = "checkpoint.safetensors";
const METRICS: &str = "metrics.jsonl";
const TEACHER: &str = "teacher.safetensors";
const BUNDLE: &str = "bundle";

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The final state.
    pub progress: Progress,
    /// The best compressor bundle, when the run trained a compressor.
    pub bundle: Option<PathBuf>,
    /// The trained teacher's weights, when the run trained one.
    pub teacher: Option<PathBuf>,
}

struct Models {
    arch: Architecture,
    compressor_vars: VarStore,
    compressor: Compressor,
    backbone_vars: VarStore,
    head: SwinTransformer,
    tail: SwinTransformer,
}

impl Models {
    fn new(arch: &Architecture, device: Device) -> Self {
        let compressor_vars = VarStore::new(device);
        let compressor = Compressor::new(&compressor_vars.root(), &arch.compressor);
        let backbone_vars = VarStore::new(device);
        let n = arch.backbone.num_stages();
        let head = SwinTransformer::new(&backbone_vars.root(), &arch.backbone, 0..arch.split_stage);
        let tail = SwinTransformer::new(&backbone_vars.root(), &arch.backbone, arch.split_stage..n);
        Self {
            arch: arch.clone(),
            compressor_vars,
            compressor,
            backbone_vars,
            head,
            tail,
        }
    }

    fn named(vs: &VarStore) -> BTreeMap<String, Tensor> {
        vs.variables().into_iter().collect()
    }

    fn set_backbone_trainable(&mut self, trainable: bool) {
        if trainable {
            self.backbone_vars.unfreeze();
        } else {
            self.backbone_vars.freeze();
        }
    }

    fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        self.tail.forward_t(&self.head.forward_t(x, train), train)
    }
}

/// At most `limit` of `items`, evenly spaced.
fn spread<T: Clone>(items: &[T], limit: usize) -> Vec<T> {
    if limit == 0 || limit >= items.len() {
        return items.to_vec();
    }
    (0..limit).map(|i| items[i * items.len() / limit].clone()).collect()
}

/// Runs (or resumes) a training run.
pub fn train(config: &RunConfig, options: &TrainOptions) -> Result<RunSummary> {
    let arch = config.architecture()?;
    let (train_set, train_folder): (Arc<dyn Source>, Option<Arc<ImageFolder>>) =
        match (&config.data.train, &config.data.generate) {
            (Some(path), _) => {
                let folder = Arc::new(ImageFolder::open(path)?);
                (folder.clone(), Some(folder))
            }
            (None, Some(stream)) => (Arc::new(SyntheticStream::new(stream.clone())?), None),
            (None, None) => return Err(Error::Config("[data] has no training images".into())),
        };
    let mut val_set = ImageFolder::open(&config.data.val)?;
    if val_set.classes != train_set.classes() {
        return Err(Error::Data(format!(
            "the training classes {:?} and those of {} ({:?}) differ",
            train_set.classes(),
            config.data.val.display(),
            val_set.classes
        )));
    }
    if let Some(limit) = config.data.val_limit {
        val_set.samples = spread(&val_set.samples, limit);
    }
    let val_set = Arc::new(val_set);
    if train_set.classes().len() as i64 > arch.backbone.num_classes {
        return Err(Error::Config(format!(
            "the data has {} classes, the backbone {} outputs",
            train_set.classes().len(),
            arch.backbone.num_classes
        )));
    }
    if let Some(weights) = &config.teacher.weights {
        if !weights.exists() {
            return Err(Error::Config(format!(
                "teacher weights {} not found: point [teacher] weights at the backbone's timm weights (.safetensors/.pth) or a bundle's weights.safetensors",
                weights.display()
            )));
        }
    }
    let out = &config.output;
    std::fs::create_dir_all(out).map_err(|e| Error::Data(format!("{}: {e}", out.display())))?;
    // Fresh weights are drawn from the seed (a VarStore initialises on creation).
    tch::manual_seed(config.seed as i64);
    let mut models = Models::new(&arch, options.device);
    let mut progress = Progress::default();
    let mut saved_optimizer = None;
    let checkpoint_path = out.join(CHECKPOINT);
    if options.resume {
        let (state, tensors) = read_checkpoint(&checkpoint_path)?;
        let take = |prefix: &str| -> BTreeMap<String, Tensor> {
            tensors
                .iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.shallow_clone())))
                .collect()
        };
        load_into(&mut models.compressor_vars, take("compressor."))?;
        load_into(&mut models.backbone_vars, take("backbone."))?;
        saved_optimizer = Some(take("adam."));
        progress = state;
        truncate_metrics(&out.join(METRICS), progress.global_step)?;
    } else {
        if checkpoint_path.exists() {
            return Err(Error::Config(format!(
                "{} already holds a run; pass --resume to continue it or choose another output",
                out.display()
            )));
        }
        if let Some(weights) = &config.teacher.weights {
            let tensors = frankensplit_models::convert::read_state_dict(weights, Default::default())?;
            // timm names, or a bundle's weights file (`backbone.` prefix).
            let prefix = if tensors.keys().any(|k| k.starts_with("backbone.patch_embed.")) {
                "backbone."
            } else {
                ""
            };
            let mut selected = select(tensors, prefix, None);
            selected.retain(|k, _| models.backbone_vars.variables().contains_key(k));
            load_into(&mut models.backbone_vars, selected)?;
        }
    }

    let preprocess = Preprocess::for_input(arch.compressor.input_size as u32);
    let mut log = MetricsLog::open(&out.join(METRICS))?;

    while progress.stage < config.stages.len() {
        let stage = &config.stages[progress.stage];
        let saved_maps = match (&config.data.saliency, &train_folder) {
            (Some(dir), Some(folder)) => Some((dir.as_path(), folder)),
            _ => None,
        };
        if let (StageKind::Saliency, Some((dir, folder))) = (stage.kind, saved_maps) {
            // Maps come from the teacher as it now is; existing ones are kept.
            let maps = MapsConfig {
                batch_size: 16,
                workers: config.workers,
                progress: options.progress,
                overlay: None,
                ..maps_config(&arch)
            };
            let backbone = Backbone {
                head: &models.head,
                tail: &models.tail,
            };
            let written = generate_maps(&backbone, folder, &preprocess, dir, &maps, options.device)?;
            if written > 0 && options.progress {
                eprintln!("wrote {written} saliency maps to {}", dir.display());
            }
        }
        let mut optimizer = stage_optimizer(&mut models, stage);
        if let Some(saved) = saved_optimizer.take() {
            optimizer
                .load_state(&saved, progress.optimizer_step)
                .map_err(Error::Config)?;
        }
        while progress.epoch < stage.epochs {
            let augment = stage.augment.unwrap_or(match stage.kind {
                StageKind::Saliency => Augment::SquareResizeCenterCrop,
                _ => Augment::RandomResizedCrop,
            });
            let transform = Arc::new(Transform {
                augment,
                preprocess: preprocess.clone(),
            });
            let loader_config = LoaderConfig {
                batch_size: stage.batch_size,
                shuffle: true,
                drop_last: true,
                workers: config.workers,
                prefetch: 2 * config.workers.max(1),
                seed: config.seed ^ ((progress.stage as u64) << 48),
            };
            let loader = Loader::start(
                train_set.clone(),
                transform,
                &loader_config,
                progress.epoch,
                progress.batch,
            );
            let bar = progress_bar(
                options.progress,
                loader.num_batches() as u64,
                progress.batch as u64,
                stage,
                &progress,
            );
            let mut stretch = Stretch::default();
            let batches = loader.num_batches();
            for batch in loader {
                let batch = batch?;
                optimizer.lr = stage.lr_at(progress.epoch, progress.batch, batches);
                tch::manual_seed((config.seed as i64) ^ (progress.global_step as i64).wrapping_mul(0x2545_F491));
                let x = Tensor::from_slice(&batch.images)
                    .view([
                        batch.len() as i64,
                        3,
                        arch.compressor.input_size,
                        arch.compressor.input_size,
                    ])
                    .to_device(options.device);
                let started = Instant::now();
                let terms = match stage.kind {
                    StageKind::Teacher => {
                        let labels = Tensor::from_slice(&batch.labels).to_device(options.device);
                        let logits = autocast(config.mixed_precision, || models.logits(&x, true));
                        let loss = logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
                            &labels,
                            None,
                            tch::Reduction::Mean,
                            -100,
                            stage.label_smoothing,
                        );
                        optimizer.zero_grad();
                        loss.backward();
                        StepTerms {
                            loss: loss.double_value(&[]),
                            distortion: None,
                            bits: None,
                        }
                    }
                    StageKind::Distill | StageKind::Saliency => {
                        let saliency = match (stage.kind, saved_maps) {
                            (StageKind::Saliency, Some((dir, folder))) => {
                                Some(saliency_batch(dir, folder, &batch.samples, options.device)?)
                            }
                            (StageKind::Saliency, None) => Some(online_saliency(&models, &x, &batch.labels)?),
                            _ => None,
                        };
                        optimizer.zero_grad();
                        let terms =
                            compressor_step(&models, &x, stage.lmbda, saliency.as_ref(), config.mixed_precision);
                        terms.loss_tensor.backward();
                        models.compressor.entropy_bottleneck.aux_loss().backward();
                        terms.values
                    }
                };
                optimizer.step();
                progress.batch += 1;
                progress.global_step += 1;
                progress.optimizer_step = optimizer.step;
                stretch.add(&terms, batch.len(), started.elapsed().as_secs_f64());
                let pixels = (arch.compressor.input_size * arch.compressor.input_size) as f64;
                bar.set_message(stretch.message(optimizer.lr, pixels));
                bar.inc(1);
                if config.checkpoint_every > 0 && progress.global_step % config.checkpoint_every as u64 == 0 {
                    log.write(&stretch.line(progress.stage, stage.kind, &progress, optimizer.lr, pixels))?;
                    stretch = Stretch::default();
                    write_checkpoint(&checkpoint_path, &models, &optimizer, &progress)?;
                    if options.stop_after_steps.is_some_and(|n| progress.global_step >= n) {
                        bar.finish_and_clear();
                        return Ok(RunSummary {
                            progress,
                            bundle: None,
                            teacher: None,
                        });
                    }
                }
            }
            bar.finish_and_clear();
            let pixels = (arch.compressor.input_size * arch.compressor.input_size) as f64;
            if stretch.images > 0 {
                log.write(&stretch.line(progress.stage, stage.kind, &progress, optimizer.lr, pixels))?;
            }
            let val = validate(&models, stage.kind, &val_set, &preprocess, config, options.device)?;
            log.write(&MetricsLine {
                split: "val".into(),
                stage: progress.stage,
                kind: stage.kind,
                epoch: progress.epoch,
                global_step: progress.global_step,
                lr: optimizer.lr,
                loss: None,
                distortion: val.distortion,
                bpp: val.bpp,
                top1: Some(val.top1),
                images_per_s: None,
            })?;
            if options.progress {
                eprintln!(
                    "stage {} ({:?}) epoch {}/{}: val top-1 {:.2} %{}",
                    progress.stage,
                    stage.kind,
                    progress.epoch + 1,
                    stage.epochs,
                    val.top1,
                    val.bpp.map(|b| format!(", {b:.4} bpp")).unwrap_or_default()
                );
            }
            let best = match stage.kind {
                StageKind::Teacher => &mut progress.best_teacher_top1,
                _ => &mut progress.best_top1,
            };
            let improved = best.is_none_or(|best| val.top1 > best);
            if improved {
                *best = Some(val.top1);
            }
            if improved || config.keep == Keep::Last {
                match stage.kind {
                    StageKind::Teacher => write_teacher(&out.join(TEACHER), &models)?,
                    _ => write_run_bundle(&out.join(BUNDLE), &models, train_set.classes(), config, stage)?,
                }
            }
            progress.epoch += 1;
            progress.batch = 0;
            write_checkpoint(&checkpoint_path, &models, &optimizer, &progress)?;
        }
        if stage.kind == StageKind::Teacher {
            // Later stages distil from the kept teacher.
            let best = Tensor::read_safetensors(out.join(TEACHER))?.into_iter().collect();
            load_into(&mut models.backbone_vars, best)?;
        } else if progress.stage + 1 < config.stages.len() {
            // The compressor as this stage left it, for comparing stages (stage 1 alone against 1 + 2).
            let dir = out.join(format!("{BUNDLE}-after-stage{}", progress.stage));
            write_run_bundle(&dir, &models, train_set.classes(), config, stage)?;
        }
        progress.stage += 1;
        progress.epoch = 0;
        progress.batch = 0;
        progress.optimizer_step = 0;
        write_checkpoint(&checkpoint_path, &models, &optimizer, &progress)?;
    }
    let trained_compressor = config.stages.iter().any(|s| s.kind != StageKind::Teacher);
    let trained_teacher = config.stages.iter().any(|s| s.kind == StageKind::Teacher);
    Ok(RunSummary {
        progress,
        bundle: trained_compressor.then(|| out.join(BUNDLE)),
        teacher: trained_teacher.then(|| out.join(TEACHER)),
    })
}

fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    if enabled {
        tch::autocast(true, f)
    } else {
        f()
    }
}

/// Adam (AdamW with a weight decay) over what the stage trains; the rest is frozen.
fn stage_optimizer(models: &mut Models, stage: &StageConfig) -> Adam {
    let mut optimizer = match stage.kind {
        StageKind::Teacher => {
            models.set_backbone_trainable(true);
            models.compressor_vars.freeze();
            Adam::new(Models::named(&models.backbone_vars), stage.lr)
        }
        _ => {
            models.set_backbone_trainable(false);
            models.compressor_vars.unfreeze();
            Adam::new(Models::named(&models.compressor_vars), stage.lr)
        }
    };
    optimizer.weight_decay = stage.weight_decay;
    optimizer
}

/// Loss values of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepTerms {
    /// The loss.
    pub loss: f64,
    /// The distortion term (compressor stages).
    pub distortion: Option<f64>,
    /// Σ bits of the batch (compressor stages).
    pub bits: Option<f64>,
}

/// The loss of a compressor step, with its terms.
pub struct CompressorLoss {
    /// What to back-propagate.
    pub loss_tensor: Tensor,
    /// Its value and terms.
    pub values: StepTerms,
}

/// The compressor's training loss on a batch: the teacher's features `h`
/// after stage `split − 1` (no gradient), the student's `h̃` through the
/// noisy bottleneck, distortion `Σ(h − h̃)²` — or with a saliency map
/// `(B, 1, H, W)`, `Σ(d + d⊙s)/2` with `s` nearest-resized to the token
/// grid — plus `λ · Σ −log₂ p(ỹ)`. `noise` fixes the latent noise
/// (drawn from torch's generator when `None`).
pub fn compressor_loss(
    compressor: &Compressor,
    teacher_head: &SwinTransformer,
    x: &Tensor,
    lmbda: f64,
    saliency: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> CompressorLoss {
    let target = tch::no_grad(|| teacher_head.forward_t(x, false));
    let out = match noise {
        Some(noise) => compressor.forward_noisy(x, noise),
        None => compressor.forward_t(x, true),
    };
    let d = (&out.features - &target).square();
    let distortion = match saliency {
        None => d.sum(Kind::Float),
        Some(maps) => {
            let (batch, tokens) = (d.size()[0], d.size()[1]);
            let side = (tokens as f64).sqrt().round() as i64;
            let s = maps
                .upsample_nearest2d([side, side], None, None)
                .view([batch, tokens, 1]);
            ((&d + &d * s).sum(Kind::Float)) / 2.0
        }
    };
    let bits = out.likelihoods.log2().sum(Kind::Float).neg();
    let loss = &distortion + &bits * lmbda;
    // One transfer to the host for the three values (one synchronisation on a GPU).
    let host = Vec::<f64>::try_from(
        Tensor::stack(&[&loss, &distortion, &bits], 0)
            .detach()
            .to_kind(Kind::Double)
            .to_device(Device::Cpu),
    )
    .unwrap_or_else(|_| vec![f64::NAN; 3]);
    let values = StepTerms {
        loss: host[0],
        distortion: Some(host[1]),
        bits: Some(host[2]),
    };
    CompressorLoss {
        loss_tensor: loss,
        values,
    }
}

fn compressor_step(models: &Models, x: &Tensor, lmbda: f64, saliency: Option<&Tensor>, amp: bool) -> CompressorLoss {
    autocast(amp, || {
        compressor_loss(&models.compressor, &models.head, x, lmbda, saliency, None)
    })
}

/// The reference's map settings for an architecture: XGradCAM at every
/// stage after the first, eigen-smoothed, on the latent grid.
fn maps_config(arch: &Architecture) -> MapsConfig {
    MapsConfig {
        stages: (1..arch.backbone.num_stages()).collect(),
        eigen_smooth: true,
        side: arch.compressor.latent_size() as usize,
        batch_size: 16,
        workers: 1,
        progress: false,
        overlay: None,
    }
}

/// A batch's saliency maps `(B, 1, H, W)` computed now from the teacher,
/// as [`generate_maps`] would have written them.
fn online_saliency(models: &Models, x: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let settings = maps_config(&models.arch);
    let backbone = Backbone {
        head: &models.head,
        tail: &models.tail,
    };
    let maps = xgradcam(
        &backbone,
        x,
        labels,
        &settings.stages,
        settings.side,
        settings.eigen_smooth,
    )?;
    let side = settings.side as i64;
    Ok(Tensor::from_slice(&maps.concat())
        .view([labels.len() as i64, 1, side, side])
        .to_device(x.device()))
}

/// The saliency maps of a batch's samples, `(B, 1, H, W)`.
fn saliency_batch(root: &Path, dataset: &ImageFolder, samples: &[usize], device: Device) -> Result<Tensor> {
    let mut values = Vec::new();
    let mut side = None;
    for &sample in samples {
        let path = root.join(dataset.relative(sample)).with_extension("npy");
        let (shape, map) = npy::read(&path)?;
        let h = shape.iter().rev().nth(1).copied().unwrap_or(0);
        let w = shape.last().copied().unwrap_or(0);
        if h != w || h * w != map.len() || side.is_some_and(|s| s != h) {
            return Err(Error::Data(format!(
                "{}: saliency maps must be square and all the same size, got shape {shape:?}",
                path.display()
            )));
        }
        side = Some(h);
        values.extend(map);
    }
    let side = side.unwrap_or(0) as i64;
    Ok(Tensor::from_slice(&values)
        .view([samples.len() as i64, 1, side, side])
        .to_device(device))
}

struct Validation {
    top1: f64,
    bpp: Option<f64>,
    distortion: Option<f64>,
}

/// Top-1 on the validation set: the whole backbone for a teacher stage;
/// otherwise the compressor with rounding (no real coding) in front of the
/// backbone tail, with the estimated bits per pixel and the distortion.
fn validate(
    models: &Models,
    kind: StageKind,
    val_set: &Arc<ImageFolder>,
    preprocess: &Preprocess,
    config: &RunConfig,
    device: Device,
) -> Result<Validation> {
    let transform = Arc::new(Transform {
        augment: Augment::ResizeCenterCrop,
        preprocess: preprocess.clone(),
    });
    let loader_config = LoaderConfig {
        batch_size: 32,
        shuffle: false,
        drop_last: false,
        workers: config.workers,
        prefetch: 2 * config.workers.max(1),
        seed: config.seed,
    };
    let size = i64::from(preprocess.crop);
    let (mut correct, mut seen, mut bits, mut distortion) = (0i64, 0i64, 0f64, 0f64);
    for batch in Loader::start(val_set.clone(), transform, &loader_config, 0, 0) {
        let batch = batch?;
        let x = Tensor::from_slice(&batch.images)
            .view([batch.len() as i64, 3, size, size])
            .to_device(device);
        let labels = Tensor::from_slice(&batch.labels).to_device(device);
        let logits = tch::no_grad(|| match kind {
            StageKind::Teacher => models.logits(&x, false),
            _ => {
                let target = models.head.forward_t(&x, false);
                let out = models.compressor.forward_t(&x, false);
                bits += out.likelihoods.log2().sum(Kind::Double).neg().double_value(&[]);
                distortion += (&out.features - &target).square().sum(Kind::Double).double_value(&[]);
                models.tail.forward_t(&out.features, false)
            }
        });
        correct += logits
            .argmax(-1, false)
            .eq_tensor(&labels)
            .sum(Kind::Int64)
            .int64_value(&[]);
        seen += batch.len() as i64;
    }
    let n = seen.max(1) as f64;
    let compressor = kind != StageKind::Teacher;
    Ok(Validation {
        top1: 100.0 * correct as f64 / n,
        bpp: compressor.then(|| bits / (n * (size * size) as f64)),
        distortion: compressor.then(|| distortion / n),
    })
}

#[derive(Default)]
struct Stretch {
    loss: f64,
    distortion: f64,
    bits: f64,
    steps: usize,
    images: usize,
    seconds: f64,
    compressor: bool,
}

impl Stretch {
    fn add(&mut self, terms: &StepTerms, images: usize, seconds: f64) {
        self.loss += terms.loss;
        self.distortion += terms.distortion.unwrap_or(0.0);
        self.bits += terms.bits.unwrap_or(0.0);
        self.compressor = terms.bits.is_some();
        self.steps += 1;
        self.images += images;
        self.seconds += seconds;
    }

    fn message(&self, lr: f64, pixels: f64) -> String {
        let steps = self.steps.max(1) as f64;
        let mut text = format!("loss {:.4}", self.loss / steps);
        if self.compressor {
            text += &format!(" bpp {:.4}", self.bits / (self.images.max(1) as f64 * pixels));
        }
        text + &format!(" lr {lr:.2e} {:.1} img/s", self.images as f64 / self.seconds.max(1e-9))
    }

    fn line(&self, stage: usize, kind: StageKind, progress: &Progress, lr: f64, pixels: f64) -> MetricsLine {
        let steps = self.steps.max(1) as f64;
        let images = self.images.max(1) as f64;
        MetricsLine {
            split: "train".into(),
            stage,
            kind,
            epoch: progress.epoch,
            global_step: progress.global_step,
            lr,
            loss: Some(self.loss / steps),
            distortion: self.compressor.then(|| self.distortion / images),
            bpp: self.compressor.then(|| self.bits / (images * pixels)),
            top1: None,
            images_per_s: Some(self.images as f64 / self.seconds.max(1e-9)),
        }
    }
}

fn progress_bar(show: bool, total: u64, done: u64, stage: &StageConfig, progress: &Progress) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!(
        "stage {} {:?} epoch {}/{}",
        progress.stage,
        stage.kind,
        progress.epoch + 1,
        stage.epochs
    ));
    bar.set_position(done);
    bar
}

struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        Ok(Self { file })
    }

    fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let text = serde_json::to_string(line).map_err(|e| Error::Data(e.to_string()))?;
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::Data(format!("metrics log: {e}")))
    }
}

/// Drops log lines written after the checkpoint a run resumes from, so the
/// log reads as one uninterrupted run.
fn truncate_metrics(path: &Path, global_step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<MetricsLine>(l).is_ok_and(|m| m.global_step <= global_step))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    write_atomically(path, body.as_bytes())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    frankensplit_fsio::write_file(path, bytes).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Writes the checkpoint to a temporary file and renames it into place, so
/// that a kill at any moment leaves the previous checkpoint or the new one.
fn write_checkpoint(path: &Path, models: &Models, optimizer: &Adam, progress: &Progress) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (prefix, vs) in [
        ("compressor.", &models.compressor_vars),
        ("backbone.", &models.backbone_vars),
    ] {
        for (name, t) in vs.variables() {
            tensors.push((format!("{prefix}{name}"), t.detach().to_device(Device::Cpu)));
        }
    }
    for (name, t) in optimizer.state() {
        tensors.push((format!("adam.{name}"), t.to_device(Device::Cpu)));
    }
    let state = serde_json::to_vec(progress).map_err(|e| Error::Data(e.to_string()))?;
    tensors.push(("progress".into(), Tensor::from_slice(&state)));
    write_safetensors_atomically(path, &tensors)
}

/// Writes tensors to a temporary file and renames it over `path`.
fn write_safetensors_atomically(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    Tensor::write_safetensors(tensors, &tmp)?;
    frankensplit_fsio::commit_file(&tmp, path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// Reads a checkpoint: the run's progress and every tensor.
pub fn read_checkpoint(path: &Path) -> Result<(Progress, BTreeMap<String, Tensor>)> {
    if !path.exists() {
        return Err(Error::Config(format!(
            "{} does not exist: nothing to resume (start without --resume)",
            path.display()
        )));
    }
    let mut tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
    let state = tensors
        .remove("progress")
        .ok_or_else(|| Error::Data(format!("{} is not a training checkpoint", path.display())))?;
    let bytes = Vec::<u8>::try_from(&state)?;
    let progress = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Data(format!("{}: damaged progress record: {e}", path.display())))?;
    Ok((progress, tensors))
}

fn write_teacher(path: &Path, models: &Models) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = models
        .backbone_vars
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.detach().to_device(Device::Cpu)))
        .collect();
    write_safetensors_atomically(path, &tensors)
}

/// The trained compressor with the teacher as a servable bundle (tables
/// rebuilt from the learned density, whole backbone included).
fn write_run_bundle(
    dir: &Path,
    models: &Models,
    classes: &[String],
    config: &RunConfig,
    stage: &StageConfig,
) -> Result<()> {
    let formula = LikelihoodFormula::Direct;
    let tables = models.compressor.entropy_bottleneck.density()?.build_tables(formula)?;
    write_bundle(
        dir,
        BundleContents {
            architecture: &models.arch,
            compressor_vars: &models.compressor_vars,
            backbone_vars: &models.backbone_vars,
            backbone_head: true,
            tables: &tables,
            likelihood_formula: formula,
            table_source: TableSource::Recomputed,
            labels: classes.to_vec(),
            source: format!(
                "trained by frankensplit train (seed {}, λ {}, kept after a {:?} stage)",
                config.seed, stage.lmbda, stage.kind
            ),
        },
        false,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_validation_limit_keeps_every_class_its_share() {
        // 10 classes × 20 images in class order, as an ImageFolder lists them.
        let samples: Vec<usize> = (0..200).map(|i| i / 20).collect();
        let kept = spread(&samples, 50);
        assert_eq!(kept.len(), 50);
        for class in 0..10 {
            assert_eq!(kept.iter().filter(|&&c| c == class).count(), 5, "class {class}");
        }
        assert_eq!(spread(&samples, 0), samples);
        assert_eq!(spread(&samples, 500), samples);
    }

    #[test]
    fn cosine_schedules_warm_up_then_decay_to_zero() {
        let stage: StageConfig = toml::from_str(
            "kind = \"distill\"\nepochs = 2\nbatch_size = 1\nlr = 1.0\nschedule = \"cosine\"\nwarmup = 4",
        )
        .unwrap();
        // 10 steps an epoch: warm-up over steps 0–3, then half a cosine over 16 steps.
        let lrs: Vec<f64> = (0..20).map(|step| stage.lr_at(step / 10, step % 10, 10)).collect();
        use std::f64::consts::PI;
        for (step, want) in [
            (0, 0.25),
            (3, 1.0),
            (4, 1.0),
            (12, 0.5),
            (19, 0.5 * (1.0 + (PI * 15.0 / 16.0).cos())),
        ] {
            assert!((lrs[step] - want).abs() < 1e-12, "step {step}: {}", lrs[step]);
        }
        assert!(lrs[4..].windows(2).all(|w| w[1] < w[0]));
        // The reference's schedule: constant within an epoch, × gamma per epoch.
        let exponential: StageConfig =
            toml::from_str("kind = \"distill\"\nepochs = 2\nbatch_size = 1\nlr = 1.0\ngamma = 0.5").unwrap();
        assert_eq!(exponential.lr_at(0, 9, 10), 1.0);
        assert_eq!(exponential.lr_at(1, 0, 10), 0.5);
    }
}
