//! `frankensplit bench codec`: encode and decode throughput of the entropy
//! coder on a FrankenSplit-sized latent, in a form a Python script can replay
//! through CompressAI on the same data (`tools/bench/compressai_codec.py`).
//! `frankensplit bench edge`: the device's encoder g_a and coding, ours
//! (libtorch-free) against libtorch's kernels in the same run, as a fraction
//! of the machine's sgemm peak.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Subcommand;
use frankensplit_codec::{DecodeLimits, EntropyBottleneck, LatentShape};
use serde::Serialize;

#[derive(Subcommand)]
pub enum Target {
    /// Entropy coding of a 48×28×28 latent (FrankenSplit at 224×224) with a
    /// synthetic 48-channel factorized prior: median time to compress
    /// (quantise + rANS) and decompress (rANS + dequantise), and symbols/s.
    Codec {
        /// Timed repetitions of each direction.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Untimed repetitions before timing.
        #[arg(long, default_value_t = 20)]
        warmup: usize,
        /// Latent shape as C,H,W.
        #[arg(long, default_value = "48,28,28", value_parser = parse_shape)]
        shape: LatentShape,
        /// Write the tables, latent and our string as JSON, for the CompressAI
        /// comparison script to time CompressAI on the very same case.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The edge encoder g_a plus entropy coding at batch 1: ours (no
    /// libtorch) against libtorch 2.11's eager kernels on the same weights
    /// and input, and the machine's peak from a large sgemm.
    Edge {
        /// Bundle to take g_a and the entropy tables from; default: the
        /// reference's encoder (3 → 48 → 64 → 48, 224²) with random weights.
        #[arg(long, value_parser = crate::builtin::parse_model)]
        model: Option<PathBuf>,
        /// Timed runs of each method.
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        /// Untimed runs before timing.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Threads for ours (split over output rows) and libtorch's intra-op threads.
        #[arg(long, default_value_t = 1)]
        threads: i32,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct CodecReport {
    shape: LatentShape,
    symbols: usize,
    string_bytes: usize,
    iterations: usize,
    compress_ms_median: f64,
    decompress_ms_median: f64,
    compress_symbols_per_s: f64,
    decompress_symbols_per_s: f64,
}

#[derive(Serialize)]
struct ExportedCase<'a> {
    shape: LatentShape,
    quantized_cdf: Vec<i32>,
    cdf_width: usize,
    cdf_length: Vec<i32>,
    offset: Vec<i32>,
    medians: &'a [f32],
    latent: &'a [f32],
    string_hex: String,
}

fn parse_shape(s: &str) -> Result<LatentShape, String> {
    let dims: Vec<u32> = s
        .split(',')
        .map(|d| d.trim().parse::<u32>().map_err(|e| format!("bad dimension {d:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match dims[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok(LatentShape::new(c, h, w)),
        _ => Err(format!("expected three positive dimensions C,H,W, got {s:?}")),
    }
}

pub fn run(target: Target) -> Result<()> {
    match target {
        Target::Codec {
            iterations,
            warmup,
            shape,
            export,
            json,
        } => run_codec(iterations, warmup, shape, export, json),
        Target::Edge {
            model,
            iterations,
            warmup,
            threads,
            json,
        } => crate::bench_edge::run(model, iterations, warmup, threads, json),
    }
}

fn run_codec(iterations: usize, warmup: usize, shape: LatentShape, export: Option<PathBuf>, json: bool) -> Result<()> {
    ensure!(iterations > 0, "--iterations must be at least 1");
    let eb = EntropyBottleneck::synthetic(shape.channels as usize);
    let latent = eb.synthetic_latent(shape, 0x5EED);
    let string = eb.compress(&latent, shape)?;
    let limits = DecodeLimits::default();
    let decoded = eb.decompress(&string, shape, limits)?;
    let expected: Vec<i32> = eb.quantize(&latent, shape)?;
    ensure!(
        eb.quantize(&decoded, shape)? == expected,
        "round trip failed: decoded latent differs from the input"
    );

    let compress = time(warmup, iterations, || {
        std::hint::black_box(
            eb.compress(std::hint::black_box(&latent), shape)
                .expect("benchmark latent encodes"),
        );
    });
    let decompress = time(warmup, iterations, || {
        std::hint::black_box(
            eb.decompress(std::hint::black_box(&string), shape, limits)
                .expect("benchmark string decodes"),
        );
    });
    let symbols = shape.len();
    let report = CodecReport {
        shape,
        symbols,
        string_bytes: string.len(),
        iterations,
        compress_ms_median: compress.as_secs_f64() * 1e3,
        decompress_ms_median: decompress.as_secs_f64() * 1e3,
        compress_symbols_per_s: symbols as f64 / compress.as_secs_f64(),
        decompress_symbols_per_s: symbols as f64 / decompress.as_secs_f64(),
    };

    if let Some(path) = export {
        let (quantized_cdf, cdf_width, cdf_length, offset) = eb.tables().to_compressai();
        let case = ExportedCase {
            shape,
            quantized_cdf,
            cdf_width,
            cdf_length,
            offset,
            medians: eb.medians(),
            latent: &latent,
            string_hex: string.iter().map(|b| format!("{b:02x}")).collect(),
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&case)?).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot move {} into place", path.display()))?;
    }

    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "latent {shape} ({symbols} symbols) -> {} bytes\n  compress   {:8.3} ms  {:7.1} Msymbols/s\n  decompress {:8.3} ms  {:7.1} Msymbols/s\n  (median of {iterations} after {warmup} warm-up runs)",
            string.len(),
            report.compress_ms_median,
            report.compress_symbols_per_s / 1e6,
            report.decompress_ms_median,
            report.decompress_symbols_per_s / 1e6,
        );
    }
    Ok(())
}

/// Median wall time of `iterations` calls after `warmup` untimed ones.
pub fn time(warmup: usize, iterations: usize, mut f: impl FnMut()) -> Duration {
    for _ in 0..warmup {
        f();
    }
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}
