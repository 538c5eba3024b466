//! A procedural image-classification benchmark, so that tests, the demo and
//! the project's published results need no download and anyone can
//! regenerate them from a seed.
//!
//! Each image is a scene as photographs are: the label lives in one object
//! (disc, square, triangle, ring, cross, stripes, checkerboard, dots, star,
//! blob) covering a tenth of the picture or less, at a random place, size,
//! colour and orientation, while most of the pixels' entropy is irrelevant to
//! the task: two octaves of coloured value noise, an oriented texture,
//! distractor strokes and blobs, a lighting gradient over everything and
//! sensor grain. Colour says nothing about the class, so a classifier has to
//! find the object and read its shape, and a codec that keeps the whole
//! picture spends most of its bytes on what the classifier ignores.
//!
//! Every image is a pure function of `(seed, split, epoch, index)`, so the
//! generator also serves as an endless training stream
//! ([`SyntheticStream`]): fresh images every epoch, nothing to memorise, and
//! a resumed run sees exactly the images it would have seen.

use std::f32::consts::PI;
use std::path::Path;

use frankensplit_preprocess::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The class names, in label order (sorted, as ImageFolder numbers folders).
pub const CLASSES: [&str; 10] = [
    "blob", "checker", "cross", "disc", "dots", "ring", "square", "star", "stripes", "triangle",
];

/// The smallest image side the scenes are drawn at.
pub const MIN_SIZE: u32 = 32;
/// The largest image side (a bound on what a run file may ask to allocate).
pub const MAX_SIZE: u32 = 1024;
/// The most images a stream's epoch may hold (its shuffled order is held in memory).
pub const MAX_PER_EPOCH: usize = 1 << 26;

/// Which independent family of images a sample belongs to: the same seed
/// gives unrelated images in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The written training folder.
    Train,
    /// The written validation folder.
    Val,
    /// The written test folder (generate it with a seed no run used).
    Test,
    /// The training stream's images of one epoch.
    Stream {
        /// Epoch.
        epoch: u64,
    },
}

impl Split {
    /// The ChaCha stream of the split: disjoint for every split and epoch.
    fn stream(self) -> u64 {
        match self {
            Self::Train => 1,
            Self::Val => 2,
            Self::Test => 3,
            Self::Stream { epoch } => (1 << 32) | (epoch & 0xFFFF_FFFF),
        }
    }
}

/// Draws image `index` of `split`: its pixels and its label (`index` modulo
/// the number of classes, so every split is balanced).
pub fn sample(seed: u64, split: Split, index: u64, classes: usize, size: u32) -> (RgbImage, usize) {
    let label = (index % classes.max(1) as u64) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(split.stream());
    // 2^32 words (16 GiB of randomness) per image: far more than one draws.
    rng.set_word_pos(u128::from(index) << 32);
    let pixels = draw(label, size, &mut rng);
    (
        RgbImage {
            width: size,
            height: size,
            pixels,
        },
        label,
    )
}

/// What `synth-data` writes.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Number of classes (taken from the start of [`CLASSES`]).
    pub classes: usize,
    /// Training images per class.
    pub train_per_class: usize,
    /// Validation images per class.
    pub val_per_class: usize,
    /// Test images per class.
    pub test_per_class: usize,
    /// Image side in pixels.
    pub size: u32,
    /// Seed; the same seed gives the same files.
    pub seed: u64,
    /// Write JPEG (quality 90) instead of PNG.
    pub jpeg: bool,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            classes: 10,
            train_per_class: 100,
            val_per_class: 20,
            test_per_class: 0,
            size: 112,
            seed: 0,
            jpeg: false,
        }
    }
}

fn check_shape(classes: usize, size: u32) -> Result<()> {
    if classes == 0 || classes > CLASSES.len() {
        return Err(Error::Data(format!(
            "the synthetic dataset has 1 to {} classes, not {classes}",
            CLASSES.len()
        )));
    }
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        return Err(Error::Data(format!(
            "synthetic images are {MIN_SIZE} to {MAX_SIZE} pixels a side, not {size}"
        )));
    }
    Ok(())
}

