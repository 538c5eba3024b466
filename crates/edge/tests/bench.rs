//! `frankensplit-edge bench` on a bundle: every step of g_a is reported with
//! the multiply-adds it executes and a throughput consistent with its time,
//! and bad arguments are refused.
// Bundles come from the libtorch model, which links on x86-64 here.
#![cfg(target_arch = "x86_64")]

mod common;

use std::process::Command;

use common::{random_bundle, small_architecture};
use serde_json::Value;

#[test]
fn bench_reports_each_step_of_the_encoder() {
    let dir = std::env::temp_dir().join(format!("frankensplit-edge-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let arch = small_architecture();
    random_bundle(&dir, &arch, 5);
    let bench = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_frankensplit-edge"))
            .args(["bench", "--model"])
            .arg(&dir)
            .args(extra)
            .output()
            .expect("frankensplit-edge runs")
    };
    let out = bench(&["--iterations", "3", "--warmup", "1", "--threads", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["latent"]["channels"], 6);
    assert_eq!(report["latent"]["height"], 8);
    assert_eq!(report["threads"], 2);
    // Per block: conv1 (3×3, stride 2), conv2 (3×3), skip (1×1, stride 2).
    let block = |side: f64, cin: f64, cout: f64| side * side * (9.0 * cin * cout + 9.0 * cout * cout + cin * cout);
    let written = block(32.0, 3.0, 8.0) + block(16.0, 8.0, 12.0) + block(8.0, 12.0, 6.0);
    // Folding 3 → 8 would cost 147·8 multiply-adds per output instead of
    // the pair's 27·8 + 72·8, so nothing folds; Winograd then computes every
    // conv2 with 16 products per 2×2 outputs instead of 36.
    let steps = report["encoder"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["as written", "folded", "folded + Winograd", "int8"]);
    assert_eq!(steps[0]["macs"].as_f64().unwrap(), written);
    assert_eq!(steps[1]["macs"].as_f64().unwrap(), written);
    let winograd: f64 = [(32.0, 8.0), (16.0, 12.0), (8.0, 6.0)]
        .iter()
        .map(|&(side, c): &(f64, f64)| (side * side * 9.0 - side * side / 4.0 * 16.0) * c * c)
        .sum();
    assert_eq!(steps[2]["macs"].as_f64().unwrap(), written - winograd);
    // int8 reads taps in groups of 4 along each kernel row (zero weights
    // past it); the skips of unfolded blocks run in f32, tap by tap.
    let group = |taps: f64| (taps / 4.0).ceil() * 4.0;
    let int8_block = |side: f64, cin: f64, cout: f64| {
        side * side * (3.0 * group(3.0 * cin) * cout + 3.0 * group(3.0 * cout) * cout + cin * cout)
    };
    let int8 = int8_block(32.0, 3.0, 8.0) + int8_block(16.0, 8.0, 12.0) + int8_block(8.0, 12.0, 6.0);
    assert_eq!(steps[3]["macs"].as_f64().unwrap(), int8);
    let latent_scale = steps[3]["max_abs_difference"].as_f64().unwrap();
    assert!(latent_scale > 0.0 && steps[2].get("max_abs_difference").is_none());
    for step in steps {
        let (ms, macs, gflops) = (
            step["ms"].as_f64().unwrap(),
            step["macs"].as_f64().unwrap(),
            step["gflops"].as_f64().unwrap(),
        );
        assert!(ms > 0.0 && (gflops - 2.0 * macs / ms / 1e6).abs() <= 1e-9 * gflops);
    }
    let total = report["encode_and_code_ms"].as_f64().unwrap();
    assert!((total - steps[2]["ms"].as_f64().unwrap() - report["coding_ms"].as_f64().unwrap()).abs() < 1e-9);
    let int8_total = report["int8_encode_and_code_ms"].as_f64().unwrap();
    assert!((int8_total - steps[3]["ms"].as_f64().unwrap() - report["coding_ms"].as_f64().unwrap()).abs() < 1e-9);
    assert!(report["string_bytes"].as_u64().unwrap() > 0);

    let refused = bench(&["--iterations", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--iterations must be at least 1"));
    let missing = Command::new(env!("CARGO_BIN_EXE_frankensplit-edge"))
        .args(["bench", "--model"])
        .arg(dir.join("nowhere"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot load model"));
    let _ = std::fs::remove_dir_all(&dir);
}
