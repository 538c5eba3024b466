//! `frankensplit eval`: rate vs accuracy of FrankenSplit bundles against
//! offloading the image with standard codecs, on an ImageFolder. Split
//! inference goes through real entropy coding (payload bytes on the wire);
//! the codec baselines feed the same backbone the decoded centre crop, and
//! their bytes are the compressed image's. Top-1 comes with a 95 %
//! bootstrap interval, and each FrankenSplit family with its mean byte
//! ratio against each lossy codec at equal top-1 ([`crate::stats`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use frankensplit_edge::EdgeModel;
use frankensplit_imagecodecs::ImageCodec;
use frankensplit_models::{Bundle, Precision};
use frankensplit_preprocess::{ImageFolder, RgbImage};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::placement::Placement;
use crate::plot::{self, Chart, Series};
use crate::stats::{byte_ratio, Bootstrap, Outcomes, Point};

/// Bootstrap resamples behind every interval `eval` reports.
const BOOTSTRAP_ROUNDS: usize = 2000;

#[derive(Args)]
pub struct EvalArgs {
    /// FrankenSplit bundles (e.g. one per λ); repeat the flag.
    #[arg(long = "model", required = true, value_parser = crate::builtin::parse_model)]
    models: Vec<PathBuf>,
    /// ImageFolder to evaluate on (class folders of JPEG/PNG/WebP images).
    #[arg(long)]
    data: PathBuf,
    /// The server side's device and number format (--precision bf16 measures
    /// what reduced precision costs in accuracy; the edge encoder stays f32 on the CPU).
    #[command(flatten)]
    placement: Placement,
    /// Image codecs to compare against, sending the centre crop, e.g.
    /// jpeg:q=10,jpeg:q=50,webp:q=50,png; '' for none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "jpeg:q=10,jpeg:q=30,jpeg:q=75,webp:q=10,webp:q=50,webp:q=80,png"
    )]
    codec: Vec<String>,
    /// Evaluate at most this many images (spread over the classes).
    #[arg(long)]
    limit: Option<usize>,
    /// Write the results here: JSON for a .json file, else a Markdown table;
    /// repeat the flag for both.
    #[arg(long)]
    report: Vec<PathBuf>,
    /// Draw accuracy against bits per pixel here (.png or .svg); repeat the flag for both.
    #[arg(long)]
    plot: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also evaluate each bundle's int8 edge encoder (`frankensplit-edge
    /// encode --int8`), calibrated on images of this ImageFolder (the
    /// training set, say: not the evaluated images).
    #[arg(long, value_name = "DIR")]
    int8_calibration: Option<PathBuf>,
    /// How many images of --int8-calibration to calibrate on (spread over its classes).
    #[arg(long, default_value_t = 32, requires = "int8_calibration")]
    int8_calibration_images: usize,
}

/// One method's results.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    /// `frankensplit <directory> (<fingerprint>)`, with ` → NAME` for a
    /// bundle's further backbone, or the codec (`jpeg:q=75`).
    pub method: String,
    /// `frankensplit`, `frankensplit int8`, `jpeg`, `webp` or `png`; for a
    /// bundle's further backbones `backbone NAME` (their byte ratios are not
    /// computed: the codecs go through the first backbone's whole model).
    pub family: String,
    /// Images evaluated.
    pub images: usize,
    /// Top-1 accuracy (%).
    pub top1: f64,
    /// 95 % bootstrap interval of top-1 (%), resampling the images.
    pub top1_ci: [f64; 2],
    /// Top-5 accuracy (%).
    pub top5: f64,
    /// Mean bytes sent per image (container header included for FrankenSplit).
    pub mean_bytes: f64,
    /// Bits per pixel of the model's input crop, from `mean_bytes`.
    pub bpp: f64,
    /// FrankenSplit: bits per pixel of the rANS string alone (no container header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpp_string: Option<f64>,
    /// Mean device-side time per image: encoder and entropy coding, or codec encoding (ms).
    pub encode_ms: f64,
    /// Mean server-side time per image: decoding and classification, batch 1 (ms).
    pub decode_ms: f64,
}

