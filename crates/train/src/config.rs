//! The run file: what a training run reads from its TOML (data, teacher,
//! compressor, stages, what to keep), with its defaults, relative paths taken
//! from the file's directory, and the checks made before anything runs.

use std::path::{Path, PathBuf};

use frankensplit_models::{Architecture, BackboneConfig, CompressorConfig};
use serde::{Deserialize, Serialize};

use crate::data::Augment;
use crate::synthetic::StreamConfig;
use crate::{Error, Result};

/// The backbone: a timm preset name or a full configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BackboneSpec {
    /// `swin_s3_base_224`, `resnet50`, `convnext_tiny`, …
    Preset(String),
    /// A [`BackboneConfig`]: its `family` and that family's fields.
    Config(BackboneConfig),
}

impl BackboneSpec {
    fn resolve(&self) -> Result<BackboneConfig> {
        match self {
            Self::Preset(name) => BackboneConfig::preset(name).ok_or_else(|| {
                Error::Config(format!(
                    "unknown backbone preset {name:?}; presets: {}",
                    BackboneConfig::preset_names().join(", ")
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
    /// Only the decoder, by head distillation against this run's teacher,
    /// in front of a frozen edge encoder and prior (from `encoder_weights`
    /// or `compressor_weights`): a decoder for another backbone that
    /// decodes the payloads the encoder already sends, byte for byte. It
    /// learns from the dequantised latents the server receives; it has no
    /// rate term.
    Decoder,
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
    /// A `teacher` stage trains only the tail (stages from `split_stage` on
    /// and the classifier): the head's features, which compressors learn to
    /// restore, stay as they were, so compressors distilled from it stay valid.
    #[serde(default)]
    pub freeze_head: bool,
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
    /// Weights the compressor starts from instead of the seed's draw: a
    /// bundle directory, a weights file (a bundle's, a built-in model's
    /// `compressor.safetensors`) or a run's checkpoint, whose `compressor.`
    /// tensors fit `[compressor]`. For fine-tuning, or for a longer schedule
    /// after a finished run; a resumed run takes its checkpoint's instead.
    #[serde(default)]
    pub compressor_weights: Option<PathBuf>,
    /// The edge encoder and prior the compressor starts from (the `g_a` and
    /// `entropy_bottleneck` tensors of a bundle directory, weights file or
    /// checkpoint), its decoder drawn fresh from the seed: what a `decoder`
    /// stage needs to serve a new backbone from an existing encoder's
    /// payloads.
    #[serde(default)]
    pub encoder_weights: Option<PathBuf>,
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
        if let Some(p) = config.compressor_weights.as_mut() {
            rebase(p);
        }
        if let Some(p) = config.encoder_weights.as_mut() {
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
            if stage.kind == StageKind::Decoder && stage.lmbda != 0.0 {
                return Err(Error::Config(format!(
                    "stage {i}: a `decoder` stage has no rate term (the encoder is frozen): remove lmbda"
                )));
            }
            if stage.freeze_head && stage.kind != StageKind::Teacher {
                return Err(Error::Config(format!(
                    "stage {i}: freeze_head applies to a `teacher` stage (compressor stages never train the backbone)"
                )));
            }
            if stage.freeze_head && self.teacher.weights.is_none() && i == 0 {
                return Err(Error::Config(format!(
                    "stage {i}: freeze_head keeps the head as it is, so the head needs trained weights: set [teacher] weights"
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
        let trains_decoder_only = self.stages.iter().any(|s| s.kind == StageKind::Decoder);
        if trains_decoder_only {
            if self.encoder_weights.is_none() && self.compressor_weights.is_none() {
                return Err(Error::Config(
                    "a `decoder` stage keeps the edge encoder and prior it starts from: set encoder_weights (or compressor_weights)".into(),
                ));
            }
            if self
                .stages
                .iter()
                .any(|s| matches!(s.kind, StageKind::Distill | StageKind::Saliency))
            {
                return Err(Error::Config(
                    "a run with a `decoder` stage cannot also have `distill` or `saliency` stages: they would change the encoder whose payloads the decoder must read".into(),
                ));
            }
        }
        if self.encoder_weights.is_some() && self.compressor_weights.is_some() {
            return Err(Error::Config(
                "give encoder_weights or compressor_weights, not both (the second would overwrite the first's encoder)"
                    .into(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
