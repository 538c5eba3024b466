//! The PyTorch checkpoint reader on untrusted files: the zip container and,
//! directly, the pickle interpreter.
#![no_main]

use std::io::Cursor;

use frankensplit_checkpoint::{unpickle, Checkpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.starts_with(b"PK") {
        if let Ok(ckpt) = Checkpoint::from_reader(Cursor::new(data)) {
            let _ = ckpt.tensors_under(&[]);
            let _ = ckpt.tensors_under(&["model"]);
        }
    } else {
        let _ = unpickle(data);
    }
});
