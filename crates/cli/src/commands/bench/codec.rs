//! `frankensplit bench codec`: encode and decode throughput of the entropy
//! coder on a FrankenSplit-sized latent, in a form a Python script can replay
//! through CompressAI on the same data (`tools/bench/compressai_codec.py`).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use frankensplit_codec::{DecodeLimits, EntropyBottleneck, LatentShape};
use serde::Serialize;

use super::time;

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

pub(super) fn parse_shape(s: &str) -> Result<LatentShape, String> {
    let dims: Vec<u32> = s
        .split(',')
        .map(|d| d.trim().parse::<u32>().map_err(|e| format!("bad dimension {d:?}: {e}")))
        .collect::<Result<_, _>>()?;
    match dims[..] {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Ok(LatentShape::new(c, h, w)),
        _ => Err(format!("expected three positive dimensions C,H,W, got {s:?}")),
    }
}

pub(super) fn run(
    iterations: usize,
    warmup: usize,
    shape: LatentShape,
    export: Option<PathBuf>,
    json: bool,
) -> Result<()> {
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
