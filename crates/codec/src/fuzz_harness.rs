//! The decoder's fuzzing entry point, shared by the `cargo fuzz` target and
//! the test that replays the committed corpus.

use std::sync::OnceLock;

use crate::{
    decode_with_indexes, encode_with_indexes, pmf_to_quantized_cdf, CdfTables, DecodeLimits, EntropyBottleneck,
    LatentShape, Payload,
};

/// Feeds `data` to every parser and decoder that takes untrusted bytes; any
/// panic, hang or unbounded allocation is a bug. Outcomes are checked for
/// consistency: whatever decodes must re-encode to exactly the same bytes.
pub fn decode_untrusted(data: &[u8]) {
    static MODEL: OnceLock<EntropyBottleneck> = OnceLock::new();
    let eb = MODEL.get_or_init(|| EntropyBottleneck::synthetic(8));
    let limits = DecodeLimits { max_symbols: 1 << 16 };
    let round_trip = |string: &[u8], shape: LatentShape| {
        if let Ok(symbols) = eb.decompress_symbols(string, shape, limits) {
            let plane = shape.plane();
            let indexes: Vec<u32> = (0..symbols.len()).map(|i| (i / plane) as u32).collect();
            let again = encode_with_indexes(&symbols, &indexes, eb.tables()).expect("decoded symbols re-encode");
            assert_eq!(again, string, "decode-encode round trip changed the string");
        }
    };

    if let Ok(payload) = Payload::parse(data) {
        assert_eq!(payload.to_bytes(), data, "container parse is not canonical");
        round_trip(payload.string, payload.shape);
    }
    // Raw CompressAI strings with a known shape.
    round_trip(data, LatentShape::new(8, 2, 3));
    let indexes: Vec<u32> = (0..40).map(|i| i % 8).collect();
    let _ = decode_with_indexes(data, &indexes, eb.tables());

    // Tables and pmfs from bytes, as a checkpoint might hold them.
    let words: Vec<i32> = data
        .chunks_exact(4)
        .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    if let Some((&width, rest)) = words.split_first() {
        let width = (width as usize) % 8 + 1;
        let rows = rest.len() / (width + 2);
        let (cdf, rest) = rest.split_at(rows * width);
        if rest.len() >= 2 * rows {
            let _ = CdfTables::from_compressai(cdf, width, &rest[..rows], &rest[rows..2 * rows]);
        }
    }
    let pmf: Vec<f32> = words.iter().map(|&w| f32::from_bits(w as u32)).collect();
    if let Ok(cdf) = pmf_to_quantized_cdf(&pmf) {
        assert_eq!(cdf.len(), pmf.len() + 1);
        CdfTables::new(vec![cdf], vec![0]).expect("quantised pmfs make valid rows");
    }
}
