//! `frankensplit bench edge` on the built-in demo model: both encoders run
//! on the same weights and agree, and the report's arithmetic holds
//! together.

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
    // The demo model's g_a: 3 → 16 → 24 → 12 at 96², a 12×12×12 latent;
    // its three blocks output 48², 24² and 12² pixels.
    assert_eq!(report["latent"]["channels"], 12);
    assert_eq!(report["latent"]["height"], 12);
    let (p1, p2, p3) = (48.0 * 48.0, 24.0 * 24.0, 12.0 * 12.0);
    let macs = report["macs"].as_f64().unwrap();
    let expected = (p1 * (27.0 * 16.0 + 144.0 * 16.0 + 3.0 * 16.0))
        + (p2 * (144.0 * 24.0 + 216.0 * 24.0 + 16.0 * 24.0))
        + (p3 * (216.0 * 12.0 + 108.0 * 12.0 + 24.0 * 12.0));
    assert_eq!(macs, expected);
    // The first block (3 → 16, 3×3 pair) folds into one 7×7 convolution:
    // 147·16 instead of 27·16 + 144·16 per output pixel.
    let folded = macs - p1 * (27.0 * 16.0 + 144.0 * 16.0 - 147.0 * 16.0);
    // Winograd computes the others' conv2 (24 → 24 at 24², 12 → 12 at 12²)
    // with 16 products per 2×2 outputs instead of 36.
    let winograd = folded - (p2 * 9.0 - p2 / 4.0 * 16.0) * 24.0 * 24.0 - (p3 * 9.0 - p3 / 4.0 * 16.0) * 12.0 * 12.0;
    let peak = report["peak_gflops"].as_f64().unwrap();
    let methods = report["encoder"].as_array().unwrap();
    // int8: the folded block, and every convolution's row of taps read in
    // groups of 4 (zero weights past it): 7·3 → 24, a 3-channel skip → 4.
    let int8 = p1 * (7.0 * 24.0 * 16.0 + 4.0 * 16.0)
        + p2 * (48.0 * 3.0 * 24.0 + 72.0 * 3.0 * 24.0 + 16.0 * 24.0)
        + p3 * (72.0 * 3.0 * 12.0 + 36.0 * 3.0 * 12.0 + 24.0 * 12.0);
    assert_eq!(methods.len(), 5);
    for method in methods {
        let name = method["name"].as_str().unwrap();
        let difference = method["max_abs_difference"].as_f64().unwrap();
        if name.contains("int8") {
            assert_eq!(method["macs"].as_f64().unwrap(), int8, "{name}");
            // Within a few of the latent's 256 levels (its values reach ≈ 13).
            assert!(difference > 0.0 && difference < 0.5, "{name}: {difference}");
            continue;
        }
        let executed = if name.contains("Winograd") {
            winograd
        } else if name.contains("folded") {
            folded
        } else {
            macs
        };
        assert_eq!(method["macs"].as_f64().unwrap(), executed, "{name}");
        assert!(difference < 1e-4, "{name}");
        let ms = method["ms"].as_f64().unwrap();
        let gflops = method["gflops"].as_f64().unwrap();
        assert!(ms > 0.0 && (gflops - 2.0 * executed / ms / 1e6).abs() < 1e-6 * gflops);
        assert!((method["fraction_of_peak"].as_f64().unwrap() - gflops / peak).abs() < 1e-9);
    }
    assert!(report["string_bytes"].as_u64().unwrap() > 8);
    let _ = std::fs::remove_dir_all(&cache);
}
