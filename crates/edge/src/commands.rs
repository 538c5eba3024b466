//! The `frankensplit-edge` subcommands' arguments and runs: `encode`
//! (payload files) and `calibrate` (int8 ranges); `inspect` lives in
//! [`crate::inspect`]. `frankensplit` reuses them for its `encode` and `inspect`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_preprocess::RgbImage;
use serde::Serialize;

use crate::calibration::{load_calibration, CALIBRATION_FILE};
use crate::io::{for_each_image, payload_targets, write_atomically};
use crate::model::{bpp, encode_image, EdgeModel};

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
