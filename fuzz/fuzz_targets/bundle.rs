//! A model bundle from an untrusted source: `model.toml` and the weights'
//! safetensors, through manifest validation, the size check, the entropy
//! tables and the payload codec. See `frankensplit_bundle::fuzz_harness`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    frankensplit_bundle::fuzz_harness::open_untrusted(data);
});
