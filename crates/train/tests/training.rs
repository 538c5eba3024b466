//! A whole run on a tiny synthetic dataset with the small fixture
//! architecture: a teacher stage, stage 1, then stage 2 with saliency maps
//! the run computes itself. Checks that the run writes its log, teacher,
//! maps and bundle, and that a run stopped after a checkpoint and resumed
//! ends with exactly the weights of an uninterrupted run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use frankensplit_models::bundle::merge_bundles;
use frankensplit_models::Bundle;
mod common;

use common::{fixture_arch, options, small_data};
use frankensplit_train::run::{read_checkpoint, train, MetricsLine, RunConfig};
use tch::{Device, Tensor};

/// Writes `dir/<output>.toml` with `text`, the fixture architecture appended.
fn write_run_file(dir: &Path, output: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{output}.toml"));
    std::fs::write(&path, format!("{text}\n{}", fixture_arch(true))).unwrap();
    path
}

/// Runs `split` stopped after `stop` steps, resumes it, and checks that it
/// ends where `whole` (already run, ending at `end`) ended, weight for weight.
/// The log's lines as (split, stage, epoch, step): what must read the same
/// for a resumed run as for an uninterrupted one.
fn log_steps(run: &RunConfig) -> Vec<(String, usize, usize, u64)> {
    std::fs::read_to_string(run.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let m: MetricsLine = serde_json::from_str(l).unwrap();
            (m.split, m.stage, m.epoch, m.global_step)
        })
        .collect()
}

