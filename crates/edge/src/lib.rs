//! The edge side of FrankenSplit: what runs on the device. Images are
//! decoded and preprocessed, the encoder g_a runs, and the latent is
//! entropy-coded into a payload (docs/format.md). This crate and its binary
//! `frankensplit-edge` carry no tensor framework (g_a runs on our own
//! convolution kernels: [`encoder`], [`conv`], [`kernel`]; in 8-bit
//! integers after calibration: [`int8`]), and no server or training code.
//! HTTP comes only with the `client` feature ([`client`]: `frankensplit-edge
//! send`), which talks to a server in the types of `frankensplit-api`.

pub mod bench;
#[cfg(feature = "client")]
pub mod client;
pub mod conv;
pub mod encoder;
pub mod int8;
pub mod kernel;
pub mod model;
mod pool;
pub mod tensor;
pub mod units;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use frankensplit_codec::Payload;
use frankensplit_preprocess::RgbImage;
use serde::Serialize;

pub use model::{EdgeModel, Int8Calibration, CALIBRATION_FILE};

/// Deterministic values in [-0.5, 0.5) for the kernels' tests (a small LCG:
/// no dependency, the same on every machine).
#[cfg(test)]
fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

#[derive(Args)]
pub struct EncodeArgs {
    /// Model bundle directory (only the encoder and entropy tables are used).
    #[arg(long)]
    pub model: PathBuf,
    /// Images (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Directory for the payloads (`<image stem>.fsp`).
    #[arg(short, long)]
    output: PathBuf,
    /// Print one JSON object per image.
    #[arg(long)]
    json: bool,
    /// Threads for the encoder (the device's cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run g_a in 8-bit integers, quantized with the model's calibration
    /// (see `calibrate`): faster, with payloads that differ slightly from f32's.
    #[arg(long)]
    int8: bool,
    /// The int8 calibration file [default: MODEL/int8-calibration.json].
    #[arg(long, requires = "int8")]
    calibration: Option<PathBuf>,
}

#[derive(Serialize)]
struct Encoded {
    image: PathBuf,
    payload: PathBuf,
    bytes: usize,
    bpp: f64,
    encode_ms: f64,
}

/// Preprocesses and encodes one image: the payload and the edge compute time.
pub fn encode_image(model: &EdgeModel, path: &Path) -> Result<(Vec<u8>, f64)> {
    let image = RgbImage::open(path)?;
    let start = Instant::now();
    let input = model.preprocess.apply(&image)?;
    let payload = model.compress(&input)?;
    Ok((payload, start.elapsed().as_secs_f64() * 1e3))
}

/// Bits per pixel of the model's input crop for a payload of `bytes`.
pub fn bpp(model: &EdgeModel, bytes: usize) -> f64 {
    let crop = f64::from(model.preprocess.crop);
    bytes as f64 * 8.0 / (crop * crop)
}

/// Reads the int8 calibration at `file`, or the bundle's default one,
/// saying how to make it when there is none.
pub fn load_calibration(model: &Path, file: Option<&Path>) -> Result<Int8Calibration> {
    let path = file.map_or_else(|| model.join(CALIBRATION_FILE), Path::to_path_buf);
    if !path.exists() {
        bail!(
            "no int8 calibration at {}: run `frankensplit-edge calibrate --model {} IMAGES…` first (a few dozen images like those to encode)",
            path.display(),
            model.display()
        );
    }
    Int8Calibration::load(&path)
}

/// `encode`: one payload file per image.
pub fn run_encode(args: EncodeArgs) -> Result<()> {
    let mut model =
        EdgeModel::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    model.threads = args.threads.max(1);
    if args.int8 {
        model.use_int8(&load_calibration(&args.model, args.calibration.as_deref())?)?;
    }
    let targets = payload_targets(&args.images, &args.output);
    let mut next = targets.iter();
    for_each_image(&args.images, |path| {
        let target = next.next().expect("one target per image");
        let encoded = encode_image(&model, path).and_then(|(payload, encode_ms)| {
            let target = target.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?.clone();
            write_atomically(&target, &payload)?;
            Ok(Encoded {
                image: path.to_path_buf(),
                payload: target,
                bytes: payload.len(),
                bpp: bpp(&model, payload.len()),
                encode_ms,
            })
        })?;
        if args.json {
            println!("{}", serde_json::to_string(&encoded)?);
        } else {
            let e = &encoded;
            println!(
                "{} -> {}: {} bytes, {:.4} bpp, {:.1} ms",
                e.image.display(),
                e.payload.display(),
                e.bytes,
                e.bpp,
                e.encode_ms
            );
        }
        Ok(())
    })
}

/// Runs `each` on every image, reporting failures on stderr and going on;
/// fails at the end if any image failed.
pub fn for_each_image(images: &[PathBuf], mut each: impl FnMut(&Path) -> Result<()>) -> Result<()> {
    let mut failures = 0;
    for path in images {
        if let Err(e) = each(path) {
            failures += 1;
            eprintln!("{}: {e:#}", path.display());
        }
    }
    if failures > 0 {
        bail!("{failures} of {} images failed", images.len());
    }
    Ok(())
}