/// Writes `root/{train,val,test}/<class>/NNNNN.png` (splits with no images
/// per class are left out); returns how many images it wrote.
pub fn generate(root: &Path, config: &SyntheticConfig) -> Result<usize> {
    check_shape(config.classes, config.size)?;
    let extension = if config.jpeg { "jpg" } else { "png" };
    let format = if config.jpeg {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    let mut written = 0;
    for (name, split, per_class) in [
        ("train", Split::Train, config.train_per_class),
        ("val", Split::Val, config.val_per_class),
        ("test", Split::Test, config.test_per_class),
    ] {
        if per_class == 0 {
            continue;
        }
        for class in CLASSES.iter().take(config.classes) {
            let dir = root.join(name).join(class);
            std::fs::create_dir_all(&dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
        }
        let total = per_class
            .checked_mul(config.classes)
            .ok_or_else(|| Error::Data(format!("{per_class} {name} images per class is too many")))?;
        let write = |index: usize| -> Result<()> {
            let (image, label) = sample(config.seed, split, index as u64, config.classes, config.size);
            let path = root
                .join(name)
                .join(CLASSES[label])
                .join(format!("{:05}.{extension}", index / config.classes));
            let buffer = image::RgbImage::from_raw(image.width, image.height, image.pixels)
                .ok_or_else(|| Error::Data("pixel buffer of the wrong size".into()))?;
            let tmp = path.with_extension(format!("{extension}.tmp"));
            buffer
                .save_with_format(&tmp, format)
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(image::ImageError::IoError))
                .map_err(|e| Error::Data(format!("{}: {e}", path.display())))
        };
        // Drawing and PNG encoding dominate: spread the images over the cores.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(total);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| scope.spawn(move || (t..total).step_by(threads).try_for_each(write)))
                .collect();
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(Error::Data("a generator thread panicked".into())))
            })
        })?;
        written += total;
    }
    Ok(written)
}

/// `[data.generate]` of a run file: training images drawn fresh every epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// Seed of the stream (any; the stream's images differ from the written
    /// folders' of every seed).
    #[serde(default)]
    pub seed: u64,
    /// Image side in pixels (what `synth-data --size` writes for validation).
    pub size: u32,
    /// Images per epoch.
    pub per_epoch: usize,
    /// Number of classes.
    #[serde(default = "default_classes")]
    pub classes: usize,
}

fn default_classes() -> usize {
    CLASSES.len()
}

/// An endless training set: sample `i` of epoch `e` is image `i` of the
/// stream `e`, so no image is seen twice.
#[derive(Debug, Clone)]
pub struct SyntheticStream {
    config: StreamConfig,
    classes: Vec<String>,
}

impl SyntheticStream {
    /// Checks the configuration.
    pub fn new(config: StreamConfig) -> Result<Self> {
        check_shape(config.classes, config.size)?;
        if !(1..=MAX_PER_EPOCH).contains(&config.per_epoch) {
            return Err(Error::Config(format!(
                "[data.generate] per_epoch must lie in 1..={MAX_PER_EPOCH}, not {}",
                config.per_epoch
            )));
        }
        let classes = CLASSES.iter().take(config.classes).map(|c| c.to_string()).collect();
        Ok(Self { config, classes })
    }
}

impl crate::data::Source for SyntheticStream {
    fn len(&self) -> usize {
        self.config.per_epoch
    }

    fn classes(&self) -> &[String] {
        &self.classes
    }

    fn sample(&self, index: usize, epoch: usize) -> Result<(RgbImage, i64)> {
        let split = Split::Stream { epoch: epoch as u64 };
        let (image, label) = sample(
            self.config.seed,
            split,
            index as u64,
            self.config.classes,
            self.config.size,
        );
        Ok((image, label as i64))
    }
}

fn random_colour(rng: &mut impl Rng) -> [f32; 3] {
    [rng.gen(), rng.gen(), rng.gen()]
}

