//! `frankensplit latency`: end-to-end latency of split inference against
//! offloading the image, per network link. Edge and server compute are
//! measured here, on this machine, with the model and images given; the
//! link adds its network time, from the link model of `frankensplit-links`:
//!
//! `total = edge · slowdown + network(bytes) + server`, where the network
//! time is one round trip, the request (with its head and each segment's
//! headers) at the uplink rate, the answer at the downlink rate, and over a
//! fresh connection the handshake and slow start's waits.
//!
//! `frankensplit bench links` measures the same over emulated links
//! (network namespaces, kernel shaping, delay and loss) and prints the
//! model beside each measurement.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use frankensplit_imagecodecs::ImageCodec;
use frankensplit_links::model::LinkModel;
use frankensplit_models::Bundle;
use frankensplit_preprocess::RgbImage;
use serde::Serialize;
use tch::Device;

use super::placement::Placement;
use crate::plot::{self, Chart, Series};
use frankensplit_edge::units::{format_rate, parse_ms, parse_rate};

/// A network link: uplink bandwidth and round-trip time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkProfile {
    /// Short name (`ble`, `lte`, …).
    pub name: String,
    /// Uplink bandwidth, bits per second.
    pub bits_per_s: f64,
    /// Round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// What the figures stand for.
    pub about: String,
}

/// Bytes of the client's request line and headers, and of the server's
/// answer (head and JSON body, top 5), as measured on the emulated links
/// (`frankensplit bench links`, docs/latency.md).
pub const REQUEST_HEAD_BYTES: f64 = 100.0;
pub const ANSWER_BYTES: f64 = 630.0;

impl LinkProfile {
    /// The link model of this link (the same rate both ways), over a kept
    /// connection or a fresh one per request.
    pub fn model(&self, fresh_connection: bool) -> LinkModel {
        LinkModel {
            uplink_bits_per_s: self.bits_per_s,
            downlink_bits_per_s: self.bits_per_s,
            rtt_ms: self.rtt_ms,
            fresh_connection,
            request_head_bytes: REQUEST_HEAD_BYTES,
            answer_bytes: ANSWER_BYTES,
        }
    }

    /// Milliseconds to deliver a request with a body of `bytes` and get the answer back.
    pub fn transfer_ms(&self, bytes: f64, fresh_connection: bool) -> f64 {
        self.model(fresh_connection).request(bytes).total_ms
    }
}

/// The named links: typical uplink figures, documented in `docs/latency.md`.
pub fn presets() -> Vec<LinkProfile> {
    let link = |name: &str, bits_per_s: f64, rtt_ms: f64, about: &str| LinkProfile {
        name: name.into(),
        bits_per_s,
        rtt_ms,
        about: about.into(),
    };
    vec![
        link(
            "ble",
            270e3,
            30.0,
            "Bluetooth Low Energy 4.2, practical GATT throughput to a phone",
        ),
        link("3g", 1.5e6, 100.0, "UMTS/HSPA uplink"),
        link("lte", 10e6, 50.0, "4G LTE uplink, typical urban"),
        link("5g", 50e6, 20.0, "5G NR mid-band uplink"),
        link("wifi", 100e6, 5.0, "802.11ac/ax Wi-Fi, device to a nearby server"),
    ]
}

