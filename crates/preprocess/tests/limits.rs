//! Images whose shapes make the pipeline's intermediates explode: a PNG of a
//! few kilobytes can declare 1 × 16,777,215 pixels, which `Resize(256)`
//! would turn into 256 × 4,294,967,040. Each must be refused with an error
//! before anything of that size is allocated.

use frankensplit_preprocess::{Error, Preprocess, RgbImage};

fn png(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(width, height)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn extreme_aspect_ratios_are_refused_by_the_plan() {
    let preprocess = Preprocess::default();
    for (w, h) in [(1, 16_777_215), (16_777_215, 1), (1, 4_000_000), (4_000_000, 1)] {
        let err = preprocess.plan(w, h, 4096 * 4096).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{w}×{h}: {err}");
    }
    // The largest canvases a u32 header can state: no arithmetic overflows.
    for (w, h) in [(u32::MAX, u32::MAX), (u32::MAX, 1), (1, u32::MAX)] {
        let err = preprocess.plan(w, h, 1 << 28).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{w}×{h}: {err}");
        if let Ok(plan) = preprocess.plan(w, h, u64::MAX) {
            assert!(plan.working_bytes > u64::from(w) * u64::from(h));
        }
    }
}

#[test]
fn the_plan_agrees_with_torchvision_and_bounds_the_work() {
    let preprocess = Preprocess::default();
    // torchvision: int(256 · 640 / 480) = 341.
    let plan = preprocess.plan(640, 480, 4096 * 4096).unwrap();
    assert_eq!(plan.resized, (341, 256));
    // At least the decoded image, the resized one and the f32 crop.
    assert!(plan.working_bytes >= 3 * (640 * 480 + 341 * 256) + 12 * 224 * 224);
    let err = preprocess.plan(0, 100, 1 << 20).unwrap_err();
    assert!(matches!(err, Error::Size { .. }), "{err}");
}

#[test]
fn decoded_images_of_extreme_shape_give_errors_not_aborts() {
    // What `frankensplit-edge encode` and `classify` do with a decoded image:
    // the resize itself must refuse.
    let preprocess = Preprocess::default();
    for (width, height) in [(1u32, 16_777_215u32), (16_777_215, 1), (1, 4_000_000)] {
        let image = RgbImage {
            width,
            height,
            pixels: vec![128; width as usize * height as usize * 3],
        };
        let err = preprocess.apply(&image).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{width}×{height}: {err}");
    }
}

#[test]
fn uploads_are_refused_from_their_header_before_decoding() {
    let preprocess = Preprocess::default();
    for (w, h) in [(1, 4_000_000), (4_000_000, 1)] {
        let bytes = png(w, h);
        let err = preprocess.decode_and_apply(&bytes, 4096 * 4096).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{w}×{h}: {err}");
    }
    // A normal upload still goes through, to the crop's size.
    let input = preprocess.decode_and_apply(&png(300, 260), 4096 * 4096).unwrap();
    assert_eq!(input.len(), 3 * 224 * 224);
}

#[test]
fn the_fuzz_seed_images_of_odd_sizes_go_through_the_whole_pipeline() {
    // fuzz/seeds/image (tools/fixtures/gen_fuzz_seeds.py): PNG, JPEG and
    // WebP of 1 × 1 to 97 × 1 pixels in every colour type; each must reach
    // the resize and give a crop, as the fuzz target expects of them.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/image");
    let preprocess = Preprocess::for_input(32);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let input = preprocess
            .decode_and_apply(&bytes, 1 << 20)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(input.len(), 3 * 32 * 32, "{}", path.display());
        count += 1;
    }
    assert!(count >= 60, "{count} seeds");
}