/// Whether the object of class `label` covers the point `(u, v)` given in
/// object coordinates (unit radius, already rotated).
fn covers(label: usize, u: f32, v: f32, detail: f32) -> bool {
    let r = (u * u + v * v).sqrt();
    let angle = v.atan2(u);
    match CLASSES[label] {
        "blob" => r < 0.75 + 0.2 * (3.0 * angle + detail).sin() * (2.0 * angle).cos(),
        "checker" => {
            u.abs() < 0.9 && v.abs() < 0.9 && (((u + 1.0) * 2.5).floor() + ((v + 1.0) * 2.5).floor()) as i32 % 2 == 0
        }
        "cross" => (u.abs() < 0.25 && v.abs() < 0.95) || (v.abs() < 0.25 && u.abs() < 0.95),
        "disc" => r < 0.9,
        "dots" => {
            let (cu, cv) = (((u + 1.0) * 2.0).fract() - 0.5, ((v + 1.0) * 2.0).fract() - 0.5);
            r < 0.95 && cu * cu + cv * cv < 0.09
        }
        "ring" => (0.55..0.9).contains(&r),
        "square" => u.abs() < 0.75 && v.abs() < 0.75,
        "star" => r < 0.4 + 0.5 * ((5.0 * angle).cos() * 0.5 + 0.5).powi(3),
        "stripes" => u.abs() < 0.9 && v.abs() < 0.9 && ((u + 1.0) * 3.0).floor() as i32 % 2 == 0,
        "triangle" => v > -0.6 && v < 0.9 && u.abs() < (0.9 - v) * 0.66,
        _ => false,
    }
}

/// Smoothly interpolated random colours on a `cells × cells` lattice.
struct ValueNoise {
    cells: usize,
    lattice: Vec<[f32; 3]>,
}

impl ValueNoise {
    fn new(cells: usize, rng: &mut impl Rng, palette: &[[f32; 3]; 2]) -> Self {
        let lattice = (0..(cells + 1) * (cells + 1))
            .map(|_| {
                let t: f32 = rng.gen();
                let jitter: [f32; 3] = std::array::from_fn(|_| rng.gen_range(-0.1..0.1));
                std::array::from_fn(|c| palette[0][c] * (1.0 - t) + palette[1][c] * t + jitter[c])
            })
            .collect();
        Self { cells, lattice }
    }

    /// The colour at `(x, y)` in `[0, 1)²`.
    fn at(&self, x: f32, y: f32) -> [f32; 3] {
        let n = self.cells as f32;
        let (gx, gy) = (x * n, y * n);
        let (i, j) = ((gx as usize).min(self.cells - 1), (gy as usize).min(self.cells - 1));
        let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
        let (tx, ty) = (smooth(gx - i as f32), smooth(gy - j as f32));
        let corner = |a: usize, b: usize| self.lattice[(j + b) * (self.cells + 1) + i + a];
        let (c00, c10, c01, c11) = (corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1));
        std::array::from_fn(|c| {
            let top = c00[c] * (1.0 - tx) + c10[c] * tx;
            let bottom = c01[c] * (1.0 - tx) + c11[c] * tx;
            top * (1.0 - ty) + bottom * ty
        })
    }
}

/// A distractor behind the object: a stroke or a soft blob.
enum Distractor {
    Stroke {
        from: [f32; 2],
        to: [f32; 2],
        half_width: f32,
        colour: [f32; 3],
    },
    Blob {
        at: [f32; 2],
        radius: f32,
        colour: [f32; 3],
    },
}

impl Distractor {
    fn random(s: f32, rng: &mut impl Rng) -> Self {
        let colour = random_colour(rng);
        if rng.gen_bool(0.6) {
            let from = [rng.gen_range(0.0..s), rng.gen_range(0.0..s)];
            let angle = rng.gen_range(0.0..2.0 * PI);
            let length = rng.gen_range(0.15..0.6) * s;
            Self::Stroke {
                from,
                to: [from[0] + length * angle.cos(), from[1] + length * angle.sin()],
                half_width: rng.gen_range(0.004..0.015) * s,
                colour,
            }
        } else {
            Self::Blob {
                at: [rng.gen_range(0.0..s), rng.gen_range(0.0..s)],
                radius: rng.gen_range(0.04..0.15) * s,
                colour,
            }
        }
    }