/// The mean byte ratio of a FrankenSplit family to a codec at equal top-1.
#[derive(Debug, Clone, Serialize)]
pub struct ByteRatio {
    /// The FrankenSplit family (`frankensplit`, `frankensplit int8`).
    pub family: String,
    /// The codec family it is compared with.
    pub reference: String,
    /// Geometric mean over the common top-1 range of the family's bytes
    /// over the reference's at equal top-1 (below 1: FrankenSplit sends less).
    pub ratio: f64,
    /// 95 % bootstrap interval of the ratio.
    pub ratio_ci: [f64; 2],
    /// Resamples whose curves no longer overlapped (left out of the interval).
    pub resamples_without_overlap: usize,
    /// The top-1 range (%) both curves cover, over which the ratio is averaged.
    pub top1_range: [f64; 2],
}

/// What `eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// One row per method.
    pub methods: Vec<MethodResult>,
    /// FrankenSplit's bytes against each lossy codec's at equal top-1.
    pub byte_ratios: Vec<ByteRatio>,
    /// How many bootstrap resamples the intervals come from.
    pub bootstrap_rounds: usize,
}

/// Running sums for one method.
#[derive(Default)]
struct Tally {
    images: usize,
    top1: usize,
    top5: usize,
    bytes: usize,
    string_bytes: usize,
    encode_s: f64,
    decode_s: f64,
    outcomes: Outcomes,
}

impl Tally {
    fn add(&mut self, logits: &Tensor, label: i64, bytes: usize, encode_s: f64, decode_s: f64) {
        let logits = logits.to_kind(Kind::Float).view([-1]);
        let k = logits.size()[0].min(5);
        let top: Vec<i64> = Vec::try_from(logits.topk(k, 0, true, true).1).unwrap_or_default();
        self.images += 1;
        let right = top.first() == Some(&label);
        self.top1 += usize::from(right);
        self.top5 += usize::from(top.contains(&label));
        self.bytes += bytes;
        self.outcomes.correct.push(right);
        self.outcomes.bytes.push(bytes);
        self.encode_s += encode_s;
        self.decode_s += decode_s;
    }

    fn result(&self, method: String, family: &str, pixels: f64) -> (MethodResult, Outcomes) {
        let n = self.images.max(1) as f64;
        let mean_bytes = self.bytes as f64 / n;
        let result = MethodResult {
            method,
            family: family.into(),
            images: self.images,
            top1: 100.0 * self.top1 as f64 / n,
            top1_ci: [f64::NAN; 2],
            top5: 100.0 * self.top5 as f64 / n,
            mean_bytes,
            bpp: mean_bytes * 8.0 / pixels,
            bpp_string: (family.starts_with("frankensplit") || family.starts_with("backbone "))
                .then(|| self.string_bytes as f64 / n * 8.0 / pixels),
            encode_ms: self.encode_s / n * 1e3,
            decode_ms: self.decode_s / n * 1e3,
        };
        (result, self.outcomes.clone())
    }
}

/// Each sample's label in the bundle's class numbering: by class name when
/// the bundle has labels, else the folder order.
fn labels_for(bundle: &Bundle, dataset: &ImageFolder) -> Result<Vec<i64>> {
    let names = &bundle.manifest.labels;
    if names.is_empty() {
        return Ok(dataset.samples.iter().map(|(_, l)| *l).collect());
    }
    let index: BTreeMap<&str, i64> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as i64)).collect();
    dataset
        .samples
        .iter()
        .map(|(_, l)| {
            let class = &dataset.classes[*l as usize];
            index.get(class.as_str()).copied().with_context(|| {
                format!(
                    "class folder {class:?} is not among the labels of {}",
                    bundle.dir.display()
                )
            })
        })
        .collect()
}

/// At most `limit` samples, taken evenly across the (class-ordered) list.
fn subsample(dataset: &mut ImageFolder, limit: Option<usize>) {
    if let Some(limit) = limit.filter(|&l| l < dataset.len() && l > 0) {
        let step = dataset.len() as f64 / limit as f64;
        dataset.samples = (0..limit)
            .map(|i| dataset.samples[(i as f64 * step) as usize].clone())
            .collect();
    }
}

