//! Replays the committed corpus of `cargo fuzz run image` (minimised; seeded
//! from `fuzz/seeds/image`) through the target's harness: the header planned
//! against the pixel limit, decoding and the whole input pipeline. Any input
//! gives a crop-sized tensor or an error.

use std::path::Path;

use frankensplit_preprocess::Preprocess;

#[test]
fn fuzz_corpus_replays_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let preprocess = Preprocess::for_input(32);
    let (mut count, mut decoded) = (0, 0);
    for entry in std::fs::read_dir(&dir).expect("corpus directory exists") {
        let data = std::fs::read(entry.expect("readable entry").path()).expect("readable file");
        if let Ok(input) = preprocess.decode_and_apply(&data, 1 << 20) {
            assert_eq!(input.len(), 3 * 32 * 32);
            decoded += 1;
        }
        count += 1;
    }
    assert!(count >= 100, "corpus at {} has only {count} inputs", dir.display());
    // The corpus reaches the resize, not only the decoders' error paths.
    assert!(
        decoded >= 20,
        "only {decoded} of {count} inputs got through the pipeline"
    );
}