/// Where `encode` writes each image's payload: under `output`, at the
/// image's path relative to the deepest directory holding all the images
/// (`a/cat.jpg` and `b/cat.jpg` give `a/cat.fsp` and `b/cat.fsp`; images of
/// one directory give `cat.fsp`), with `.fsp` for the extension, or appended
/// to the whole name where two images would share a name (`cat.jpg.fsp`,
/// `cat.png.fsp`). An image that cannot be found gets its error.
pub fn payload_targets(images: &[PathBuf], output: &Path) -> Vec<Result<PathBuf, String>> {
    let resolved: Vec<Result<PathBuf, String>> = images
        .iter()
        .map(|p| std::fs::canonicalize(p).map_err(|e| format!("cannot read {}: {e}", p.display())))
        .collect();
    let mut common: Option<PathBuf> = None;
    for path in resolved.iter().flatten() {
        let parent = path.parent().unwrap_or(Path::new("/"));
        common = Some(match common {
            None => parent.to_path_buf(),
            Some(c) => c
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    let common = common.unwrap_or_default();
    let relative = |path: &Path| -> PathBuf { path.strip_prefix(&common).unwrap_or(path).to_path_buf() };
    let with_stem = |rel: &Path| rel.with_extension("fsp");
    let mut seen = std::collections::HashMap::<PathBuf, usize>::new();
    for path in resolved.iter().flatten() {
        *seen.entry(with_stem(&relative(path))).or_default() += 1;
    }
    resolved
        .into_iter()
        .map(|path| {
            let rel = relative(&path?);
            let name = if seen[&with_stem(&rel)] > 1 {
                let mut whole = rel.clone().into_os_string();
                whole.push(".fsp");
                PathBuf::from(whole)
            } else {
                with_stem(&rel)
            };
            Ok(output.join(name))
        })
        .collect()
}

/// Writes `bytes` to a flushed sibling, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    frankensplit_fsio::write_file(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[derive(Args)]
pub struct CalibrateArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Images like those the device will encode (JPEG, PNG or WebP); a few dozen suffice.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Where to write the calibration [default: MODEL/int8-calibration.json].
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Threads for the encoder.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the calibration as JSON.
    #[arg(long)]
    json: bool,
}

/// `calibrate`: the ranges of g_a's tensors on the images, for `encode --int8`.
pub fn run_calibrate(args: CalibrateArgs) -> Result<()> {
    let mut model =
        EdgeModel::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    model.threads = args.threads.max(1);
    let mut inputs = Vec::new();
    for_each_image(&args.images, |path| {
        inputs.push(model.preprocess.apply(&RgbImage::open(path)?)?);
        Ok(())
    })?;
    let calibration = model.calibrate(&inputs)?;
    let path = args.output.unwrap_or_else(|| args.model.join(CALIBRATION_FILE));
    calibration.save(&path)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&calibration)?);
    } else {
        println!("{} images → {}", calibration.images, path.display());
        for (i, block) in calibration.blocks.iter().enumerate() {
            println!(
                "  rb{}: input [{:.3}, {:.3}], after conv1 [{:.3}, {:.3}]",
                i + 1,
                block.input.min,
                block.input.max,
                block.middle.min,
                block.middle.max
            );
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// Payload files written by the edge encoder.
    #[arg(required = true)]
    payloads: Vec<PathBuf>,
    /// Print one JSON object per payload instead of text.
    #[arg(long)]
    json: bool,
}

/// `inspect`: payload headers.
pub fn run_inspect(args: InspectArgs) -> Result<()> {
    for path in args.payloads {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let payload = Payload::parse(&bytes).with_context(|| format!("{} is not a valid payload", path.display()))?;
        let header = bytes.len() - payload.string.len();
        // g_a downsamples by 8: the input the latent came from.
        let (input_height, input_width) = (8 * u64::from(payload.shape.height), 8 * u64::from(payload.shape.width));
        let bpp = bytes.len() as f64 * 8.0 / (input_height * input_width).max(1) as f64;
        if args.json {
            let line = serde_json::json!({
                "path": path,
                "fingerprint": payload.fingerprint.to_string(),
                "shape": payload.shape,
                "string_bytes": payload.string.len(),
                "header_bytes": header,
                "total_bytes": bytes.len(),
                "input": [input_height, input_width],
                "bpp": bpp,
            });
            println!("{line}");
        } else {
            println!(
                "{}: model {} latent {} string {} B + header {} B = {} B ({bpp:.4} bpp at {input_height}×{input_width})",
                path.display(),
                payload.fingerprint,
                payload.shape,
                payload.string.len(),
                header,
                bytes.len()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod payload_names {
    use super::*;

    #[test]
    fn images_of_the_same_name_keep_their_own_payloads() {
        let root = std::env::temp_dir().join(format!("fs-edge-names-{}", std::process::id()));
        for file in ["a/cat.jpg", "b/cat.jpg", "b/dog.jpg", "b/dog.png"] {
            std::fs::create_dir_all(root.join(file).parent().unwrap()).unwrap();
            std::fs::write(root.join(file), b"").unwrap();
        }
        let images: Vec<PathBuf> = ["a/cat.jpg", "b/cat.jpg", "b/dog.jpg", "b/dog.png", "b/missing.jpg"]
            .iter()
            .map(|f| root.join(f))
            .collect();
        let out = Path::new("out");
        let targets = payload_targets(&images, out);
        let names: Vec<_> = targets[..4].iter().map(|t| t.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                out.join("a/cat.fsp"),
                out.join("b/cat.fsp"),
                out.join("b/dog.jpg.fsp"),
                out.join("b/dog.png.fsp")
            ]
        );
        assert!(targets[4].as_ref().unwrap_err().contains("missing.jpg"));
        // Images of one directory land directly in the output.
        let one = payload_targets(&images[1..2], out);
        assert_eq!(one[0].as_ref().unwrap(), &out.join("cat.fsp"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