fn elapsed(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Runs one method over the dataset: `prepare` (not timed: decoding,
/// geometry) turns an image into what the device codes, `encode` into the
/// bytes sent and the bytes of the coded string alone, `classify` the bytes
/// into logits on the server.
fn evaluate<T>(
    dataset: &ImageFolder,
    labels: &[i64],
    mut prepare: impl FnMut(&RgbImage) -> Result<T>,
    mut encode: impl FnMut(&T) -> Result<(Vec<u8>, usize)>,
    mut classify: impl FnMut(&[u8]) -> Result<Tensor>,
) -> Result<Tally> {
    let mut tally = Tally::default();
    for ((path, _), &label) in dataset.samples.iter().zip(labels) {
        let prepared = prepare(&RgbImage::open(path)?)?;
        let start = Instant::now();
        let (sent, string_bytes) = encode(&prepared)?;
        let encode_s = elapsed(start);
        let start = Instant::now();
        let logits = classify(&sent)?.to_device(Device::Cpu);
        let decode_s = elapsed(start);
        tally.string_bytes += string_bytes;
        tally.add(&logits, label, sent.len(), encode_s, decode_s);
    }
    Ok(tally)
}

/// How a bundle appears in reports: its directory's name (the run's, for
/// a run's `bundle/`) and its fingerprint.
fn bundle_name(bundle: &Bundle) -> String {
    let dir = &bundle.dir;
    let run = || dir.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str());
    let name = match dir.file_name().and_then(|n| n.to_str()) {
        Some("bundle") => run().map(str::to_string),
        Some(other) => match (other.strip_prefix("bundle-after-stage"), run()) {
            (Some(stage), Some(run)) => Some(format!("{run}, after stage {stage}")),
            _ => Some(other.to_string()),
        },
        None => None,
    };
    // Reduced precision changes the accuracy, so it is part of the name.
    let precision = match bundle.precision {
        Precision::F32 => String::new(),
        other => format!(", {other}"),
    };
    match name {
        Some(name) => format!("frankensplit {name} ({}{precision})", bundle.fingerprint),
        None => format!("frankensplit {}{precision}", bundle.fingerprint),
    }
}

/// The split pipeline with the device side done by `compress` (preprocessed
/// image → payload) and the server side by `bundle`'s first backbone,
/// reported as `method`.
fn evaluate_split(
    bundle: &Bundle,
    dataset: &ImageFolder,
    labels: &[i64],
    method: (String, &str),
    compress: impl Fn(&[f32]) -> Result<Vec<u8>>,
) -> Result<(MethodResult, Outcomes)> {
    evaluate_backbone(bundle, 0, dataset, labels, method, compress)
}

/// [`evaluate_split`] with the decoder and tail of `bundle`'s backbone `backbone`.
fn evaluate_backbone(
    bundle: &Bundle,
    backbone: usize,
    dataset: &ImageFolder,
    labels: &[i64],
    (method, family): (String, &str),
    compress: impl Fn(&[f32]) -> Result<Vec<u8>>,
) -> Result<(MethodResult, Outcomes)> {
    let preprocess = &bundle.manifest.preprocess;
    let tally = evaluate(
        dataset,
        labels,
        |image| Ok(preprocess.apply(image)?),
        |input| {
            let payload = compress(input)?;
            let string = frankensplit_codec::Payload::parse(&payload)?.string.len();
            Ok((payload, string))
        },
        |payload| {
            let features = bundle.decompress_for(backbone, payload)?;
            Ok(bundle.classify_features_for(backbone, &features)?)
        },
    )?;
    let crop = f64::from(preprocess.crop);
    Ok(tally.result(method, family, crop * crop))
}

/// The bundle at `path` with g_a run by the edge crate in int8, quantized
/// with a calibration on `calibration` (preprocessed images).
fn evaluate_int8(
    bundle: &Bundle,
    path: &Path,
    calibration: &[Vec<f32>],
    dataset: &ImageFolder,
    labels: &[i64],
) -> Result<(MethodResult, Outcomes)> {
    let mut edge = EdgeModel::open(path).with_context(|| format!("cannot load {} on the edge", path.display()))?;
    let ranges = edge.calibrate(calibration)?;
    edge.use_int8(&ranges)?;
    let method = format!("{}, int8 edge encoder", bundle_name(bundle));
    evaluate_split(bundle, dataset, labels, (method, "frankensplit int8"), |input| {
        edge.compress(input)
    })
}

/// The images of `folder`, preprocessed by `bundle`'s pipeline.
fn calibration_images(folder: &ImageFolder, bundle: &Bundle) -> Result<Vec<Vec<f32>>> {
    folder
        .samples
        .iter()
        .map(|(path, _)| Ok(bundle.manifest.preprocess.apply(&RgbImage::open(path)?)?))
        .collect()
}

fn evaluate_codec(
    bundle: &Bundle,
    dataset: &ImageFolder,
    labels: &[i64],
    codec: &ImageCodec,
) -> Result<(MethodResult, Outcomes)> {
    let preprocess = &bundle.manifest.preprocess;
    let tally = evaluate(
        dataset,
        labels,
        |image| Ok(preprocess.resize_and_crop(image)?),
        |crop| {
            let encoded = codec.encode(crop)?;
            let len = encoded.len();
            Ok((encoded, len))
        },
        |encoded| Ok(bundle.classify_images(&[preprocess.normalize(&RgbImage::decode(encoded)?)])?),
    )?;
    let side = f64::from(preprocess.crop);
    Ok(tally.result(codec.to_string(), codec.family(), side * side))
}

/// Fills in the intervals of `methods` and the byte ratios of each
/// FrankenSplit family against each lossy codec family.
fn summarise(methods: Vec<(MethodResult, Outcomes)>) -> Report {
    let images = methods.first().map_or(0, |(r, _)| r.images);
    let bootstrap = Bootstrap::new(images, BOOTSTRAP_ROUNDS, 0);
    let mut families: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (r, _)) in methods.iter().enumerate() {
        families.entry(r.family.clone()).or_default().push(i);
    }
    let mut byte_ratios = Vec::new();
    for (family, ours) in families.iter().filter(|(f, _)| f.starts_with("frankensplit")) {
        for (reference, theirs) in families.iter().filter(|(f, _)| ["jpeg", "webp"].contains(&f.as_str())) {
            let points = |indices: &[usize]| -> Vec<Point> {
                indices
                    .iter()
                    .map(|&i| Point {
                        bytes: methods[i].0.mean_bytes,
                        top1: methods[i].0.top1,
                    })
                    .collect()
            };
            let Some((ratio, top1_range)) = byte_ratio(&points(ours), &points(theirs)) else {
                continue;
            };
            let outcomes = |indices: &[usize]| -> Vec<&Outcomes> { indices.iter().map(|&i| &methods[i].1).collect() };
            let (ratio_ci, resamples_without_overlap) = bootstrap
                .ratio_interval(&outcomes(ours), &outcomes(theirs))
                .unwrap_or(([f64::NAN; 2], BOOTSTRAP_ROUNDS));
            byte_ratios.push(ByteRatio {
                family: family.clone(),
                reference: reference.clone(),
                ratio,
                ratio_ci,
                resamples_without_overlap,
                top1_range,
            });
        }
    }
    let methods = methods
        .into_iter()
        .map(|(mut r, outcomes)| {
            r.top1_ci = bootstrap.top1_interval(&outcomes);
            r
        })
        .collect();
    Report {
        methods,
        byte_ratios,
        bootstrap_rounds: BOOTSTRAP_ROUNDS,
    }
}

