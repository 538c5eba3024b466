//! The edge and server commands together over loopback: `encode` writes
//! payloads, `serve` answers `client` with the same top-1 as local
//! `classify`, and SIGINT stops the server cleanly.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_frankensplit"))
}

fn run(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("frankensplit runs");
    assert!(
        out.status.success(),
        "frankensplit {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn encode_serve_and_client_agree_with_local_classification() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures");
    let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../preprocess/tests/fixtures");
    let work = std::env::temp_dir().join(format!("frankensplit-serve-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let bundle = work.join("bundle");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    run(&[
        "convert",
        "--checkpoint",
        &s(&models.join("reference_checkpoint.pt")),
        "--arch",
        &s(&models.join("small_arch.toml")),
        "-o",
        &s(&bundle),
    ]);
    let pictures = [images.join("gradient_300x250.png"), images.join("noise_97x131.png")];

    let encoded = run(&[
        "encode",
        "--json",
        "--model",
        &s(&bundle),
        "-o",
        &s(&work.join("payloads")),
        &s(&pictures[0]),
        &s(&pictures[1]),
    ]);
    for line in encoded.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        let bytes = std::fs::read(e["payload"].as_str().unwrap()).unwrap();
        assert_eq!(bytes.len() as u64, e["bytes"].as_u64().unwrap());
    }
    let local: Vec<i64> = run(&[
        "classify",
        "--json",
        "--model",
        &s(&bundle),
        &s(&pictures[0]),
        &s(&pictures[1]),
    ])
    .lines()
    .map(|l| {
        serde_json::from_str::<Value>(l).unwrap()["top_k"][0]["class"]
            .as_i64()
            .unwrap()
    })
    .collect();

    let mut server = bin()
        .args(["serve", "--model", &s(&bundle), "--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut banner = String::new();
    stderr.read_line(&mut banner).unwrap();
    let url = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("server prints its URL")
        .to_string();

    let out = run(&[
        "client",
        "--json",
        "--server",
        &url,
        "--model",
        &s(&bundle),
        "--repeat",
        "3",
        "--concurrency",
        "4",
        &s(&pictures[0]),
        &s(&pictures[1]),
    ]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (requests, summary) = lines.split_at(lines.len() - 1);
    assert_eq!(requests.len(), 6);
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["top1"].as_i64().unwrap(), local[i % 2], "request {i}");
        assert!(r["server_ms"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(summary[0]["ok"], 6);

    let pid = server.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = server.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(
        status.success() && rest.contains("stopped"),
        "server did not stop cleanly: {status:?} {rest}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
