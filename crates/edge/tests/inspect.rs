//! `frankensplit-edge inspect --model`: a payload holding a string that
//! CompressAI 1.2.8 wrote decodes to the symbols CompressAI coded (as
//! `.npy`), `--raw` gives that string back, raw strings are read with
//! `--shape`, `--stats` counts what an independent computation from
//! CompressAI's tables counts, and hostile inputs are refused without a
//! panic. The model is a bundle carrying the tables and quantiles of the
//! codec crate's CompressAI fixture (no libtorch involved).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use frankensplit_bundle::{names, write, Architecture, Manifest, TableSource, BUNDLE_FORMAT};
use frankensplit_codec::LikelihoodFormula;
use frankensplit_preprocess::Preprocess;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_frankensplit-edge");

/// The CompressAI fixture's entropy bottleneck and one of its latents.
struct Fixture {
    /// `_quantized_cdf` rows (unpadded), `_offset`: what `update()` built.
    cdf: Vec<Vec<i64>>,
    offsets: Vec<i64>,
    quantiles: Vec<f32>,
    medians: Vec<f32>,
    /// The "escapes" latent (48×3×3): CompressAI's symbols, string and decoded output.
    symbols: Vec<i32>,
    string: Vec<u8>,
    decoded: Vec<f32>,
    /// The "typical" latent's string (48×4×5), another shape.
    other_string: Vec<u8>,
}

fn fixture() -> Fixture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../codec/tests/fixtures/compressai_codec.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let eb = &json["entropy_bottleneck"];
    let ints = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let floats = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let hex = |v: &Value| -> Vec<u8> {
        let s = v.as_str().unwrap();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let tables = &eb["tables_direct"];
    let lengths = ints(&tables["cdf_length"]);
    let cdf = tables["quantized_cdf"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&lengths)
        .map(|(row, &len)| ints(row)[..len as usize].to_vec())
        .collect();
    let latent = |name: &str| {
        eb["latents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap()
            .clone()
    };
    let escapes = latent("escapes");
    assert_eq!(ints(&escapes["shape"]), [48, 3, 3]);
    Fixture {
        cdf,
        offsets: ints(&tables["offset"]),
        quantiles: floats(&eb["params"]["quantiles"]["data"]),
        medians: floats(&eb["medians"]),
        symbols: ints(&escapes["symbols"]).into_iter().map(|s| s as i32).collect(),
        string: hex(&escapes["string"]),
        decoded: floats(&escapes["decoded"]),
        other_string: hex(&latent("typical")["string"]),
    }
}

/// The small test architecture at a 24-pixel input: a 48×3×3 latent.
fn architecture() -> Architecture {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/small_arch.toml");
    let mut arch = Architecture::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
    arch.compressor.input_size = 24;
    arch.compressor.latent_channels = 48;
    arch.backbone.set_img_size(24);
    arch
}

/// A bundle with the fixture's tables and quantiles (the networks' weights
/// are padding: inspect reads only the entropy model); its fingerprint.
fn bundle(dir: &Path, fx: &Fixture) -> u32 {
    let arch = architecture();
    let width = fx.cdf.iter().map(Vec::len).max().unwrap();
    let le32 = |values: &mut dyn Iterator<Item = i32>| -> Vec<u8> { values.flat_map(i32::to_le_bytes).collect() };
    let cdf = le32(
        &mut fx
            .cdf
            .iter()
            .flat_map(|row| (0..width).map(|i| row.get(i).copied().unwrap_or(0) as i32)),
    );
    let lengths = le32(&mut fx.cdf.iter().map(|row| row.len() as i32));
    let offsets = le32(&mut fx.offsets.iter().map(|&o| o as i32));
    let quantiles: Vec<u8> = fx.quantiles.iter().flat_map(|q| q.to_le_bytes()).collect();
    let padding = vec![0u8; 4 * arch.min_parameters(false) as usize + 4];
    let tensors = [
        (
            names::COMPRESSOR,
            TensorView::new(Dtype::U8, vec![padding.len()], &padding).unwrap(),
        ),
        (
            names::QUANTIZED_CDF,
            TensorView::new(Dtype::I32, vec![48, width], &cdf).unwrap(),
        ),
        (
            names::CDF_LENGTH,
            TensorView::new(Dtype::I32, vec![48], &lengths).unwrap(),
        ),
        (names::OFFSET, TensorView::new(Dtype::I32, vec![48], &offsets).unwrap()),
        (
            names::QUANTILES,
            TensorView::new(Dtype::F32, vec![48, 1, 3], &quantiles).unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(tensors, &None).unwrap();
    let manifest = Manifest {
        format: BUNDLE_FORMAT,
        fingerprint: String::new(),
        weights_fingerprint: None,
        backbone_name: None,
        more_backbones: Vec::new(),
        preprocess: Preprocess::for_input(24),
        architecture: arch,
        likelihood_formula: LikelihoodFormula::Direct,
        tables: TableSource::Checkpoint,
        backbone_head: false,
        labels: Vec::new(),
        source: "edge inspect test: CompressAI 1.2.8 fixture tables".into(),
    };
    write(dir, manifest, false, |path| std::fs::write(path, &bytes))
        .unwrap()
        .0
}

/// Our container, written out by hand (docs/format.md): magic, fingerprint,
/// the three dimensions as one-byte LEB128, the string.
fn container(fingerprint: u32, dims: [u8; 3], string: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0xF1];
    bytes.extend_from_slice(&fingerprint.to_le_bytes());
    bytes.extend_from_slice(&dims);
    bytes.extend_from_slice(string);
    bytes
}

/// A test's directory with the bundle, its fingerprint and the fixture.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    fingerprint: u32,
    fx: Fixture,
}

fn setup() -> Setup {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let fingerprint = bundle(&model, &fx);
    Setup {
        dir,
        model,
        fingerprint,
        fx,
    }
}

impl Setup {
    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The fixture's CompressAI string in our container for the bundle's model.
    fn payload(&self) -> PathBuf {
        self.file("escapes.fsp", &container(self.fingerprint, [48, 3, 3], &self.fx.string))
    }
}

fn inspect(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut command = Command::new(BINARY);
    command.arg("inspect");
    for a in args {
        command.arg(a);
    }
    command.output().unwrap()
}

fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// An error exit (1, not a panic's 101); its stderr.
fn refused(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        matches!(output.status.code(), Some(1 | 2)),
        "{:?}: {stderr}",
        output.status
    );
    stderr
}

