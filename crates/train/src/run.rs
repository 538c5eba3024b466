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
//!
//! This module holds the loop ([`train`]); the run file is read in
//! `config`, the losses live in `loss`, the models, checkpoints and written
//! weights in `state`, and the log and progress bar in `metrics`. Their
//! public items are re-exported here.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use frankensplit_bundle::names;
use frankensplit_models::weights::load_into;
use frankensplit_models::Architecture;
use frankensplit_preprocess::Preprocess;
use tch::nn::ModuleT;
use tch::{Device, Kind, Tensor};

use crate::data::{Augment, Batch, ImageFolder, Loader, LoaderConfig, Source, Transform};
use crate::distributed::World;
use crate::loss::{compressor_step, decoder_step, teacher_step};
use crate::metrics::{progress_bar, truncate_metrics, MetricsLog, Stretch};
use crate::optim::Adam;
use crate::saliency::{generate_maps, xgradcam, MapsConfig, SplitBackbone};
use crate::state::{
    load_checkpoint, write_checkpoint, write_run_bundle, write_teacher, Models, BUNDLE, CHECKPOINT, METRICS, TEACHER,
};
use crate::synthetic::SyntheticStream;
use crate::{npy, Error, Result};

pub use crate::config::{BackboneSpec, DataConfig, Keep, RunConfig, Schedule, StageConfig, StageKind, TeacherConfig};
pub use crate::loss::{compressor_loss, CompressorLoss, StepTerms};
pub use crate::metrics::MetricsLine;
pub use crate::state::{read_checkpoint, Progress};

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

/// Runs (or resumes) a training run — as one rank of a multi-process run
/// when a launcher started several (see [`crate::distributed`]): rank 0
/// reads and writes the run's files and validates, every rank trains on
/// its share of each batch. When one rank fails, every rank is stopped.
pub fn train(config: &RunConfig, options: &TrainOptions) -> Result<RunSummary> {
    let world = World::get(options.device)?;
    let result = train_in(config, options, world);
    if let Err(e) = &result {
        if world.size > 1 {
            eprintln!("rank {} of {}: {e}; stopping every rank", world.rank, world.size);
            world.abort_others();
        }
    }
    result
}

fn train_in(config: &RunConfig, options: &TrainOptions, world: &'static World) -> Result<RunSummary> {
    for (i, stage) in config.stages.iter().enumerate() {
        if !stage.batch_size.is_multiple_of(world.size) {
            return Err(Error::Config(format!(
                "stage {i}: batch_size {} (the global batch) does not split over {} processes",
                stage.batch_size, world.size
            )));
        }
    }
    let mut run = Run::open(config, options, world)?;
    while run.progress.stage < config.stages.len() {
        if run.stage()?.is_break() {
            return Ok(run.stopped());
        }
    }
    Ok(run.finished())
}

/// A run in progress: its data, models and log, and where it stands.
struct Run<'a> {
    config: &'a RunConfig,
    options: &'a TrainOptions,
    /// The processes of the run and this one's rank.
    world: &'static World,
    /// Where this process computes.
    device: Device,
    arch: Architecture,
    train_set: Arc<dyn Source>,
    /// The training folder, when the images come from one (not a generator).
    train_folder: Option<Arc<ImageFolder>>,
    val_set: Arc<ImageFolder>,
    models: Models,
    progress: Progress,
    /// The resumed checkpoint's optimiser state, for the stage it was saved in.
    saved_optimizer: Option<BTreeMap<String, Tensor>>,
    preprocess: Preprocess,
    /// The metrics log (rank 0's alone).
    log: Option<MetricsLog>,
}

