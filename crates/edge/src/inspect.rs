//! `inspect`: what a payload holds. Without a model, its header (model
//! fingerprint, latent shape, sizes); with `--model`, the payload decoded
//! with the bundle's entropy tables: the latent's integer symbols as a
//! NumPy array (`--symbols`), what each channel costs (`--stats`), and the
//! raw CompressAI string inside the container (`--raw`). Raw CompressAI
//! strings are read too, given their latent shape (`--shape`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use frankensplit_bundle::VerifiedBundle;
use frankensplit_codec::{
    symbol_cost, CodecError, DecodeLimits, EntropyBottleneck, LatentShape, Payload, PayloadCodec,
};
use serde::Serialize;

use crate::io::write_atomically;

#[derive(Args)]
pub struct InspectArgs {
    /// Payload files written by the edge encoder (or, with `--shape`, raw
    /// CompressAI strings).
    #[arg(required = true)]
    payloads: Vec<PathBuf>,
    /// Print one JSON object per payload instead of text (with `--stats`,
    /// the statistics too).
    #[arg(long)]
    json: bool,
    /// Model bundle directory (with `frankensplit`, a built-in model's name
    /// too): decode the payloads with its entropy tables (payloads of
    /// another model or latent shape are refused).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// The payloads are raw CompressAI strings (the bytes of
    /// `EntropyBottleneck.compress`, without our container) of latents of
    /// this shape, `C,H,W`: it must be the model's latent shape. Needs `--model`.
    #[arg(long, requires = "model", value_name = "C,H,W", value_parser = parse_shape)]
    shape: Option<LatentShape>,
    /// Write the decoded symbols as an int32 NumPy array `C×H×W`: the
    /// latent's integers before the medians are added back, as CompressAI's
    /// `EntropyBottleneck.quantize(y, "symbols")` gives them (`round(y −
    /// median)`; `decompress` returns them plus the medians). Needs `--model`
    /// and one payload.
    #[arg(long, requires = "model", value_name = "OUT.npy")]
    symbols: Option<PathBuf>,
    /// Per channel: the bits its symbols cost under the model's CDF (−log2 p
    /// summed, escape bypass bits included), the empirical entropy of its
    /// symbols, its escapes (symbols outside the table, sent with the
    /// 4-bit bypass) and its share of the payload; then a total line.
    /// Needs `--model`.
    #[arg(long, requires = "model")]
    stats: bool,
    /// Write the raw CompressAI string inside the container (what
    /// CompressAI's `decompress` reads) to this file. One payload.
    #[arg(long, value_name = "OUT")]
    raw: Option<PathBuf>,
}

/// `C,H,W` (or `C×H×W`, `CxHxW`) with every dimension at least 1.
fn parse_shape(text: &str) -> Result<LatentShape, String> {
    let dims: Vec<&str> = text.split([',', '×', 'x']).map(str::trim).collect();
    let parsed: Option<Vec<u32>> = dims.iter().map(|d| d.parse().ok().filter(|&d: &u32| d > 0)).collect();
    match parsed.as_deref() {
        Some(&[c, h, w]) => Ok(LatentShape::new(c, h, w)),
        _ => Err(format!(
            "expected the latent shape as C,H,W (three positive integers, e.g. 48,28,28), got {text:?}"
        )),
    }
}

/// What a file holds: our container, or a raw CompressAI string.
enum Input<'a> {
    Container(Payload<'a>),
    Raw { string: &'a [u8], shape: LatentShape },
}

impl Input<'_> {
    fn string(&self) -> &[u8] {
        match self {
            Input::Container(p) => p.string,
            Input::Raw { string, .. } => string,
        }
    }

    fn shape(&self) -> LatentShape {
        match self {
            Input::Container(p) => p.shape,
            Input::Raw { shape, .. } => *shape,
        }
    }
}

