//! Saliency maps as the reference computes them offline: XGradCAM on the
//! ground-truth class at `norm1` of the last block of each of the given
//! stages (the reference: stages 1, 2, 3 of Swin-S3-B), eigen-smoothed
//! (projection on the first principal component), ReLU, min-max
//! normalised, resized (OpenCV's bilinear) to the latent grid, averaged over
//! layers, ReLU, normalised again; NaN becomes 0.5. pytorch-grad-cam's
//! `XGradCAM(…, eigen_smooth=True)` with the reference's aggregation.
//!
//! One deliberate difference: a principal component's sign is arbitrary,
//! and pytorch-grad-cam keeps whatever numpy's LAPACK returns, so after the
//! ReLU its maps keep one half of the projection or the other at random
//! (per image and layer; measured: numpy and libtorch agree on about half
//! of the 196×384 matrices of Swin-S3-B's stage 2). Here the component is
//! oriented to correlate positively with the plain XGradCAM map, i.e.
//! towards evidence for the class.

use std::path::Path;
use std::sync::Arc;

use frankensplit_models::Backbone;
use frankensplit_preprocess::{Preprocess, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{Device, Kind, Tensor};

use crate::data::{Augment, ImageFolder, Loader, LoaderConfig, Transform};
use crate::{npy, Error, Result};

/// The whole backbone as head (stages before the split) and tail.
pub struct SplitBackbone<'a> {
    /// Stages `0..split`.
    pub head: &'a Backbone,
    /// Stages `split..`, ending in the classifier.
    pub tail: &'a Backbone,
}

/// XGradCAM maps `(B, side, side)` for a batch `x` `(B, 3, S, S)` and its
/// labels, from the last block of each stage in `stages`; with
/// `eigen_smooth`, each layer's map is the oriented first principal
/// component of the weighted activations instead of their channel sum.
pub fn xgradcam(
    backbone: &SplitBackbone<'_>,
    x: &Tensor,
    labels: &[i64],
    stages: &[usize],
    side: usize,
    eigen_smooth: bool,
) -> Result<Vec<Vec<f32>>> {
    let batch = labels.len();
    // Gradients must reach the activations even though the weights are frozen.
    let x = x.detach().set_requires_grad(true);
    let (tokens, mut probes) = backbone.head.forward_probed(&x, false);
    let (features, tail_probes) = backbone.tail.forward_probed(&tokens, false);
    probes.extend(tail_probes);
    let logits = backbone.tail.classify_features(&features);
    let index = Tensor::from_slice(labels).to_device(x.device()).view([-1, 1]);
    let score = logits.gather(1, &index, false).sum(Kind::Float);
    let chosen: Vec<Tensor> = stages
        .iter()
        .map(|&s| {
            probes
                .get(s)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| Error::Config(format!("the backbone has no stage {s} (it has {})", probes.len())))
        })
        .collect::<Result<_>>()?;
    let grads = Tensor::run_backward(&[score], &chosen, false, false);
    let mut per_layer: Vec<Vec<Vec<f32>>> = Vec::with_capacity(stages.len());
    for (a, g) in chosen.iter().zip(&grads) {
        // Swin's probes are tokens on a square grid, a CNN's are maps already.
        let grid = match a.size()[..] {
            [_, tokens, _] => (tokens as f64).sqrt().round() as i64,
            _ => a.size()[2],
        };
        let to_nchw = |t: &Tensor| -> Tensor {
            let t = t.detach().to_kind(Kind::Float);
            match t.size()[..] {
                [_, _, c] => t.view([batch as i64, grid, grid, c]).permute([0, 3, 1, 2]),
                _ => t,
            }
        };
        let (a, g) = (to_nchw(a), to_nchw(g));
        let sum_a = a.sum_dim_intlist([2, 3].as_slice(), true, Kind::Float);
        let weights = (&g * &a / (sum_a + 1e-7)).sum_dim_intlist([2, 3].as_slice(), true, Kind::Float);
        let weighted = (weights * &a).to_device(Device::Cpu);
        let mut maps = Vec::with_capacity(batch);
        for b in 0..batch as i64 {
            let image = weighted.get(b);
            let plain = Vec::<f32>::try_from(image.sum_dim_intlist([0].as_slice(), false, Kind::Float).reshape([-1]))?;
            let cam = if eigen_smooth {
                let projection = first_component(&image)?;
                let agreement: f32 = projection.iter().zip(&plain).map(|(p, q)| p * q).sum();
                if agreement < 0.0 {
                    projection.into_iter().map(|v| -v).collect()
                } else {
                    projection
                }
            } else {
                plain
            };
            let cam: Vec<f32> = cam.into_iter().map(|v| v.max(0.0)).collect();
            let scaled = min_max(&cam);
            maps.push(resize_linear(&scaled, grid as usize, side));
        }
        per_layer.push(maps);
    }
    Ok((0..batch)
        .map(|b| {
            let mean: Vec<f32> = (0..side * side)
                .map(|i| {
                    let total: f32 = per_layer.iter().map(|layer| layer[b][i]).sum();
                    (total / per_layer.len() as f32).max(0.0)
                })
                .collect();
            min_max(&mean)
                .into_iter()
                .map(|v| if v.is_nan() { 0.5 } else { v })
                .collect()
        })
        .collect())
}

