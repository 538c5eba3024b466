//! A bundle written by this crate reads back verified; damaged, foreign or
//! hostile bundles are refused with a message that says why; writing never
//! replaces a directory that holds anything but a bundle unless forced.

use std::path::Path;

use frankensplit_bundle::{
    names, write, Architecture, Manifest, TableSource, VerifiedBundle, BUNDLE_FORMAT, MANIFEST, WEIGHTS,
};
use frankensplit_codec::LikelihoodFormula;
use frankensplit_preprocess::Preprocess;
use safetensors::tensor::{Dtype, TensorView};

/// The small architecture of the parity fixtures (6 × 8 × 8 latent).
fn small() -> Architecture {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/small_arch.toml");
    Architecture::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The weights of a bundle whose entropy model codes each channel's symbols
/// -1, 0, 1 with the given probabilities, around medians `c / 10`, padded
/// to the size the small architecture's networks would take.
fn weights(channels: usize) -> Vec<u8> {
    weights_with(channels, 0, 0.0)
}

/// [`weights`] with the server side's stand-in (the padding under
/// `compressor.`) filled with `server_byte` and the medians moved by `shift`.
fn weights_with(channels: usize, server_byte: u8, shift: f32) -> Vec<u8> {
    let cdf: Vec<u8> = (0..channels)
        .flat_map(|_| [0i32, 10_000, 55_000, 65_000, 65_536])
        .flat_map(i32::to_le_bytes)
        .collect();
    let lengths: Vec<u8> = (0..channels).flat_map(|_| 5i32.to_le_bytes()).collect();
    let offsets: Vec<u8> = (0..channels).flat_map(|_| (-1i32).to_le_bytes()).collect();
    let quantiles: Vec<u8> = (0..channels)
        .flat_map(|c| [-5.0f32, c as f32 / 10.0 + shift, 5.0])
        .flat_map(f32::to_le_bytes)
        .collect();
    let padding = vec![server_byte; 4 * small().min_parameters(false) as usize];
    let tensors = [
        (
            names::COMPRESSOR,
            TensorView::new(Dtype::U8, vec![padding.len()], &padding).unwrap(),
        ),
        (
            names::QUANTIZED_CDF,
            TensorView::new(Dtype::I32, vec![channels, 5], &cdf).unwrap(),
        ),
        (
            names::CDF_LENGTH,
            TensorView::new(Dtype::I32, vec![channels], &lengths).unwrap(),
        ),
        (
            names::OFFSET,
            TensorView::new(Dtype::I32, vec![channels], &offsets).unwrap(),
        ),
        (
            names::QUANTILES,
            TensorView::new(Dtype::F32, vec![channels, 1, 3], &quantiles).unwrap(),
        ),
    ];
    safetensors::serialize(tensors, &None).unwrap()
}

fn manifest(architecture: Architecture) -> Manifest {
    Manifest {
        format: BUNDLE_FORMAT,
        fingerprint: String::new(),
        weights_fingerprint: None,
        backbone_name: None,
        more_backbones: Vec::new(),
        preprocess: Preprocess::for_input(architecture.compressor.input_size as u32),
        architecture,
        likelihood_formula: LikelihoodFormula::Direct,
        tables: TableSource::Recomputed,
        backbone_head: false,
        labels: vec!["cat".into(), "dog".into()],
        source: "bundle tests".into(),
    }
}

fn write_test_bundle(dir: &Path, force: bool) -> frankensplit_bundle::Result<frankensplit_codec::ModelFingerprint> {
    let bytes = weights(6);
    write(dir, manifest(small()), force, |path| std::fs::write(path, &bytes))
}

#[test]
fn a_written_bundle_reads_back_verified_and_codes_payloads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let fingerprint = write_test_bundle(&dir, false).unwrap();
    let bundle = VerifiedBundle::open(&dir).unwrap();
    assert_eq!(bundle.fingerprint, fingerprint);
    assert_eq!(bundle.manifest.fingerprint, fingerprint.to_string());
    assert_eq!(bundle.manifest.labels, ["cat", "dog"]);
    let codec = bundle.payload_codec().unwrap();
    assert_eq!(codec.shape.to_string(), "6×8×8");
    let plane = 8 * 8;
    let latent: Vec<f32> = (0..6 * plane)
        .map(|i| (i / plane) as f32 / 10.0 + [-1.2, 0.1, 0.8][i % 3])
        .collect();
    let decoded = codec.decompress(&codec.compress(&latent).unwrap()).unwrap();
    for (i, (y, d)) in latent.iter().zip(&decoded).enumerate() {
        let median = (i / plane) as f32 / 10.0;
        assert!((d - median - (y - median).round()).abs() < 1e-5, "value {i}: {y} → {d}");
    }
}

