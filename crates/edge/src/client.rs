//! The device talking to a `frankensplit serve` over HTTP (feature
//! `client`; `frankensplit-edge send` and `frankensplit client`): in split
//! mode it encodes with this crate's encoder and sends payloads, in the
//! image modes it sends compressed images (the offloading baseline), with a
//! per-request latency breakdown, a paced upload (`--throttle`) and a load
//! mode. Requests and answers are the types of `frankensplit-api`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use frankensplit_api::{ClassifyResponse, ErrorBody};
use frankensplit_bundle::Manifest;
use frankensplit_imagecodecs::ImageCodec;
use frankensplit_preprocess::{Preprocess, RgbImage};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::units::{format_rate, parse_rate};
use crate::{encode_image, EdgeModel};

/// What the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Encode on the device and send the payload (FrankenSplit).
    Split,
    /// Send the image as JPEG (libjpeg-turbo; quality default 75).
    Jpeg,
    /// Send the image as lossless PNG.
    Png,
    /// Send the image as lossy WebP (libwebp; quality default 80).
    Webp,
}

#[derive(Args)]
pub struct ClientArgs {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// Model bundle the server runs: split mode encodes with its encoder;
    /// image modes take the crop size from it (default 224).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Images (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// split: send FrankenSplit payloads to /v1/classify; jpeg|png|webp: send
    /// the centre crop compressed with that codec to /v1/classify-image
    /// (image offloading).
    #[arg(long, value_enum, default_value_t = Mode::Split)]
    mode: Mode,
    /// Split mode: which of the server's backbones classifies (a name its
    /// bundle serves, or `all`); the server's first when absent.
    #[arg(long, value_name = "NAME")]
    backbone: Option<String>,
    /// Codec quality for --mode jpeg (1-100) or webp (0-100).
    #[arg(long)]
    quality: Option<f32>,
    /// Image modes: send the image file as it is and let the server resize
    /// and crop, instead of cropping and re-encoding on the device.
    #[arg(long)]
    original: bool,
    /// Send request bodies at this rate (e.g. 2mbit, 500kbit, 1MB/s) to
    /// check the latency model against a real, paced transfer; each request
    /// is paced on its own (concurrent requests do not share the rate).
    #[arg(long, value_name = "RATE")]
    throttle: Option<String>,
    /// Send every image this many times (a load run).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open a new connection for every request (TCP handshake and slow start
    /// each time) instead of keeping one alive.
    #[arg(long)]
    fresh_connections: bool,
    /// Print one JSON object per request, then a summary object.
    #[arg(long)]
    json: bool,
    /// File holding the bearer token to send (its first non-comment line),
    /// for servers started with --auth-token-file.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM certificate(s) of the authority to trust for an https:// server
    /// (e.g. a self-signed server certificate), besides the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

/// The HTTP client: the token on every request, the extra CA trusted, and
/// with `fresh_connections` no connection kept for the next request.
pub fn http_client(
    token_file: Option<&std::path::Path>,
    ca_cert: Option<&std::path::Path>,
    fresh_connections: bool,
) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().use_rustls_tls();
    if fresh_connections {
        builder = builder.pool_max_idle_per_host(0);
    }
    if let Some(path) = token_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let token = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .with_context(|| format!("{} holds no token", path.display()))?;
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .with_context(|| format!("the token in {} is not a valid header value", path.display()))?;
        value.set_sensitive(true);
        builder = builder.default_headers([(reqwest::header::AUTHORIZATION, value)].into_iter().collect());
    }
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} holds no PEM certificate", path.display()))?;
        if certs.is_empty() {
            bail!("{} holds no PEM certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().context("cannot set up the HTTP client")
}

/// One request as `client --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestReport {
    pub image: PathBuf,
    /// HTTP status; 0 when no answer came.
    pub status: u16,
    pub payload_bytes: usize,
    /// Preprocessing and encoding on the device.
    pub edge_ms: f64,
    /// The round trip less the server's own time.
    pub network_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modelled_transfer_ms: Option<f64>,
    /// The server's time as its answer reports it.
    pub server_ms: f64,
    /// Edge time plus the round trip.
    pub total_ms: f64,
    pub top1: Option<usize>,
    /// The backbone that classified, as the server names it (servers of
    /// several backbones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
    mean_payload_bytes: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    mean_network_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mean_modelled_transfer_ms: Option<f64>,
}

