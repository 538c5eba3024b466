//! `frankensplit-edge bench`: the encoder and the entropy coder timed on the
//! device itself, with nothing but this binary and a bundle (the full
//! `frankensplit bench edge` also times libtorch, which devices lack). Each
//! step of g_a is timed on its own — as written, folded, folded + Winograd
//! (what `encode` runs), int8 (what `encode --int8` runs, calibrated on the
//! timed input) — on one deterministic input, so that a device's figures
//! compare with BENCHMARKS.md's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::Args;
use frankensplit_codec::LatentShape;
use serde::Serialize;

use crate::int8::QuantizedEncoder;
use crate::EdgeModel;

#[derive(Args)]
pub struct BenchArgs {
    /// Model bundle directory (only the encoder and entropy tables are used).
    #[arg(long)]
    pub model: PathBuf,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 50)]
    pub iterations: usize,
    /// Untimed runs before them.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Threads for the encoder (the device's cores).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Step {
    name: &'static str,
    ms: f64,
    /// Multiply-adds it executes.
    macs: usize,
    gflops: f64,
    /// Largest difference of its latent from the f32 encoder's (int8 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_abs_difference: Option<f32>,
}

#[derive(Serialize)]
struct Report {
    model: PathBuf,
    input: [usize; 3],
    latent: LatentShape,
    threads: usize,
    iterations: usize,
    /// Whether the vector tiles ran (else the portable loop).
    vectorised: bool,
    /// The instructions of the f32 tiles.
    f32_kernels: String,
    /// The instructions of the int8 tiles.
    int8_kernels: String,
    encoder: Vec<Step>,
    coding_ms: f64,
    string_bytes: usize,
    /// What `encode` spends per image after preprocessing: g_a as it runs + coding.
    encode_and_code_ms: f64,
    /// The same with `encode --int8`.
    int8_encode_and_code_ms: f64,
}

/// The median of `iterations` timed calls after `warmup` untimed ones, in ms.
fn median_ms(warmup: usize, iterations: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<f64> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A deterministic input in [-2, 2): the range of normalised images.
fn input(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 22) as f32 - 2.0
        })
        .collect()
}

/// The largest `|a − b|`.
pub fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// `bench`: each step of g_a, then the coder, on one input.
pub fn run_bench(args: BenchArgs) -> Result<()> {
    ensure!(args.iterations > 0, "--iterations must be at least 1");
    let model = EdgeModel::open(&args.model).with_context(|| format!("cannot load model {}", args.model.display()))?;
    let threads = args.threads.max(1);
    let side = model.input_size();
    let image = input(3 * side * side);
    let mut encoder = Vec::new();
    for (name, e) in model.encoder.steps(side) {
        let mut workspace = e.workspace(side);
        let ms = median_ms(args.warmup, args.iterations, || {
            std::hint::black_box(
                e.run(&mut workspace, std::hint::black_box(&image), threads)
                    .expect("input fits"),
            );
        });
        let macs = e.macs(side);
        encoder.push(Step {
            name,
            ms,
            macs,
            gflops: 2.0 * macs as f64 / ms / 1e6,
            max_abs_difference: None,
        });
    }
    let latent = model.encoder.forward(&image, side, threads)?.0;
    // Calibrated on the timed input itself: the ranges do not change the work.
    let ranges = QuantizedEncoder::calibrate(&model.encoder, std::slice::from_ref(&image), side, threads)?;
    let quantized = QuantizedEncoder::new(&model.encoder, &ranges)?;
    let mut workspace = quantized.workspace(side);
    let ms = median_ms(args.warmup, args.iterations, || {
        std::hint::black_box(
            quantized
                .run(&mut workspace, std::hint::black_box(&image), threads)
                .expect("input fits"),
        );
    });
    let int8_latent = quantized.run(&mut workspace, &image, threads)?.0;
    let macs = quantized.macs(side);
    encoder.push(Step {
        name: "int8",
        ms,
        macs,
        gflops: 2.0 * macs as f64 / ms / 1e6,
        max_abs_difference: Some(max_abs_difference(&int8_latent, &latent)),
    });
    let shape = model.latent_shape();
    let string = model.coder().compress(&latent, shape)?;
    let coding_ms = median_ms(args.warmup, args.iterations, || {
        std::hint::black_box(model.coder().compress(&latent, shape).expect("latent codes"));
    });
    let report = Report {
        model: args.model,
        input: [3, side, side],
        latent: shape,
        threads,
        iterations: args.iterations,
        vectorised: crate::kernel::vectorised(),
        f32_kernels: crate::kernel::f32_kernels().to_string(),
        int8_kernels: crate::kernel::int8_instructions().to_string(),
        encode_and_code_ms: encoder[2].ms + coding_ms,
        int8_encode_and_code_ms: encoder[3].ms + coding_ms,
        encoder,
        coding_ms,
        string_bytes: string.len(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "g_a of {}: input 3×{side}×{side}, latent {}, {} thread(s), {} kernels (int8: {}); median of {} after {} warm-up runs",
        report.model.display(),
        report.latent,
        threads,
        report.f32_kernels,
        report.int8_kernels,
        args.iterations,
        args.warmup
    );
    for step in &report.encoder {
        println!(
            "  {:<20} {:8.2} ms {:8.1} M multiply-adds {:7.1} GFLOP/s",
            step.name,
            step.ms,
            step.macs as f64 / 1e6,
            step.gflops
        );
        if let Some(d) = step.max_abs_difference {
            println!("  {:<20} latent within {d:.3e} of f32's", "");
        }
    }
    println!(
        "  {:<20} {:8.2} ms ({} bytes)",
        "entropy coding", report.coding_ms, report.string_bytes
    );
    println!("  {:<20} {:8.2} ms", "encode + code", report.encode_and_code_ms);
    println!(
        "  {:<20} {:8.2} ms",
        "int8 encode + code", report.int8_encode_and_code_ms
    );
    Ok(())
}
