//! Every untrusted-bytes entry point of the codec: containers, raw CompressAI
//! strings, CDF buffers and pmfs. See `frankensplit_codec::fuzz_harness`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| frankensplit_codec::fuzz_harness::decode_untrusted(data));