/// The links `--profile` names, or every preset when it names none and no
/// link of one's own is given, then the link of `--bandwidth` and `--rtt`.
pub fn chosen_links(names: &[String], bandwidth: Option<&str>, rtt: Option<&str>) -> Result<Vec<LinkProfile>> {
    let all = presets();
    let mut links: Vec<LinkProfile> = if names.is_empty() && bandwidth.is_none() {
        all.clone()
    } else {
        names
            .iter()
            .map(|name| {
                all.iter()
                    .find(|p| p.name.eq_ignore_ascii_case(name))
                    .cloned()
                    .with_context(|| {
                        let known: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
                        format!("unknown link profile {name:?}; known: {}", known.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    if let Some(bandwidth) = bandwidth {
        links.push(LinkProfile {
            name: "custom".into(),
            bits_per_s: parse_rate(bandwidth)?,
            rtt_ms: rtt.map(parse_ms).transpose()?.unwrap_or_default(),
            about: format!("--bandwidth {bandwidth} --rtt {}", rtt.unwrap_or("0ms")),
        });
    }
    Ok(links)
}

#[derive(Args)]
pub struct LatencyArgs {
    /// Model bundle with the whole backbone (convert with --backbone-weights)
    /// so that both the split and the image-offloading server times can be measured.
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Images to measure with (JPEG, PNG or WebP); sizes and times are averaged.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Offloading baselines: the centre crop compressed with these codecs.
    #[arg(long, value_delimiter = ',', default_value = "jpeg:q=75,webp:q=80,png")]
    codec: Vec<String>,
    /// Named links to report (ble, 3g, lte, 5g, wifi); default: all.
    #[arg(long, value_delimiter = ',')]
    profile: Vec<String>,
    /// A custom link's uplink bandwidth (e.g. 2mbit, 500kbit, 1MB/s).
    #[arg(long, requires = "rtt")]
    bandwidth: Option<String>,
    /// A custom link's round-trip time (e.g. 40ms); also the RTT of the plot.
    #[arg(long)]
    rtt: Option<String>,
    /// Multiply the measured edge compute by this factor, to stand for a
    /// device slower than this machine.
    #[arg(long, default_value_t = 1.0)]
    edge_slowdown: f64,
    /// Model a new TCP connection per request (handshake and slow start)
    /// instead of one kept alive.
    #[arg(long)]
    fresh_connections: bool,
    /// Timed passes over the images (after one warm-up pass); medians are reported.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Draw total latency against bandwidth to this file (.png or .svg);
    /// repeat the flag for both.
    #[arg(long)]
    plot: Vec<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// The server side's device and number format (the edge encoder is
    /// timed on this machine's CPU in f32 either way).
    #[command(flatten)]
    placement: Placement,
}

/// What one method costs on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// `split` or the codec (`jpeg:q=75`).
    pub method: String,
    /// Median edge compute per image (preprocessing and encoding), ms.
    pub edge_ms: f64,
    /// Mean bytes sent per image.
    pub bytes: f64,
    /// Median server compute per image (decoding and networks, batch 1), ms.
    pub server_ms: f64,
}

#[derive(Serialize)]
struct Row {
    profile: LinkProfile,
    /// Total latency per method, in the order of `methods`.
    total_ms: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    methods: Vec<Measured>,
    /// Where the server side ran: `cpu, f32`, `cuda:0, bf16`, …
    server: String,
    edge_slowdown: f64,
    links: Vec<Row>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Times one method over `iterations` passes (after a warm-up pass):
/// `edge` turns an image into the bytes sent, `server` answers them.
fn time_method(
    method: String,
    images: &[RgbImage],
    iterations: usize,
    mut edge: impl FnMut(&RgbImage) -> Result<Vec<u8>>,
    mut server: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Measured> {
    let (mut edge_ms, mut server_ms, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    for pass in 0..=iterations {
        for image in images {
            let start = Instant::now();
            let sent = edge(image)?;
            let edge_time = elapsed_ms(start);
            let start = Instant::now();
            server(&sent)?;
            if pass > 0 {
                server_ms.push(elapsed_ms(start));
                edge_ms.push(edge_time);
                bytes.push(sent.len() as f64);
            }
        }
    }
    Ok(Measured {
        method,
        edge_ms: median(edge_ms),
        bytes: bytes.iter().sum::<f64>() / bytes.len() as f64,
        server_ms: median(server_ms),
    })
}

/// Times the split pipeline and each codec's offloading on `images`, the
/// edge encoder `edge`'s (on the CPU), the server side `bundle`'s.
fn measure(
    edge: &Bundle,
    bundle: &Bundle,
    images: &[RgbImage],
    codecs: &[ImageCodec],
    iterations: usize,
) -> Result<Vec<Measured>> {
    let preprocess = &bundle.manifest.preprocess;
    let mut out = vec![time_method(
        "split".into(),
        images,
        iterations,
        |image| Ok(edge.compress(&preprocess.apply(image)?)?),
        |payload| {
            let features = bundle.decompress(payload)?;
            let _ = bundle.classify_features(&features).to_device(Device::Cpu);
            Ok(())
        },
    )?];
    for codec in codecs {
        out.push(time_method(
            codec.to_string(),
            images,
            iterations,
            |image| Ok(codec.encode(&preprocess.resize_and_crop(image)?)?),
            |encoded| {
                let input = preprocess.normalize(&RgbImage::decode(encoded)?);
                let _ = bundle.classify_images(&[input])?.to_device(Device::Cpu);
                Ok(())
            },
        )?);
    }
    Ok(out)
}

fn total_ms(m: &Measured, link: &LinkProfile, slowdown: f64, fresh: bool) -> f64 {
    m.edge_ms * slowdown + link.transfer_ms(m.bytes, fresh) + m.server_ms
}

pub fn run(args: LatencyArgs) -> Result<()> {
    if !(args.edge_slowdown.is_finite() && args.edge_slowdown > 0.0) {
        bail!("--edge-slowdown must be a positive factor");
    }
    let codecs = ImageCodec::parse_list(&args.codec)?;
    let links = chosen_links(&args.profile, args.bandwidth.as_deref(), args.rtt.as_deref())?;
    let rtt = args.rtt.as_deref().map(parse_ms).transpose()?;
    let bundle = args.placement.open(&args.model)?;
    let edge = args.placement.open_edge(&args.model)?;
    if bundle.backbone_head.is_none() && !codecs.is_empty() {
        bail!(
            "{} holds only the backbone after the split, so image offloading cannot be timed; convert it with the whole backbone (--backbone-weights), or pass --codec '' for split alone",
            args.model.display()
        );
    }
    let images: Vec<RgbImage> = args
        .images
        .iter()
        .map(|p| RgbImage::open(p).map_err(Into::into))
        .collect::<Result<_>>()?;
    let methods = measure(
        edge.as_ref().unwrap_or(&bundle),
        &bundle,
        &images,
        &codecs,
        args.iterations.max(1),
    )?;
    let rows: Vec<Row> = links
        .iter()
        .map(|link| Row {
            profile: link.clone(),
            total_ms: methods
                .iter()
                .map(|m| total_ms(m, link, args.edge_slowdown, args.fresh_connections))
                .collect(),
        })
        .collect();
    for path in &args.plot {
        let plot_rtt = rtt.unwrap_or(20.0);
        let bandwidths: Vec<f64> = (0..=48).map(|i| 1e5 * 10f64.powf(f64::from(i) / 12.0)).collect();
        let series: Vec<Series> = methods
            .iter()
            .map(|m| Series {
                name: m.method.clone(),
                points: bandwidths
                    .iter()
                    .map(|&b| {
                        let link = LinkProfile {
                            name: String::new(),
                            bits_per_s: b,
                            rtt_ms: plot_rtt,
                            about: String::new(),
                        };
                        (b / 1e6, total_ms(m, &link, args.edge_slowdown, args.fresh_connections))
                    })
                    .collect(),
            })
            .collect();
        let marks: Vec<(f64, String)> = links.iter().map(|l| (l.bits_per_s / 1e6, l.name.clone())).collect();
        plot::draw(
            &Chart::over_bandwidth(
                format!("End-to-end latency per image (RTT {plot_rtt} ms)"),
                "latency (ms)",
                &series,
                &marks,
            ),
            path,
        )?;
    }
    if args.json {
        let report = Report {
            methods,
            server: args.placement.describe(),
            edge_slowdown: args.edge_slowdown,
            links: rows,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "measured on this machine ({} images, median of {} passes; edge × {}; server on {}):",
        images.len(),
        args.iterations.max(1),
        args.edge_slowdown,
        args.placement.describe()
    );
    println!("{:<14} {:>10} {:>11} {:>11}", "method", "edge ms", "bytes", "server ms");
    for m in &methods {
        println!(
            "{:<14} {:>10.2} {:>11.0} {:>11.2}",
            m.method,
            m.edge_ms * args.edge_slowdown,
            m.bytes,
            m.server_ms
        );
    }
    println!();
    print!("{:<8} {:>14} {:>8}", "link", "uplink", "RTT");
    for m in &methods {
        print!(" {:>13}", m.method);
    }
    println!(" {:>16}", "split speed-up");
    for row in &rows {
        print!(
            "{:<8} {:>14} {:>5.0} ms",
            row.profile.name,
            format_rate(row.profile.bits_per_s),
            row.profile.rtt_ms
        );
        for t in &row.total_ms {
            print!(" {:>10.1} ms", t);
        }
        let best_offload = row.total_ms[1..].iter().copied().fold(f64::INFINITY, f64::min);
        if best_offload.is_finite() {
            println!(" {:>15.2}×", best_offload / row.total_ms[0]);
        } else {
            println!();
        }
    }
    for path in &args.plot {
        println!("\nplot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_time_counts_the_round_trip_both_messages_and_their_headers() {
        let link = LinkProfile {
            name: "t".into(),
            bits_per_s: 2e6,
            rtt_ms: 40.0,
            about: String::new(),
        };
        // Request: 5,000 B body + 100 B head in 4 segments of 66 B headers
        // = 5,364 B = 21.456 ms at 2 Mbit/s; answer: 630 + 66 B = 2.784 ms.
        let kept = 40.0 + 21.456 + 2.784;
        assert!((link.transfer_ms(5_000.0, false) - kept).abs() < 1e-9);
        // A fresh connection adds the handshake: a round trip and 214 B of
        // SYN, SYN-ACK and ACK (0.856 ms); 4 segments fit the initial window.
        assert!((link.transfer_ms(5_000.0, true) - (kept + 40.856)).abs() < 1e-9);
        let m = Measured {
            method: "split".into(),
            edge_ms: 3.0,
            bytes: 5_000.0,
            server_ms: 7.0,
        };
        assert!((total_ms(&m, &link, 2.0, false) - (6.0 + kept + 7.0)).abs() < 1e-9);
    }

    #[test]
    fn presets_have_distinct_names_and_sane_figures() {
        let presets = presets();
        for (i, p) in presets.iter().enumerate() {
            assert!(p.bits_per_s > 0.0 && p.rtt_ms >= 0.0, "{}", p.name);
            assert!(presets[..i].iter().all(|q| q.name != p.name));
        }
    }
}
