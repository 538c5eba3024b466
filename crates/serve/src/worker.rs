//! The inference thread: it owns the networks (libtorch state stays on one
//! thread), forms batches of up to `max_batch` requests arriving within
//! `batch_wait` of the first, runs latents and whole images of a batch as
//! one forward pass each, and answers each request's channel. The bundle
//! may be on a GPU and in reduced precision: a batch's latents (entropy-decoded
//! on the blocking pool's CPU threads, in parallel with this thread) go to the
//! device as one tensor, and the logits come back to the CPU as f32.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use frankensplit_api::Prediction;
use frankensplit_models::Bundle;
use tch::{Device, Kind, Tensor};
use tokio::sync::oneshot;

use crate::{Metrics, ServeConfig};

/// What a request asks the networks to classify.
pub(crate) enum Input {
    /// A dequantised latent (CHW): decoder, then the backbone tail, of the
    /// chosen backbones.
    Latent(Vec<f32>, Backbones),
    /// A preprocessed image (CHW): the whole (first) backbone.
    Image(Vec<f32>),
}

/// Which of the bundle's backbones classify a latent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backbones {
    /// The backbone of this index.
    One(usize),
    /// Every one, in the bundle's order.
    All,
}

impl Backbones {
    fn includes(self, index: usize) -> bool {
        self == Self::All || self == Self::One(index)
    }
}

/// A decoded request waiting for inference.
pub(crate) struct Job {
    pub input: Input,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobResult, String>>,
}

/// `(backbone index, logits)` for each backbone a request asked, in order.
pub(crate) type BackboneLogits = Vec<(usize, Vec<f32>)>;

/// Logits of one request and how it was served.
pub(crate) struct JobResult {
    pub logits: BackboneLogits,
    pub labels: Arc<Vec<String>>,
    pub batch_size: usize,
    pub queue_ms: f64,
    pub inference_ms: f64,
}

impl JobResult {
    /// The `k` most probable classes of `logits` (softmax over them).
    pub fn top_k(&self, logits: &[f32], k: usize) -> Vec<Prediction> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        order
            .into_iter()
            .take(k)
            .map(|class| Prediction {
                class,
                label: self.labels.get(class).cloned(),
                probability: exp[class] / total,
                logit: logits[class],
            })
            .collect()
    }
}

/// Starts the inference thread. Its queue is unbounded: admission control
/// bounds what requests can put in it.
pub(crate) fn spawn(bundle: Bundle, config: &ServeConfig, metrics: Arc<Metrics>) -> (Sender<Job>, JoinHandle<()>) {
    let (tx, rx) = channel();
    let max_batch = config.max_batch.max(1);
    let wait = config.batch_wait;
    let handle = std::thread::Builder::new()
        .name("frankensplit-inference".into())
        .spawn(move || run(bundle, rx, max_batch, wait, metrics))
        .expect("the inference thread starts");
    (tx, handle)
}

fn run(bundle: Bundle, rx: Receiver<Job>, max_batch: usize, wait: Duration, metrics: Arc<Metrics>) {
    let labels = Arc::new(bundle.manifest.labels.clone());
    while let Ok(first) = rx.recv() {
        let deadline = Instant::now() + wait;
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queue_depth.dec_by(batch.len() as i64);
        // Requests that timed out (their handler gave up and dropped the
        // receiver) are not computed.
        let before = batch.len();
        batch.retain(|job| !job.reply.is_closed());
        metrics.abandoned.inc_by((before - batch.len()) as u64);
        if batch.is_empty() {
            continue;
        }
        metrics.batch_size.observe(batch.len() as f64);
        let started = Instant::now();
        let outcome = infer(&bundle, &mut batch);
        let inference_ms = started.elapsed().as_secs_f64() * 1e3;
        let size = batch.len();
        match outcome {
            Ok(rows) => {
                for (job, logits) in batch.into_iter().zip(rows) {
                    let queue_ms = (started - job.enqueued).as_secs_f64() * 1e3;
                    let _ = job.reply.send(Ok(JobResult {
                        logits,
                        labels: labels.clone(),
                        batch_size: size,
                        queue_ms,
                        inference_ms,
                    }));
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(format!("inference failed: {e}")));
                }
            }
        }
    }
}

/// Logits for every job of `batch`, in order: for each backbone, the
/// latents that ask for it go through its decoder and tail as one batch;
/// images go through the whole first backbone as one.
fn infer(bundle: &Bundle, batch: &mut [Job]) -> frankensplit_models::Result<Vec<BackboneLogits>> {
    let mut latents = Vec::new();
    let mut images = Vec::new();
    for (i, job) in batch.iter_mut().enumerate() {
        match &mut job.input {
            Input::Latent(l, backbones) => latents.push((i, std::mem::take(l), *backbones)),
            Input::Image(x) => images.push((i, std::mem::take(x))),
        }
    }
    let mut rows = vec![Vec::new(); batch.len()];
    for backbone in 0..=bundle.more.len() {
        let (index, inputs): (Vec<usize>, Vec<&[f32]>) = latents
            .iter()
            .filter(|(_, _, chosen)| chosen.includes(backbone))
            .map(|(i, latent, _)| (*i, latent.as_slice()))
            .unzip();
        if inputs.is_empty() {
            continue;
        }
        let features = bundle.restore_features_for(backbone, &inputs)?;
        let logits = host_rows(&bundle.classify_features_for(backbone, &features)?)?;
        for (i, row) in index.into_iter().zip(logits) {
            rows[i].push((backbone, row));
        }
    }
    if !images.is_empty() {
        let (index, inputs): (Vec<usize>, Vec<Vec<f32>>) = images.into_iter().unzip();
        let logits = host_rows(&bundle.classify_images(&inputs)?)?;
        for (i, row) in index.into_iter().zip(logits) {
            rows[i].push((0, row));
        }
    }
    Ok(rows)
}

/// Logits `(B, classes)` from the bundle's device and precision as f32 rows on the CPU.
fn host_rows(logits: &Tensor) -> frankensplit_models::Result<Vec<Vec<f32>>> {
    Ok(Vec::<Vec<f32>>::try_from(
        logits.to_kind(Kind::Float).to_device(Device::Cpu),
    )?)
}
