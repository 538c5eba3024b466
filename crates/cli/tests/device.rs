//! `--device` and `--precision` on the commands that run the server-side
//! networks: CUDA that this machine or build lacks, unknown device names and
//! f16 on the CPU are refused with messages that say what to do; `serve
//! --device cpu --precision bf16` and `classify --precision bf16` answer with
//! f32's top-1 on the small fixture model.

use std::path::PathBuf;
use std::process::Output;

mod common;

use common::{bin, run, Server};
use serde_json::Value;

/// Runs a command that must fail; its stderr.
fn refused<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let Output { status, stderr, .. } = bin()
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("frankensplit runs");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(!status.success(), "frankensplit {args:?} succeeded:\n{stderr}");
    stderr
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Device names are checked before any model is loaded, in every command
/// that takes one; what this machine lacks is said, with how to get it.
#[test]
fn devices_this_machine_lacks_are_refused_clearly() {
    let image = fixtures().join("images/noise_97x131.png");
    let image = image.to_str().unwrap();
    let commands: [&[&str]; 5] = [
        &["serve", "--model", "demo"],
        &["eval", "--model", "demo", "--data", "/nonexistent"],
        &["classify", "--model", "demo", image],
        &["latency", "--model", "demo", image],
        &["train", "--config", "/nonexistent.toml"],
    ];
    for command in commands {
        let with = |device: &str| -> Vec<String> {
            command
                .iter()
                .chain(&["--device", device])
                .map(|a| a.to_string())
                .collect()
        };
        if tch::Cuda::is_available() {
            // What a GPU machine can still lack: a device index beyond its count.
            let missing = format!("cuda:{}", tch::Cuda::device_count());
            let e = refused(&with(&missing));
            assert!(
                e.contains("does not exist") && e.contains("CUDA device"),
                "{command:?}: {e}"
            );
        } else {
            for device in ["cuda", "cuda:1"] {
                let e = refused(&with(device));
                assert!(
                    e.contains("has no CUDA") && e.contains("--features cuda") && e.contains("NVIDIA GPU"),
                    "{command:?} --device {device}: {e}"
                );
            }
        }
        let e = refused(&with("gpu0"));
        assert!(
            e.contains("expected cpu, cuda (= cuda:0) or cuda:N"),
            "{command:?}: {e}"
        );
    }
    let e = refused(&["serve", "--model", "demo", "--precision", "f16"]);
    assert!(e.contains("f16 needs a CUDA device") && e.contains("bf16"), "{e}");
    let e = refused(&["classify", "--model", "demo", "--precision", "f8", image]);
    assert!(e.contains("f32, bf16 or f16"), "{e}");
}

/// `serve --device cpu --precision bf16` answers the edge's payloads with
/// the top-1 of f32 inference, as `classify --precision bf16` does locally.
#[test]
fn bf16_serving_on_the_cpu_answers_as_f32() {
    let work = std::env::temp_dir().join(format!("frankensplit-device-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let bundle = work.join("bundle");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let models = fixtures().join("models");
    run(&[
        "convert",
        "--checkpoint",
        &s(&models.join("reference_checkpoint.pt")),
        "--arch",
        &s(&models.join("small_arch.toml")),
        "-o",
        &s(&bundle),
    ]);
    let images = fixtures().join("images");
    let pictures = [
        s(&images.join("gradient_300x250.png")),
        s(&images.join("noise_97x131.png")),
        s(&images.join("grey_180x90.png")),
    ];
    let classify = |precision: &str| -> Vec<Value> {
        let mut args = vec!["classify", "--json", "--model"];
        let model = s(&bundle);
        args.push(&model);
        args.extend(["--device", "cpu", "--precision", precision]);
        args.extend(pictures.iter().map(String::as_str));
        run(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let f32 = classify("f32");
    let bf16 = classify("bf16");
    let top1 = |v: &Value| v["top_k"][0]["class"].as_i64().unwrap();
    for (a, b) in f32.iter().zip(&bf16) {
        assert_eq!(top1(a), top1(b), "f32 {a}\nbf16 {b}");
        assert_eq!(a["payload_bytes"], b["payload_bytes"], "the edge encoder stays f32");
        let (a, b) = (a["logits"].as_array().unwrap(), b["logits"].as_array().unwrap());
        let scale = a.iter().fold(1f64, |m, l| m.max(l.as_f64().unwrap().abs()));
        let moved = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs())
            .fold(0f64, f64::max);
        // bf16 rounds (8 significant bits) but the logits still move: the
        // networks did run in bf16, and not far from f32.
        assert!(
            moved > 0.0 && moved <= scale / 32.0,
            "logits moved by {moved} (scale {scale})"
        );
    }

    let model = s(&bundle);
    let server = Server::start(&[
        "--model",
        &model,
        "--listen",
        "127.0.0.1:0",
        "--device",
        "cpu",
        "--precision",
        "bf16",
    ]);
    assert!(server.banner.contains("(cpu, bf16)"), "{}", server.banner);
    let mut args = vec!["client", "--json", "--server", &server.url, "--model"];
    args.push(&model);
    args.extend(pictures.iter().map(String::as_str));
    let answers: Vec<Value> = run(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, expected) in f32.iter().enumerate() {
        assert_eq!(answers[i]["status"], 200, "{}", answers[i]);
        assert_eq!(answers[i]["top1"].as_i64().unwrap(), top1(expected), "{}", answers[i]);
    }
    assert!(server.interrupt().0.success());
    let _ = std::fs::remove_dir_all(&work);
}