/// Reads an int32 `.npy` file (format 1.0, C order) written by the command.
fn read_npy_i32(path: &Path) -> (Vec<usize>, Vec<i32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "the data is 64-byte aligned");
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '<i4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let values = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, values)
}

#[test]
fn symbols_and_raw_string_of_a_payload_are_compressais() {
    let s = setup();
    // The fixture is consistent with itself: CompressAI's decompress output
    // is its symbols plus the medians, so the symbols are what it decodes.
    for (i, (&sym, &dec)) in s.fx.symbols.iter().zip(&s.fx.decoded).enumerate() {
        assert_eq!(sym as f32 + s.fx.medians[i / 9], dec, "value {i}");
    }
    assert!(
        s.fx.symbols.iter().any(|&v| v.abs() > 1 << 26),
        "the latent has far escapes"
    );
    let payload = s.payload();
    let (npy, raw) = (s.path("symbols.npy"), s.path("string.bin"));
    let stdout = ok(&inspect(&[
        &"--model",
        &s.model,
        &"--symbols",
        &npy,
        &"--raw",
        &raw,
        &payload,
    ]));
    assert!(stdout.contains("decoded with model"), "{stdout}");
    let (shape, symbols) = read_npy_i32(&npy);
    assert_eq!(shape, [48, 3, 3]);
    assert_eq!(symbols, s.fx.symbols);
    assert_eq!(std::fs::read(&raw).unwrap(), s.fx.string);
}

