//! `frankensplit-edge send` against a real `frankensplit serve` on
//! loopback: the device binary, which links no libtorch, classifies images
//! through the server as the libtorch model does.
#![cfg(all(feature = "client", target_arch = "x86_64"))]

mod common;

use std::process::Command;

use common::{fixtures, random_bundle, small_architecture};
use frankensplit_models::Bundle;
use frankensplit_serve::{start, ServeConfig};
use tch::Device;

const BINARY: &str = env!("CARGO_BIN_EXE_frankensplit-edge");

#[test]
fn the_device_binary_links_no_libtorch() {
    let output = Command::new("ldd").arg(BINARY).output().expect("ldd runs");
    let libraries = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{libraries}");
    assert!(libraries.contains("libc.so"), "{libraries}");
    assert!(!libraries.contains("torch"), "{libraries}");
}

#[test]
fn send_classifies_through_a_server_as_the_libtorch_model_does() {
    let tmp = std::env::temp_dir().join(format!("frankensplit-edge-send-{}", std::process::id()));
    let dir = tmp.join("bundle");
    random_bundle(&dir, &small_architecture(), 11);
    let images: Vec<_> = ["gradient_300x250.png", "noise_97x131.png", "grey_180x90.png"]
        .iter()
        .map(|name| fixtures().join("images").join(name))
        .collect();

    // What the libtorch model answers for each image's payload.
    let model = Bundle::open(&dir, Device::Cpu).unwrap();
    let edge = frankensplit_edge::EdgeModel::open(&dir).unwrap();
    let expected: Vec<i64> = images
        .iter()
        .map(|image| {
            let (payload, _) = frankensplit_edge::encode_image(&edge, image).unwrap();
            let features = model.decompress(&payload).unwrap();
            model.classify_features(&features).argmax(-1, false).int64_value(&[0])
        })
        .collect();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime
        .block_on(start(
            model,
            "127.0.0.1:0".parse().unwrap(),
            ServeConfig::default(),
            async {
                let _ = stopped.await;
            },
        ))
        .unwrap();
    let output = Command::new(BINARY)
        .args(["send", "--json", "--server"])
        .arg(format!("http://{}", server.addr))
        .arg("--model")
        .arg(&dir)
        .args(&images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        lines.len(),
        images.len() + 1,
        "one line per request and a summary:\n{stdout}"
    );
    for (line, class) in lines.iter().zip(&expected) {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["top1"].as_i64(), Some(*class), "{line}");
        assert!(line["payload_bytes"].as_u64().unwrap() > 8, "{line}");
    }
    assert_eq!(lines[images.len()]["ok"], images.len());

    // A payload for another model is answered with the server's reason.
    let other = tmp.join("other");
    random_bundle(&other, &small_architecture(), 12);
    let output = Command::new(BINARY)
        .args(["send", "--server"])
        .arg(format!("http://{}", server.addr))
        .arg("--model")
        .arg(&other)
        .arg(&images[0])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("409") && stdout.contains("produced by model"),
        "{stdout}"
    );

    stop.send(()).unwrap();
    runtime.block_on(server.done).unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
}
