//! Property tests: random tables, symbols (escapes included) and corruptions.

use frankensplit_codec::{
    decode_with_indexes, encode_with_indexes, pmf_to_quantized_cdf, CdfTables, DecodeLimits, EntropyBottleneck,
    LatentShape, ModelFingerprint, Payload,
};
use proptest::prelude::*;

fn tables_strategy() -> impl Strategy<Value = CdfTables> {
    prop::collection::vec((prop::collection::vec(0.0f32..1.0, 2..80), -100i32..100), 1..6).prop_filter_map(
        "pmf with mass",
        |rows| {
            let (cdfs, offsets): (Vec<_>, Vec<_>) = rows
                .into_iter()
                .map(|(pmf, offset)| pmf_to_quantized_cdf(&pmf).map(|cdf| (cdf, offset)))
                .collect::<Result<Vec<_>, _>>()
                .ok()?
                .into_iter()
                .unzip();
            CdfTables::new(cdfs, offsets).ok()
        },
    )
}

fn symbol_strategy() -> impl Strategy<Value = i32> {
    prop_oneof![
        8 => -120i32..120,
        1 => any::<i32>(),
        1 => prop::sample::select(vec![i32::MIN, i32::MAX, 1 << 27, -(1 << 27), (1 << 28) + 3]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn quantised_cdfs_are_valid_rows(pmf in prop::collection::vec(0.0f32..1.0, 1..300)) {
        if let Ok(cdf) = pmf_to_quantized_cdf(&pmf) {
            prop_assert_eq!(cdf.len(), pmf.len() + 1);
            prop_assert_eq!(cdf[0], 0);
            prop_assert_eq!(*cdf.last().unwrap(), 1 << 16);
            prop_assert!(cdf.windows(2).all(|w| w[0] < w[1]));
        } else {
            prop_assert!(pmf.iter().all(|&p| (p * 65536.0).round() == 0.0));
        }
    }

    #[test]
    fn random_symbols_round_trip(
        tables in tables_strategy(),
        raw in prop::collection::vec((symbol_strategy(), any::<u32>()), 0..400),
    ) {
        let symbols: Vec<i32> = raw.iter().map(|&(s, _)| s).collect();
        let indexes: Vec<u32> = raw.iter().map(|&(_, i)| i % tables.num_rows() as u32).collect();
        let bytes = encode_with_indexes(&symbols, &indexes, &tables).unwrap();
        prop_assert_eq!(bytes.len() % 4, 0);
        prop_assert_eq!(decode_with_indexes(&bytes, &indexes, &tables).unwrap(), symbols);
    }

    #[test]
    fn corrupted_strings_never_decode_to_the_original_silently(
        seed in any::<u64>(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let eb = EntropyBottleneck::synthetic(8);
        let shape = LatentShape::new(8, 5, 5);
        let latent = eb.synthetic_latent(shape, seed);
        let string = eb.compress(&latent, shape).unwrap();
        let symbols = eb.quantize(&latent, shape).unwrap();
        let mut corrupted = string.clone();
        let i = position.index(corrupted.len());
        corrupted[i] ^= flip;
        // Any outcome but a panic is acceptable, except decoding to the same symbols.
        if let Ok(decoded) = eb.decompress_symbols(&corrupted, shape, DecodeLimits::default()) {
            prop_assert_ne!(decoded, symbols);
        }
    }

    #[test]
    fn payloads_round_trip(c in 1u32..5000, h in 1u32..300, w in 1u32..300, fp in any::<u32>(), words in 2usize..50) {
        let string = vec![0xA5u8; 4 * words];
        let payload = Payload { fingerprint: ModelFingerprint(fp), shape: LatentShape::new(c, h, w), string: &string };
        let bytes = payload.to_bytes();
        prop_assert_eq!(Payload::parse(&bytes).unwrap(), payload);
        prop_assert!(Payload::parse_for(&bytes, ModelFingerprint(fp.wrapping_add(1))).is_err());
    }
}

#[test]
fn declared_shapes_beyond_the_cap_are_refused_before_allocating() {
    let eb = EntropyBottleneck::synthetic(8);
    let string = [0u8, 0, 0, 0x80, 0, 0, 0, 0];
    let huge = LatentShape::new(8, 1 << 15, 1 << 15);
    let err = eb.decompress(&string, huge, DecodeLimits::default()).unwrap_err();
    assert!(matches!(err, frankensplit_codec::CodecError::TooLarge { .. }), "{err}");
}
