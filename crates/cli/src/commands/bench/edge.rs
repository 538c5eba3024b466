//! `frankensplit bench edge`: g_a and entropy coding at batch 1, ours (the
//! libtorch-free `frankensplit-edge` path: as written, folded, folded +
//! Winograd, int8) against libtorch's kernels on the same weights and input, each
//! also as a fraction of the machine's peak (the faster of libtorch's and
//! matrixmultiply's sgemm on large matrices).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use frankensplit_codec::{EntropyBottleneck, LatentShape, LikelihoodFormula};
use frankensplit_edge::bench::max_abs_difference;
use frankensplit_edge::encoder::Encoder;
use frankensplit_edge::int8::QuantizedEncoder;
use frankensplit_edge::EdgeModel;
use frankensplit_models::{Bundle, Compressor, CompressorConfig, DecoderBlueprint};
use serde::Serialize;
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

use super::time;

#[derive(Serialize)]
struct Method {
    name: String,
    ms: f64,
    /// Multiply-adds it executes (folding and Winograd execute fewer).
    macs: usize,
    gflops: f64,
    fraction_of_peak: f64,
    /// Largest difference of its latent from libtorch's.
    max_abs_difference: f32,
}

#[derive(Serialize)]
struct EdgeReport {
    model: String,
    input: String,
    latent: LatentShape,
    macs: usize,
    threads: i32,
    iterations: usize,
    peak_gflops: f64,
    peak_from: String,
    encoder: Vec<Method>,
    /// The instructions of the int8 tiles.
    int8_kernels: String,
    coding_ms: f64,
    string_bytes: usize,
}

/// g_a twice (ours and libtorch's, same weights) and the coder.
struct Subject {
    name: String,
    ours: Encoder,
    reference: Box<dyn Fn(&Tensor) -> Tensor>,
    coder: EntropyBottleneck,
    config: CompressorConfig,
}

/// The reference's encoder and entropy bottleneck with weights drawn from seed 0.
fn random_reference() -> Result<Subject> {
    tch::manual_seed(0);
    let config = CompressorConfig::default();
    let vars = VarStore::new(Device::Cpu);
    let compressor = Compressor::new(&vars.root(), &config, DecoderBlueprint::Swin);
    let variables = vars.variables();
    let ours = Encoder::from_torch(&config, |name| {
        let tensor = variables
            .get(&format!("g_a.{name}"))
            .with_context(|| format!("g_a.{name} missing"))?;
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        Ok((Vec::<f32>::try_from(tensor.flatten(0, -1))?, shape))
    })?;
    let coder = EntropyBottleneck::from_density(&compressor.entropy_bottleneck.density()?, LikelihoodFormula::Direct)?;
    Ok(Subject {
        name: "the reference's g_a (3 → 48 → 64 → 48), random weights".into(),
        ours,
        reference: Box::new(move |x| compressor.g_a.forward(x)),
        coder,
        config,
    })
}

fn from_bundle(dir: &Path) -> Result<Subject> {
    let edge = EdgeModel::open(dir).with_context(|| format!("cannot load model {}", dir.display()))?;
    let bundle = Bundle::open(dir, Device::Cpu)?;
    Ok(Subject {
        name: format!("{} ({})", dir.display(), edge.fingerprint),
        // `run` times each of its steps (`Encoder::steps`).
        ours: edge.encoder.unfolded(),
        coder: edge.coder().clone(),
        reference: Box::new(move |x| bundle.compressor.g_a.forward(x)),
        config: edge.config.clone(),
    })
}

