//! The `frankensplit-edge` subcommands' arguments and runs: `encode`
//! (payload files), `calibrate` (int8 ranges) and `inspect` (payload
//! headers). `frankensplit` reuses them for its `encode` and `inspect`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use frankensplit_codec::Payload;
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