impl<'a> Run<'a> {
    /// Opens and checks the data, then sets up the models: drawn from the
    /// seed with the teacher's weights loaded, or, when resuming, as the
    /// checkpoint left them (the log cut back to it). With several
    /// processes, rank 0 alone reads the files and the others take its
    /// weights and position.
    fn open(config: &'a RunConfig, options: &'a TrainOptions, world: &'static World) -> Result<Self> {
        let arch = config.architecture()?;
        let Data {
            train_set,
            train_folder,
            val_set,
        } = open_data(config, &arch)?;
        if let Some(weights) = &config.teacher.weights {
            if !weights.exists() {
                return Err(Error::Config(format!(
                    "teacher weights {} not found: point [teacher] weights at the backbone's timm weights (.safetensors/.pth) or a bundle's weights.safetensors",
                    weights.display()
                )));
            }
        }
        for (key, weights) in [
            ("compressor_weights", &config.compressor_weights),
            ("encoder_weights", &config.encoder_weights),
        ] {
            if let Some(weights) = weights.as_ref().filter(|w| !w.exists()) {
                return Err(Error::Config(format!(
                    "{key} {} not found: point it at a bundle directory, its weights.safetensors or a run's checkpoint.safetensors",
                    weights.display()
                )));
            }
        }
        let out = &config.output;
        let root = world.is_root();
        if root {
            std::fs::create_dir_all(out).map_err(|e| Error::Data(format!("{}: {e}", out.display())))?;
        }
        // Fresh weights are drawn from the seed (a VarStore initialises on creation).
        tch::manual_seed(config.seed as i64);
        let device = world.device(options.device);
        let mut models = Models::new(&arch, device);
        let checkpoint_path = out.join(CHECKPOINT);
        let (progress, saved_optimizer) = if !root {
            (Progress::default(), None)
        } else if options.resume {
            let (progress, optimizer) = load_checkpoint(&checkpoint_path, &mut models)?;
            truncate_metrics(&out.join(METRICS), progress.global_step)?;
            (progress, Some(optimizer))
        } else {
            if checkpoint_path.exists() {
                return Err(Error::Config(format!(
                    "{} already holds a run; pass --resume to continue it or choose another output",
                    out.display()
                )));
            }
            if let Some(weights) = &config.teacher.weights {
                models.load_teacher(weights)?;
            }
            if let Some(weights) = &config.compressor_weights {
                models.load_compressor(weights, false)?;
            }
            if let Some(weights) = &config.encoder_weights {
                models.load_compressor(weights, true)?;
            }
            (Progress::default(), None)
        };
        let progress = share_progress(world, progress)?;
        let mut variables = Models::named(&models.compressor_vars).into_values().collect::<Vec<_>>();
        variables.extend(Models::named(&models.backbone_vars).into_values());
        world.broadcast_tensors(&variables)?;
        let preprocess = Preprocess::for_input(arch.compressor.input_size as u32);
        let log = if root {
            Some(MetricsLog::open(&out.join(METRICS))?)
        } else {
            None
        };
        Ok(Self {
            config,
            options,
            world,
            device,
            arch,
            train_set,
            train_folder,
            val_set,
            models,
            progress,
            saved_optimizer,
            preprocess,
            log,
        })
    }

    /// `name` in the run's output directory.
    fn file(&self, name: &str) -> PathBuf {
        self.config.output.join(name)
    }

    /// Pixels of a network input.
    fn pixels(&self) -> f64 {
        (self.arch.compressor.input_size * self.arch.compressor.input_size) as f64
    }

    /// The run's saved saliency maps and the training folder they mirror,
    /// when it has both.
    fn saved_maps(&self) -> Option<(&Path, &ImageFolder)> {
        match (&self.config.data.saliency, &self.train_folder) {
            (Some(dir), Some(folder)) => Some((dir.as_path(), folder)),
            _ => None,
        }
    }

    /// Runs the current stage from where the run stands; breaks when the run
    /// stops early.
    fn stage(&mut self) -> Result<ControlFlow<()>> {
        let config = self.config;
        let stage = &config.stages[self.progress.stage];
        if stage.kind == StageKind::Saliency {
            self.write_saved_maps()?;
        }
        let mut optimizer = stage_optimizer(&mut self.models, stage);
        if let Some(saved) = self.saved_optimizer.take() {
            optimizer
                .load_state(&saved, self.progress.optimizer_step)
                .map_err(Error::Config)?;
        }
        if self.world.size > 1 {
            // Rank 0's moments (a resumed stage's); every rank then applies the same updates.
            optimizer.step = self.progress.optimizer_step;
            let moments = optimizer.moments().map(Tensor::shallow_clone);
            self.world.broadcast_tensors(&moments)?;
        }
        while self.progress.epoch < stage.epochs {
            if self.epoch(stage, &mut optimizer)?.is_break() {
                return Ok(ControlFlow::Break(()));
            }
        }
        self.end_stage(stage, &optimizer)?;
        Ok(ControlFlow::Continue(()))
    }

