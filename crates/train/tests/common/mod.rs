//! What the training tests share: the small fixture architecture as a run
//! file's tables, a small generated dataset, and the run options.

use std::path::{Path, PathBuf};

use frankensplit_train::run::TrainOptions;
use frankensplit_train::synthetic::{generate, SyntheticConfig};
use tch::Device;

/// The small fixture architecture's [compressor] and [backbone] tables,
/// renamed into a run file's; without stochastic depth when
/// `drop_path` is false.
pub fn fixture_arch(drop_path: bool) -> String {
    let arch = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/small_arch.toml"),
    )
    .unwrap()
    .replace("split_stage = 2\n", "")
    .replace("[backbone]", "[teacher.backbone]");
    if drop_path {
        arch
    } else {
        arch.replace("decoder_drop_path = 0.05", "decoder_drop_path = 0.0")
    }
}

/// Writes `dir/data`: `train_per_class` training and 2 validation images
/// for each of 3 classes, 72 pixels.
pub fn small_data(dir: &Path, train_per_class: usize) {
    let _ = std::fs::remove_dir_all(dir);
    let config = SyntheticConfig {
        classes: 3,
        train_per_class,
        val_per_class: 2,
        test_per_class: 0,
        size: 72,
        seed: 1,
        jpeg: false,
    };
    generate(&dir.join("data"), &config).unwrap();
}

/// On the CPU, without a progress bar.
pub fn options(stop_after_steps: Option<u64>, resume: bool) -> TrainOptions {
    TrainOptions {
        resume,
        device: Device::Cpu,
        progress: false,
        stop_after_steps,
    }
}
