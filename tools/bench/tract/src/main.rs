//! Times tract-onnx on one ONNX graph (the edge encoder g_a exported by
//! `tools/bench/edge_reference.py --save-onnx` or by `frankensplit export-onnx
//! --part encoder`) and prints one JSON object. See BENCHMARKS.md, "tract".

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use tract_onnx::prelude::*;

/// Times tract-onnx (pure-Rust ONNX inference) on one ONNX graph with one f32
/// input, on the calling thread only: load, fix the input shape, optimise
/// (`into_optimized`), make runnable, run --warmup untimed iterations, then
/// --iterations timed ones. Prints JSON: median and min ms, tract-onnx
/// version, iterations, and, with --reference, the largest absolute
/// difference between tract's first output and the reference output.
///
/// Example (files written by tools/bench/edge_reference.py --save-onnx DIR):
///
///   tract-bench DIR/encoder.onnx --input DIR/input.npy --reference DIR/output.npy
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// The ONNX file (one f32 input, e.g. g_a exported with torch.onnx).
    model: PathBuf,

    /// Input shape, comma-separated (default: the shape of --input if it is a
    /// .npy file, else 1,3,224,224).
    #[arg(long, value_delimiter = ',')]
    shape: Option<Vec<usize>>,

    /// Input tensor: a .npy file (little-endian f32, C order) or raw
    /// little-endian f32 values (then --shape gives the shape). Default: a
    /// deterministic pseudo-random input in [-1, 1).
    #[arg(long)]
    input: Option<PathBuf>,

    /// Reference output for the same input (.npy or raw little-endian f32),
    /// e.g. ONNX Runtime's or PyTorch's; reports max |tract - reference|.
    #[arg(long)]
    reference: Option<PathBuf>,

    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 10)]
    warmup: usize,

    /// Timed iterations (one image each); the median and min are reported.
    #[arg(long, default_value_t = 50)]
    iterations: usize,

    /// Also write the JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Print the optimised plan (node, operator, output fact) to stderr.
    #[arg(long)]
    print_plan: bool,
}

/// Reads a .npy file (dtype '<f4', C order) or, for any other extension, raw
/// little-endian f32 values. Returns the shape (None for raw) and the values.
fn read_f32(path: &Path) -> Result<(Option<Vec<usize>>, Vec<f32>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let is_npy = bytes.starts_with(b"\x93NUMPY");
    let (shape, data) = if is_npy {
        ensure!(bytes.len() >= 10, "{}: truncated .npy header", path.display());
        let major = bytes[6];
        let (header_len, start) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
            v => bail!("{}: unsupported .npy version {v}", path.display()),
        };
        let header = std::str::from_utf8(&bytes[start..start + header_len])?;
        ensure!(
            header.contains("'descr': '<f4'"),
            "{}: need dtype '<f4', header {header}",
            path.display()
        );
        ensure!(
            header.contains("'fortran_order': False"),
            "{}: need C order",
            path.display()
        );
        let shape_text = header
            .split("'shape': (")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .with_context(|| format!("{}: no shape in header {header}", path.display()))?;
        let shape = shape_text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>())
            .collect::<Result<Vec<_>, _>>()?;
        (Some(shape), &bytes[start + header_len..])
    } else {
        (None, &bytes[..])
    };
    ensure!(
        data.len() % 4 == 0,
        "{}: {} data bytes is not a whole number of f32",
        path.display(),
        data.len()
    );
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some(shape) = &shape {
        ensure!(
            shape.iter().product::<usize>() == values.len(),
            "{}: shape {shape:?} but {} values",
            path.display(),
            values.len()
        );
    }
    Ok((shape, values))
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift64*).
fn pseudo_random(len: usize) -> Vec<f32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
            r as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn threads_of_process() -> Option<usize> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// User + system CPU seconds of this process (Linux /proc, clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.iterations > 0, "--iterations must be at least 1");

    let (input_shape, input_values) = match &args.input {
        Some(path) => {
            let (file_shape, values) = read_f32(path)?;
            let shape = match (&args.shape, file_shape) {
                (Some(s), _) => s.clone(),
                (None, Some(s)) => s,
                (None, None) => vec![1, 3, 224, 224],
            };
            ensure!(
                shape.iter().product::<usize>() == values.len(),
                "input shape {shape:?} needs {} values, {} has {}",
                shape.iter().product::<usize>(),
                path.display(),
                values.len()
            );
            (shape, values)
        }
        None => {
            let shape = args.shape.clone().unwrap_or_else(|| vec![1, 3, 224, 224]);
            let len = shape.iter().product();
            (shape, pseudo_random(len))
        }
    };

    let load_start = Instant::now();
    let model = tract_onnx::onnx()
        .model_for_path(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?
        .with_input_fact(0, f32::fact(&input_shape).into())
        .context("fixing the input shape")?
        .into_optimized()
        .context("optimising the model")?
        .into_runnable()
        .context("making the model runnable")?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    if args.print_plan {
        for &id in model.order_without_consts() {
            let node = &model.model().nodes()[id];
            eprintln!(
                "{:>3} {:<40} {:<24} {:?}",
                id,
                node.name,
                node.op.name(),
                node.outputs[0].fact
            );
        }
    }

    let input: Tensor = tract_ndarray::ArrayD::from_shape_vec(input_shape.clone(), input_values)?.into();
    let input = input.into_tvalue();

    // One state for all runs, as an application would keep it (its buffers
    // are reused); `model.run` would spawn a fresh one per call.
    let mut state = model.spawn()?;
    let mut output = state.run(tvec!(input.clone())).context("running the model")?;
    for _ in 1..args.warmup {
        output = state.run(tvec!(input.clone()))?;
    }
    let threads_after_warmup = threads_of_process();
    let cpu_before = cpu_seconds();
    let mut samples = Vec::with_capacity(args.iterations);
    let timed_start = Instant::now();
    for _ in 0..args.iterations {
        let start = Instant::now();
        let out = state.run(tvec!(input.clone()))?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&out);
    }
    let wall = timed_start.elapsed().as_secs_f64();
    let cpu_per_wall = match (cpu_before, cpu_seconds()) {
        (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
        _ => None,
    };
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };

    let out = output[0]
        .to_plain_array_view::<f32>()
        .context("first output is not f32")?;
    let output_shape = out.shape().to_vec();
    let max_abs_difference = match &args.reference {
        Some(path) => {
            let (ref_shape, reference) = read_f32(path)?;
            if let Some(s) = &ref_shape {
                ensure!(
                    *s == output_shape,
                    "reference shape {s:?} but tract's output is {output_shape:?}"
                );
            }
            ensure!(
                reference.len() == out.len(),
                "reference has {} values, tract's output {}",
                reference.len(),
                out.len()
            );
            let worst = out
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let scale = reference.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            Some((worst, scale))
        }
        None => None,
    };

    let report = serde_json::json!({
        "engine": "tract-onnx",
        "tract_version": env!("TRACT_ONNX_VERSION"),
        "model": args.model.display().to_string(),
        "input_shape": input_shape,
        "output_shape": output_shape,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "median_ms": median,
        "min_ms": samples[0],
        "max_ms": samples[n - 1],
        "load_optimise_ms": load_ms,
        "process_threads": threads_after_warmup,
        "cpu_seconds_per_wall_second": cpu_per_wall,
        "reference": args.reference.as_ref().map(|p| p.display().to_string()),
        "max_abs_difference": max_abs_difference.map(|(w, _)| w),
        "reference_max_abs": max_abs_difference.map(|(_, s)| s),
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &args.json {
        fs::write(path, format!("{text}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
