//! What the command-line tests share: the `frankensplit` binary, and running
//! it to success.

use std::process::Command;

/// The `frankensplit` binary cargo built for these tests.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_frankensplit"))
}

/// Runs `frankensplit ARGS` and returns its standard output; fails the test,
/// with the command's standard error, if it does not succeed.
pub fn run(args: &[&str]) -> String {
    let out = bin().args(args).output().expect("frankensplit runs");
    assert!(
        out.status.success(),
        "frankensplit {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