/// pytorch-grad-cam's `get_2d_projection` for one image: the `(HW × C)`
/// activations, centred per channel, projected on the first right singular vector.
fn first_component(weighted: &Tensor) -> Result<Vec<f32>> {
    let size = weighted.size();
    let (c, h, w) = (size[0], size[1], size[2]);
    let m = weighted.nan_to_num(0.0, None, None).reshape([c, h * w]).transpose(0, 1);
    let centred = &m - m.mean_dim(0, true, Kind::Float);
    // torch.svd (LAPACK gesdd, as numpy's svd): V's first column is VT[0].
    let (_, _, v) = centred.svd(true, true);
    let projection = centred.matmul(&v.select(1, 0));
    Ok(Vec::<f32>::try_from(projection.contiguous())?)
}

/// pytorch-grad-cam's `scale_cam_image` without resizing: `(x − min) / (max + 1e-7)` after the shift.
fn min_max(values: &[f32]) -> Vec<f32> {
    let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = values.iter().map(|v| v - lo).collect();
    let hi = shifted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    shifted.into_iter().map(|v| v / (1e-7 + hi)).collect()
}

/// OpenCV's `cv2.resize(…, INTER_LINEAR)` of a square float map: half-pixel
/// centres, edges clamped, no antialiasing.
pub fn resize_linear(map: &[f32], from: usize, to: usize) -> Vec<f32> {
    if from == to {
        return map.to_vec();
    }
    let scale = from as f64 / to as f64;
    let taps: Vec<(usize, usize, f32)> = (0..to)
        .map(|d| {
            let f = (d as f64 + 0.5) * scale - 0.5;
            let mut s = f.floor() as i64;
            let mut frac = (f - s as f64) as f32;
            if s < 0 {
                s = 0;
                frac = 0.0;
            }
            if s >= from as i64 - 1 {
                s = from as i64 - 1;
                frac = 0.0;
            }
            let s = s as usize;
            (s, (s + 1).min(from - 1), frac)
        })
        .collect();
    let mut out = Vec::with_capacity(to * to);
    for &(y0, y1, fy) in &taps {
        for &(x0, x1, fx) in &taps {
            let top = map[y0 * from + x0] * (1.0 - fx) + map[y0 * from + x1] * fx;
            let bottom = map[y1 * from + x0] * (1.0 - fx) + map[y1 * from + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Settings of [`generate_maps`].
#[derive(Debug, Clone)]
pub struct MapsConfig {
    /// Stages whose last block's `norm1` is read (the reference: 1, 2, 3).
    pub stages: Vec<usize>,
    /// Eigen-smoothing (the reference: on).
    pub eigen_smooth: bool,
    /// Side of the written maps (the latent grid: 28 at 224²).
    pub side: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Data-loading threads.
    pub workers: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// Also write heat-map overlays (PNG) here.
    pub overlay: Option<std::path::PathBuf>,
}

/// Writes one `.npy` map per image of `dataset` under `out`, mirroring its
/// tree; images whose map exists are skipped, so an interrupted run resumes.
/// Returns how many maps were written.
pub fn generate_maps(
    backbone: &SplitBackbone<'_>,
    dataset: &ImageFolder,
    preprocess: &Preprocess,
    out: &Path,
    config: &MapsConfig,
    device: Device,
) -> Result<usize> {
    let map_path = |i: usize| out.join(dataset.relative(i)).with_extension("npy");
    let todo: Vec<usize> = (0..dataset.len()).filter(|&i| !map_path(i).exists()).collect();
    if todo.is_empty() {
        return Ok(0);
    }
    let subset = Arc::new(ImageFolder {
        root: dataset.root.clone(),
        classes: dataset.classes.clone(),
        samples: todo.iter().map(|&i| dataset.samples[i].clone()).collect(),
    });
    // The reference's transform for saliency: Resize((256, 256)), CenterCrop(224).
    let transform = Arc::new(Transform {
        augment: Augment::SquareResizeCenterCrop,
        preprocess: preprocess.clone(),
    });
    let loader_config = LoaderConfig {
        batch_size: config.batch_size.max(1),
        shuffle: false,
        drop_last: false,
        workers: config.workers,
        prefetch: 2 * config.workers.max(1),
        seed: 0,
        shard: None,
    };
    let bar = if config.progress {
        let bar = ProgressBar::new(todo.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("saliency maps [{bar:30}] {pos}/{len} ({per_sec}, {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let size = i64::from(preprocess.crop);
    let mut written = 0;
    for batch in Loader::start(subset.clone(), transform, &loader_config, 0, 0) {
        let batch = batch?;
        let x = Tensor::from_slice(&batch.images)
            .view([batch.len() as i64, 3, size, size])
            .to_device(device);
        let maps = xgradcam(
            backbone,
            &x,
            &batch.labels,
            &config.stages,
            config.side,
            config.eigen_smooth,
        )?;
        for (k, (&sample, map)) in batch.samples.iter().zip(&maps).enumerate() {
            let original = todo[sample];
            npy::write(&map_path(original), &[config.side, config.side], map)?;
            if let Some(dir) = &config.overlay {
                let plane = (size * size) as usize;
                let image = &batch.images[k * 3 * plane..(k + 1) * 3 * plane];
                let path = dir.join(dataset.relative(original)).with_extension("png");
                write_overlay(&path, image, preprocess, map, config.side)?;
            }
            written += 1;
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(written)
}

/// The crop with the map as a jet-coloured heat map blended over it.
fn write_overlay(path: &Path, chw: &[f32], preprocess: &Preprocess, map: &[f32], side: usize) -> Result<()> {
    let size = preprocess.crop as usize;
    let up = resize_linear(map, side, size);
    let plane = size * size;
    let mut pixels = Vec::with_capacity(plane * 3);
    for i in 0..plane {
        let heat = jet(up[i]);
        for c in 0..3 {
            let value = (chw[c * plane + i] * preprocess.std[c] + preprocess.mean[c]).clamp(0.0, 1.0);
            pixels.push(((0.5 * value + 0.5 * heat[c]) * 255.0).round() as u8);
        }
    }
    let image = RgbImage {
        width: size as u32,
        height: size as u32,
        pixels,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
    }
    let buffer = image::RgbImage::from_raw(image.width, image.height, image.pixels).expect("buffer size matches");
    let tmp = path.with_extension("png.tmp");
    buffer
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    frankensplit_fsio::commit_file(&tmp, path).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
}

/// The jet colour map at `v` in [0, 1].
fn jet(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    let channel = |offset: f32| (1.5 - (4.0 * v - offset).abs()).clamp(0.0, 1.0);
    [channel(3.0), channel(2.0), channel(1.0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_resize_follows_opencv() {
        // cv2.resize(np.array([[0, 1], [2, 3]], np.float32), (4, 4)).
        let out = resize_linear(&[0.0, 1.0, 2.0, 3.0], 2, 4);
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in out.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        assert_eq!(resize_linear(&[1.0, 2.0, 3.0, 4.0], 2, 2), [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn min_max_maps_onto_the_unit_interval() {
        let scaled = min_max(&[2.0, 4.0, 3.0]);
        assert!((scaled[0]).abs() < 1e-6 && (scaled[1] - 1.0).abs() < 1e-6 && (scaled[2] - 0.5).abs() < 1e-6);
        // A constant map has no extent: zeros, not NaN (the 1e-7 guard).
        assert_eq!(min_max(&[5.0, 5.0]), [0.0, 0.0]);
    }

    #[test]
    fn the_projection_finds_the_dominant_direction() {
        // Activations varying along one channel direction only: the
        // projection is that variation (up to sign), centred.
        let along: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut data = Vec::new();
        for scale in [1.0f32, 2.0, 0.0] {
            data.extend(along.iter().map(|v| v * scale));
        }
        let t = Tensor::from_slice(&data).view([3, 4, 4]);
        let projection = first_component(&t).unwrap();
        let norm = 5f32.sqrt();
        for (i, p) in projection.iter().enumerate() {
            let expected = (i as f32 - 7.5) * norm;
            assert!((p.abs() - expected.abs()).abs() < 1e-3, "{i}: {p} vs {expected}");
        }
    }
}
