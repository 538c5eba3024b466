//! `frankensplit demo --quick` end to end, and the committed demo bundles
//! behind `--model demo`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn frankensplit(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_frankensplit"))
        .args(args)
        .env("FRANKENSPLIT_CACHE", cache)
        .output()
        .expect("frankensplit runs")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn work_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frankensplit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn quick_demo_trains_evaluates_and_serves() {
    let work = work_dir("demo");
    let out = work.join("demo");
    let stdout = ok(
        frankensplit(&["demo", "--quick", "-o", out.to_str().unwrap()], &work.join("cache")),
        "demo --quick",
    );

    // Every step's command is echoed, so the demo can be replayed by hand.
    for command in [
        "synth-data",
        "train --config",
        "eval --model",
        "latency --model",
        "client --server",
    ] {
        assert!(
            stdout.contains(&format!("$ frankensplit {command}")),
            "{command} missing:\n{stdout}"
        );
    }
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let results = report["methods"].as_array().unwrap();
    let family = |f: &str| results.iter().filter(|r| r["family"] == f).collect::<Vec<_>>();
    let split = family("frankensplit");
    assert_eq!(split.len(), 5, "one result per built-in model");
    let png = family("png");
    assert_eq!(png.len(), 1);
    assert_eq!(family("jpeg").len(), 1);
    assert_eq!(family("webp").len(), 2);
    for r in results {
        assert_eq!(r["images"], 30, "10 classes × 3 test images");
        let top1 = r["top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1) && top1 <= r["top5"].as_f64().unwrap());
        let ci: Vec<f64> = r["top1_ci"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(ci[0] <= top1 && top1 <= ci[1], "{r}");
    }
    for r in &split {
        // The container adds its header to the coded string; the latent of
        // a 96² input is at most a few hundred bytes, a PNG tens of thousands.
        let (bpp, string) = (r["bpp"].as_f64().unwrap(), r["bpp_string"].as_f64().unwrap());
        assert!(0.0 < string && string < bpp, "{r}");
        assert!(r["mean_bytes"].as_f64().unwrap() * 10.0 < png[0]["mean_bytes"].as_f64().unwrap());
    }
    // Rates fall as λ rises.
    let bytes: Vec<f64> = split.iter().map(|r| r["mean_bytes"].as_f64().unwrap()).collect();
    assert!(bytes.windows(2).all(|w| w[0] > w[1]), "{bytes:?}");
    // Each model also with the int8 edge encoder (calibrated on validation
    // images): about the same rate as in f32.
    let int8 = family("frankensplit int8");
    assert_eq!(int8.len(), 5, "one int8 result per model");
    for (f32_result, int8_result) in split.iter().zip(&int8) {
        let (f, q) = (
            f32_result["bpp"].as_f64().unwrap(),
            int8_result["bpp"].as_f64().unwrap(),
        );
        assert!((q - f).abs() <= 0.2 * f, "{f32_result} vs {int8_result}");
    }
    // The byte ratio against WebP, when the curves overlap, with its interval.
    for ratio in report["byte_ratios"].as_array().unwrap() {
        let r = ratio["ratio"].as_f64().unwrap();
        assert!(r > 0.0 && r.is_finite(), "{ratio}");
        assert!(["jpeg", "webp"].contains(&ratio["reference"].as_str().unwrap()));
    }
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with('|')).count(), 2 + results.len());
    assert!(stdout.contains(&table), "the demo prints its table");

    for plot in ["rate-accuracy", "latency"] {
        let png = std::fs::read(out.join(format!("{plot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{plot}.png");
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "{plot}.svg");
    }
    // The loopback client got answers in both modes.
    let answered = stdout.lines().filter(|l| l.contains(": 200 | ")).count();
    assert_eq!(answered, 4, "2 images × (split, webp):\n{stdout}");

    // The one-minute run trained a bundle from the generator, against the built-in teacher.
    assert!(out.join("runs/compressor/bundle/model.toml").exists());
    let run_file = std::fs::read_to_string(out.join("configs/compressor.toml")).unwrap();
    assert!(
        run_file.contains("[data.generate]") && run_file.contains("per_epoch = 16"),
        "{run_file}"
    );

    // A directory that is not a demo's is left alone.
    let foreign = work.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let refused = frankensplit(
        &["demo", "--quick", "-o", foreign.to_str().unwrap()],
        &work.join("cache"),
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a previous demo"));
    assert_eq!(std::fs::read_to_string(foreign.join("keep.txt")).unwrap(), "mine");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn committed_demo_bundles_classify_synthetic_images() {
    let work = work_dir("demo-model");
    let cache = work.join("cache");
    ok(
        frankensplit(
            &[
                "synth-data",
                "-o",
                work.join("data").to_str().unwrap(),
                "--train-per-class",
                "0",
                "--val-per-class",
                "5",
                "--seed",
                "99",
            ],
            &cache,
        ),
        "synth-data",
    );
    let val = work.join("data/val");
    let mut images = Vec::new();
    let mut classes = Vec::new();
    for class in std::fs::read_dir(&val)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
    {
        for i in 0..5 {
            images.push(
                val.join(&class)
                    .join(format!("0000{i}.png"))
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
            classes.push(class.clone());
        }
    }
    let mut args = vec!["classify", "--model", "demo", "--json", "--top-k", "1"];
    args.extend(images.iter().map(String::as_str));
    let stdout = ok(frankensplit(&args, &cache), "classify --model demo");
    let reports: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), images.len());
    let correct = reports
        .iter()
        .zip(&classes)
        .filter(|(r, class)| r["top_k"][0]["label"] == class.as_str())
        .count();
    // Fresh images the model never saw; chance is 1 in 10 (5 of 50).
    assert!(correct >= 30, "{correct} of {} right:\n{stdout}", images.len());
    // Unpacked once into the cache, under a name taken from the content.
    let unpacked: Vec<_> = std::fs::read_dir(cache.join("models")).unwrap().collect();
    assert_eq!(unpacked.len(), 1);
    let copy = unpacked[0].as_ref().unwrap().path().join("demo-l0.64");
    assert!(copy.join("model.toml").exists() && copy.join("weights.safetensors").exists());

    // The device side encodes with it too; `inspect` reads the payload's
    // header and counts bits per pixel of the 96×96 input the 12×12 latent implies.
    let payloads = work.join("payloads");
    ok(
        frankensplit(
            &[
                "encode",
                "--model",
                "demo",
                "-o",
                payloads.to_str().unwrap(),
                &images[0],
            ],
            &cache,
        ),
        "encode --model demo",
    );
    let payload = payloads.join("00000.fsp");
    let header: Value = serde_json::from_str(&ok(
        frankensplit(&["inspect", "--json", payload.to_str().unwrap()], &cache),
        "inspect",
    ))
    .unwrap();
    let total = std::fs::metadata(&payload).unwrap().len() as f64;
    assert_eq!(header["input"], serde_json::json!([96, 96]));
    assert_eq!(header["total_bytes"].as_f64().unwrap(), total);
    assert!((header["bpp"].as_f64().unwrap() - total * 8.0 / 9216.0).abs() < 1e-12);

    // Each built-in model merges back into the bundle its fingerprint names
    // (opening checks the weights against the manifest's fingerprint).
    let mut fingerprints = Vec::new();
    for name in ["demo-l0.04", "demo-l0.16", "demo-l0.64", "demo-l2.56", "demo-l10.24"] {
        let info: Value =
            serde_json::from_str(&ok(frankensplit(&["info", "--json", "--model", name], &cache), name)).unwrap();
        fingerprints.push(info["fingerprint"].as_str().unwrap().to_string());
    }
    fingerprints.dedup();
    assert_eq!(fingerprints.len(), 5);

    let unknown = frankensplit(&["info", "--model", "demo-l9"], &cache);
    assert!(!unknown.status.success());
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        message.contains("demo-l0.04") && message.contains("bundle directory"),
        "{message}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
