//! Datasets and the input pipeline for training: ImageFolder trees (one
//! folder per class) and generated streams behind one [`Source`] trait,
//! torchvision's transforms as the reference uses them, and a multi-threaded
//! loader whose batches depend only on the seed, the epoch and the batch
//! index — not on thread timing — so a resumed run sees the same batches it
//! would have seen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use frankensplit_preprocess::{resize_bilinear, Preprocess, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where a loader's samples come from: a fixed set of files, or a
/// generator that draws new images every epoch.
pub trait Source: Send + Sync {
    /// Samples per epoch.
    fn len(&self) -> usize;
    /// Whether an epoch has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class names; a sample's label indexes this list.
    fn classes(&self) -> &[String];
    /// Sample `index` as it is in `epoch`, with its label.
    fn sample(&self, index: usize, epoch: usize) -> Result<(RgbImage, i64)>;
}

// Listed by the preprocess crate, so that evaluating needs no training crate.
pub use frankensplit_preprocess::ImageFolder;

impl Source for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn sample(&self, index: usize, _epoch: usize) -> Result<(RgbImage, i64)> {
        let (path, label) = &self.samples[index];
        Ok((RgbImage::open(path)?, *label))
    }
}

/// How training images are cropped and resized before normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// Stage 1 and teacher training: torchvision `RandomResizedCrop(size)`
    /// (scale 0.08–1, ratio ¾–4⁄3) and a horizontal flip with probability ½.
    RandomResizedCrop,
    /// Stage 2: `Resize((resize, resize))` (square, aspect not kept), then `CenterCrop(size)`.
    SquareResizeCenterCrop,
    /// Validation: `Resize(resize)` (short side), then `CenterCrop(size)`.
    ResizeCenterCrop,
    /// Small-data training: `Resize(resize)` (short side), `RandomCrop(size)`
    /// and a horizontal flip with probability ½ — the CIFAR recipe, which
    /// varies the input without cutting the object out.
    RandomCropFlip,
}

/// The pipeline: geometry from [`Augment`], then ImageNet normalisation.
#[derive(Debug, Clone)]
pub struct Transform {
    /// Geometry.
    pub augment: Augment,
    /// Sizes and normalisation (`resize`, `crop`, mean, std).
    pub preprocess: Preprocess,
}

