//! The int8 path end to end: `frankensplit-edge calibrate` writes the
//! ranges next to the bundle, `encode --int8` uses them, the latent stays
//! close to the libtorch model's, and calibrations that are missing or made
//! for other weights are refused with what to do.
// Bundles come from the libtorch model, which links on x86-64 here.
#![cfg(target_arch = "x86_64")]

mod common;

use std::process::Command;

use common::{fixtures, random_bundle, small_architecture};
use frankensplit_codec::Payload;
use frankensplit_edge::{EdgeModel, Int8Calibration, CALIBRATION_FILE};
use frankensplit_models::Bundle;
use frankensplit_preprocess::RgbImage;
use tch::Device;

#[test]
fn calibrate_then_encode_in_int8() {
    let root = std::env::temp_dir().join(format!("frankensplit-edge-int8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let arch = small_architecture();
    let (model, other) = (root.join("model"), root.join("other"));
    random_bundle(&model, &arch, 11);
    random_bundle(&other, &arch, 12);
    let images: Vec<_> = ["gradient_300x250.png", "noise_97x131.png", "grey_180x90.png"]
        .iter()
        .map(|name| fixtures().join("images").join(name))
        .collect();
    let edge = |args: &[&str], dir: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_frankensplit-edge"))
            .args(args)
            .arg("--model")
            .arg(dir)
            .args(&images)
            .output()
            .expect("frankensplit-edge runs")
    };
    let payloads = root.join("payloads");
    let encode = ["encode", "--int8", "-o", payloads.to_str().unwrap()];

    let uncalibrated = edge(&encode, &model);
    assert!(!uncalibrated.status.success());
    assert!(String::from_utf8_lossy(&uncalibrated.stderr).contains("frankensplit-edge calibrate --model"));

    let calibrated = edge(&["calibrate", "--json"], &model);
    assert!(
        calibrated.status.success(),
        "{}",
        String::from_utf8_lossy(&calibrated.stderr)
    );
    let calibration = Int8Calibration::load(&model.join(CALIBRATION_FILE)).unwrap();
    let printed: Int8Calibration = serde_json::from_slice(&calibrated.stdout).unwrap();
    assert_eq!(printed, calibration);
    assert_eq!((calibration.images, calibration.blocks.len()), (3, 3));

    let encoded = edge(&[&encode[..], &["--json"]].concat(), &model);
    assert!(encoded.status.success(), "{}", String::from_utf8_lossy(&encoded.stderr));
    let reference = Bundle::open(&model, Device::Cpu).unwrap();
    let mut int8 = EdgeModel::open(&model).unwrap();
    int8.use_int8(&calibration).unwrap();
    for image in &images {
        let stem = image.file_stem().unwrap().to_str().unwrap();
        let bytes = std::fs::read(payloads.join(format!("{stem}.fsp"))).unwrap();
        let payload = Payload::parse(&bytes).unwrap();
        assert_eq!(payload.fingerprint, reference.fingerprint);
        let input = reference
            .manifest
            .preprocess
            .apply(&RgbImage::open(image).unwrap())
            .unwrap();
        assert_eq!(int8.compress(&input).unwrap(), bytes, "{stem}");
        // Within a few quantization levels of the f32 latent.
        let want = reference.encode_latent(&input).unwrap();
        let got = int8.encode_latent(&input).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let error = want.iter().zip(&got).fold(0f32, |m, (w, g)| m.max((w - g).abs()));
        assert!(error > 0.0 && error <= 0.05 * scale, "{stem}: {error} of {scale}");
    }

    // A calibration made for other weights.
    let foreign = edge(&["calibrate", "-o", root.join("other.json").to_str().unwrap()], &other);
    assert!(foreign.status.success());
    let wrong = edge(
        &[
            &encode[..],
            &["--calibration", root.join("other.json").to_str().unwrap()],
        ]
        .concat(),
        &model,
    );
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("calibrate again for this model"));
    let _ = std::fs::remove_dir_all(&root);
}