/// One channel's cost and statistics.
#[derive(Debug, Serialize)]
pub struct ChannelStats {
    /// Channel index.
    pub channel: usize,
    /// Its symbols (`H·W`).
    pub symbols: usize,
    /// What it costs: `−log2 p` of each coded CDF entry (the escape's for
    /// symbols outside the table) summed, plus the escapes' bypass bits.
    pub bits: f64,
    /// `bits / symbols`.
    pub bits_per_symbol: f64,
    /// Empirical entropy of its symbols, in bits per symbol.
    pub entropy_bits_per_symbol: f64,
    /// Symbols outside the table's range.
    pub escapes: usize,
    /// Bits of their 4-bit bypass chunks (part of `bits`).
    pub escape_bits: u64,
    /// `bits` over the payload's bits (header included).
    pub share: f64,
}

/// The whole latent's cost, against what the payload actually takes.
#[derive(Debug, Serialize)]
pub struct TotalStats {
    /// Symbols in the latent.
    pub symbols: usize,
    /// Sum of the channels' bits: the ideal code length under the model.
    pub bits: f64,
    /// `bits / symbols`.
    pub bits_per_symbol: f64,
    /// Sum over channels of symbols × empirical entropy.
    pub entropy_bits: f64,
    /// All escapes.
    pub escapes: usize,
    /// All escapes' bypass bits.
    pub escape_bits: u64,
    /// `bits` over the payload's bits.
    pub share: f64,
    /// The CompressAI string's bits (8 × its bytes).
    pub string_bits: u64,
    /// `string_bits − bits`: the rANS coder's final state and word padding.
    pub coder_overhead_bits: f64,
    /// The container's header bits (0 for a raw string).
    pub header_bits: u64,
    /// The payload's bits: the string's and the header's.
    pub payload_bits: u64,
}

/// `--stats`: every channel and the total.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Per channel, in order.
    pub channels: Vec<ChannelStats>,
    /// The whole latent.
    pub total: TotalStats,
}

/// The statistics of `symbols` (a `shape` latent's, CHW) coded with
/// `coder` into a string of `string_bytes` inside a payload of
/// `payload_bytes`.
pub fn symbol_stats(
    coder: &EntropyBottleneck,
    symbols: &[i32],
    shape: LatentShape,
    string_bytes: usize,
    payload_bytes: usize,
) -> Result<Stats> {
    let plane = shape.plane();
    if shape.channels as usize != coder.channels() || symbols.len() != shape.len() || plane == 0 {
        bail!(
            "{} symbols of a {shape} latent do not fit a {}-channel entropy model",
            symbols.len(),
            coder.channels()
        );
    }
    let payload_bits = 8 * payload_bytes as u64;
    let mut sorted = Vec::with_capacity(plane);
    let channels: Vec<ChannelStats> = symbols
        .chunks_exact(plane)
        .enumerate()
        .map(|(c, values)| {
            let row = coder.tables().row(c);
            let (mut bits, mut escapes, mut escape_bits) = (0.0, 0, 0u64);
            for &s in values {
                let cost = symbol_cost(row, s);
                bits += cost.bits();
                escapes += usize::from(cost.escaped);
                escape_bits += u64::from(cost.bypass_bits);
            }
            sorted.clear();
            sorted.extend_from_slice(values);
            sorted.sort_unstable();
            let n = values.len() as f64;
            let entropy = sorted
                .chunk_by(|a, b| a == b)
                .map(|run| {
                    let p = run.len() as f64 / n;
                    -p * p.log2()
                })
                .sum::<f64>();
            // One value alone sums to -0.0.
            let entropy = if entropy > 0.0 { entropy } else { 0.0 };
            ChannelStats {
                channel: c,
                symbols: values.len(),
                bits,
                bits_per_symbol: bits / n,
                entropy_bits_per_symbol: entropy,
                escapes,
                escape_bits,
                share: bits / payload_bits.max(1) as f64,
            }
        })
        .collect();
    let bits: f64 = channels.iter().map(|c| c.bits).sum();
    let string_bits = 8 * string_bytes as u64;
    let total = TotalStats {
        symbols: symbols.len(),
        bits,
        bits_per_symbol: bits / symbols.len() as f64,
        entropy_bits: channels
            .iter()
            .map(|c| c.entropy_bits_per_symbol * c.symbols as f64)
            .sum(),
        escapes: channels.iter().map(|c| c.escapes).sum(),
        escape_bits: channels.iter().map(|c| c.escape_bits).sum(),
        share: bits / payload_bits.max(1) as f64,
        string_bits,
        coder_overhead_bits: string_bits as f64 - bits,
        header_bits: payload_bits - string_bits,
        payload_bits,
    };
    Ok(Stats { channels, total })
}