#[test]
fn payloads_carry_the_encoder_sides_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: Vec<u8>| {
        let dir = tmp.path().join(name);
        write(&dir, manifest(small()), false, |path| std::fs::write(path, &bytes)).unwrap();
        VerifiedBundle::open(&dir).unwrap()
    };
    let first = open("first", weights_with(6, 0, 0.0));
    let other_server_side = open("second", weights_with(6, 7, 0.0));
    let other_prior = open("third", weights_with(6, 0, 0.25));
    assert_eq!(first.manifest.format, BUNDLE_FORMAT);
    // Another decoder and backbone: same identity, other file.
    assert_eq!(first.fingerprint, other_server_side.fingerprint);
    assert_ne!(
        first.manifest.weights_fingerprint,
        other_server_side.manifest.weights_fingerprint
    );
    // Another prior: another identity, and its payloads are refused.
    assert_ne!(first.fingerprint, other_prior.fingerprint);
    let latent = vec![0.5f32; 6 * 8 * 8];
    let payload = first.payload_codec().unwrap().compress(&latent).unwrap();
    assert_eq!(
        other_server_side.payload_codec().unwrap().compress(&latent).unwrap(),
        payload
    );
    assert!(other_prior.payload_codec().unwrap().decompress(&payload).is_err());
}

#[test]
fn format_1_bundles_read_with_their_whole_file_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let bytes = weights(6);
    let whole = frankensplit_codec::ModelFingerprint::of_parts([bytes.as_slice()]);
    let mut old = manifest(small());
    old.format = 1;
    old.fingerprint = whole.to_string();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(WEIGHTS), &bytes).unwrap();
    std::fs::write(dir.join(MANIFEST), old.to_toml().unwrap()).unwrap();
    let bundle = VerifiedBundle::open(&dir).unwrap();
    assert_eq!(bundle.fingerprint, whole);
    assert!(!old.to_toml().unwrap().contains("weights_fingerprint"));
}

#[test]
fn an_edited_fingerprint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let fingerprint = write_test_bundle(&dir, false).unwrap();
    let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
    let edited = text.replace(&fingerprint.to_string(), "0badf00d");
    std::fs::write(dir.join(MANIFEST), edited).unwrap();
    let err = VerifiedBundle::open(&dir).unwrap_err().to_string();
    assert!(err.contains("the manifest was edited"), "{err}");
    let missing = text
        .lines()
        .filter(|l| !l.starts_with("weights_fingerprint"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join(MANIFEST), missing).unwrap();
    let err = VerifiedBundle::open(&dir).unwrap_err().to_string();
    assert!(err.contains("must give weights_fingerprint"), "{err}");
}

#[test]
fn damaged_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_test_bundle(&dir, false).unwrap();
    let mut bytes = std::fs::read(dir.join(WEIGHTS)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(dir.join(WEIGHTS), bytes).unwrap();
    let err = VerifiedBundle::open(&dir).unwrap_err().to_string();
    assert!(err.contains("does not match its manifest"), "{err}");
}

#[test]
fn foreign_and_hostile_manifests_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_test_bundle(&dir, false).unwrap();
    let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();

    let newer = text.replace("format = 2", "format = 3");
    assert_ne!(newer, text);
    std::fs::write(dir.join(MANIFEST), &newer).unwrap();
    let err = Manifest::read(&dir).unwrap_err().to_string();
    assert!(err.contains("bundle format 3 is not supported"), "{err}");

    let hostile = text.replace("latent_channels = 6", "latent_channels = 4000000000");
    assert_ne!(hostile, text);
    std::fs::write(dir.join(MANIFEST), &hostile).unwrap();
    let err = Manifest::read(&dir).unwrap_err().to_string();
    assert!(err.contains("latent_channels"), "{err}");

    // An architecture far larger than the weights is refused before anything of its size is built.
    let larger = text
        .replace("embed_dim = 8", "embed_dim = 512")
        .replace("target_dim = 32", "target_dim = 2048");
    assert_ne!(larger, text);
    std::fs::write(dir.join(MANIFEST), &larger).unwrap();
    let err = VerifiedBundle::open(&dir).unwrap_err().to_string();
    assert!(err.contains("does not describe these weights"), "{err}");

    std::fs::write(dir.join(MANIFEST), " ".repeat(2 << 20)).unwrap();
    let err = Manifest::read(&dir).unwrap_err().to_string();
    assert!(err.contains("more than the"), "{err}");

    let err = Manifest::read(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("is not a model bundle"), "{err}");
}

#[test]
fn writing_never_replaces_other_files_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    assert!(write_test_bundle(&dir, false).is_err());
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
    write_test_bundle(&dir, true).unwrap();
    assert!(!dir.join("notes.txt").exists());
    VerifiedBundle::open(&dir).unwrap();
    // A bundle replaces a bundle without force.
    write_test_bundle(&dir, false).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no staging directory is left behind");
}

#[test]
fn a_failed_weights_writer_leaves_the_old_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let before = write_test_bundle(&dir, false).unwrap();
    let err = write(&dir, manifest(small()), false, |_| Err("disk full")).unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    assert_eq!(VerifiedBundle::open(&dir).unwrap().fingerprint, before);
}