/// One image ready to send: its body and the edge compute it took.
struct Prepared {
    image: PathBuf,
    body: Arc<Vec<u8>>,
    edge_ms: f64,
}

fn prepare(args: &ClientArgs) -> Result<(Vec<Prepared>, String)> {
    let base = args.server.trim_end_matches('/');
    if args.mode == Mode::Split {
        let model = args
            .model
            .as_ref()
            .context("--mode split needs --model (the bundle the server runs)")?;
        if args.quality.is_some() || args.original {
            bail!("--quality and --original apply to the image modes (jpeg, png, webp)");
        }
        let edge = EdgeModel::open(model).with_context(|| format!("cannot load model {}", model.display()))?;
        let prepared = args
            .images
            .iter()
            .map(|p| {
                let (payload, edge_ms) = encode_image(&edge, p).with_context(|| format!("{}", p.display()))?;
                Ok(Prepared {
                    image: p.clone(),
                    body: Arc::new(payload),
                    edge_ms,
                })
            })
            .collect::<Result<_>>()?;
        let query = match &args.backbone {
            Some(name) if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {
                format!("?backbone={name}")
            }
            Some(name) => bail!("--backbone {name:?}: backbone names are letters, digits, _ and -"),
            None => String::new(),
        };
        return Ok((prepared, format!("{base}{}{query}", frankensplit_api::CLASSIFY)));
    }
    if args.backbone.is_some() {
        bail!("--backbone chooses among a split server's backbones; image modes use its first");
    }
    if args.original {
        if args.quality.is_some() {
            bail!("--original sends the file as it is; --quality does not apply");
        }
        let prepared = args
            .images
            .iter()
            .map(|p| {
                let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                Ok(Prepared {
                    image: p.clone(),
                    body: Arc::new(bytes),
                    edge_ms: 0.0,
                })
            })
            .collect::<Result<_>>()?;
        return Ok((prepared, format!("{base}{}", frankensplit_api::CLASSIFY_IMAGE)));
    }
    let codec = match (args.mode, args.quality) {
        (Mode::Jpeg, q) => format!("jpeg:q={}", q.unwrap_or(75.0)),
        (Mode::Webp, q) => format!("webp:q={}", q.unwrap_or(80.0)),
        (Mode::Png, None) => "png".to_string(),
        (Mode::Png, Some(_)) => bail!("PNG is lossless; --quality does not apply"),
        (Mode::Split, _) => unreachable!("handled above"),
    };
    let codec: ImageCodec = codec.parse()?;
    let preprocess = match &args.model {
        Some(model) => Manifest::read(model)?.preprocess,
        None => Preprocess::default(),
    };
    let prepared = args
        .images
        .iter()
        .map(|p| {
            let image = RgbImage::open(p)?;
            let start = Instant::now();
            let body = codec.encode(&preprocess.resize_and_crop(&image)?)?;
            Ok(Prepared {
                image: p.clone(),
                body: Arc::new(body),
                edge_ms: start.elapsed().as_secs_f64() * 1e3,
            })
        })
        .collect::<Result<_>>()?;
    Ok((
        prepared,
        format!("{base}{}?cropped=true", frankensplit_api::CLASSIFY_IMAGE),
    ))
}