    /// How much the distractor covers `(x, y)`, 0 to 1.
    fn weight(&self, x: f32, y: f32) -> f32 {
        match self {
            Self::Stroke {
                from, to, half_width, ..
            } => {
                let (dx, dy) = (to[0] - from[0], to[1] - from[1]);
                let t = (((x - from[0]) * dx + (y - from[1]) * dy) / (dx * dx + dy * dy).max(1e-6)).clamp(0.0, 1.0);
                let (px, py) = (from[0] + t * dx - x, from[1] + t * dy - y);
                let distance = (px * px + py * py).sqrt();
                (half_width + 0.5 - distance).clamp(0.0, 1.0) * 0.6
            }
            Self::Blob { at, radius, .. } => {
                let d2 = ((x - at[0]).powi(2) + (y - at[1]).powi(2)) / (radius * radius);
                (-d2).exp() * 0.4
            }
        }
    }

    fn colour(&self) -> [f32; 3] {
        match self {
            Self::Stroke { colour, .. } | Self::Blob { colour, .. } => *colour,
        }
    }
}

/// Draws one scene with an object of class `label`: RGB bytes, `size × size`.
fn draw(label: usize, size: u32, rng: &mut impl Rng) -> Vec<u8> {
    let s = size as f32;
    let palette = [random_colour(rng), random_colour(rng)];
    let coarse = ValueNoise::new(rng.gen_range(2..5), rng, &palette);
    let fine_palette = [random_colour(rng), random_colour(rng)];
    let fine = ValueNoise::new(rng.gen_range(8..16), rng, &fine_palette);
    let fine_weight = rng.gen_range(0.1..0.35);
    let texture = random_colour(rng);
    let texture_weight = rng.gen_range(0.05..0.25);
    let frequency = rng.gen_range(3.0..16.0) * 2.0 * PI / s;
    let direction = rng.gen_range(0.0..PI);
    let distractors: Vec<Distractor> = (0..rng.gen_range(2..7)).map(|_| Distractor::random(s, rng)).collect();
    let light_direction = rng.gen_range(0.0..2.0 * PI);
    let light_slope = rng.gen_range(0.0..0.5) / s;
    let light_base = rng.gen_range(0.75..1.1);
    let grain = rng.gen_range(0.02..0.09);

    let radius = rng.gen_range(0.16..0.24) * s;
    // Inside the centre crop the networks and codecs see (crop/resize 0.875).
    let margin = 0.07 * s + radius;
    let centre = [rng.gen_range(margin..s - margin), rng.gen_range(margin..s - margin)];
    // Upright within ±30°, as objects in photographs mostly are.
    let rotation = rng.gen_range(-PI / 6.0..PI / 6.0);
    let detail = rng.gen_range(0.0..2.0 * PI);
    let (sin, cos) = rotation.sin_cos();
    let mut colour = random_colour(rng);
    // Keep the object visible against what lies behind it.
    let behind = coarse.at(centre[0] / s, centre[1] / s);
    if colour.iter().zip(&behind).map(|(a, b)| (a - b).abs()).sum::<f32>() < 0.7 {
        colour = colour.map(|c| 1.0 - c);
    }
    let shading = rng.gen_range(-0.15..0.15);

    let mut pixels = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let (dx, dy) = ((fx - centre[0]) / radius, (fy - centre[1]) / radius);
            let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
            let mut px = if covers(label, u, v, detail) {
                colour.map(|c| c * (1.0 + shading * v))
            } else {
                let (nx, ny) = (fx / s, fy / s);
                let (base, detail_colour) = (coarse.at(nx, ny), fine.at(nx, ny));
                let wave = 0.5 + 0.5 * ((fx * direction.cos() + fy * direction.sin()) * frequency).sin();
                let mut px: [f32; 3] = std::array::from_fn(|c| {
                    let mixed = base[c] * (1.0 - fine_weight) + detail_colour[c] * fine_weight;
                    mixed * (1.0 - texture_weight * wave) + texture[c] * texture_weight * wave
                });
                for distractor in &distractors {
                    let weight = distractor.weight(fx, fy);
                    if weight > 0.0 {
                        let c = distractor.colour();
                        for k in 0..3 {
                            px[k] = px[k] * (1.0 - weight) + c[k] * weight;
                        }
                    }
                }
                px
            };
            let light = light_base + light_slope * (fx * light_direction.cos() + fy * light_direction.sin());
            for value in &mut px {
                *value = *value * light + rng.gen_range(-grain..grain);
            }
            pixels.extend(px.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8));
        }
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Source;

    #[test]
    fn every_class_draws_an_object_of_plausible_size() {
        for (label, name) in CLASSES.iter().enumerate() {
            let covered = (0..400)
                .filter(|i| {
                    let (u, v) = ((i % 20) as f32 / 10.0 - 0.95, (i / 20) as f32 / 10.0 - 0.95);
                    covers(label, u, v, 0.3)
                })
                .count();
            assert!((20..380).contains(&covered), "{name}: {covered} of 400");
        }
    }

    #[test]
    fn generation_is_deterministic_and_writes_image_folders() {
        let root = std::env::temp_dir().join(format!("frankensplit-synth-{}", std::process::id()));
        let config = SyntheticConfig {
            classes: 3,
            train_per_class: 2,
            val_per_class: 1,
            test_per_class: 1,
            size: 40,
            seed: 7,
            jpeg: false,
        };
        assert_eq!(generate(&root, &config).unwrap(), 12);
        let folder = crate::data::ImageFolder::open(&root.join("train")).unwrap();
        assert_eq!(folder.classes, ["blob", "checker", "cross"]);
        assert_eq!(folder.len(), 6);
        assert_eq!(crate::data::ImageFolder::open(&root.join("test")).unwrap().len(), 3);
        let first = std::fs::read(&folder.samples[0].0).unwrap();
        generate(&root, &config).unwrap();
        assert_eq!(std::fs::read(&folder.samples[0].0).unwrap(), first);
        let other = std::fs::read(&folder.samples[1].0).unwrap();
        assert_ne!(first, other);
        // The written file holds the drawn pixels, in the labelled folder.
        let (image, label) = sample(7, Split::Train, 0, 3, 40);
        assert_eq!(folder.samples[0].1, label as i64);
        assert_eq!(
            frankensplit_preprocess::RgbImage::open(&folder.samples[0].0).unwrap(),
            image
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn splits_and_epochs_draw_different_images_from_one_seed() {
        let draws = [
            sample(3, Split::Train, 5, 10, 48).0,
            sample(3, Split::Val, 5, 10, 48).0,
            sample(3, Split::Test, 5, 10, 48).0,
            sample(3, Split::Stream { epoch: 0 }, 5, 10, 48).0,
            sample(3, Split::Stream { epoch: 1 }, 5, 10, 48).0,
            sample(4, Split::Train, 5, 10, 48).0,
        ];
        for (i, a) in draws.iter().enumerate() {
            for b in &draws[i + 1..] {
                assert_ne!(a.pixels, b.pixels);
            }
        }
        let stream = SyntheticStream::new(StreamConfig {
            seed: 3,
            size: 48,
            per_epoch: 100,
            classes: 10,
        })
        .unwrap();
        let (image, label) = stream.sample(5, 1).unwrap();
        assert_eq!(image, draws[4]);
        assert_eq!(label, 5);
    }

    #[test]
    fn the_object_sets_the_label_and_the_background_carries_the_entropy() {
        // Same random stream, different class: only the object's pixels may differ,
        // and they are a minority of the image.
        let size = 96;
        let mut differing = 0;
        for index in 0..20u64 {
            let draw_as = |label: usize| {
                let mut rng = ChaCha8Rng::seed_from_u64(index);
                draw(label, size, &mut rng)
            };
            let (a, b) = (draw_as(3), draw_as(7));
            let changed = a.chunks(3).zip(b.chunks(3)).filter(|(p, q)| p != q).count();
            assert!(changed > 0, "image {index}: classes drew the same picture");
            differing += changed;
        }
        let fraction = differing as f64 / (20 * size * size) as f64;
        assert!((0.02..0.3).contains(&fraction), "object pixels: {fraction}");
    }

    #[test]
    fn sizes_outside_the_bounds_are_refused() {
        for size in [MIN_SIZE - 1, MAX_SIZE + 1] {
            let config = SyntheticConfig {
                size,
                ..SyntheticConfig::default()
            };
            assert!(generate(Path::new("/nonexistent"), &config).is_err());
        }
        for per_epoch in [0, MAX_PER_EPOCH + 1] {
            let stream = StreamConfig {
                seed: 0,
                size: 64,
                per_epoch,
                classes: 10,
            };
            assert!(SyntheticStream::new(stream).is_err());
        }
    }
}
