//! The libtorch-free encoder against the libtorch model it replaces on the
//! device: same features (to float rounding), same symbols, same payload
//! bytes, with the folded first block where it folds and the other blocks'
//! second convolutions by Winograd's F(2×2, 3×3); and damaged bundles
//! refused.
// Bundles come from the libtorch model, which links on x86-64 here.
#![cfg(target_arch = "x86_64")]

mod common;

use common::{fixtures, random_bundle, reference_encoder_architecture, small_architecture};
use frankensplit_edge::EdgeModel;
use frankensplit_models::{Architecture, Bundle};
use frankensplit_preprocess::RgbImage;
use tch::Device;

fn inputs(bundle: &Bundle) -> Vec<Vec<f32>> {
    let images = fixtures().join("images");
    ["gradient_300x250.png", "noise_97x131.png", "grey_180x90.png"]
        .iter()
        .map(|name| {
            let image = RgbImage::open(&images.join(name)).unwrap();
            bundle.manifest.preprocess.apply(&image).unwrap()
        })
        .collect()
}

/// `folds`: whether the first block runs as one folded convolution;
/// `winograd`: how many blocks compute conv2 by Winograd.
fn check_parity(arch: &Architecture, seed: i64, name: &str, folds: bool, winograd: usize) {
    let dir = std::env::temp_dir().join(format!("frankensplit-edge-parity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    random_bundle(&dir, arch, seed);
    let reference = Bundle::open(&dir, Device::Cpu).unwrap();
    let edge = EdgeModel::open(&dir).unwrap();
    let mut threaded = EdgeModel::open(&dir).unwrap();
    assert_eq!(edge.fingerprint, reference.fingerprint);
    assert_eq!(edge.latent_shape(), reference.latent_shape());
    assert_eq!(edge.encoder.blocks[0].folded.is_some(), folds, "{name}");
    let by_winograd = edge.encoder.blocks.iter().filter(|b| b.winograd.is_some()).count();
    assert_eq!(by_winograd, winograd, "{name}");
    let shape = edge.latent_shape();
    let plane = shape.plane();
    let mut ties = 0;
    for (i, input) in inputs(&reference).iter().enumerate() {
        let want = reference.encode_latent(input).unwrap();
        let got = edge.encode_latent(input).unwrap();
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tolerance = 1e-5 * scale;
        let worst = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            worst <= tolerance,
            "{name} image {i}: features differ by {worst} (scale {scale})"
        );
        // Symbols: equal, except where the reference's value lies within
        // float rounding of a rounding boundary (two correct sums of the
        // same products may fall on either side of it).
        let symbols = |latent: &[f32]| edge.coder().quantize(latent, shape).unwrap();
        let (got_symbols, want_symbols) = (symbols(&got), symbols(&want));
        for (j, (g, w)) in got_symbols.iter().zip(&want_symbols).enumerate() {
            if g != w {
                let centred = want[j] - edge.coder().medians()[j / plane];
                let off_half = (centred - centred.floor() - 0.5).abs();
                assert!(
                    (g - w).abs() == 1 && off_half <= tolerance,
                    "{name} image {i} symbol {j}: {g} vs {w} at {centred}"
                );
                ties += 1;
            }
        }
        if got_symbols == want_symbols {
            assert_eq!(
                edge.compress(input).unwrap(),
                reference.compress(input).unwrap(),
                "{name} image {i}"
            );
        }
        // Threads split rows; every output is summed as on one thread.
        threaded.threads = 3;
        assert_eq!(
            threaded.encode_latent(input).unwrap(),
            got,
            "{name} image {i} on 3 threads"
        );
    }
    assert!(ties <= 2, "{name}: {ties} symbols on rounding boundaries");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn edge_encoder_matches_the_libtorch_model() {
    let small = small_architecture();
    check_parity(&small, 1, "small", false, 3);
    let mut with_activation = small.clone();
    with_activation.compressor.act_after_conv1 = true;
    check_parity(&with_activation, 2, "act", false, 3);
    check_parity(&reference_encoder_architecture(), 3, "full", true, 2);
}

#[test]
fn damaged_bundles_are_refused() {
    let small = small_architecture();
    let dir = std::env::temp_dir().join(format!("frankensplit-edge-damaged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    random_bundle(&dir, &small, 4);
    let weights = dir.join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let error = format!("{:#}", EdgeModel::open(&dir).unwrap_err());
    assert!(error.contains("does not match its manifest"), "{error}");
    std::fs::remove_file(&weights).unwrap();
    let error = format!("{:#}", EdgeModel::open(&dir).unwrap_err());
    assert!(error.contains("cannot read"), "{error}");
    let error = format!("{:#}", EdgeModel::open(&dir.join("nowhere")).unwrap_err());
    assert!(error.contains("is not a model bundle"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
