//! Output into a closed pipe (`frankensplit info … | head -1`) ends the
//! command quietly, as it ends `cat`, instead of a panic about a failed print.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

mod common;

#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    let mut child = common::bin()
        .args(["info", "--model", "demo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("frankensplit runs");
    // The reader goes away before the first line is written, as `head` does after its lines.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {stderr}", out.status);
}
