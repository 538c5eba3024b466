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
    /// A dequantised latent (CHW): decoder, then the backbone tail.
    Latent(Vec<f32>),
    /// A preprocessed image (CHW): the whole backbone.
    Image(Vec<f32>),
}

/// A decoded request waiting for inference.
pub(crate) struct Job {
    pub input: Input,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobResult, String>>,
}

/// Logits of one request and how it was served.
pub(crate) struct JobResult {
    pub logits: Vec<f32>,
    pub labels: Arc<Vec<String>>,
    pub batch_size: usize,
    pub queue_ms: f64,
    pub inference_ms: f64,
}

impl JobResult {
    /// The `k` most probable classes (softmax over the logits).
    pub fn top_k(&self, k: usize) -> Vec<Prediction> {
        let max = self.logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f64> = self.logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut order: Vec<usize> = (0..self.logits.len()).collect();
        order.sort_by(|&a, &b| self.logits[b].total_cmp(&self.logits[a]));
        order
            .into_iter()
            .take(k)
            .map(|class| Prediction {
                class,
                label: self.labels.get(class).cloned(),
                probability: exp[class] / total,
                logit: self.logits[class],
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

/// Logits for every job of `batch`, in order: latents and images each go
/// through the networks as one batch.
fn infer(bundle: &Bundle, batch: &mut [Job]) -> frankensplit_models::Result<Vec<Vec<f32>>> {
    let mut latents = Vec::new();
    let mut images = Vec::new();
    for (i, job) in batch.iter_mut().enumerate() {
        match &mut job.input {
            Input::Latent(l) => latents.push((i, std::mem::take(l))),
            Input::Image(x) => images.push((i, std::mem::take(x))),
        }
    }
    let mut rows = vec![Vec::new(); batch.len()];
    if !latents.is_empty() {
        let (index, inputs): (Vec<usize>, Vec<Vec<f32>>) = latents.into_iter().unzip();
        let features = bundle.restore_features(&inputs)?;
        let logits = host_rows(&bundle.classify_features(&features))?;
        for (i, row) in index.into_iter().zip(logits) {
            rows[i] = row;
        }
    }
    if !images.is_empty() {
        let (index, inputs): (Vec<usize>, Vec<Vec<f32>>) = images.into_iter().unzip();
        let logits = host_rows(&bundle.classify_images(&inputs)?)?;
        for (i, row) in index.into_iter().zip(logits) {
            rows[i] = row;
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