/// One line per byte ratio, for people.
pub fn ratio_lines(ratios: &[ByteRatio]) -> String {
    ratios
        .iter()
        .map(|r| {
            format!(
                "{} needs {:.2}× the bytes of {} for the same top-1 (95 % CI {:.2}–{:.2}×), averaged over top-1 {:.2}–{:.2} %\n",
                r.family, r.ratio, r.reference, r.ratio_ci[0], r.ratio_ci[1], r.top1_range[0], r.top1_range[1]
            )
        })
        .collect()
}

/// The Markdown table of `results`.
pub fn markdown(results: &[MethodResult]) -> String {
    let mut out = String::from(
        "| method | images | top-1 % | top-1 95 % CI | top-5 % | bytes | bpp | bpp (string) | encode ms | decode + classify ms |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out += &format!(
            "| {} | {} | {:.2} | {:.2}–{:.2} | {:.2} | {:.0} | {:.4} | {} | {:.2} | {:.2} |\n",
            r.method,
            r.images,
            r.top1,
            r.top1_ci[0],
            r.top1_ci[1],
            r.top5,
            r.mean_bytes,
            r.bpp,
            r.bpp_string.map_or("—".to_string(), |b| format!("{b:.4}")),
            r.encode_ms,
            r.decode_ms
        );
    }
    out
}