fn check_resume(whole: &RunConfig, split: &RunConfig, stop: u64, end: &frankensplit_train::run::Progress) {
    let stopped = train(split, &options(Some(stop), false)).unwrap();
    assert_eq!(stopped.progress.global_step, stop);
    // A crash after logging but before the next checkpoint leaves lines the
    // checkpoint does not cover: resuming must cut them back.
    let log = split.output.join("metrics.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let mut stale: MetricsLine = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    stale.global_step = stop + 1;
    stale.split = "train".into();
    std::fs::write(&log, format!("{text}{}\n", serde_json::to_string(&stale).unwrap())).unwrap();
    let resumed = train(split, &options(None, true)).unwrap();
    assert_eq!(&resumed.progress, end);
    assert_eq!(
        log_steps(split),
        log_steps(whole),
        "the resumed log differs from the uninterrupted one"
    );
    let (a, b) = (
        weights(&whole.output.join("checkpoint.safetensors")),
        weights(&split.output.join("checkpoint.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k} differs after resuming");
    }
}

fn run_file(dir: &Path, output: &str) -> PathBuf {
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
"#
    );
    write_run_file(dir, output, &text)
}

/// Runs seed torch's one global generator at every step: tests that train
/// take turns, or each would draw the other's noise.
static TORCH_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn weights(path: &Path) -> BTreeMap<String, Tensor> {
    read_checkpoint(path).unwrap().1
}

#[test]
fn a_run_trains_logs_and_resumes_exactly() {
    let _turn = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("frankensplit-train-{}", std::process::id()));
    small_data(&dir, 4);

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
    // Stage 1's compressor is kept beside the final one; the teacher stage and the last stage leave none.
    let after_stage1 = Bundle::open(&whole.output.join("bundle-after-stage1"), Device::Cpu).unwrap();
    assert_ne!(after_stage1.fingerprint, bundle.fingerprint);
    assert!(!whole.output.join("bundle-after-stage0").exists() && !whole.output.join("bundle-after-stage2").exists());
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
    check_resume(&whole, &split, 5, &summary.progress);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run file training from the generator's stream: teacher with warm-up,
/// cosine decay, AdamW and label smoothing; stage 2 with maps computed per batch.
fn stream_run_file(dir: &Path, output: &str) -> PathBuf {
    let text = format!(
        r#"
output = "{output}"
seed = 5
workers = 2
checkpoint_every = 1

[data]
val = "data/val"

[data.generate]
seed = 9
size = 72
per_epoch = 8
classes = 3

[teacher]
split_stage = 2

[[stages]]
kind = "teacher"
epochs = 2
batch_size = 4
lr = 2e-3
schedule = "cosine"
warmup = 2
weight_decay = 0.05
label_smoothing = 0.1

[[stages]]
kind = "saliency"
epochs = 1
batch_size = 4
lr = 4e-4
lmbda = 0.05
"#
    );
    write_run_file(dir, output, &text)
}

#[test]
fn a_streamed_run_with_maps_per_batch_resumes_exactly() {
    let _turn = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("frankensplit-stream-{}", std::process::id()));
    small_data(&dir, 0);
    let whole = RunConfig::from_file(&stream_run_file(&dir, "whole")).unwrap();
    let summary = train(&whole, &options(None, false)).unwrap();
    // 8 images a epoch, batch 4: 2 steps an epoch, 3 epochs.
    assert_eq!(summary.progress.global_step, 6);
    assert!(summary.bundle.unwrap().join("model.toml").exists());
    let log: Vec<MetricsLine> = std::fs::read_to_string(whole.output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_lr: Vec<f64> = log.iter().filter(|l| l.split == "train").map(|l| l.lr).collect();
    // Warm-up 1e-3, 2e-3, then half a cosine over the last two steps: 2e-3, 2e-3·(1 + cos(π/2))/2.
    let expected = [1e-3, 2e-3, 2e-3, 1e-3];
    assert!(train_lr.len() >= expected.len(), "{train_lr:?}");
    for (got, want) in train_lr.iter().zip(expected) {
        assert!((got - want).abs() < 1e-12, "{train_lr:?}");
    }

    let split = RunConfig::from_file(&stream_run_file(&dir, "split")).unwrap();
    check_resume(&whole, &split, 5, &summary.progress);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run file training on the generator's stream (8 images an epoch of 3
/// classes): `top` adds top-level keys, `teacher` lines to `[teacher]`,
/// then the `stages`; the fixture architecture.
fn stream_run(dir: &Path, output: &str, top: &str, teacher: &str, stages: &str) -> PathBuf {
    stream_run_with(dir, output, top, teacher, stages, &fixture_arch(true))
}

/// [`stream_run`] with `arch` (a `[teacher.backbone]` and a `[compressor]`
/// table) in place of the fixture architecture.
fn stream_run_with(dir: &Path, output: &str, top: &str, teacher: &str, stages: &str, arch: &str) -> PathBuf {
    let text = format!(
        r#"
output = "{output}"
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
{teacher}

{arch}

{stages}
"#
    );
    let path = dir.join(format!("{output}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A teacher stage on the generator's stream, from `weights` when given.
fn teacher_run_file(dir: &Path, output: &str, weights: Option<&str>, freeze_head: bool) -> PathBuf {
    let weights = weights.map(|w| format!("weights = \"{w}\"")).unwrap_or_default();
    let stage =
        format!("[[stages]]\nkind = \"teacher\"\nfreeze_head = {freeze_head}\nepochs = 1\nbatch_size = 4\nlr = 2e-3");
    stream_run(dir, output, "", &weights, &stage)
}

#[test]
fn a_teacher_stage_with_a_frozen_head_trains_only_the_tail() {
    let _turn = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("frankensplit-freeze-{}", std::process::id()));
    small_data(&dir, 0);
    let first = RunConfig::from_file(&teacher_run_file(&dir, "first", None, false)).unwrap();
    train(&first, &options(None, false)).unwrap();
    let before = Tensor::read_safetensors(first.output.join("teacher.safetensors")).unwrap();

    // Without trained weights a frozen head would be a random one.
    let unweighted = RunConfig::from_file(&teacher_run_file(&dir, "unweighted", None, true));
    assert!(unweighted.unwrap_err().to_string().contains("freeze_head"));

    let weights = first.output.join("teacher.safetensors");
    let tail = RunConfig::from_file(&teacher_run_file(&dir, "tail", Some(weights.to_str().unwrap()), true)).unwrap();
    train(&tail, &options(None, false)).unwrap();
    let after: BTreeMap<String, Tensor> = Tensor::read_safetensors(tail.output.join("teacher.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let is_head =
        |name: &str| name.starts_with("patch_embed.") || name.starts_with("layers.0.") || name.starts_with("layers.1.");
    let (mut head, mut tail_changed) = (0, 0);
    for (name, was) in &before {
        let now = &after[name];
        let same = was.equal(now);
        if is_head(name) {
            head += 1;
            assert!(same, "{name} is in the frozen head but changed");
        } else if !same {
            tail_changed += 1;
        }
    }
    assert!(
        head > 0 && tail_changed > 0,
        "head tensors {head}, tail tensors changed {tail_changed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A distillation stage on the generator's stream against the teacher in
/// `dir/teacher`, from `compressor_weights` when given.
fn distill_run_file(dir: &Path, output: &str, lr: &str, compressor_weights: Option<&Path>) -> PathBuf {
    let start = compressor_weights
        .map(|w| format!("compressor_weights = \"{}\"", w.display()))
        .unwrap_or_default();
    let stage = format!("[[stages]]\nkind = \"distill\"\nepochs = 1\nbatch_size = 4\nlr = {lr}\nlmbda = 0.05");
    stream_run(dir, output, &start, "weights = \"teacher/teacher.safetensors\"", &stage)
}

/// The compressor tensors of a run's final bundle.
fn compressor_tensors(run: &RunConfig) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(run.output.join("bundle/weights.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("compressor."))
        .collect()
}

/// The largest absolute difference between two sets of the same tensors.
fn largest_difference(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| (t - &b[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn a_run_starts_its_compressor_from_given_weights() {
    let _turn = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("frankensplit-start-{}", std::process::id()));
    small_data(&dir, 0);
    let teacher = RunConfig::from_file(&teacher_run_file(&dir, "teacher", None, false)).unwrap();
    train(&teacher, &options(None, false)).unwrap();
    let trained = RunConfig::from_file(&distill_run_file(&dir, "trained", "1e-2", None)).unwrap();
    train(&trained, &options(None, false)).unwrap();
    let reference = compressor_tensors(&trained);

    // At a learning rate too small to move a weight, a run ends where it
    // started: from the trained bundle when told, from the seed's draw otherwise.
    let bundle = trained.output.join("bundle");
    let started = RunConfig::from_file(&distill_run_file(&dir, "started", "1e-30", Some(&bundle))).unwrap();
    train(&started, &options(None, false)).unwrap();
    assert!(largest_difference(&compressor_tensors(&started), &reference) < 1e-6);
    let fresh = RunConfig::from_file(&distill_run_file(&dir, "fresh", "1e-30", None)).unwrap();
    train(&fresh, &options(None, false)).unwrap();
    assert!(largest_difference(&compressor_tensors(&fresh), &reference) > 1e-3);

    // A run's checkpoint serves as well; a file without a compressor is refused.
    let checkpoint = trained.output.join("checkpoint.safetensors");
    let from_checkpoint = RunConfig::from_file(&distill_run_file(&dir, "ckpt", "1e-30", Some(&checkpoint))).unwrap();
    train(&from_checkpoint, &options(None, false)).unwrap();
    assert!(largest_difference(&compressor_tensors(&from_checkpoint), &reference) < 1e-6);
    let backbone_only = teacher.output.join("teacher.safetensors");
    let refused = RunConfig::from_file(&distill_run_file(&dir, "refused", "1e-30", Some(&backbone_only))).unwrap();
    let error = train(&refused, &options(None, false)).unwrap_err().to_string();
    assert!(error.contains("no `compressor.` tensors"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run that trains a small ResNet teacher, then a decoder for it in front
/// of the edge encoder and prior of `encoder` (a bundle), with the
/// fixture's compressor widths.
fn resnet_decoder_run_file(dir: &Path, output: &str, encoder: Option<&Path>) -> PathBuf {
    let start = encoder
        .map(|e| format!("encoder_weights = \"{}\"", e.display()))
        .unwrap_or_default();
    let fixture = fixture_arch(true);
    let compressor = &fixture[fixture.find("[compressor]").unwrap()..fixture.find("[teacher.backbone]").unwrap()];
    let arch = format!(
        r#"[teacher.backbone]
family = "resnet"
img_size = 64
in_chans = 3
num_classes = 10
block = "basic"
layers = [1, 1, 1, 1]
channels = [8, 16, 24, 32]
drop_path_rate = 0.0

{}"#,
        // The ResNet's layer2 output, 16 × 8 × 8, is what the decoder restores.
        compressor.replace("target_dim = 32", "target_dim = 16")
    );
    let stages = "[[stages]]\nkind = \"teacher\"\nepochs = 1\nbatch_size = 4\nlr = 2e-3\n\n[[stages]]\nkind = \"decoder\"\nepochs = 1\nbatch_size = 4\nlr = 2e-3";
    stream_run_with(dir, output, &start, "", stages, &arch)
}

#[test]
fn a_decoder_stage_serves_another_backbone_from_the_same_payloads() {
    let _turn = TORCH_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("frankensplit-decoder-{}", std::process::id()));
    small_data(&dir, 0);
    let teacher = RunConfig::from_file(&teacher_run_file(&dir, "teacher", None, false)).unwrap();
    train(&teacher, &options(None, false)).unwrap();
    let swin = RunConfig::from_file(&distill_run_file(&dir, "swin", "1e-2", None)).unwrap();
    train(&swin, &options(None, false)).unwrap();
    let swin_bundle = swin.output.join("bundle");

    let refused = RunConfig::from_file(&resnet_decoder_run_file(&dir, "refused", None));
    assert!(refused.unwrap_err().to_string().contains("set encoder_weights"));

    let resnet = RunConfig::from_file(&resnet_decoder_run_file(&dir, "resnet", Some(&swin_bundle))).unwrap();
    train(&resnet, &options(None, false)).unwrap();
    let first = Bundle::open(&swin_bundle, Device::Cpu).unwrap();
    let second = Bundle::open(&resnet.output.join("bundle"), Device::Cpu).unwrap();
    assert_eq!(second.manifest.architecture.backbone.family(), "resnet");
    assert_eq!(first.fingerprint, second.fingerprint);
    let tensors = |run: &RunConfig| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(run.output.join("bundle/weights.safetensors"))
            .unwrap()
            .into_iter()
            .collect()
    };
    let (before, after) = (tensors(&swin), tensors(&resnet));
    let mut decoder_tensors = 0;
    for (name, t) in &after {
        if name.starts_with("compressor.g_a.") || name.starts_with("compressor.entropy_bottleneck.") {
            assert!(t.equal(&before[name]), "{name} changed");
        } else if name.starts_with("compressor.g_s.") {
            decoder_tensors += 1;
        }
    }
    assert!(decoder_tensors > 0);

    tch::manual_seed(11);
    for _ in 0..4 {
        let image = Vec::<f32>::try_from(Tensor::randn([3 * 64 * 64], (tch::Kind::Float, Device::Cpu))).unwrap();
        let payload = first.compress(&image).unwrap();
        assert_eq!(second.compress(&image).unwrap(), payload, "payloads differ");
        let features = second.decompress(&payload).unwrap();
        assert_eq!(features.size(), [1, 16, 8, 8]);
        assert_eq!(second.classify_features(&features).size(), [1, 10]);
    }

    // One bundle serving both backbones answers each as its own bundle does.
    let merged_dir = dir.join("merged");
    let parts = [
        ("swin".to_string(), swin_bundle.clone()),
        ("resnet".to_string(), resnet.output.join("bundle")),
    ];
    let fingerprint = merge_bundles(&merged_dir, &parts, false).unwrap();
    assert_eq!(fingerprint, first.fingerprint);
    let merged = Bundle::open(&merged_dir, Device::Cpu).unwrap();
    assert_eq!(merged.backbone_names(), ["swin", "resnet"]);
    assert_eq!(merged.backbone_index("resnet").unwrap(), 1);
    assert!(merged
        .backbone_index("vit")
        .unwrap_err()
        .to_string()
        .contains("swin, resnet"));
    let image = Vec::<f32>::try_from(Tensor::randn([3 * 64 * 64], (tch::Kind::Float, Device::Cpu))).unwrap();
    let latent = merged.payload.decompress(&first.compress(&image).unwrap()).unwrap();
    for (index, single) in [(0, &first), (1, &second)] {
        let logits = |bundle: &Bundle, i| {
            let features = bundle.restore_features_for(i, std::slice::from_ref(&latent)).unwrap();
            bundle.classify_features_for(i, &features).unwrap()
        };
        let (ours, theirs) = (logits(&merged, index), logits(single, 0));
        assert!(ours.allclose(&theirs, 1e-6, 1e-6, false), "backbone {index}");
    }
    // Bundles of another encoder are refused.
    // Another learning rate: another encoder.
    let other = RunConfig::from_file(&distill_run_file(&dir, "other", "3e-2", None)).unwrap();
    train(&other, &options(None, false)).unwrap();
    let mixed = [
        ("swin".to_string(), swin_bundle),
        ("other".to_string(), other.output.join("bundle")),
    ];
    let error = merge_bundles(&dir.join("mixed"), &mixed, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("another edge encoder"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