#[test]
fn a_raw_string_decodes_with_its_shape_and_without_one_says_what_to_pass() {
    let s = setup();
    let raw = s.file("escapes.bin", &s.fx.string);
    let npy = s.path("raw.npy");
    let json = ok(&inspect(&[
        &"--model",
        &s.model,
        &"--shape",
        &"48,3,3",
        &"--symbols",
        &npy,
        &"--json",
        &raw,
    ]));
    assert_eq!(read_npy_i32(&npy), (vec![48, 3, 3], s.fx.symbols.clone()));
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["format"], "raw");
    assert_eq!(line["string_bytes"], s.fx.string.len());
    assert_eq!(line["header_bytes"], 0);

    // Without --shape: this string starts with 0xF2, like a container of
    // format version 2; the other with 0x5b, no magic at all. Both errors
    // say what to pass.
    assert_eq!(s.fx.string[0], 0xF2);
    let other = s.file("typical.bin", &s.fx.other_string);
    assert_eq!(s.fx.other_string[0], 0x5b);
    for file in [&raw, &other] {
        let err = refused(&inspect(&[&"--model", &s.model, file]));
        assert!(
            err.contains("not a valid FrankenSplit payload") && err.contains("--shape 48,3,3"),
            "{err}"
        );
        let err = refused(&inspect(&[file]));
        assert!(err.contains("--model DIR --shape C,H,W"), "{err}");
    }
    // --shape needs a model.
    refused(&inspect(&[&"--shape", &"48,3,3", &raw]));
    // A shape that is not the model's is refused before decoding, whatever its size.
    for shape in ["48,4,5", "47,3,3", "4294967295,4294967295,4294967295"] {
        let err = refused(&inspect(&[&"--model", &s.model, &"--shape", &shape, &raw]));
        assert!(
            err.contains("not the latent shape") && err.contains("--shape 48,3,3"),
            "{shape}: {err}"
        );
    }
    for shape in ["48,3", "0,3,3", "a,b,c", "48,3,3,1"] {
        let err = refused(&inspect(&[&"--model", &s.model, &"--shape", &shape, &raw]));
        assert!(err.contains("C,H,W"), "{shape}: {err}");
    }
    // Another shape's string, read at this shape, is malformed.
    let err = refused(&inspect(&[&"--model", &s.model, &"--shape", &"48,3,3", &other]));
    assert!(err.contains("not a raw CompressAI string of a 48×3×3 latent"), "{err}");
    // Our container given as a raw string: the message says to drop --shape.
    let err = refused(&inspect(&[&"--model", &s.model, &"--shape", &"48,3,3", &s.payload()]));
    assert!(err.contains("drop --shape"), "{err}");
}

/// Bits of one escape's bypass chunks, from docs/format.md: `raw` in 4-bit
/// chunks, preceded by their count as repeated 15s and a remainder.
fn bypass_bits(value: i64, max: i64) -> f64 {
    let raw: u64 = if value < 0 {
        (-2 * value - 1) as u64
    } else {
        (2 * (value - max)) as u64
    };
    let mut chunks = 0;
    while chunks < 16 && raw >> (4 * chunks) != 0 {
        chunks += 1;
    }
    4.0 * (chunks + 1 + chunks / 15) as f64
}

#[test]
fn stats_are_the_bits_entropy_and_escapes_of_compressais_tables() {
    let s = setup();
    let payload = s.payload();
    let payload_bits = 8.0 * std::fs::metadata(&payload).unwrap().len() as f64;
    let json = ok(&inspect(&[&"--model", &s.model, &"--stats", &"--json", &payload]));
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["format"], "container");
    assert_eq!(line["fingerprint"], format!("{:08x}", s.fingerprint));
    let channels = line["stats"]["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 48);
    let close = |a: &Value, b: f64, what: &str| {
        let a = a.as_f64().unwrap();
        assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{what}: {a} vs {b}");
    };
    let (mut total_bits, mut total_escapes) = (0.0, 0);
    for (c, got) in channels.iter().enumerate() {
        let cdf = &s.fx.cdf[c];
        let max = cdf.len() as i64 - 2;
        let values = &s.fx.symbols[c * 9..(c + 1) * 9];
        let (mut bits, mut escapes, mut escape_bits) = (0.0, 0, 0.0);
        let mut counts = HashMap::new();
        for &v in values {
            *counts.entry(v).or_insert(0) += 1;
            let coded = i64::from(v) - s.fx.offsets[c];
            let entry = if coded < 0 || coded >= max {
                escapes += 1;
                escape_bits += bypass_bits(coded, max);
                max
            } else {
                coded
            } as usize;
            bits += -((cdf[entry + 1] - cdf[entry]) as f64 / 65536.0).log2();
        }
        bits += escape_bits;
        let entropy: f64 = counts
            .values()
            .map(|&n| {
                let p = n as f64 / 9.0;
                -p * p.log2()
            })
            .sum();
        close(&got["bits"], bits, &format!("channel {c} bits"));
        close(&got["bits_per_symbol"], bits / 9.0, "bits per symbol");
        close(
            &got["entropy_bits_per_symbol"],
            entropy,
            &format!("channel {c} entropy"),
        );
        close(&got["share"], bits / payload_bits, "share");
        assert_eq!(got["escapes"], escapes, "channel {c} escapes");
        assert_eq!(
            got["escape_bits"].as_f64().unwrap(),
            escape_bits,
            "channel {c} escape bits"
        );
        assert_eq!(got["symbols"], 9);
        total_bits += bits;
        total_escapes += escapes;
    }
    let total = &line["stats"]["total"];
    close(&total["bits"], total_bits, "total bits");
    assert_eq!(total["escapes"], total_escapes);
    assert!(
        total_escapes >= 12,
        "the fixture placed 12 far values, found {total_escapes} escapes"
    );
    let string_bits = 8.0 * s.fx.string.len() as f64;
    assert_eq!(total["string_bits"].as_f64().unwrap(), string_bits);
    assert_eq!(total["header_bits"], 64);
    // The coder's string holds the ideal code length plus its final state
    // and word padding: a few words at most.
    let overhead = total["coder_overhead_bits"].as_f64().unwrap();
    close(&total["coder_overhead_bits"], string_bits - total_bits, "overhead");
    assert!((0.0..=96.0).contains(&overhead), "{overhead}");

    let text = ok(&inspect(&[&"--model", &s.model, &"--stats", &payload]));
    assert_eq!(text.lines().count(), 2 + 1 + 48 + 2, "{text}");
    assert!(text.lines().any(|l| l.trim_start().starts_with("total")), "{text}");
}