    /// Before a saliency stage, writes the maps missing from the run's map
    /// directory; they come from the teacher as it now is, existing ones are
    /// kept. Rank 0 writes them while the others wait (the directory must
    /// be one that every rank reads, as the training folder is).
    fn write_saved_maps(&self) -> Result<()> {
        let Some((dir, folder)) = self.saved_maps() else {
            return Ok(());
        };
        if !self.world.is_root() {
            self.world.barrier()?;
            return Ok(());
        }
        let maps = MapsConfig {
            batch_size: 16,
            workers: self.config.workers,
            progress: self.options.progress,
            overlay: None,
            ..maps_config(&self.arch)
        };
        let backbone = SplitBackbone {
            head: &self.models.head,
            tail: &self.models.tail,
        };
        let written = generate_maps(&backbone, folder, &self.preprocess, dir, &maps, self.device)?;
        if written > 0 && self.options.progress {
            eprintln!("wrote {written} saliency maps to {}", dir.display());
        }
        self.world.barrier()?;
        Ok(())
    }

    /// The training batches of the current epoch, from the current batch on.
    fn loader(&self, stage: &StageConfig) -> Loader {
        let augment = stage.augment.unwrap_or(match stage.kind {
            StageKind::Saliency => Augment::SquareResizeCenterCrop,
            _ => Augment::RandomResizedCrop,
        });
        let transform = Arc::new(Transform {
            augment,
            preprocess: self.preprocess.clone(),
        });
        let loader_config = LoaderConfig {
            batch_size: stage.batch_size,
            shuffle: true,
            drop_last: true,
            workers: self.config.workers,
            prefetch: 2 * self.config.workers.max(1),
            seed: self.config.seed ^ ((self.progress.stage as u64) << 48),
            shard: Some((self.world.rank, self.world.size)),
        };
        Loader::start(
            self.train_set.clone(),
            transform,
            &loader_config,
            self.progress.epoch,
            self.progress.batch,
        )
    }

    /// Trains the rest of the current epoch, logging and checkpointing every
    /// `checkpoint_every` steps, then validates it; breaks when the run stops early.
    fn epoch(&mut self, stage: &StageConfig, optimizer: &mut Adam) -> Result<ControlFlow<()>> {
        let loader = self.loader(stage);
        let bar = progress_bar(
            self.options.progress && self.world.is_root(),
            loader.num_batches() as u64,
            self.progress.batch as u64,
            stage,
            &self.progress,
        );
        let mut stretch = Stretch::default();
        let mut shown = Instant::now();
        let batches = loader.num_batches();
        for batch in loader {
            let batch = batch?;
            optimizer.lr = stage.lr_at(self.progress.epoch, self.progress.batch, batches);
            let (terms, seconds) = self.step(stage, optimizer, &batch)?;
            let compressor = stage.kind != StageKind::Teacher;
            stretch.add(&terms, compressor, batch.len() * self.world.size, seconds);
            // The message reads the loss from the device: at most once a second.
            if !bar.is_hidden() && shown.elapsed().as_secs_f64() >= 1.0 {
                bar.set_message(stretch.message(optimizer.lr, self.pixels()));
                shown = Instant::now();
            }
            bar.inc(1);
            let every = self.config.checkpoint_every as u64;
            if every > 0 && self.progress.global_step.is_multiple_of(every) {
                self.log_stretch(&mut stretch, stage.kind, optimizer.lr)?;
                stretch = Stretch::default();
                self.checkpoint(optimizer)?;
                if self
                    .options
                    .stop_after_steps
                    .is_some_and(|n| self.progress.global_step >= n)
                {
                    bar.finish_and_clear();
                    return Ok(ControlFlow::Break(()));
                }
            }
        }
        bar.finish_and_clear();
        if stretch.images > 0 {
            self.log_stretch(&mut stretch, stage.kind, optimizer.lr)?;
        }
        if self.world.is_root() {
            self.validate(stage, optimizer.lr)?;
        }
        self.progress.epoch += 1;
        self.progress.batch = 0;
        self.checkpoint(optimizer)?;
        Ok(ControlFlow::Continue(()))
    }

    /// Logs the means of a stretch of training steps.
    fn log_stretch(&mut self, stretch: &mut Stretch, kind: StageKind, lr: f64) -> Result<()> {
        let line = stretch.line(self.progress.stage, kind, &self.progress, lr, self.pixels());
        match &mut self.log {
            Some(log) => log.write(&line),
            None => Ok(()),
        }
    }

