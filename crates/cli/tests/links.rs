//! `frankensplit bench links` on one short link: the server and the client
//! in their own network namespaces, 1 Mbit/s each way and a 20 ms round
//! trip. The kernel shapes the transfer (no request crosses faster than its
//! bytes at the rate), and split inference answers sooner than sending the
//! PNG. Without root, iproute2 or /dev/net/tun the command must say why and
//! exit 0, and the test checks exactly that.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_links_measures_split_and_png_over_a_shaped_link() {
    let cache = std::env::temp_dir().join(format!("frankensplit-links-{}", std::process::id()));
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images");
    let out = Command::new(env!("CARGO_BIN_EXE_frankensplit"))
        .args([
            "bench",
            "links",
            "--model",
            "demo",
            "--bandwidth",
            "1mbit",
            "--rtt",
            "20ms",
            "--loss",
            "0",
            "--connections",
            "kept",
            "--codec",
            "png",
            "--repeat",
            "3",
            "--json",
        ])
        .arg(images.join("noise_97x131.png"))
        .env("FRANKENSPLIT_CACHE", &cache)
        .output()
        .expect("frankensplit runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if let Some(reason) = frankensplit_links::unavailable() {
        assert!(stderr.contains("not run") && stderr.contains(&reason), "{stderr}");
        assert!(out.stdout.is_empty());
        eprintln!("bench links not run here: {reason}");
        return;
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let row = |method: &str| {
        rows.iter()
            .find(|r| r["method"] == method)
            .unwrap_or_else(|| panic!("no {method} row"))
    };
    let (split, png) = (row("split"), row("png"));
    for r in [split, png] {
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["uplink_bits_per_s"], 1e6);
        // The request's body alone takes bytes · 8 / rate on the wire, plus the round trip.
        let floor_ms = r["payload_bytes"].as_f64().unwrap() * 8.0 / 1e6 * 1e3 + 20.0;
        let network = r["median_network_ms"].as_f64().unwrap();
        assert!(
            network >= floor_ms,
            "{} crossed in {network} ms < {floor_ms} ms",
            r["method"]
        );
        assert!(r["wire_up_bytes"].as_f64().unwrap() > r["payload_bytes"].as_f64().unwrap());
    }
    assert!(
        split["median_total_ms"].as_f64().unwrap() < png["median_total_ms"].as_f64().unwrap(),
        "split {split} png {png}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}
