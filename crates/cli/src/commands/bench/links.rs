//! `frankensplit bench links`: split inference against image offloading
//! over emulated links. The server runs in one network namespace and the
//! client in another, joined through a router whose kernel shapes the rates
//! and whose packet stage adds the round trip and the loss
//! (`frankensplit-links`). For every link profile, loss rate, method and
//! connection mode the client sends the images, and the run reports the
//! measured latency beside the link model's.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use frankensplit_edge::client::RequestReport;
use frankensplit_edge::units::format_rate;
use frankensplit_imagecodecs::ImageCodec;
use frankensplit_links::model::NetworkTime;
use frankensplit_links::{LinkSettings, Testbed, SERVER_ADDR};
use serde::Serialize;

use crate::commands::latency::{chosen_links, LinkProfile};
use crate::plot::{self, Chart, Series};

/// Which connections the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connections {
    /// One connection kept alive (its first request is left out).
    Kept,
    /// A new connection per request.
    Fresh,
    /// Both, one after the other.
    Both,
}

#[derive(Args)]
pub struct LinksArgs {
    /// Model bundle the server runs, with the whole backbone so that it also
    /// classifies images (a built-in name such as `demo` works).
    #[arg(long, value_parser = crate::builtin::parse_model)]
    model: PathBuf,
    /// Images to send (JPEG, PNG or WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Link profiles (ble, 3g, lte, 5g, wifi); default: all, or none when
    /// --bandwidth gives a link of your own.
    #[arg(long, value_delimiter = ',')]
    profile: Vec<String>,
    /// A link of your own: its rate, both ways (e.g. 1mbit, 500kbit, 1MB/s).
    #[arg(long, requires = "rtt")]
    bandwidth: Option<String>,
    /// The round-trip time of that link (e.g. 40ms).
    #[arg(long, requires = "bandwidth")]
    rtt: Option<String>,
    /// Packet loss rates in percent, each direction.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5")]
    loss: Vec<f64>,
    /// Offloading baselines: the centre crop compressed with these codecs.
    #[arg(long, value_delimiter = ',', default_value = "jpeg:q=75,webp:q=80,png")]
    codec: Vec<String>,
    /// Times each image is sent per method.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Kept-alive connections, a fresh one per request, or both.
    #[arg(long, value_enum, default_value_t = Connections::Both)]
    connections: Connections,
    /// Seed of the packet stage's loss draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Port the server listens on inside its namespace.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Draw measured and modelled latency against bandwidth (.png or .svg;
    /// zero-loss runs, kept connections); repeat for both.
    #[arg(long)]
    plot: Vec<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

/// One profile × loss × method × connection mode.
#[derive(Debug, Serialize)]
struct Row {
    profile: String,
    uplink_bits_per_s: f64,
    rtt_ms: f64,
    loss_percent: f64,
    method: String,
    connections: Connections,
    requests: usize,
    failed: usize,
    /// Mean body bytes per request sent.
    payload_bytes: f64,
    /// Bytes the client's interface sent per request (headers, ACKs, retransmissions).
    wire_up_bytes: f64,
    /// Bytes the client's interface received per request.
    wire_down_bytes: f64,
    /// Per-request end-to-end latency (edge + network + server), ms.
    median_total_ms: f64,
    p90_total_ms: f64,
    /// Network part (round trip less the server's time), ms.
    median_network_ms: f64,
    p90_network_ms: f64,
    median_edge_ms: f64,
    median_server_ms: f64,
    /// The link model's network time for the mean payload.
    modelled: NetworkTime,
    /// The plain `rtt + body bytes · 8 / rate`, the model before the emulated links.
    plain_model_ms: f64,
    /// Packets the stage dropped in this run.
    dropped_packets: u64,
}

#[derive(Serialize)]
struct Report {
    model: PathBuf,
    images: usize,
    repeat: usize,
    rows: Vec<Row>,
}

/// Set by Ctrl-C or SIGTERM: the run stops between measurements and
/// removes its namespaces on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// A server started inside its namespace; interrupted when dropped.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SAFETY: kill with a pid this process spawned and has not reaped.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        let _ = self.0.wait();
    }
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn start_server(bed: &Testbed, exe: &Path, model: &Path, port: u16) -> Result<ServerProcess> {
    let mut child = bed
        .in_server(exe)
        .args(["serve", "--model"])
        .arg(model)
        .args(["--listen", &format!("{SERVER_ADDR}:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the server in its namespace")?;
    let mut banner = String::new();
    std::io::BufReader::new(child.stderr.take().expect("piped stderr"))
        .read_line(&mut banner)
        .context("the server printed nothing")?;
    let server = ServerProcess(child);
    if !banner.contains("serving") {
        bail!("the server did not start: {}", banner.trim());
    }
    Ok(server)
}

/// The client's arguments for a method: `split`, or a codec.
fn method_args(codec: Option<&ImageCodec>) -> Vec<String> {
    match codec {
        None => vec!["--mode".into(), "split".into()],
        Some(ImageCodec::Jpeg { quality }) => {
            vec!["--mode".into(), "jpeg".into(), "--quality".into(), quality.to_string()]
        }
        Some(ImageCodec::Webp { quality }) => {
            vec!["--mode".into(), "webp".into(), "--quality".into(), quality.to_string()]
        }
        Some(ImageCodec::Png) => vec!["--mode".into(), "png".into()],
    }
}

struct Runner<'a> {
    bed: &'a Testbed,
    exe: &'a Path,
    args: &'a LinksArgs,
    url: String,
}

fn measure(cx: &Runner, profile: &LinkProfile, loss: f64, codec: Option<&ImageCodec>, fresh: bool) -> Result<Row> {
    let args = cx.args;
    let stage_before = cx.bed.stage_counts();
    let (up0, down0) = cx.bed.client_bytes()?;
    let mut command = cx.bed.in_client(cx.exe);
    command
        .args(["client", "--server", &cx.url, "--model"])
        .arg(&args.model)
        .args(method_args(codec))
        .args(["--json", "--repeat", &args.repeat.max(1).to_string()]);
    if fresh {
        command.arg("--fresh-connections");
    }
    let out = command.args(&args.images).output().context("cannot run the client")?;
    let (up1, down1) = cx.bed.client_bytes()?;
    let stage_after = cx.bed.stage_counts();
    let mut reports: Vec<RequestReport> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if reports.is_empty() {
        bail!(
            "the client sent nothing: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sent = reports.len();
    // Bytes over every request sent, as the interface counters cover them all.
    let payload = reports.iter().map(|r| r.payload_bytes as f64).sum::<f64>() / sent as f64;
    if !fresh && reports.len() > 1 {
        // The first request opens the kept connection.
        reports.remove(0);
    }
    let ok: Vec<&RequestReport> = reports.iter().filter(|r| r.status == 200).collect();
    let failed = reports.len() - ok.len();
    let of = |f: fn(&RequestReport) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let (total, network) = (of(|r| r.total_ms), of(|r| r.network_ms));
    let method = codec.map_or_else(|| "split".to_string(), ToString::to_string);
    let dropped = (stage_after.uplink_dropped + stage_after.downlink_dropped)
        - (stage_before.uplink_dropped + stage_before.downlink_dropped);
    Ok(Row {
        profile: profile.name.clone(),
        uplink_bits_per_s: profile.bits_per_s,
        rtt_ms: profile.rtt_ms,
        loss_percent: loss,
        method,
        connections: if fresh { Connections::Fresh } else { Connections::Kept },
        requests: reports.len(),
        failed,
        payload_bytes: payload,
        wire_up_bytes: (up1 - up0) as f64 / sent as f64,
        wire_down_bytes: (down1 - down0) as f64 / sent as f64,
        median_total_ms: quantile(&total, 0.5),
        p90_total_ms: quantile(&total, 0.9),
        median_network_ms: quantile(&network, 0.5),
        p90_network_ms: quantile(&network, 0.9),
        median_edge_ms: quantile(&of(|r| r.edge_ms), 0.5),
        median_server_ms: quantile(&of(|r| r.server_ms), 0.5),
        modelled: profile.model(fresh).request(payload),
        plain_model_ms: profile.rtt_ms + payload * 8.0 / profile.bits_per_s * 1e3,
        dropped_packets: dropped,
    })
}

pub fn run(args: LinksArgs) -> Result<()> {
    if let Some(reason) = frankensplit_links::unavailable() {
        eprintln!("bench links: not run: {reason}");
        return Ok(());
    }
    if args.loss.iter().any(|l| !(0.0..100.0).contains(l)) {
        bail!("--loss takes percentages in [0, 100)");
    }
    let profiles = chosen_links(&args.profile, args.bandwidth.as_deref(), args.rtt.as_deref())?;
    let codecs = ImageCodec::parse_list(&args.codec)?;
    for image in &args.images {
        if !image.is_file() {
            bail!("{} is not a file", image.display());
        }
    }
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    let bed = Testbed::create(&format!("fsl{}", std::process::id()))?;
    // Start the server on a fast link so that nothing waits on the link.
    bed.configure(
        &LinkSettings {
            uplink_bits_per_s: 1e9,
            downlink_bits_per_s: 1e9,
            rtt: Duration::ZERO,
            loss: 0.0,
        },
        args.seed,
    )?;
    let _server = start_server(&bed, &exe, &args.model, args.port)?;
    let cx = Runner {
        bed: &bed,
        exe: &exe,
        args: &args,
        url: format!("http://{SERVER_ADDR}:{}", args.port),
    };
    let modes: &[bool] = match args.connections {
        Connections::Kept => &[false],
        Connections::Fresh => &[true],
        Connections::Both => &[false, true],
    };
    let methods: Vec<Option<&ImageCodec>> = std::iter::once(None).chain(codecs.iter().map(Some)).collect();
    let runs = profiles.len() * args.loss.len() * methods.len() * modes.len();
    let bar = indicatif::ProgressBar::new(runs as u64)
        .with_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("a valid template"));
    let mut rows = Vec::new();
    for profile in &profiles {
        for &loss in &args.loss {
            bed.configure(
                &LinkSettings {
                    uplink_bits_per_s: profile.bits_per_s,
                    downlink_bits_per_s: profile.bits_per_s,
                    rtt: Duration::from_secs_f64(profile.rtt_ms / 1e3),
                    loss: loss / 100.0,
                },
                args.seed,
            )?;
            for &fresh in modes {
                for codec in &methods {
                    if INTERRUPTED.load(Ordering::Relaxed) {
                        bail!("interrupted; the namespaces are removed");
                    }
                    bar.set_message(format!(
                        "{} {loss} % {}",
                        profile.name,
                        codec.map_or("split".into(), |c| c.to_string())
                    ));
                    rows.push(measure(&cx, profile, loss, *codec, fresh)?);
                    bar.inc(1);
                }
            }
        }
    }
    bar.finish_and_clear();
    for path in &args.plot {
        draw(&rows, path)?;
    }
    let report = Report {
        model: args.model.clone(),
        images: args.images.len(),
        repeat: args.repeat,
        rows,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.save {
        frankensplit_fsio::write_file(path, json.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_table(&report);
        for path in &args.plot {
            println!("plot: {}", path.display());
        }
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!(
        "{} images × {} per method; latency per request, median (p90); network = round trip less server time",
        report.images, report.repeat
    );
    println!(
        "{:<5} {:>9} {:>5} {:>5} {:<10} {:>6} {:>8} {:>9} {:>9} {:>20} {:>20} {:>10} {:>7}",
        "link",
        "uplink",
        "RTT",
        "loss",
        "method",
        "conn",
        "bytes",
        "wire up",
        "wire down",
        "total ms",
        "network ms",
        "model ms",
        "diff"
    );
    for r in &report.rows {
        let modelled = r.modelled.total_ms;
        println!(
            "{:<5} {:>9} {:>5.0} {:>4.0}% {:<10} {:>6} {:>8.0} {:>9.0} {:>9.0} {:>9.1} ({:>8.1}) {:>9.1} ({:>8.1}) {:>10.1} {:>+6.1}%{}",
            r.profile,
            format_rate(r.uplink_bits_per_s),
            r.rtt_ms,
            r.loss_percent,
            r.method,
            match r.connections {
                Connections::Fresh => "fresh",
                _ => "kept",
            },
            r.payload_bytes,
            r.wire_up_bytes,
            r.wire_down_bytes,
            r.median_total_ms,
            r.p90_total_ms,
            r.median_network_ms,
            r.p90_network_ms,
            modelled,
            (r.median_network_ms / modelled - 1.0) * 100.0,
            if r.failed > 0 { format!(" ({} failed)", r.failed) } else { String::new() }
        );
    }
}

/// Measured network time of the zero-loss, kept-connection runs per method
/// beside the model's, at each profile's bandwidth (each profile has its own
/// round trip, so the model is drawn through the profiles' points).
fn draw(rows: &[Row], path: &Path) -> Result<()> {
    let mut kept: Vec<&Row> = rows
        .iter()
        .filter(|r| r.loss_percent == 0.0 && r.connections == Connections::Kept)
        .collect();
    kept.sort_by(|a, b| a.uplink_bits_per_s.total_cmp(&b.uplink_bits_per_s));
    let mut methods: Vec<&str> = kept.iter().map(|r| r.method.as_str()).collect();
    methods.sort();
    methods.dedup();
    let mut series = Vec::new();
    for method in methods {
        let runs: Vec<&&Row> = kept.iter().filter(|r| r.method == method).collect();
        let mbit = |r: &Row| r.uplink_bits_per_s / 1e6;
        series.push(Series {
            name: format!("{method} measured"),
            points: runs.iter().map(|r| (mbit(r), r.median_network_ms)).collect(),
        });
        series.push(Series {
            name: format!("{method} model"),
            points: runs.iter().map(|r| (mbit(r), r.modelled.total_ms)).collect(),
        });
    }
    let mut marks: Vec<(f64, String)> = kept
        .iter()
        .map(|r| (r.uplink_bits_per_s / 1e6, r.profile.clone()))
        .collect();
    marks.dedup();
    plot::draw(
        &Chart::over_bandwidth(
            "Network time per request over emulated links (no loss, kept connection)".into(),
            "network time (ms)",
            &series,
            &marks,
        ),
        path,
    )
}