    /// One optimiser step on `batch` (this rank's share of the global
    /// batch): the global batch's loss terms (`[loss, distortion, bits]`,
    /// left on the device with one process) and the seconds it took.
    ///
    /// With several ranks the gradients are averaged across them before the
    /// step. A teacher's loss is a mean over the batch, so the average is
    /// the global batch's gradient; a compressor's loss is a sum over the
    /// batch, so each rank scales its own by the number of ranks (the
    /// auxiliary loss, which does not depend on the batch, is not scaled).
    /// The latent noise is drawn for the whole global batch and each rank
    /// takes its samples' rows, as one process would have drawn it.
    fn step(&mut self, stage: &StageConfig, optimizer: &mut Adam, batch: &Batch) -> Result<(Tensor, f64)> {
        // Torch's generator (the latent noise) follows the step, so a resumed run draws what it would have.
        let seed = (self.config.seed as i64) ^ (self.progress.global_step as i64).wrapping_mul(0x2545_F491);
        tch::manual_seed(seed);
        let size = self.arch.compressor.input_size;
        let device = self.device;
        let ranks = self.world.size;
        let x = Tensor::from_slice(&batch.images)
            .view([batch.len() as i64, 3, size, size])
            .to_device(device);
        let amp = self.config.mixed_precision;
        let started = Instant::now();
        let terms = match stage.kind {
            StageKind::Teacher => {
                let labels = Tensor::from_slice(&batch.labels).to_device(device);
                let loss = teacher_step(&self.models, &x, &labels, stage.label_smoothing, stage.freeze_head, amp);
                optimizer.zero_grad();
                loss.backward();
                let loss = loss.detach().to_kind(Kind::Double).reshape([1]);
                Tensor::cat(&[loss, Tensor::zeros([2], (Kind::Double, device))], 0)
            }
            StageKind::Distill | StageKind::Saliency => {
                let saliency = match (stage.kind, self.saved_maps()) {
                    (StageKind::Saliency, Some((dir, folder))) => {
                        Some(saliency_batch(dir, folder, &batch.samples, device)?)
                    }
                    (StageKind::Saliency, None) => Some(online_saliency(&self.models, &x, &batch.labels)?),
                    _ => None,
                };
                optimizer.zero_grad();
                let noise = (ranks > 1).then(|| self.global_noise(batch.len(), device));
                let terms = compressor_step(&self.models, &x, stage.lmbda, saliency.as_ref(), noise.as_ref(), amp);
                backward_over_ranks(&terms.loss_tensor, ranks);
                self.models.compressor.entropy_bottleneck.aux_loss().backward();
                terms.terms
            }
            StageKind::Decoder => {
                optimizer.zero_grad();
                let terms = decoder_step(&self.models, &x, amp);
                backward_over_ranks(&terms.loss_tensor, ranks);
                terms.terms
            }
        };
        self.world.average_gradients(optimizer.params())?;
        optimizer.step();
        let terms = self.global_terms(terms, stage.kind)?;
        self.progress.batch += 1;
        self.progress.global_step += 1;
        self.progress.optimizer_step = optimizer.step;
        Ok((terms, started.elapsed().as_secs_f64()))
    }

    /// The latent noise of this rank's `local` samples: drawn for the global
    /// batch (from torch's generator, as the compressor draws it), rows
    /// `rank, rank + ranks, …` — the rows of this rank's samples.
    fn global_noise(&self, local: usize, device: Device) -> Tensor {
        let (rank, ranks) = (self.world.rank as i64, self.world.size as i64);
        let c = &self.arch.compressor;
        let side = c.latent_size();
        let all = Tensor::rand(
            [local as i64 * ranks, c.latent_channels, side, side],
            (Kind::Float, device),
        ) - 0.5;
        all.slice(0, rank, None, ranks)
    }

    /// A step's loss terms over the global batch: sums over the ranks (a
    /// teacher's mean loss, averaged), on the device for NCCL, through the
    /// host for MPI; with one process, the terms as they are, on the device.
    fn global_terms(&self, terms: Tensor, kind: StageKind) -> Result<Tensor> {
        if self.world.size <= 1 {
            return Ok(terms);
        }
        let summed = self.world.sum_tensor(terms.to_kind(Kind::Double))?;
        Ok(if kind == StageKind::Teacher {
            summed / self.world.size as f64
        } else {
            summed
        })
    }