/// `inspect`: payload headers and, with a model, their decoded contents.
pub fn run_inspect(args: InspectArgs) -> Result<()> {
    if (args.symbols.is_some() || args.raw.is_some()) && args.payloads.len() != 1 {
        bail!(
            "--symbols and --raw write one file each: give one payload, not {}",
            args.payloads.len()
        );
    }
    let codec = match &args.model {
        Some(dir) => {
            let bundle = VerifiedBundle::open(dir).with_context(|| format!("cannot load model {}", dir.display()))?;
            Some(
                bundle
                    .payload_codec()
                    .with_context(|| format!("cannot read the entropy tables of {}", dir.display()))?,
            )
        }
        None => None,
    };
    if let (Some(shape), Some(codec)) = (args.shape, &codec) {
        if shape != codec.shape {
            bail!(
                "--shape {shape} is not the latent shape of model {} ({}, i.e. --shape {},{},{}): its tables cannot decode it",
                codec.fingerprint,
                codec.shape,
                codec.shape.channels,
                codec.shape.height,
                codec.shape.width
            );
        }
    }
    for path in &args.payloads {
        inspect_one(&args, codec.as_ref(), path)?;
    }
    Ok(())
}

fn inspect_one(args: &InspectArgs, codec: Option<&PayloadCodec>, path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let input = match args.shape {
        Some(shape) => Input::Raw { string: &bytes, shape },
        None => match Payload::parse(&bytes) {
            Ok(payload) => Input::Container(payload),
            // A raw string's first byte is its coder state's lowest byte:
            // one in 16 starts like our magic, so any header error may mean
            // a raw string.
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "{} is not a valid FrankenSplit payload; {}",
                    path.display(),
                    raw_hint(codec)
                )))
            }
        },
    };
    let symbols = match codec {
        Some(codec) => Some(decode(codec, &input, &bytes).with_context(|| {
            format!(
                "cannot decode {} with model {}",
                path.display(),
                args.model.as_deref().unwrap_or(Path::new("?")).display()
            )
        })?),
        None => None,
    };
    let shape = input.shape();
    if let (Some(out), Some(symbols)) = (&args.symbols, &symbols) {
        let dims = [shape.channels, shape.height, shape.width].map(|d| d as usize);
        frankensplit_fsio::npy::write(out, &dims, symbols)
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(out) = &args.raw {
        write_atomically(out, input.string())?;
    }
    let stats = match (codec, &symbols) {
        (Some(codec), Some(symbols)) if args.stats => Some(symbol_stats(
            codec.coder(),
            symbols,
            shape,
            input.string().len(),
            bytes.len(),
        )?),
        _ => None,
    };
    print_report(args, codec, path, &input, bytes.len(), stats.as_ref())
}

/// What to pass when a file may be a raw CompressAI string.
fn raw_hint(codec: Option<&PayloadCodec>) -> String {
    match codec {
        Some(codec) => format!(
            "if it is a raw CompressAI string, give its latent shape: --shape {},{},{} for this model",
            codec.shape.channels, codec.shape.height, codec.shape.width
        ),
        None => "if it is a raw CompressAI string, pass the model that made it and the latent shape: --model DIR --shape C,H,W"
            .into(),
    }
}

/// Decodes the input's symbols with `codec`: a container must be the
/// model's (fingerprint and shape), a raw string is read at its shape.
fn decode(codec: &PayloadCodec, input: &Input<'_>, bytes: &[u8]) -> Result<Vec<i32>> {
    match input {
        Input::Container(_) => codec.decompress_symbols(bytes).map_err(|e| match e {
            // A raw string can look like a container by chance.
            CodecError::FingerprintMismatch { .. } | CodecError::LatentShapeMismatch { .. } => {
                anyhow!("{e} ({})", raw_hint(Some(codec)))
            }
            e => anyhow!(e),
        }),
        Input::Raw { string, shape } => codec
            .coder()
            .decompress_symbols(string, *shape, DecodeLimits::default())
            .map_err(|e| {
                let hint = if Payload::parse(bytes).is_ok_and(|p| p.fingerprint == codec.fingerprint) {
                    " (the file looks like a FrankenSplit payload of this model: drop --shape)"
                } else {
                    ""
                };
                anyhow!("not a raw CompressAI string of a {shape} latent for this model: {e}{hint}")
            }),
    }
}

