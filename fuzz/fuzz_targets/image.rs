//! An upload as `/v1/classify-image` handles it: the header planned against
//! the pixel limit, then decoding (JPEG through libjpeg-turbo, PNG and WebP
//! through the `image` crate) and the whole input pipeline, resize included.
//! Any bytes must give a tensor of the crop's size or an error.
#![no_main]

use frankensplit_preprocess::Preprocess;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small crop keeps each run fast; the resize's arithmetic is the same.
    let preprocess = Preprocess::for_input(32);
    if let Ok(input) = preprocess.decode_and_apply(data, 1 << 20) {
        assert_eq!(input.len(), 3 * 32 * 32);
    }
});