    /// Validates the epoch's weights and logs the result; keeps them as the
    /// run's teacher or bundle when they are the best so far (always, with
    /// `keep = "last"`).
    fn validate(&mut self, stage: &StageConfig, lr: f64) -> Result<()> {
        let val = self.evaluate(stage.kind)?;
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        log.write(&MetricsLine {
            split: "val".into(),
            stage: self.progress.stage,
            kind: stage.kind,
            epoch: self.progress.epoch,
            global_step: self.progress.global_step,
            lr,
            loss: None,
            distortion: val.distortion,
            bpp: val.bpp,
            top1: Some(val.top1),
            images_per_s: None,
        })?;
        if self.options.progress {
            eprintln!(
                "stage {} ({:?}) epoch {}/{}: val top-1 {:.2} %{}",
                self.progress.stage,
                stage.kind,
                self.progress.epoch + 1,
                stage.epochs,
                val.top1,
                val.bpp.map(|b| format!(", {b:.4} bpp")).unwrap_or_default()
            );
        }
        let best = match stage.kind {
            StageKind::Teacher => &mut self.progress.best_teacher_top1,
            _ => &mut self.progress.best_top1,
        };
        let improved = best.is_none_or(|best| val.top1 > best);
        if improved {
            *best = Some(val.top1);
        }
        if improved || self.config.keep == Keep::Last {
            match stage.kind {
                StageKind::Teacher => write_teacher(&self.file(TEACHER), &self.models)?,
                _ => write_run_bundle(
                    &self.file(BUNDLE),
                    &self.models,
                    self.train_set.classes(),
                    self.config,
                    stage,
                )?,
            }
        }
        Ok(())
    }

