//! The edge and server commands together over loopback: `encode` writes
//! payloads, `serve` answers `client` with the same top-1 as local
//! `classify`, image offloading answers the same whether the device or the
//! server crops, a paced upload takes at least the link model's time, and
//! SIGINT stops the server cleanly.

use std::path::PathBuf;

mod common;

use common::{run, Server};
use serde_json::Value;

#[test]
fn encode_serve_and_client_agree_with_local_classification() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
    let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images");
    let work = std::env::temp_dir().join(format!("frankensplit-serve-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let bundle = work.join("bundle");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    // The fixture checkpoint's tail comes from this timm backbone, whose
    // first stages let the server classify whole images too.
    let timm: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(models.join("swin_timm06.safetensors"))
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("weights.")?.to_string(), t)))
        .collect();
    std::fs::create_dir_all(&work).unwrap();
    let timm_file = work.join("timm.safetensors");
    tch::Tensor::write_safetensors(&timm, &timm_file).unwrap();
    run(&[
        "convert",
        "--checkpoint",
        &s(&models.join("reference_checkpoint.pt")),
        "--backbone-weights",
        &s(&timm_file),
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

    let server = Server::start(&["--model", &s(&bundle), "--listen", "127.0.0.1:0"]);
    let url = server.url.clone();

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

    // Image offloading: cropping on the device and sending lossless PNG
    // gives the server the same pixels as sending the file for it to crop.
    let offload = |extra: &[&str]| -> Vec<Value> {
        let mut args = vec!["client", "--json", "--server", &url, "--model"];
        let model = s(&bundle);
        let files = [s(&pictures[0]), s(&pictures[1])];
        args.push(&model);
        args.extend_from_slice(extra);
        args.extend(files.iter().map(String::as_str));
        run(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let png = offload(&["--mode", "png"]);
    let original = offload(&["--mode", "png", "--original"]);
    let jpeg = offload(&["--mode", "jpeg", "--quality", "50"]);
    for i in 0..2 {
        assert_eq!(png[i]["status"], 200, "{}", png[i]);
        assert_eq!(png[i]["top1"], original[i]["top1"]);
        assert_eq!(jpeg[i]["status"], 200, "{}", jpeg[i]);
        assert!(jpeg[i]["payload_bytes"].as_u64() < png[i]["payload_bytes"].as_u64());
    }
    // A paced upload: the body's last byte cannot leave before bytes · 8 / rate.
    let paced = offload(&["--mode", "jpeg", "--throttle", "100kbit"]);
    for r in &paced[..2] {
        let bytes = r["payload_bytes"].as_f64().unwrap();
        let serialisation = bytes * 8.0 / 100e3 * 1e3;
        let modelled = r["modelled_transfer_ms"].as_f64().unwrap();
        // The model adds the connection's measured RTT to the serialisation time.
        assert!(modelled >= serialisation && modelled < serialisation + 1_000.0, "{r}");
        assert!(r["network_ms"].as_f64().unwrap() >= serialisation, "{r}");
    }

    // Rate vs accuracy on an ImageFolder of JPEGs made now: split inference
    // answers as `classify` does, with the bytes `encode` writes.
    let data = work.join("synthetic");
    run(&[
        "synth-data",
        "-o",
        &s(&data),
        "--classes",
        "3",
        "--train-per-class",
        "1",
        "--val-per-class",
        "2",
        "--size",
        "80",
        "--jpeg",
    ]);
    let val = data.join("val");
    let report: Value = serde_json::from_str(&run(&[
        "eval",
        "--json",
        "--model",
        &s(&bundle),
        "--data",
        &s(&val),
        "--codec",
        "png,jpeg:q=50",
    ]))
    .unwrap();
    let eval = report["methods"].as_array().unwrap();
    let images: Vec<PathBuf> = ["blob", "checker", "cross"]
        .iter()
        .flat_map(|c| {
            (0..2)
                .map(|i| val.join(c).join(format!("{i:05}.jpg")))
                .collect::<Vec<_>>()
        })
        .collect();
    let mut args = vec!["classify".to_string(), "--json".into(), "--model".into(), s(&bundle)];
    args.extend(images.iter().map(&s));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let classified: Vec<Value> = run(&args).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let correct = classified
        .iter()
        .enumerate()
        .filter(|(i, c)| c["top_k"][0]["class"].as_i64() == Some((i / 2) as i64))
        .count();
    let mean_bytes = classified
        .iter()
        .map(|c| c["payload_bytes"].as_f64().unwrap())
        .sum::<f64>()
        / 6.0;
    let split = &eval[0];
    assert_eq!(split["family"], "frankensplit");
    assert_eq!(split["images"], 6);
    assert!(
        (split["top1"].as_f64().unwrap() - 100.0 * correct as f64 / 6.0).abs() < 1e-9,
        "{split}"
    );
    assert!((split["mean_bytes"].as_f64().unwrap() - mean_bytes).abs() < 1e-9);
    assert!(split["bpp_string"].as_f64() < split["bpp"].as_f64());
    let (png, jpeg) = (&eval[1], &eval[2]);
    assert_eq!(
        (png["method"].as_str(), jpeg["method"].as_str()),
        (Some("png"), Some("jpeg:q=50"))
    );
    assert!(png["bpp"].as_f64() > jpeg["bpp"].as_f64());
    for r in eval {
        assert!(r["top5"].as_f64() >= r["top1"].as_f64(), "{r}");
    }

    let (status, rest) = server.interrupt();
    assert!(
        status.success() && rest.contains("stopped"),
        "server did not stop cleanly: {status:?} {rest}"
    );
    let _ = std::fs::remove_dir_all(&work);
}
