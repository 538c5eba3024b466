//! One edge encoder, two backbone families, through the command line: a
//! Swin compressor trained by `frankensplit train`, a decoder for a ResNet
//! trained against its frozen encoder (`decoder` stage), `frankensplit
//! merge` into one bundle, then `info` and `eval`, which report both
//! backbones from the same payloads.

mod common;

use std::path::{Path, PathBuf};

use common::run;
use serde_json::Value;

/// The small fixture architecture's [compressor] table.
fn compressor_table(target_dim: u32) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/small_arch.toml"),
    )
    .unwrap();
    let start = text.find("[compressor]").unwrap();
    let end = text.find("[backbone]").unwrap();
    text[start..end].replace("target_dim = 32", &format!("target_dim = {target_dim}"))
}

/// A run file in `dir`: a stream of 8 images an epoch of 3 classes, the
/// given top-level lines, backbone table and stages.
fn run_file(dir: &Path, name: &str, top: &str, backbone: &str, target_dim: u32, stages: &str) -> PathBuf {
    let text = format!(
        r#"output = "{name}"
seed = 3
workers = 1
keep = "last"
{top}

[data]
val = "data/val"

[data.generate]
seed = 4
size = 72
per_epoch = 8
classes = 3

[teacher]
split_stage = 2

[teacher.backbone]
{backbone}

{}
{stages}
"#,
        compressor_table(target_dim)
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

const SWIN: &str = r#"family = "swin"
img_size = 64
patch_size = 4
in_chans = 3
num_classes = 3
embed_dim = 8
depths = [2, 2, 2, 2]
num_heads = [1, 2, 2, 4]
window_sizes = [4, 4, 4, 2]
mlp_ratio = 4.0
qkv_bias = true
drop_path_rate = 0.0"#;

const RESNET: &str = r#"family = "resnet"
img_size = 64
in_chans = 3
num_classes = 3
block = "basic"
layers = [1, 1, 1, 1]
channels = [8, 16, 24, 32]
drop_path_rate = 0.0"#;

const TEACHER: &str = "[[stages]]\nkind = \"teacher\"\nepochs = 1\nbatch_size = 4\nlr = 2e-3\n";

#[test]
fn a_merged_bundle_reports_each_backbone_from_the_same_payloads() {
    let dir = std::env::temp_dir().join(format!("frankensplit-cli-backbones-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "synth-data",
        "-o",
        &s(&dir.join("data")),
        "--classes",
        "3",
        "--train-per-class",
        "0",
        "--val-per-class",
        "4",
        "--size",
        "72",
    ]);
    let distill = "[[stages]]\nkind = \"distill\"\nepochs = 1\nbatch_size = 4\nlr = 1e-2\nlmbda = 0.05\n";
    let swin = run_file(&dir, "swin", "", SWIN, 32, &format!("{TEACHER}\n{distill}"));
    run(&["train", "--config", &s(&swin)]);
    let encoder = format!("encoder_weights = \"{}\"", dir.join("swin/bundle").display());
    let decoder = "[[stages]]\nkind = \"decoder\"\nepochs = 1\nbatch_size = 4\nlr = 2e-3\n";
    // The ResNet's layer2 output, 16 × 8 × 8, is what its decoder restores.
    let resnet = run_file(&dir, "resnet", &encoder, RESNET, 16, &format!("{TEACHER}\n{decoder}"));
    run(&["train", "--config", &s(&resnet)]);

    let merged = dir.join("merged");
    let out = run(&[
        "merge",
        "-o",
        &s(&merged),
        &format!("swin={}", dir.join("swin/bundle").display()),
        &format!("resnet={}", dir.join("resnet/bundle").display()),
    ]);
    assert!(out.contains("backbones swin, resnet, default swin"), "{out}");

    let info: Value = serde_json::from_str(&run(&["info", "--model", &s(&merged), "--json"])).unwrap();
    let swin_info: Value =
        serde_json::from_str(&run(&["info", "--model", &s(&dir.join("swin/bundle")), "--json"])).unwrap();
    assert_eq!(info["fingerprint"], swin_info["fingerprint"], "payloads stay valid");
    let families: Vec<&str> = info["backbones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["family"].as_str().unwrap())
        .collect();
    assert_eq!(families, ["swin", "resnet"]);

    let report: Value = serde_json::from_str(&run(&[
        "eval",
        "--model",
        &s(&merged),
        "--data",
        &s(&dir.join("data/val")),
        "--codec",
        "",
        "--json",
    ]))
    .unwrap();
    let methods = report["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2, "{report}");
    assert_eq!(methods[1]["family"], "backbone resnet");
    assert!(methods[1]["method"].as_str().unwrap().ends_with("→ resnet"));
    // The same payloads: the same bytes for both backbones.
    assert_eq!(methods[0]["mean_bytes"], methods[1]["mean_bytes"]);
    assert_eq!(methods[0]["bpp_string"], methods[1]["bpp_string"]);
    assert_eq!(methods[0]["images"], 12);

    // Locally, `classify --backbone` runs the same pipeline.
    let local = |backbone: &str| -> Value {
        let out = run(&[
            "classify",
            "--model",
            &s(&merged),
            "--backbone",
            backbone,
            "--json",
            image_path(&dir).to_str().unwrap(),
        ]);
        serde_json::from_str(out.lines().next().unwrap()).unwrap()
    };
    let (swin_logits, resnet_logits) = (local("swin")["logits"].clone(), local("resnet")["logits"].clone());
    assert_ne!(swin_logits, resnet_logits);

    // The edge's client picks a backbone of the server.
    let server = common::Server::start(&["--model", &s(&merged), "--listen", "127.0.0.1:0"]);
    let image = image_path(&dir);
    let merged_path = s(&merged);
    for (flag, answered) in [(None, "swin"), (Some("resnet"), "resnet")] {
        let mut args = vec!["client", "--server", &server.url, "--model", &merged_path];
        args.extend(flag.map(|f| ["--backbone", f]).into_iter().flatten());
        let out = run(&[args.as_slice(), &["--json", image.to_str().unwrap()]].concat());
        let request: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(request["backbone"], answered, "{out}");
    }
    server.interrupt();

    // Bundles of two encoders do not merge.
    let other = run_file(
        &dir,
        "other",
        "",
        SWIN,
        32,
        &format!("{TEACHER}\n{}", distill.replace("1e-2", "3e-2")),
    );
    run(&["train", "--config", &s(&other)]);
    let refused = common::bin()
        .args([
            "merge",
            "-o",
            &s(&dir.join("refused")),
            &format!("swin={}", dir.join("swin/bundle").display()),
            &format!("other={}", dir.join("other/bundle").display()),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("another edge encoder"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// One validation image of the test's data.
fn image_path(dir: &Path) -> PathBuf {
    let class = dir.join("data/val").read_dir().unwrap().next().unwrap().unwrap().path();
    class.read_dir().unwrap().next().unwrap().unwrap().path()
}
