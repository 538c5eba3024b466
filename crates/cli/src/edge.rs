//! `encode` (the edge side: images to payload files) and `client` (the edge
//! side talking to a `frankensplit serve` over HTTP, with a per-request
//! latency breakdown and a load mode).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use frankensplit_models::Bundle;
use frankensplit_preprocess::RgbImage;
use serde::Serialize;
use serde_json::Value;
use tch::Device;

use crate::models::{for_each_image, write_atomically};

#[derive(Args)]
pub struct EncodeArgs {
    /// Model bundle directory (only the encoder and entropy tables are used).
    #[arg(long)]
    model: PathBuf,
    /// Images (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Directory for the payloads (`<image stem>.fsp`).
    #[arg(short, long)]
    output: PathBuf,
    /// Print one JSON object per image.
    #[arg(long)]
    json: bool,
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
fn encode_image(bundle: &Bundle, path: &Path) -> Result<(Vec<u8>, f64)> {
    let image = RgbImage::open(path)?;
    let start = Instant::now();
    let input = bundle.manifest.preprocess.apply(&image)?;
    let payload = bundle.compress(&input)?;
    Ok((payload, start.elapsed().as_secs_f64() * 1e3))
}

fn bpp(bundle: &Bundle, bytes: usize) -> f64 {
    let crop = f64::from(bundle.manifest.preprocess.crop);
    bytes as f64 * 8.0 / (crop * crop)
}

pub fn run_encode(args: EncodeArgs) -> Result<()> {
    let bundle = Bundle::open(&args.model, Device::Cpu)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    for_each_image(&args.images, |path| {
        let encoded = encode_image(&bundle, path).and_then(|(payload, encode_ms)| {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "payload".into());
            let target = args.output.join(format!("{stem}.fsp"));
            write_atomically(&target, &payload)?;
            Ok(Encoded {
                image: path.to_path_buf(),
                payload: target,
                bytes: payload.len(),
                bpp: bpp(&bundle, payload.len()),
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
pub struct ClientArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// Model bundle the server runs (the client encodes with its encoder).
    #[arg(long)]
    model: PathBuf,
    /// Images (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Send every image this many times (a load run).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Print one JSON object per request, then a summary object.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct RequestReport {
    image: PathBuf,
    status: u16,
    payload_bytes: usize,
    edge_ms: f64,
    network_ms: f64,
    server_ms: f64,
    total_ms: f64,
    top1: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct Summary {
    requests: usize,
    ok: usize,
    failed: usize,
    seconds: f64,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn run_client(args: ClientArgs) -> Result<()> {
    let bundle = Bundle::open(&args.model, Device::Cpu)
        .with_context(|| format!("cannot load model {}", args.model.display()))?;
    // Encode once per image: the edge work is the same for every repetition.
    let encoded: Vec<(PathBuf, Arc<Vec<u8>>, f64)> = args
        .images
        .iter()
        .map(|p| {
            encode_image(&bundle, p)
                .map(|(payload, ms)| (p.clone(), Arc::new(payload), ms))
                .with_context(|| format!("{}", p.display()))
        })
        .collect::<Result<_>>()?;
    let url = format!("{}/v1/classify", args.server.trim_end_matches('/'));
    let jobs: Vec<(PathBuf, Arc<Vec<u8>>, f64)> =
        (0..args.repeat.max(1)).flat_map(|_| encoded.iter().cloned()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let reports: Vec<RequestReport> = runtime.block_on(async {
        let client = reqwest::Client::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let tasks: Vec<_> = jobs
            .into_iter()
            .map(|(image, payload, edge_ms)| {
                let (client, url, limit) = (client.clone(), url.clone(), limit.clone());
                tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    send(&client, &url, image, payload, edge_ms).await
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(task.await.expect("request task"));
        }
        out
    });
    let seconds = started.elapsed().as_secs_f64();
    for r in &reports {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else if args.repeat <= 1 {
            println!(
                "{}: {} | {} B | edge {:.1} ms + network {:.1} ms + server {:.1} ms = {:.1} ms | top-1 {}",
                r.image.display(),
                r.status,
                r.payload_bytes,
                r.edge_ms,
                r.network_ms,
                r.server_ms,
                r.total_ms,
                r.top1
                    .map_or_else(|| r.error.clone().unwrap_or_default(), |c| c.to_string())
            );
        }
    }
    let mut latencies: Vec<f64> = reports
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.network_ms + r.server_ms)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let ok = latencies.len();
    let summary = Summary {
        requests: reports.len(),
        ok,
        failed: reports.len() - ok,
        seconds,
        requests_per_s: reports.len() as f64 / seconds,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if args.repeat > 1 || args.images.len() > 1 {
        println!(
            "{} requests ({} ok) in {:.2} s: {:.1} req/s, round trip p50 {:.1} ms, p99 {:.1} ms",
            summary.requests, summary.ok, summary.seconds, summary.requests_per_s, summary.p50_ms, summary.p99_ms
        );
    }
    if summary.failed > 0 {
        bail!("{} of {} requests failed", summary.failed, summary.requests);
    }
    Ok(())
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    image: PathBuf,
    payload: Arc<Vec<u8>>,
    edge_ms: f64,
) -> RequestReport {
    let started = Instant::now();
    let response = client.post(url).body(payload.as_ref().clone()).send().await;
    let (status, body) = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
        Err(e) => (0, serde_json::json!({ "error": e.to_string() })),
    };
    let round_trip = started.elapsed().as_secs_f64() * 1e3;
    let server_ms = body["timings_ms"]["total"].as_f64().unwrap_or(0.0);
    RequestReport {
        image,
        status,
        payload_bytes: payload.len(),
        edge_ms,
        network_ms: (round_trip - server_ms).max(0.0),
        server_ms,
        total_ms: edge_ms + round_trip,
        top1: body["top_k"][0]["class"].as_i64(),
        error: body["error"].as_str().map(str::to_string),
    }
}
