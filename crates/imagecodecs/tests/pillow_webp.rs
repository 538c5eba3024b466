//! Our WebP encoder writes the bytes Pillow writes for
//! `save(format="WEBP", quality=q)` at its other defaults (libwebp 1.6.0
//! driven as Pillow 12 drives it; fixtures from
//! tools/fixtures/gen_webp_fixtures.py), so the WebP baseline costs what it
//! costs for users of Pillow.

use std::path::{Path, PathBuf};

use frankensplit_imagecodecs::ImageCodec;
use frankensplit_preprocess::RgbImage;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn source(case: &Value, here: &Path) -> RgbImage {
    let name = case["source"].as_str().unwrap();
    let shared = here.join("../../fixtures/images").join(name);
    let path = if shared.exists() {
        shared
    } else {
        here.join("tests/fixtures").join(name)
    };
    let image = RgbImage::open(&path).unwrap();
    match case["crop"].as_array() {
        Some(crop) => {
            let crop: Vec<u32> = crop.iter().map(|v| v.as_u64().unwrap() as u32).collect();
            image.crop(crop[0], crop[1], crop[2], crop[3])
        }
        None => image,
    }
}

#[test]
fn lossy_webps_are_byte_identical_to_pillows() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = here.join("tests/fixtures");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("webp.json")).unwrap()).unwrap();
    assert_eq!(fixture["libwebp"], "1.6.0");
    let cases = fixture["cases"].as_array().unwrap();
    for case in cases {
        let name = case["file"].as_str().unwrap();
        let image = source(case, &here);
        // The pixels Pillow encoded are the pixels we encode.
        assert_eq!(
            hex_sha256(&image.pixels),
            case["pixels_sha256"].as_str().unwrap(),
            "{name}"
        );
        let quality = case["options"].get("quality").and_then(Value::as_f64).unwrap_or(80.0) as f32;
        let ours = ImageCodec::Webp { quality }.encode(&image).unwrap();
        let pillows = std::fs::read(fixtures.join(name)).unwrap();
        assert_eq!(hex_sha256(&pillows), case["webp_sha256"].as_str().unwrap(), "{name}");
        assert_eq!(
            (ours.len(), hex_sha256(&ours)),
            (pillows.len(), hex_sha256(&pillows)),
            "{name} at q={quality}: {} bytes against Pillow's {}",
            ours.len(),
            pillows.len()
        );
    }
    assert_eq!(cases.len(), 20);
}