pub fn run(args: EvalArgs) -> Result<()> {
    let codecs = ImageCodec::parse_list(&args.codec)?;
    let mut dataset = ImageFolder::open(&args.data)?;
    subsample(&mut dataset, args.limit);
    // The calibration images, checked before any evaluation runs.
    let calibration = match &args.int8_calibration {
        Some(dir) => {
            let mut folder = ImageFolder::open(dir)
                .with_context(|| format!("--int8-calibration {} is not an ImageFolder", dir.display()))?;
            if args.int8_calibration_images == 0 {
                bail!("--int8-calibration-images must be at least 1");
            }
            subsample(&mut folder, Some(args.int8_calibration_images));
            Some((dir, folder))
        }
        None => None,
    };
    let mut results = Vec::new();
    let mut baseline: Option<Bundle> = None;
    for path in &args.models {
        let bundle = args.placement.open(path)?;
        let edge = args.placement.open_edge(path)?;
        let labels = labels_for(&bundle, &dataset)?;
        eprintln!(
            "evaluating {} on {} images ({})",
            path.display(),
            dataset.len(),
            args.placement.describe()
        );
        let method = (bundle_name(&bundle), "frankensplit");
        let encoder = edge.as_ref().unwrap_or(&bundle);
        results.push(evaluate_split(&bundle, &dataset, &labels, method, |input| {
            Ok(encoder.compress(input)?)
        })?);
        // Further backbones classify the same payloads; the codecs go through
        // the first backbone's whole model, so byte ratios are the first's.
        let names = bundle.backbone_names();
        for (index, name) in names.iter().enumerate().skip(1) {
            eprintln!("evaluating {} through its backbone {name}", path.display());
            let family = format!("backbone {name}");
            let method = (format!("{} → {name}", bundle_name(&bundle)), family.as_str());
            results.push(evaluate_backbone(&bundle, index, &dataset, &labels, method, |input| {
                Ok(encoder.compress(input)?)
            })?);
        }
        if let Some((dir, folder)) = &calibration {
            let images = calibration_images(folder, &bundle)?;
            eprintln!(
                "evaluating {} with the int8 edge encoder (calibrated on {} images of {})",
                path.display(),
                images.len(),
                dir.display()
            );
            results.push(evaluate_int8(&bundle, path, &images, &dataset, &labels)?);
        }
        if baseline.is_none() && bundle.backbone_head.is_some() {
            baseline = Some(bundle);
        }
    }
    if !codecs.is_empty() {
        let bundle = baseline.context(
            "the codec baselines need a bundle with the whole backbone (convert with --backbone-weights); pass --codec '' to skip them",
        )?;
        let labels = labels_for(&bundle, &dataset)?;
        for codec in &codecs {
            eprintln!("evaluating {codec}");
            results.push(evaluate_codec(&bundle, &dataset, &labels, codec)?);
        }
    }
    let report = summarise(results);
    let mut table = markdown(&report.methods);
    if !report.byte_ratios.is_empty() {
        table += &format!("\n{}", ratio_lines(&report.byte_ratios));
    }
    let json = serde_json::to_string_pretty(&report)?;
    for path in &args.report {
        let text = if path.extension().is_some_and(|e| e == "json") {
            &json
        } else {
            &table
        };
        frankensplit_edge::write_atomically(path, text.as_bytes())?;
    }
    for path in &args.plot {
        draw(&report.methods, path)?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Accuracy against bpp, one line per method family.
fn draw(results: &[MethodResult], path: &Path) -> Result<()> {
    let mut families: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for r in results {
        families.entry(r.family.as_str()).or_default().push((r.bpp, r.top1));
    }
    let series: Vec<Series> = families
        .into_iter()
        .map(|(family, mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                name: family.to_string(),
                points,
            }
        })
        .collect();
    if series.is_empty() {
        bail!("nothing to plot");
    }
    plot::draw(
        &Chart {
            title: "Top-1 accuracy vs rate".into(),
            x_label: "bits per pixel of the input crop".into(),
            y_label: "top-1 accuracy (%)".into(),
            log_x: true,
            log_y: false,
            series: &series,
            marks: &[],
            legend: plotters::chart::SeriesLabelPosition::LowerRight,
        },
        path,
    )
}