/// Median time of an `n³` sgemm: libtorch's and matrixmultiply's, as GFLOP/s.
fn sgemm_peaks(n: usize) -> (f64, f64) {
    let flops = 2.0 * (n * n * n) as f64;
    let a = Tensor::randn([n as i64, n as i64], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([n as i64, n as i64], (Kind::Float, Device::Cpu));
    let libtorch = time(2, 7, || {
        let _ = std::hint::black_box(a.matmul(&b));
    });
    let x: Vec<f32> = Vec::try_from(a.flatten(0, -1)).unwrap_or_default();
    let y: Vec<f32> = Vec::try_from(b.flatten(0, -1)).unwrap_or_default();
    let mut z = vec![0f32; n * n];
    let ours = time(1, 5, || {
        // SAFETY: row-major n × n matrices of exactly n² elements each.
        unsafe {
            matrixmultiply::sgemm(
                n,
                n,
                n,
                1.0,
                x.as_ptr(),
                n as isize,
                1,
                y.as_ptr(),
                n as isize,
                1,
                0.0,
                z.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        std::hint::black_box(&z);
    });
    let gflops = |t: Duration| flops / t.as_secs_f64() / 1e9;
    (gflops(libtorch), gflops(ours))
}

pub(super) fn run(model: Option<PathBuf>, iterations: usize, warmup: usize, threads: i32, json: bool) -> Result<()> {
    ensure!(iterations > 0, "--iterations must be at least 1");
    ensure!(threads > 0, "--threads must be at least 1");
    tch::set_num_threads(threads);
    let subject = match &model {
        Some(dir) => from_bundle(dir)?,
        None => random_reference()?,
    };
    let side = subject.config.input_size as usize;
    tch::manual_seed(1);
    let image = Tensor::randn([1, 3, side as i64, side as i64], (Kind::Float, Device::Cpu));
    let input: Vec<f32> = Vec::try_from(image.flatten(0, -1))?;

    let reference_latent: Vec<f32> = Vec::try_from(tch::no_grad(|| (subject.reference)(&image)).flatten(0, -1))?;
    let libtorch = time(warmup, iterations, || {
        let _ = std::hint::black_box(tch::no_grad(|| (subject.reference)(&image)));
    });
    let (peak_libtorch, peak_matrixmultiply) = sgemm_peaks(1024);
    let (peak, peak_from) = if peak_libtorch >= peak_matrixmultiply {
        (peak_libtorch, format!("libtorch sgemm 1024³, {threads} thread(s)"))
    } else {
        (peak_matrixmultiply, "matrixmultiply sgemm 1024³, 1 thread".to_string())
    };
    let difference = |latent: &[f32]| max_abs_difference(latent, &reference_latent);
    // Throughput counts the multiply-adds each method executes.
    let method = |name: String, t: Duration, macs: usize, max_abs_difference: f32| {
        let gflops = 2.0 * macs as f64 / t.as_secs_f64() / 1e9;
        Method {
            name,
            ms: t.as_secs_f64() * 1e3,
            macs,
            gflops,
            fraction_of_peak: gflops / peak,
            max_abs_difference,
        }
    };

    // Each step of ours, measured on its own: as written, folded, folded + Winograd.
    let mut methods = Vec::new();
    let mut latent_side = 0;
    let mut ours_latent = Vec::new();
    for (label, encoder) in subject.ours.steps(side) {
        let mut workspace = encoder.workspace(side);
        let (latent, out_side) = encoder.run(&mut workspace, &input, threads as usize)?;
        let t = time(warmup, iterations, || {
            std::hint::black_box(
                encoder
                    .run(&mut workspace, std::hint::black_box(&input), threads as usize)
                    .expect("input fits"),
            );
        });
        let name = format!("ours, {label} ({threads} thread(s))");
        methods.push(method(name, t, encoder.macs(side), difference(&latent)));
        (ours_latent, latent_side) = (latent, out_side);
    }
    // int8, calibrated on the timed input itself (the ranges do not change the work).
    let mut folded = subject.ours.unfolded();
    folded.fold(side);
    let ranges = QuantizedEncoder::calibrate(&folded, std::slice::from_ref(&input), side, threads as usize)?;
    let quantized = QuantizedEncoder::new(&folded, &ranges)?;
    let mut workspace = quantized.workspace(side);
    let (int8_latent, _) = quantized.run(&mut workspace, &input, threads as usize)?;
    let t = time(warmup, iterations, || {
        std::hint::black_box(
            quantized
                .run(&mut workspace, std::hint::black_box(&input), threads as usize)
                .expect("input fits"),
        );
    });
    let name = format!(
        "ours, int8 ({}, {threads} thread(s))",
        frankensplit_edge::kernel::int8_instructions()
    );
    methods.push(method(name, t, quantized.macs(side), difference(&int8_latent)));
    let macs = subject.ours.unfolded().macs(side);
    methods.push(method(
        format!("libtorch 2.11 eager, NCHW, {threads} thread(s)"),
        libtorch,
        macs,
        0.0,
    ));
    let latent = LatentShape::new(
        subject.config.latent_channels as u32,
        latent_side as u32,
        latent_side as u32,
    );
    let string = subject.coder.compress(&ours_latent, latent)?;
    let coding = time(warmup, iterations, || {
        std::hint::black_box(subject.coder.compress(&ours_latent, latent).expect("latent codes"));
    });
    let report = EdgeReport {
        model: subject.name,
        input: format!("3×{side}×{side}, batch 1"),
        latent,
        macs,
        threads,
        iterations,
        peak_gflops: peak,
        peak_from,
        encoder: methods,
        int8_kernels: frankensplit_edge::kernel::int8_instructions().to_string(),
        coding_ms: coding.as_secs_f64() * 1e3,
        string_bytes: string.len(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "g_a of {}: input {}, latent {}, {:.1} M multiply-adds; median of {iterations} after {warmup} warm-up runs",
        report.model,
        report.input,
        report.latent,
        macs as f64 / 1e6
    );
    println!("peak: {:.1} GFLOP/s ({})", report.peak_gflops, report.peak_from);
    for m in &report.encoder {
        println!(
            "  {:<48} {:8.2} ms {:7.1} M MACs {:7.1} GFLOP/s {:5.1} % of peak, differs from libtorch by {:.1e}",
            m.name,
            m.ms,
            m.macs as f64 / 1e6,
            m.gflops,
            m.fraction_of_peak * 100.0,
            m.max_abs_difference
        );
    }
    println!(
        "  {:<48} {:8.2} ms ({} bytes)",
        "entropy coding (ours)", report.coding_ms, report.string_bytes
    );
    let (ours, int8, libtorch) = (&report.encoder[2], &report.encoder[3], &report.encoder[4]);
    println!(
        "  ours vs libtorch: {:.2}× the speed (int8: {:.2}×); ours + coding {:.2} ms (int8: {:.2} ms)",
        libtorch.ms / ours.ms,
        libtorch.ms / int8.ms,
        ours.ms + report.coding_ms,
        int8.ms + report.coding_ms
    );
    Ok(())
}