#[test]
fn without_a_model_only_the_header_is_read_as_before() {
    let s = setup();
    let payload = s.payload();
    let text = ok(&inspect(&[&payload]));
    let expected = format!(
        "{}: model {:08x} latent 48×3×3 string 264 B + header 8 B = 272 B (3.7778 bpp at 24×24)\n",
        payload.display(),
        s.fingerprint
    );
    assert_eq!(text, expected);
    let json = ok(&inspect(&[&"--json", &payload]));
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["string_bytes"], 264);
    assert!(line.get("stats").is_none() && line.get("model").is_none(), "{line}");
    // --raw needs no model.
    let raw = s.path("r.bin");
    ok(&inspect(&[&"--raw", &raw, &payload]));
    assert_eq!(std::fs::read(&raw).unwrap(), s.fx.string);
}

#[test]
fn hostile_or_foreign_payloads_are_refused_without_a_panic() {
    let s = setup();
    let model: &dyn AsRef<std::ffi::OsStr> = &s.model;
    let run = |name: &str, bytes: &[u8]| refused(&inspect(&[&"--model", model, &"--stats", &s.file(name, bytes)]));
    let err = run("foreign.fsp", &container(s.fingerprint ^ 1, [48, 3, 3], &s.fx.string));
    assert!(err.contains("produced by model"), "{err}");
    let err = run("shape.fsp", &container(s.fingerprint, [48, 4, 5], &s.fx.other_string));
    assert!(err.contains("48×4×5") && err.contains("48×3×3"), "{err}");
    // A header declaring 2^32 − 1 channels, rows and columns.
    let mut huge = vec![0xF1];
    huge.extend_from_slice(&s.fingerprint.to_le_bytes());
    for _ in 0..3 {
        huge.extend_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
    }
    huge.extend_from_slice(&s.fx.string);
    let err = run("huge.fsp", &huge);
    assert!(err.contains("4294967295"), "{err}");
    let cut = s.fx.string.len() - 4;
    run(
        "truncated.fsp",
        &container(s.fingerprint, [48, 3, 3], &s.fx.string[..cut]),
    );
    let mut flipped = s.fx.string.clone();
    flipped[100] ^= 0x10;
    run("flipped.fsp", &container(s.fingerprint, [48, 3, 3], &flipped));
    run("empty.fsp", &[]);
    // One output file, several payloads.
    let payload = s.payload();
    let err = refused(&inspect(&[
        &"--model",
        model,
        &"--symbols",
        &s.path("x.npy"),
        &payload,
        &payload,
    ]));
    assert!(err.contains("give one payload"), "{err}");
    assert!(!s.path("x.npy").exists());
}
