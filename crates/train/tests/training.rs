//! A whole run on a tiny synthetic dataset with the small fixture
//! architecture: a teacher stage, stage 1, then stage 2 with saliency maps
//! the run computes itself. Checks that the run writes its log, teacher,
//! maps and bundle, and that a run stopped after a checkpoint and resumed
//! ends with exactly the weights of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use frankensplit_models::Bundle;
use frankensplit_train::run::{read_checkpoint, train, MetricsLine, RunConfig, TrainOptions};
use frankensplit_train::synthetic::{generate, SyntheticConfig};
use tch::{Device, Tensor};

fn run_file(dir: &Path, output: &str) -> PathBuf {
    let arch = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/small_arch.toml"),
    )
    .unwrap();
    // The fixture's [compressor] and [backbone] tables, renamed into a run file.
    let arch = arch
        .replace("split_stage = 2\n", "")
        .replace("[backbone]", "[teacher.backbone]");
    let text = format!(
        r#"
output = "{output}"
seed = 3
workers = 2
checkpoint_every = 1

[data]
train = "data/train"
val = "data/val"
saliency = "{output}-maps"

[teacher]
split_stage = 2

[[stages]]
kind = "teacher"
epochs = 1
batch_size = 4
lr = 2e-3

[[stages]]
kind = "distill"
epochs = 2
batch_size = 4
lr = 1e-3
lmbda = 0.05

[[stages]]
kind = "saliency"
epochs = 1
batch_size = 4
lr = 4e-4
lmbda = 0.05

{arch}
"#
    );
    let path = dir.join(format!("{output}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn options(stop_after_steps: Option<u64>, resume: bool) -> TrainOptions {
    TrainOptions {
        resume,
        device: Device::Cpu,
        progress: false,
        stop_after_steps,
    }
}

fn weights(path: &Path) -> BTreeMap<String, Tensor> {
    read_checkpoint(path).unwrap().1
}

#[test]
fn a_run_trains_logs_and_resumes_exactly() {
    let dir = std::env::temp_dir().join(format!("frankensplit-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    generate(
        &dir.join("data"),
        &SyntheticConfig {
            classes: 3,
            train_per_class: 4,
            val_per_class: 2,
            size: 72,
            seed: 1,
            jpeg: false,
        },
    )
    .unwrap();

    let whole = RunConfig::from_file(&run_file(&dir, "whole")).unwrap();
    let summary = train(&whole, &options(None, false)).unwrap();
    // 12 images, batch 4: 3 steps per epoch, 4 epochs in all.
    assert_eq!(summary.progress.global_step, 12);
    assert_eq!(summary.progress.stage, 3);
    // One map per training image, on the latent grid (64 / 8), in [0, 1].
    let maps: Vec<PathBuf> = std::fs::read_dir(dir.join("whole-maps/blob"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(maps.len(), 4);
    let (shape, values) = frankensplit_train::npy::read(&maps[0]).unwrap();
    assert_eq!(shape, [8, 8]);
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(values.iter().any(|&v| v > 0.99), "min-max normalised maps reach 1");
    let bundle = Bundle::open(summary.bundle.as_ref().unwrap(), Device::Cpu).unwrap();
    assert_eq!(bundle.manifest.labels, ["blob", "checker", "cross"]);
    assert!(bundle.backbone_head.is_some());
    assert!(summary.teacher.unwrap().exists());
    let log: Vec<MetricsLine> = std::fs::read_to_string(whole.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let vals: Vec<&MetricsLine> = log.iter().filter(|l| l.split == "val").collect();
    assert_eq!(vals.len(), 4);
    assert!(vals[1].bpp.unwrap() > 0.0 && vals[1].top1.is_some());
    // The learning rate decays per epoch within a stage.
    assert!((vals[2].lr / vals[1].lr - 0.610_540_23).abs() < 1e-9);
    // Starting again in the same place is refused rather than overwriting.
    assert!(train(&whole, &options(None, false)).is_err());

    // Stopped after step 5 (inside the distillation's first epoch), then resumed.
    let split = RunConfig::from_file(&run_file(&dir, "split")).unwrap();
    let stopped = train(&split, &options(Some(5), false)).unwrap();
    assert_eq!(stopped.progress.global_step, 5);
    let resumed = train(&split, &options(None, true)).unwrap();
    assert_eq!(resumed.progress, summary.progress);
    let (a, b) = (
        weights(&whole.output.join("checkpoint.safetensors")),
        weights(&split.output.join("checkpoint.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resuming");
    }
    // The resumed log reads as one run: no step twice.
    let steps: Vec<(String, u64)> = std::fs::read_to_string(split.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: MetricsLine = serde_json::from_str(l).unwrap();
            (m.split, m.global_step)
        })
        .collect();
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(steps, unique);
    let _ = std::fs::remove_dir_all(&dir);
}