    /// Top-1 on the validation set: the whole backbone for a teacher stage;
    /// otherwise the compressor with rounding (no real coding) in front of the
    /// backbone tail, with the estimated bits per pixel and the distortion.
    fn evaluate(&self, kind: StageKind) -> Result<Validation> {
        let device = self.device;
        let transform = Arc::new(Transform {
            augment: Augment::ResizeCenterCrop,
            preprocess: self.preprocess.clone(),
        });
        let loader_config = LoaderConfig {
            batch_size: 32,
            shuffle: false,
            drop_last: false,
            workers: self.config.workers,
            prefetch: 2 * self.config.workers.max(1),
            seed: self.config.seed,
            shard: None,
        };
        let size = i64::from(self.preprocess.crop);
        let (mut correct, mut seen, mut bits, mut distortion) = (0i64, 0i64, 0f64, 0f64);
        for batch in Loader::start(self.val_set.clone(), transform, &loader_config, 0, 0) {
            let batch = batch?;
            let x = Tensor::from_slice(&batch.images)
                .view([batch.len() as i64, 3, size, size])
                .to_device(device);
            let labels = Tensor::from_slice(&batch.labels).to_device(device);
            let logits = tch::no_grad(|| match kind {
                StageKind::Teacher => self.models.logits(&x, false),
                _ => {
                    let target = self.models.head.forward_t(&x, false);
                    let out = self.models.compressor.forward_t(&x, false);
                    bits += out.likelihoods.log2().sum(Kind::Double).neg().double_value(&[]);
                    distortion += (&out.features - &target).square().sum(Kind::Double).double_value(&[]);
                    self.models.tail.forward_t(&out.features, false)
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

    /// Ends the current stage and moves on to the next.
    fn end_stage(&mut self, stage: &StageConfig, optimizer: &Adam) -> Result<()> {
        let root = self.world.is_root();
        if stage.kind == StageKind::Teacher {
            // Later stages distil from the kept teacher (rank 0's file, sent to the other ranks).
            if root {
                let best = Tensor::read_safetensors(self.file(TEACHER))?.into_iter().collect();
                load_into(&mut self.models.backbone_vars, best)?;
            }
            let backbone: Vec<Tensor> = Models::named(&self.models.backbone_vars).into_values().collect();
            self.world.broadcast_tensors(&backbone)?;
        } else if root && self.progress.stage + 1 < self.config.stages.len() {
            // The compressor as this stage left it, for comparing stages (stage 1 alone against 1 + 2).
            let dir = self.file(&format!("{BUNDLE}-after-stage{}", self.progress.stage));
            write_run_bundle(&dir, &self.models, self.train_set.classes(), self.config, stage)?;
        }
        self.progress.stage += 1;
        self.progress.epoch = 0;
        self.progress.batch = 0;
        self.progress.optimizer_step = 0;
        self.checkpoint(optimizer)
    }

    /// Replaces the run's checkpoint with the current state (rank 0's job).
    fn checkpoint(&self, optimizer: &Adam) -> Result<()> {
        if !self.world.is_root() {
            return Ok(());
        }
        write_checkpoint(&self.file(CHECKPOINT), &self.models, optimizer, &self.progress)
    }

    /// A run stopped early (`stop_after_steps`) has only its checkpoint to show.
    fn stopped(self) -> RunSummary {
        RunSummary {
            progress: self.progress,
            bundle: None,
            teacher: None,
        }
    }

    /// What the finished run produced.
    fn finished(self) -> RunSummary {
        let stages = &self.config.stages;
        let trained_compressor = stages.iter().any(|s| s.kind != StageKind::Teacher);
        let trained_teacher = stages.iter().any(|s| s.kind == StageKind::Teacher);
        RunSummary {
            bundle: trained_compressor.then(|| self.file(BUNDLE)),
            teacher: trained_teacher.then(|| self.file(TEACHER)),
            progress: self.progress,
        }
    }
}

/// Rank 0's progress, on every rank.
fn share_progress(world: &World, progress: Progress) -> Result<Progress> {
    if world.size <= 1 {
        return Ok(progress);
    }
    let mut bytes = serde_json::to_vec(&progress).map_err(|e| Error::Data(e.to_string()))?;
    world.broadcast_bytes(&mut bytes)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Data(format!("rank 0's progress: {e}")))
}

/// A run's images.
struct Data {
    train_set: Arc<dyn Source>,
    train_folder: Option<Arc<ImageFolder>>,
    val_set: Arc<ImageFolder>,
}

/// The training source, the training folder when it is one, and the
/// validation folder (cut to `val_limit`), checked against each other and
/// against the backbone's classes.
fn open_data(config: &RunConfig, arch: &Architecture) -> Result<Data> {
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
    if train_set.classes().len() as i64 > arch.backbone.num_classes() {
        return Err(Error::Config(format!(
            "the data has {} classes, the backbone {} outputs",
            train_set.classes().len(),
            arch.backbone.num_classes()
        )));
    }
    Ok(Data {
        train_set,
        train_folder,
        val_set,
    })
}

/// At most `limit` of `items`, evenly spaced.
fn spread<T: Clone>(items: &[T], limit: usize) -> Vec<T> {
    if limit == 0 || limit >= items.len() {
        return items.to_vec();
    }
    (0..limit).map(|i| items[i * items.len() / limit].clone()).collect()
}

/// Back-propagates a compressor's loss, a sum over this rank's samples:
/// scaled by the number of ranks, so that the averaged gradients are those
/// of the global batch's sum.
fn backward_over_ranks(loss: &Tensor, ranks: usize) {
    if ranks > 1 {
        (loss * ranks as f64).backward();
    } else {
        loss.backward();
    }
}

/// Adam (AdamW with a weight decay) over what the stage trains; the rest is frozen.
fn stage_optimizer(models: &mut Models, stage: &StageConfig) -> Adam {
    let mut optimizer = match stage.kind {
        StageKind::Teacher => {
            models.set_backbone_trainable(true);
            models.compressor_vars.freeze();
            let mut trained = Models::named(&models.backbone_vars);
            if stage.freeze_head {
                let head = models.head_variables();
                for (name, tensor) in &head {
                    trained.remove(name);
                    let _ = tensor.set_requires_grad(false);
                }
            }
            Adam::new(trained, stage.lr)
        }
        StageKind::Decoder => {
            models.set_backbone_trainable(false);
            models.compressor_vars.freeze();
            let decoder: BTreeMap<String, Tensor> = Models::named(&models.compressor_vars)
                .into_iter()
                .filter(|(name, _)| name.starts_with(&names::DECODER[names::COMPRESSOR.len()..]))
                .map(|(name, tensor)| (name, tensor.set_requires_grad(true)))
                .collect();
            Adam::new(decoder, stage.lr)
        }
        StageKind::Distill | StageKind::Saliency => {
            models.set_backbone_trainable(false);
            models.compressor_vars.unfreeze();
            Adam::new(Models::named(&models.compressor_vars), stage.lr)
        }
    };
    optimizer.weight_decay = stage.weight_decay;
    optimizer
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
    let backbone = SplitBackbone {
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

/// A validation pass's results.
struct Validation {
    top1: f64,
    bpp: Option<f64>,
    distortion: Option<f64>,
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
}