impl Transform {
    /// Applies the transform with `rng` drawing the random parameters.
    pub fn apply(&self, image: &RgbImage, rng: &mut impl Rng) -> Result<Vec<f32>> {
        let size = self.preprocess.crop;
        let out = match self.augment {
            Augment::ResizeCenterCrop => self.preprocess.resize_and_crop(image)?,
            Augment::SquareResizeCenterCrop => {
                let resize = self.preprocess.resize;
                let square = resize_bilinear(image, resize, resize);
                let offset = ((f64::from(resize - size)) / 2.0).round_ties_even() as u32;
                square.crop(offset, offset, size, size)
            }
            Augment::RandomResizedCrop => {
                let (left, top, width, height) = random_resized_crop(image.width, image.height, rng);
                let crop = image.crop(left, top, width, height);
                maybe_flip(resize_bilinear(&crop, size, size), rng)
            }
            Augment::RandomCropFlip => {
                let resized = self.preprocess.resize_short_side(image)?;
                let left = rng.gen_range(0..=resized.width - size);
                let top = rng.gen_range(0..=resized.height - size);
                maybe_flip(resized.crop(left, top, size, size), rng)
            }
        };
        Ok(self.preprocess.normalize(&out))
    }
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1) and
/// ratio (¾, 4⁄3): `(left, top, width, height)`.
pub fn random_resized_crop(width: u32, height: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = ((3f64 / 4.0).ln(), (4f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(0.08..1.0);
        let aspect = rng.gen_range(log_lo..log_hi).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    // Fallback: the largest centred crop with the ratio clamped into range.
    let ratio = f64::from(width) / f64::from(height);
    let (w, h) = if ratio < 0.75 {
        (width, ((f64::from(width) / 0.75).round() as u32).min(height))
    } else if ratio > 4.0 / 3.0 {
        (((f64::from(height) * 4.0 / 3.0).round() as u32).min(width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

fn maybe_flip(image: RgbImage, rng: &mut impl Rng) -> RgbImage {
    if rng.gen_bool(0.5) {
        flip_horizontally(&image)
    } else {
        image
    }
}

fn flip_horizontally(image: &RgbImage) -> RgbImage {
    let row = image.width as usize * 3;
    let mut pixels = Vec::with_capacity(image.pixels.len());
    for line in image.pixels.chunks_exact(row) {
        for px in line.chunks_exact(3).rev() {
            pixels.extend_from_slice(px);
        }
    }
    RgbImage {
        width: image.width,
        height: image.height,
        pixels,
    }
}

/// One batch: `images` holds `len` CHW inputs back to back.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position of the batch in its epoch.
    pub index: usize,
    /// Dataset indices of the samples.
    pub samples: Vec<usize>,
    /// `len · 3 · size · size` normalised values.
    pub images: Vec<f32>,
    /// Class labels.
    pub labels: Vec<i64>,
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the batch is empty (never, for batches from a [`Loader`]).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Settings of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch (the last batch of an epoch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Shuffle the samples each epoch.
    pub shuffle: bool,
    /// Drop a final incomplete batch (training does, as torchdistill's loaders do not;
    /// kept as an option so small datasets still give a batch).
    pub drop_last: bool,
    /// Worker threads decoding and transforming images.
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Seed of the shuffling and the augmentation.
    pub seed: u64,
    /// With several processes, `(rank, ranks)`: the batches are the same
    /// global batches of `batch_size` samples and this process takes
    /// samples `rank, rank + ranks, …` of each (DistributedSampler's
    /// strided shard of the epoch's order, batched); an incomplete batch is
    /// first padded to a multiple of `ranks` from the epoch's start, as
    /// DistributedSampler pads. `None` (or one rank): whole batches.
    pub shard: Option<(usize, usize)>,
}

/// The batches of an epoch's `order`: chunks of `batch_size`, the last one
/// dropped when incomplete and `drop_last` (unless it is the only one);
/// with a `shard`, each cut to that rank's samples.
pub fn epoch_batches(
    order: &[usize],
    batch_size: usize,
    drop_last: bool,
    shard: Option<(usize, usize)>,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut batches: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    if drop_last && batches.len() > 1 && batches.last().is_some_and(|b| b.len() < batch_size) {
        batches.pop();
    }
    let Some((rank, ranks)) = shard.filter(|&(_, ranks)| ranks > 1) else {
        return batches;
    };
    for batch in &mut batches {
        let short = batch.len().next_multiple_of(ranks) - batch.len();
        batch.extend(order.iter().cycle().take(short));
        *batch = batch.iter().skip(rank).step_by(ranks).copied().collect();
    }
    batches
}

/// The order of the samples in `epoch`.
pub fn epoch_order(len: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_0000_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        order.shuffle(&mut rng);
    }
    order
}

/// The random stream of one sample in one epoch.
fn sample_rng(seed: u64, epoch: usize, sample: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((epoch as u64) << 32) ^ sample as u64);
    rng
}

/// Loads the batches of one epoch on worker threads, delivering them in order.
pub struct Loader {
    receiver: Receiver<(usize, Result<Batch>)>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    end: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts loading the batches `first_batch..` of `epoch`.
    pub fn start(
        dataset: Arc<dyn Source>,
        transform: Arc<Transform>,
        config: &LoaderConfig,
        epoch: usize,
        first_batch: usize,
    ) -> Self {
        let order = epoch_order(dataset.len(), config.shuffle, config.seed, epoch);
        let batches = epoch_batches(&order, config.batch_size, config.drop_last, config.shard);
        let end = batches.len();
        let batches = Arc::new(batches);
        let cursor = Arc::new(AtomicUsize::new(first_batch.min(end)));
        let (sender, receiver) = sync_channel(config.prefetch.max(1));
        let seed = config.seed;
        let workers = (0..config.workers.max(1))
            .map(|_| {
                let (dataset, transform, batches, cursor, sender) = (
                    dataset.clone(),
                    transform.clone(),
                    batches.clone(),
                    cursor.clone(),
                    sender.clone(),
                );
                std::thread::spawn(move || loop {
                    let index = cursor.fetch_add(1, Ordering::SeqCst);
                    let Some(samples) = batches.get(index) else { break };
                    let batch = load_batch(dataset.as_ref(), &transform, samples, index, seed, epoch);
                    if sender.send((index, batch)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        Self {
            receiver,
            pending: BTreeMap::new(),
            next: first_batch.min(end),
            end,
            workers,
        }
    }

    /// Batches in the epoch (including any skipped at the start).
    pub fn num_batches(&self) -> usize {
        self.end
    }
}

fn load_batch(
    dataset: &dyn Source,
    transform: &Transform,
    samples: &[usize],
    index: usize,
    seed: u64,
    epoch: usize,
) -> Result<Batch> {
    let mut images = Vec::new();
    let mut labels = Vec::with_capacity(samples.len());
    for &sample in samples {
        let (image, label) = dataset.sample(sample, epoch)?;
        let mut rng = sample_rng(seed, epoch, sample);
        images.extend(transform.apply(&image, &mut rng)?);
        labels.push(label);
    }
    Ok(Batch {
        index,
        samples: samples.to_vec(),
        images,
        labels,
    })
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.receiver.recv() {
                Ok((index, batch)) => {
                    self.pending.insert(index, batch);
                }
                Err(_) => return Some(Err(Error::Data("the data loader's workers stopped".into()))),
            }
        }
        let batch = self.pending.remove(&self.next);
        self.next += 1;
        batch
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock workers waiting on a full channel, then let them finish.
        while self.receiver.try_recv().is_ok() {}
        let receiver = std::mem::replace(&mut self.receiver, sync_channel(1).1);
        drop(receiver);
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn shards_split_each_global_batch_as_distributed_sampler_does() {
        let order: Vec<usize> = (0..10).map(|i| 9 - i).collect();
        let whole = epoch_batches(&order, 4, true, None);
        assert_eq!(whole, [vec![9, 8, 7, 6], vec![5, 4, 3, 2]]);
        // Two ranks: rank r takes positions r, r + 2 of every global batch; together the same samples.
        let (a, b) = (
            epoch_batches(&order, 4, true, Some((0, 2))),
            epoch_batches(&order, 4, true, Some((1, 2))),
        );
        assert_eq!(a, [vec![9, 7], vec![5, 3]]);
        assert_eq!(b, [vec![8, 6], vec![4, 2]]);
        // DistributedSampler's shard of the order (rank r: r, r + W, …) batched per rank is the same thing.
        let strided: Vec<usize> = order.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(b.concat(), strided[..4]);
        // A batch that does not split evenly (the last, kept without drop_last) is padded from the epoch's start to a multiple of the ranks.
        let kept = epoch_batches(&order, 4, false, Some((2, 3)));
        assert_eq!(kept, [vec![7, 8], vec![3, 8], vec![9]]);
        assert_eq!(epoch_batches(&order, 4, false, Some((0, 3)))[2], [1]);
        assert_eq!(epoch_batches(&order, 4, false, Some((1, 3)))[2], [0]);
        // One rank is no shard.
        assert_eq!(epoch_batches(&order, 4, true, Some((0, 1))), whole);
    }

    #[test]
    fn random_crop_flip_takes_a_window_of_the_resized_image_sometimes_mirrored() {
        // 6×6 image whose red channel is x and green y: every pixel says where it came from.
        let side = 6u32;
        let pixels = (0..side * side)
            .flat_map(|i| [(i % side) as u8, (i / side) as u8, 7])
            .collect();
        let image = RgbImage {
            width: side,
            height: side,
            pixels,
        };
        let transform = Transform {
            augment: Augment::RandomCropFlip,
            preprocess: Preprocess {
                resize: side,
                crop: 4,
                ..Preprocess::default()
            },
        };
        let p = &transform.preprocess;
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let out = transform.apply(&image, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            assert_eq!(out.len(), 3 * 16);
            let channel = |c: usize, i: usize| ((out[c * 16 + i] * p.std[c] + p.mean[c]) * 255.0).round() as i32;
            let (left, top) = (channel(0, 0), channel(1, 0));
            let flipped = channel(0, 1) < left;
            for i in 0..16 {
                let (x, y) = ((i % 4) as i32, (i / 4) as i32);
                let expected_x = if flipped { left - x } else { left + x };
                assert_eq!((channel(0, i), channel(1, i)), (expected_x, top + y), "seed {seed}");
            }
            seen.insert((left, top, flipped));
        }
        // Offsets 0–2 on each axis, both orientations: most of the 18 show up.
        assert!(seen.len() >= 12, "{seen:?}");
        assert!(seen.iter().any(|s| s.2) && seen.iter().any(|s| !s.2));
    }
}
