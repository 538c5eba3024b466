//! The device binary built for 64-bit ARM (NEON f32 tiles; `sdot` or the
//! portable loop for int8) writes the same payload bytes as the x86-64 one,
//! in f32 and in int8, for the reference's encoder size (folded first
//! block, Winograd in the others). The ARM binary runs under emulation:
//! `scripts/test-aarch64.sh` builds it and runs this test with
//! `FRANKENSPLIT_EDGE_ARM` set to the command that starts it.
// Bundles come from the libtorch model, which links on x86-64 here.
#![cfg(target_arch = "x86_64")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixtures, random_bundle, reference_encoder_architecture};

/// Runs `command` (program and leading arguments) with `args`, expecting success.
fn run(command: &[String], args: &[&str], model: &Path, images: &[std::path::PathBuf]) {
    let output = Command::new(&command[0])
        .args(&command[1..])
        .args(args)
        .arg("--model")
        .arg(model)
        .args(images)
        .output()
        .unwrap_or_else(|e| panic!("{command:?} starts: {e}"));
    assert!(
        output.status.success(),
        "{command:?} {args:?}: {}, {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "needs the aarch64 binary and an emulator: scripts/test-aarch64.sh runs it"]
fn arm_payloads_are_the_x86_bytes() {
    let arm: Vec<String> = std::env::var("FRANKENSPLIT_EDGE_ARM")
        .expect("FRANKENSPLIT_EDGE_ARM holds the command that starts the aarch64 frankensplit-edge")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert!(!arm.is_empty(), "FRANKENSPLIT_EDGE_ARM is empty");
    let x86 = vec![env!("CARGO_BIN_EXE_frankensplit-edge").to_string()];
    let root = std::env::temp_dir().join(format!("frankensplit-edge-aarch64-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    random_bundle(&model, &reference_encoder_architecture(), 31);
    let images: Vec<_> = ["gradient_300x250.png", "noise_97x131.png"]
        .iter()
        .map(|name| fixtures().join("images").join(name))
        .collect();
    // One calibration for both: the int8 ranges are the model's, not the machine's.
    run(&x86, &["calibrate"], &model, &images);
    for (name, int8) in [("f32", &[][..]), ("int8", &["--int8"][..])] {
        let outputs = [root.join(format!("x86-{name}")), root.join(format!("arm-{name}"))];
        for (command, output) in [&x86, &arm].into_iter().zip(&outputs) {
            let args = [&["encode", "-o", output.to_str().unwrap()][..], int8].concat();
            run(command, &args, &model, &images);
        }
        for image in &images {
            let file = format!("{}.fsp", image.file_stem().unwrap().to_str().unwrap());
            let [x86_bytes, arm_bytes] = outputs.each_ref().map(|dir| std::fs::read(dir.join(&file)).unwrap());
            assert_eq!(arm_bytes, x86_bytes, "{name} payload of {file}");
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
