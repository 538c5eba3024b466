//! A procedural image-classification dataset, so that tests and the demo
//! need no download: each class is a kind of object (disc, square,
//! triangle, ring, cross, stripes, checkerboard, dots, star, blob) drawn at
//! a random place, size, colour and orientation over a cluttered, textured
//! background with noise. Labels need shape, not colour, so a classifier
//! has to look at the object, which also gives saliency maps something to find.

use std::f32::consts::PI;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The class names, in label order.
pub const CLASSES: [&str; 10] = [
    "blob", "checker", "cross", "disc", "dots", "ring", "square", "star", "stripes", "triangle",
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Number of classes (taken from the start of [`CLASSES`]).
    pub classes: usize,
    /// Training images per class.
    pub train_per_class: usize,
    /// Validation images per class.
    pub val_per_class: usize,
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
            size: 96,
            seed: 0,
            jpeg: false,
        }
    }
}

/// Writes `root/train/<class>/NNNNN.png` and `root/val/<class>/NNNNN.png`.
pub fn generate(root: &Path, config: &SyntheticConfig) -> Result<usize> {
    if config.classes == 0 || config.classes > CLASSES.len() {
        return Err(Error::Data(format!(
            "the synthetic dataset has 1 to {} classes",
            CLASSES.len()
        )));
    }
    if config.size < 16 {
        return Err(Error::Data("synthetic images need at least 16 pixels a side".into()));
    }
    let mut written = 0;
    for (split, per_class, salt) in [
        ("train", config.train_per_class, 0u64),
        ("val", config.val_per_class, 1u64 << 40),
    ] {
        for (label, class) in CLASSES.iter().take(config.classes).enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).map_err(|e| Error::Data(format!("{}: {e}", dir.display())))?;
            for i in 0..per_class {
                let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ salt ^ ((label as u64) << 24) ^ i as u64);
                let pixels = draw(label, config.size, &mut rng);
                let extension = if config.jpeg { "jpg" } else { "png" };
                let path = dir.join(format!("{i:05}.{extension}"));
                let image = image::RgbImage::from_raw(config.size, config.size, pixels).expect("buffer size matches");
                let tmp = path.with_extension(format!("{extension}.tmp"));
                let format = if config.jpeg {
                    image::ImageFormat::Jpeg
                } else {
                    image::ImageFormat::Png
                };
                image
                    .save_with_format(&tmp, format)
                    .and_then(|()| std::fs::rename(&tmp, &path).map_err(image::ImageError::IoError))
                    .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
                written += 1;
            }
        }
    }
    Ok(written)
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
        "triangle" => v > -0.6 && v < 0.9 - 0.0 && u.abs() < (0.9 - v) * 0.66,
        _ => false,
    }
}

/// Draws one image of class `label`: RGB bytes, `size × size`.
fn draw(label: usize, size: u32, rng: &mut impl Rng) -> Vec<u8> {
    let s = size as f32;
    let background = random_colour(rng);
    let texture = random_colour(rng);
    let frequency = rng.gen_range(2.0..10.0) * 2.0 * PI / s;
    let direction = rng.gen_range(0.0..PI);
    // Clutter: a few soft blobs of random colour.
    let clutter: Vec<([f32; 2], f32, [f32; 3])> = (0..rng.gen_range(0..3))
        .map(|_| {
            (
                [rng.gen_range(0.0..s), rng.gen_range(0.0..s)],
                rng.gen_range(0.05..0.2) * s,
                random_colour(rng),
            )
        })
        .collect();
    let mut colour = random_colour(rng);
    // Keep the object visible against the background.
    if colour.iter().zip(&background).map(|(a, b)| (a - b).abs()).sum::<f32>() < 0.6 {
        colour = colour.map(|c| 1.0 - c);
    }
    let radius = rng.gen_range(0.28..0.42) * s;
    let centre = [rng.gen_range(radius..s - radius), rng.gen_range(radius..s - radius)];
    // Upright within ±30°, as objects in photographs mostly are.
    let rotation = rng.gen_range(-PI / 6.0..PI / 6.0);
    let detail = rng.gen_range(0.0..2.0 * PI);
    let (sin, cos) = rotation.sin_cos();
    let noise = rng.gen_range(0.01..0.05);
    let mut pixels = Vec::with_capacity((size * size * 3) as usize);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let wave = 0.5 + 0.5 * ((fx * direction.cos() + fy * direction.sin()) * frequency).sin();
            let mut px: [f32; 3] =
                std::array::from_fn(|c| background[c] * (1.0 - 0.25 * wave) + texture[c] * 0.25 * wave);
            for (at, r, c) in &clutter {
                let d2 = ((fx - at[0]).powi(2) + (fy - at[1]).powi(2)) / (r * r);
                let weight = (-d2).exp() * 0.4;
                for k in 0..3 {
                    px[k] = px[k] * (1.0 - weight) + c[k] * weight;
                }
            }
            let (dx, dy) = ((fx - centre[0]) / radius, (fy - centre[1]) / radius);
            let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
            if covers(label, u, v, detail) {
                px = colour;
            }
            for value in px {
                let noisy = value + rng.gen_range(-noise..noise);
                pixels.push((noisy.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn generation_is_deterministic_and_writes_an_image_folder() {
        let root = std::env::temp_dir().join(format!("frankensplit-synth-{}", std::process::id()));
        let config = SyntheticConfig {
            classes: 3,
            train_per_class: 2,
            val_per_class: 1,
            size: 32,
            seed: 7,
            jpeg: false,
        };
        assert_eq!(generate(&root, &config).unwrap(), 9);
        let folder = crate::data::ImageFolder::open(&root.join("train")).unwrap();
        assert_eq!(folder.classes, ["blob", "checker", "cross"]);
        assert_eq!(folder.len(), 6);
        let first = std::fs::read(&folder.samples[0].0).unwrap();
        generate(&root, &config).unwrap();
        assert_eq!(std::fs::read(&folder.samples[0].0).unwrap(), first);
        let other = std::fs::read(&folder.samples[1].0).unwrap();
        assert_ne!(first, other);
        let _ = std::fs::remove_dir_all(&root);
    }
}
