//! Parity with Pillow and torchvision, against fixtures from
//! `tools/fixtures/gen_preprocess_fixtures.py`.

use std::path::PathBuf;

use frankensplit_preprocess::{resize_bilinear, Preprocess, RgbImage};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("pillow.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn bilinear_resize_is_pillows_bit_for_bit() {
    for case in cases() {
        let image = RgbImage::open(&dir().join(case["file"].as_str().unwrap())).unwrap();
        for r in case["resizes"].as_array().unwrap() {
            let (w, h) = (
                r["width"].as_u64().unwrap() as u32,
                r["height"].as_u64().unwrap() as u32,
            );
            let ours = resize_bilinear(&image, w, h);
            let what = format!("{} → {w}×{h}", case["file"]);
            if let Some(hex) = r["pixels"].as_str() {
                let theirs: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                let differing = ours.pixels.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                assert_eq!(differing, 0, "{what}: {differing} bytes differ");
            }
            assert_eq!(sha256(&ours.pixels), r["sha256"].as_str().unwrap(), "{what}");
        }
    }
}

#[test]
fn eval_pipeline_matches_torchvision() {
    let pipeline = Preprocess::default();
    for case in cases() {
        let image = RgbImage::open(&dir().join(case["file"].as_str().unwrap())).unwrap();
        let tensor = pipeline.apply(&image).unwrap();
        assert_eq!(tensor.len(), 3 * 224 * 224);
        let head: Vec<f32> = case["pipeline_head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&tensor[..16], head.as_slice(), "{}", case["file"]);
        let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            sha256(&bytes),
            case["pipeline_sha256"].as_str().unwrap(),
            "{}",
            case["file"]
        );
    }
}

#[test]
fn undecodable_and_degenerate_inputs_are_errors() {
    assert!(RgbImage::decode(b"definitely not an image").is_err());
    let png = std::fs::read(dir().join("small_30x20.png")).unwrap();
    assert!(RgbImage::decode(&png[..png.len() / 2]).is_err());
    let err = RgbImage::open(&dir().join("missing.png")).unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
    let empty = RgbImage {
        width: 0,
        height: 5,
        pixels: vec![],
    };
    assert!(Preprocess::default().apply(&empty).is_err());
}

/// JPEGs that Pillow wrote decode to Pillow's pixels (both libjpeg-turbo),
/// baseline and progressive, colour and grey; truncated ones are errors.
#[test]
fn jpegs_decode_to_pillows_pixels() {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("jpeg.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let bytes = std::fs::read(dir().join("jpeg").join(file)).unwrap();
        let image = RgbImage::decode(&bytes).unwrap();
        let size = [u64::from(image.width), u64::from(image.height)];
        assert_eq!(
            case["decoded_size"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect::<Vec<_>>(),
            size
        );
        let digest = hex(&Sha256::digest(&image.pixels));
        assert_eq!(digest, case["decoded_sha256"].as_str().unwrap(), "{file}");
        assert!(RgbImage::decode(&bytes[..bytes.len() / 2]).is_err(), "{file} truncated");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Damaged JPEGs (bytes flipped, cut anywhere) give an image or an error,
/// never a crash: libjpeg's errors unwind into `Err`.
#[test]
fn damaged_jpegs_never_crash() {
    let original = std::fs::read(dir().join("jpeg/noise_q90_progressive.jpg")).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut errors = 0;
    for i in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..1 + i % 8 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = 3 + (state as usize) % (bytes.len() - 3);
            bytes[at] ^= (state >> 32) as u8 | 1;
        }
        let cut = if i % 3 == 0 {
            bytes.len() * (i % 97) / 97
        } else {
            bytes.len()
        };
        if RgbImage::decode(&bytes[..cut.max(3)]).is_err() {
            errors += 1;
        }
    }
    assert!(errors > 0, "no damage was noticed");
}
