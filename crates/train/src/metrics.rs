//! What a run reports: `metrics.jsonl` (one [`MetricsLine`] per stretch of
//! training steps and per validation), the running means of a stretch, the
//! progress bar, and cutting the log back to a checkpoint on resume.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::config::{StageConfig, StageKind};
use crate::loss::StepTerms;
use crate::state::{write_atomically, Progress};
use crate::{Error, Result};

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

/// Sums of the steps since the last line written to the log.
///
/// The loss terms (`[loss, distortion, bits]` in `f64`) are summed where the
/// steps computed them and read when a line or message is made, so that a
/// step on a GPU does not wait for its loss to reach the host. The seconds
/// are the steps' own; the wait for that read (the device finishing the
/// queued steps, nothing on a CPU) is added to them, so images/s counts the
/// device's work, not only the host's.
#[derive(Default)]
pub(crate) struct Stretch {
    pending: Option<Tensor>,
    loss: f64,
    distortion: f64,
    bits: f64,
    steps: usize,
    pub(crate) images: usize,
    seconds: f64,
    compressor: bool,
}

impl Stretch {
    /// Adds a step: its terms (three values, see [`Stretch`]), a compressor's or a teacher's.
    pub(crate) fn add(&mut self, terms: &Tensor, compressor: bool, images: usize, seconds: f64) {
        self.pending = Some(match self.pending.take() {
            Some(sums) => sums + terms,
            None => terms.shallow_clone(),
        });
        self.compressor = compressor;
        self.steps += 1;
        self.images += images;
        self.seconds += seconds;
    }

    /// Brings the sums of the steps so far to the host.
    fn settle(&mut self) {
        if let Some(sums) = self.pending.take() {
            let started = Instant::now();
            let sums = StepTerms::read(&sums, true);
            self.seconds += started.elapsed().as_secs_f64();
            self.loss += sums.loss;
            self.distortion += sums.distortion.unwrap_or(0.0);
            self.bits += sums.bits.unwrap_or(0.0);
        }
    }

    pub(crate) fn message(&mut self, lr: f64, pixels: f64) -> String {
        self.settle();
        let steps = self.steps.max(1) as f64;
        let mut text = format!("loss {:.4}", self.loss / steps);
        if self.compressor {
            text += &format!(" bpp {:.4}", self.bits / (self.images.max(1) as f64 * pixels));
        }
        text + &format!(" lr {lr:.2e} {:.1} img/s", self.images as f64 / self.seconds.max(1e-9))
    }

    pub(crate) fn line(
        &mut self,
        stage: usize,
        kind: StageKind,
        progress: &Progress,
        lr: f64,
        pixels: f64,
    ) -> MetricsLine {
        self.settle();
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

/// A bar over an epoch's batches, hidden unless `show`.
pub(crate) fn progress_bar(show: bool, total: u64, done: u64, stage: &StageConfig, progress: &Progress) -> ProgressBar {
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

/// `metrics.jsonl`, appended to line by line.
pub(crate) struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
        Ok(Self { file })
    }

    pub(crate) fn write(&mut self, line: &MetricsLine) -> Result<()> {
        let text = serde_json::to_string(line).map_err(|e| Error::Data(e.to_string()))?;
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::Data(format!("metrics log: {e}")))
    }
}

/// Drops log lines written after the checkpoint a run resumes from, so the
/// log reads as one uninterrupted run.
pub(crate) fn truncate_metrics(path: &Path, global_step: u64) -> Result<()> {
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