fn print_report(
    args: &InspectArgs,
    codec: Option<&PayloadCodec>,
    path: &Path,
    input: &Input<'_>,
    total_bytes: usize,
    stats: Option<&Stats>,
) -> Result<()> {
    let shape = input.shape();
    let string_bytes = input.string().len();
    let header = total_bytes - string_bytes;
    // g_a downsamples by 8: the input the latent came from.
    let (input_height, input_width) = (8 * u64::from(shape.height), 8 * u64::from(shape.width));
    let bpp = total_bytes as f64 * 8.0 / (input_height * input_width).max(1) as f64;
    let fingerprint = match input {
        Input::Container(p) => Some(p.fingerprint.to_string()),
        Input::Raw { .. } => None,
    };
    if args.json {
        let mut line = serde_json::json!({
            "path": path,
            "format": if fingerprint.is_some() { "container" } else { "raw" },
            "fingerprint": fingerprint,
            "shape": shape,
            "string_bytes": string_bytes,
            "header_bytes": header,
            "total_bytes": total_bytes,
            "input": [input_height, input_width],
            "bpp": bpp,
        });
        let object = line.as_object_mut().expect("an object");
        if let Some(codec) = codec {
            object.insert("model".into(), codec.fingerprint.to_string().into());
        }
        if let (Some(out), Some(_)) = (&args.symbols, codec) {
            object.insert("symbols_file".into(), serde_json::to_value(out)?);
        }
        if let Some(out) = &args.raw {
            object.insert("raw_file".into(), serde_json::to_value(out)?);
        }
        if let Some(stats) = stats {
            object.insert("stats".into(), serde_json::to_value(stats)?);
        }
        println!("{line}");
        return Ok(());
    }
    let mut text = match &fingerprint {
        Some(fingerprint) => format!(
            "{}: model {fingerprint} latent {shape} string {string_bytes} B + header {header} B = {total_bytes} B ({bpp:.4} bpp at {input_height}×{input_width})",
            path.display(),
        ),
        None => format!(
            "{}: raw CompressAI string, latent {shape}, {string_bytes} B ({bpp:.4} bpp at {input_height}×{input_width})",
            path.display(),
        ),
    };
    if let Some(codec) = codec {
        write!(
            text,
            "\n  decoded with model {}: {} symbols",
            codec.fingerprint,
            shape.len()
        )?;
    }
    if let (Some(out), Some(_)) = (&args.symbols, codec) {
        write!(text, "\n  symbols (int32 {shape}) → {}", out.display())?;
    }
    if let Some(out) = &args.raw {
        write!(text, "\n  raw CompressAI string ({string_bytes} B) → {}", out.display())?;
    }
    if let Some(stats) = stats {
        write!(
            text,
            "\n  {:>7} {:>11} {:>11} {:>11} {:>8} {:>8}",
            "channel", "bits", "bits/symbol", "entropy", "escapes", "share"
        )?;
        for c in &stats.channels {
            write!(
                text,
                "\n  {:>7} {:>11.2} {:>11.4} {:>11.4} {:>8} {:>7.2}%",
                c.channel,
                c.bits,
                c.bits_per_symbol,
                c.entropy_bits_per_symbol,
                c.escapes,
                100.0 * c.share
            )?;
        }
        let t = &stats.total;
        write!(
            text,
            "\n  {:>7} {:>11.2} {:>11.4} {:>11.4} {:>8} {:>7.2}%\n  (bits: −log2 p under the model's CDF plus {} escape bypass bits; entropy: of each channel's symbols, bits/symbol, {:.2} bits in all; the string's {} bits hold {:.2} bits of coder overhead, the header {} bits)",
            "total",
            t.bits,
            t.bits_per_symbol,
            t.entropy_bits / t.symbols as f64,
            t.escapes,
            100.0 * t.share,
            t.escape_bits,
            t.entropy_bits,
            t.string_bits,
            t.coder_overhead_bits,
            t.header_bits
        )?;
    }
    println!("{text}");
    Ok(())
}
