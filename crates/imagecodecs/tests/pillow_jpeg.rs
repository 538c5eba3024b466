//! Our JPEG encoder writes the bytes Pillow writes (both libjpeg-turbo with
//! its defaults; fixtures from tools/fixtures/gen_jpeg_fixtures.py), so
//! codec baselines cost what they cost for users of Pillow.

use std::path::PathBuf;

use frankensplit_imagecodecs::ImageCodec;
use frankensplit_preprocess::RgbImage;
use serde_json::Value;
use sha2::{Digest, Sha256};

#[test]
fn baseline_jpegs_are_byte_identical_to_pillows() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/images");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("jpeg.json")).unwrap()).unwrap();
    let mut compared = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let options = case["options"].as_object().unwrap();
        // Colour, baseline only: our encoder does not write grey or progressive files.
        if case["mode"] != "RGB" || options.contains_key("progressive") {
            continue;
        }
        let quality = options.get("quality").and_then(Value::as_u64).unwrap_or(75) as u8;
        let source = RgbImage::open(&dir.join(case["source"].as_str().unwrap())).unwrap();
        let bytes = ImageCodec::Jpeg { quality }.encode(&source).unwrap();
        let digest: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            digest,
            case["jpeg_sha256"].as_str().unwrap(),
            "{} at q={quality}",
            case["file"]
        );
        compared += 1;
    }
    assert_eq!(compared, 5);
}