/// Sends the images as `args` says and prints a report per request and a summary.
pub fn run_client(args: ClientArgs) -> Result<()> {
    let throttle = args.throttle.as_deref().map(parse_rate).transpose()?;
    // Prepare once per image: the edge work is the same for every repetition.
    let (prepared, url) = prepare(&args)?;
    let jobs: Vec<&Prepared> = (0..args.repeat.max(1)).flat_map(|_| prepared.iter()).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let client = http_client(
        args.token_file.as_deref(),
        args.ca_cert.as_deref(),
        args.fresh_connections,
    )?;
    let reports: Vec<RequestReport> = runtime.block_on(async {
        // The link model's RTT term for this connection: the median of a few
        // empty round trips.
        let link = match throttle {
            Some(rate) => Some(PacedLink {
                bits_per_s: rate,
                rtt_ms: round_trip_ms(&client, &args.server).await?,
            }),
            None => None,
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let tasks: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let (client, url, limit) = (client.clone(), url.clone(), limit.clone());
                let (image, body, edge_ms) = (job.image.clone(), job.body.clone(), job.edge_ms);
                tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await;
                    send(&client, &url, image, body, edge_ms, link).await
                })
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(task.await.expect("request task"));
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    for r in &reports {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
        } else if args.repeat <= 1 {
            let modelled = r
                .modelled_transfer_ms
                .map(|m| format!(" (link model {m:.1} ms)"))
                .unwrap_or_default();
            println!(
                "{}: {} | {} B | edge {:.1} ms + network {:.1} ms{modelled} + server {:.1} ms = {:.1} ms | top-1 {}",
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
    let ok_reports: Vec<&RequestReport> = reports.iter().filter(|r| r.status == 200).collect();
    let mut latencies: Vec<f64> = ok_reports.iter().map(|r| r.network_ms + r.server_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let mean = |values: Vec<f64>| (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    let ok = latencies.len();
    let summary = Summary {
        requests: reports.len(),
        ok,
        failed: reports.len() - ok,
        seconds,
        requests_per_s: reports.len() as f64 / seconds,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        mean_payload_bytes: mean(reports.iter().map(|r| r.payload_bytes as f64).collect()).unwrap_or(0.0),
        mean_network_ms: throttle.and_then(|_| mean(ok_reports.iter().map(|r| r.network_ms).collect())),
        mean_modelled_transfer_ms: mean(ok_reports.iter().filter_map(|r| r.modelled_transfer_ms).collect()),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if args.repeat > 1 || args.images.len() > 1 {
        println!(
            "{} requests ({} ok) in {:.2} s: {:.1} req/s, round trip p50 {:.1} ms, p99 {:.1} ms",
            summary.requests, summary.ok, summary.seconds, summary.requests_per_s, summary.p50_ms, summary.p99_ms
        );
        if let (Some(measured), Some(modelled)) = (summary.mean_network_ms, summary.mean_modelled_transfer_ms) {
            println!(
                "paced at {}: mean network {measured:.1} ms vs link model (RTT from /healthz + bytes · 8 / rate) {modelled:.1} ms ({:+.1} %)",
                format_rate(throttle.unwrap_or_default()),
                (measured / modelled - 1.0) * 100.0
            );
        }
    }
    if summary.failed > 0 {
        bail!("{} of {} requests failed", summary.failed, summary.requests);
    }
    Ok(())
}

/// A paced upload's link: the rate bodies are sent at and the connection's
/// own round-trip time.
#[derive(Debug, Clone, Copy)]
struct PacedLink {
    bits_per_s: f64,
    rtt_ms: f64,
}

/// Median of five `GET /healthz` round trips, in milliseconds.
async fn round_trip_ms(client: &reqwest::Client, server: &str) -> Result<f64> {
    let url = format!("{}{}", server.trim_end_matches('/'), frankensplit_api::HEALTH);
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let response = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        response.bytes().await?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// When each chunk of a body paced at `bits_per_s` may leave: a chunk goes
/// once the link would have finished sending it, so the last byte leaves
/// `len · 8 / rate` after the start, as the latency model assumes.
fn pacing(len: usize, bits_per_s: f64) -> Vec<(std::ops::Range<usize>, Duration)> {
    // About 2 ms of data per chunk, 64 B to 16 KiB.
    let chunk = ((bits_per_s / 8.0 / 500.0) as usize).clamp(64, 16 << 10);
    (0..len)
        .step_by(chunk)
        .map(|start| {
            let end = (start + chunk).min(len);
            (start..end, Duration::from_secs_f64(end as f64 * 8.0 / bits_per_s))
        })
        .collect()
}

/// The body as a stream released on the [`pacing`] schedule.
fn paced_body(body: Arc<Vec<u8>>, bits_per_s: f64) -> reqwest::Body {
    let start = tokio::time::Instant::now();
    let schedule = pacing(body.len(), bits_per_s);
    let chunks = futures_util::stream::iter(schedule).then(move |(range, at)| {
        let body = body.clone();
        async move {
            tokio::time::sleep_until(start + at).await;
            Ok::<_, std::io::Error>(body[range].to_vec())
        }
    });
    reqwest::Body::wrap_stream(chunks)
}

async fn send(
    client: &reqwest::Client,
    url: &str,
    image: PathBuf,
    payload: Arc<Vec<u8>>,
    edge_ms: f64,
    link: Option<PacedLink>,
) -> RequestReport {
    let started = Instant::now();
    let len = payload.len();
    let body = match link {
        Some(link) => paced_body(payload, link.bits_per_s),
        None => reqwest::Body::from(payload.as_ref().clone()),
    };
    let response = client.post(url).body(body).send().await;
    let (status, answer) = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, read_answer(status, r.bytes().await.map_err(|e| e.to_string())))
        }
        Err(e) => (0, Err(e.to_string())),
    };
    let round_trip = started.elapsed().as_secs_f64() * 1e3;
    let server_ms = answer.as_ref().map_or(0.0, |a| a.timings_ms.total);
    RequestReport {
        image,
        status,
        payload_bytes: len,
        edge_ms,
        network_ms: (round_trip - server_ms).max(0.0),
        modelled_transfer_ms: link.map(|l| l.rtt_ms + len as f64 * 8.0 / l.bits_per_s * 1e3),
        server_ms,
        total_ms: edge_ms + round_trip,
        top1: answer.as_ref().ok().and_then(|a| a.top_k.first()).map(|p| p.class),
        backbone: answer
            .as_ref()
            .ok()
            .map(|a| a.backbone.clone())
            .filter(|b| !b.is_empty()),
        error: answer.err(),
    }
}

/// The server's answer, or what went wrong: the server's error message, or
/// why its body could not be read.
fn read_answer(status: u16, body: Result<impl AsRef<[u8]>, String>) -> Result<ClassifyResponse, String> {
    let body = body.map_err(|e| format!("cannot read the answer: {e}"))?;
    let body = body.as_ref();
    if status == 200 {
        serde_json::from_slice::<ClassifyResponse>(body).map_err(|e| format!("unexpected answer from the server: {e}"))
    } else {
        Err(serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(body))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_the_contract_types() {
        let ok = br#"{"model":"00c0ffee","input_bytes":120,"top_k":[{"class":7,"probability":0.9,"logit":3.5}],"batch_size":1,"timings_ms":{"decode":0.1,"queue":0.2,"inference":1.0,"total":1.5}}"#;
        let answer = read_answer(200, Ok(ok)).unwrap();
        assert_eq!(answer.top_k[0].class, 7);
        assert_eq!(answer.timings_ms.total, 1.5);
        let refused = read_answer(409, Ok(br#"{"error":"payload was produced by model 1"}"#)).unwrap_err();
        assert_eq!(refused, "payload was produced by model 1");
        assert!(read_answer(502, Ok(b"<html>bad gateway</html>"))
            .unwrap_err()
            .contains("HTTP 502"));
        assert!(read_answer(200, Ok(b"{}")).unwrap_err().contains("unexpected answer"));
    }

    #[test]
    fn pacing_releases_the_last_byte_at_the_link_rate() {
        for (len, rate) in [(1_234usize, 2e6), (50_000, 270e3), (10, 1e9), (1 << 20, 12e6)] {
            let schedule = pacing(len, rate);
            let covered: usize = schedule.iter().map(|(r, _)| r.len()).sum();
            assert_eq!(covered, len);
            assert!(schedule
                .windows(2)
                .all(|w| w[0].0.end == w[1].0.start && w[0].1 < w[1].1));
            let last = schedule.last().unwrap().1.as_secs_f64();
            let expected = len as f64 * 8.0 / rate;
            assert!((last - expected).abs() < 1e-9 * expected.max(1.0), "{len} B at {rate}");
        }
        assert!(pacing(0, 1e6).is_empty());
    }
}
