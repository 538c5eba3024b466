//! Replays the committed fuzzing corpus (`tests/fuzz_corpus/`, minimised from
//! `cargo fuzz run decode`) through the fuzz target's harness, so every input
//! that once found new behaviour stays covered by the normal test run.

use std::fs;
use std::path::Path;

#[test]
fn fuzz_corpus_replays_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut count = 0;
    for entry in fs::read_dir(&dir).expect("corpus directory exists") {
        let path = entry.expect("readable entry").path();
        let data = fs::read(&path).expect("readable corpus file");
        frankensplit_codec::fuzz_harness::decode_untrusted(&data);
        count += 1;
    }
    assert!(count >= 50, "corpus at {} has only {count} inputs", dir.display());
}
