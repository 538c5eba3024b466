//! The bundle fuzz target's seeds reach the payload codec, and its committed
//! corpus (`tests/fuzz_corpus/`, minimised from `cargo fuzz run bundle`)
//! replays without panics.

use std::path::Path;

use frankensplit_bundle::fuzz_harness::open_untrusted;

fn inputs(dir: &Path) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| std::fs::read(entry.expect("readable entry").path()).expect("readable file"))
        .collect()
}

#[test]
fn every_seed_codes_a_payload_both_ways() {
    let seeds = inputs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/bundle"));
    assert_eq!(seeds.len(), 5);
    for seed in &seeds {
        assert!(open_untrusted(seed), "a seed stops before the payload codec");
    }
}

#[test]
fn fuzz_corpus_replays_without_panics() {
    let corpus = inputs(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus"));
    assert!(corpus.len() >= 50, "only {} inputs", corpus.len());
    let deep = corpus.iter().filter(|input| open_untrusted(input)).count();
    assert!(deep > 0, "no corpus input reaches the payload codec");
}
