//! The device side's tooling on the built-in demo model: `bench edge` (both
//! encoders run on the same weights and agree, and the report's arithmetic
//! holds together) and `export-onnx` (the encoder graph carries every weight;
//! the parts not exported yet are refused).

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_edge_times_both_encoders_on_the_same_model() {
    let cache = std::env::temp_dir().join(format!("frankensplit-bench-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_frankensplit"))
        .args([
            "bench",
            "edge",
            "--model",
            "demo",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--json",
        ])
        .env("FRANKENSPLIT_CACHE", &cache)
        .output()
        .expect("frankensplit runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The demo model's g_a: 3 → 16 → 24 → 12 at 64², a 12×8×8 latent.
    assert_eq!(report["latent"]["channels"], 12);
    assert_eq!(report["latent"]["height"], 8);
    let macs = report["macs"].as_f64().unwrap();
    let expected = (32.0 * 32.0 * (27.0 * 16.0 + 144.0 * 16.0 + 3.0 * 16.0))
        + (16.0 * 16.0 * (144.0 * 24.0 + 216.0 * 24.0 + 16.0 * 24.0))
        + (8.0 * 8.0 * (216.0 * 12.0 + 108.0 * 12.0 + 24.0 * 12.0));
    assert_eq!(macs, expected);
    assert!(report["max_abs_difference"].as_f64().unwrap() < 1e-4);
    assert!(report["folded_max_abs_difference"].as_f64().unwrap() < 1e-4);
    // The first block (3 → 16, 3×3 pair, 32² outputs) folds into one 7×7
    // convolution: 147·16 instead of 27·16 + 144·16 per output pixel.
    let folded = report["folded_macs"].as_f64().unwrap();
    assert_eq!(macs - folded, 32.0 * 32.0 * (27.0 * 16.0 + 144.0 * 16.0 - 147.0 * 16.0));
    let peak = report["peak_gflops"].as_f64().unwrap();
    for method in report["encoder"].as_array().unwrap() {
        let ms = method["ms"].as_f64().unwrap();
        let gflops = method["gflops"].as_f64().unwrap();
        let executed = if method["name"].as_str().unwrap().contains("folded") {
            folded
        } else {
            macs
        };
        assert!(ms > 0.0 && (gflops - 2.0 * executed / ms / 1e6).abs() < 1e-6 * gflops);
        assert!((method["fraction_of_peak"].as_f64().unwrap() - gflops / peak).abs() < 1e-9);
    }
    assert!(report["string_bytes"].as_u64().unwrap() > 8);
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn export_onnx_writes_the_encoder_with_its_weights() {
    let work = std::env::temp_dir().join(format!("frankensplit-onnx-{}", std::process::id()));
    let run = |part: &str, output: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_frankensplit"))
            .args([
                "export-onnx",
                "--model",
                "demo",
                "--part",
                part,
                "-o",
                output.to_str().unwrap(),
            ])
            .env("FRANKENSPLIT_CACHE", work.join("cache"))
            .output()
            .expect("frankensplit runs")
    };
    let file = work.join("encoder.onnx");
    let out = run("encoder", &file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    // g_a of the demo model: 3 → 16 → 24 → 12, three 3×3 pairs and 1×1 skips.
    let weights = 4
        * (16 * 3 * 9
            + 16 * 16 * 9
            + 16 * 3
            + 3 * 16
            + 24 * 16 * 9
            + 24 * 24 * 9
            + 24 * 16
            + 3 * 24
            + 12 * 24 * 9
            + 12 * 12 * 9
            + 12 * 24
            + 3 * 12);
    assert!(
        bytes.len() > weights && bytes.len() < weights + 4096,
        "{} bytes",
        bytes.len()
    );
    let text = String::from_utf8_lossy(&bytes);
    for name in [
        "compressor.g_a.rb1.conv1.weight",
        "compressor.g_a.rb3.skip.bias",
        "Conv",
        "Relu",
        "Add",
        "latent",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let refused = run("decoder", &work.join("decoder.onnx"));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not supported yet"));
    assert!(!work.join("decoder.onnx").exists());
    let _ = std::fs::remove_dir_all(&work);
}
