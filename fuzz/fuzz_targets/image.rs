//! Image decoding as `/v1/classify-image` does it (JPEG through libjpeg-turbo,
//! PNG and WebP through the `image` crate), with the server's pixel limit:
//! any bytes must give an image or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = frankensplit_preprocess::RgbImage::decode_limited(data, 1 << 20) {
        assert_eq!(image.pixels.len(), image.width as usize * image.height as usize * 3);
    }
});
