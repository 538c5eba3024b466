//! Replays the committed corpus of `cargo fuzz run checkpoint` (inputs under
//! 8 KiB, minimised) so every input that once found new behaviour in the zip
//! and pickle readers keeps being run.

use std::io::Cursor;
use std::path::Path;

use frankensplit_checkpoint::{unpickle, Checkpoint};

#[test]
fn fuzz_corpus_replays_without_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory exists") {
        let data = std::fs::read(entry.expect("readable entry").path()).expect("readable file");
        if data.starts_with(b"PK") {
            if let Ok(ckpt) = Checkpoint::from_reader(Cursor::new(&data)) {
                let _ = ckpt.tensors_under(&[]);
            }
        } else {
            let _ = unpickle(&data);
        }
        count += 1;
    }
    assert!(count >= 100, "corpus at {} has only {count} inputs", dir.display());
}

#[test]
fn hostile_pickles_are_refused_quickly() {
    // 100,000 nested lists: `]` pushes a list, `a` appends it to the one below.
    let mut nested = vec![0x80, 2];
    nested.extend(std::iter::repeat_n(b']', 100_000));
    nested.extend(std::iter::repeat_n(b'a', 99_999));
    nested.push(b'.');
    let err = unpickle(&nested).unwrap_err();
    assert!(err.to_string().contains("nested too deeply"), "{err}");
    // "Billion laughs": a list holding two copies of the previous one, 40 times.
    let mut laughs = vec![0x80, 2, b']', b'q', 0];
    for i in 0..40u8 {
        laughs.extend_from_slice(&[b']', b'h', i, b'a', b'h', i, b'a', b'q', i + 1]);
    }
    laughs.push(b'.');
    let err = unpickle(&laughs).unwrap_err();
    assert!(err.to_string().contains("copied too often"), "{err}");
    let mut huge = vec![0x80, 2, b'X'];
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(unpickle(&huge).is_err());
    assert!(unpickle(b"(((((.").is_err());
    assert!(unpickle(b"").is_err());
}
