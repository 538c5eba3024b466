//! What the command-line tests share: the `frankensplit` binary, and running
//! it to success, and a server it starts.

// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

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

/// A `frankensplit serve` started by a test, with the first line it printed.
pub struct Server {
    process: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
    /// The start-up line (`serving model … on http://…`).
    pub banner: String,
    /// Where it listens.
    pub url: String,
}

impl Server {
    /// Starts `frankensplit serve ARGS` and waits for its start-up line.
    pub fn start(args: &[&str]) -> Self {
        use std::io::BufRead;
        let mut process = bin()
            .arg("serve")
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("frankensplit serve starts");
        let mut stderr = std::io::BufReader::new(process.stderr.take().expect("piped stderr"));
        let mut banner = String::new();
        stderr
            .read_line(&mut banner)
            .expect("the server prints a start-up line");
        let url = banner
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("the server printed no URL: {banner}"))
            .to_string();
        Self {
            process,
            stderr,
            banner,
            url,
        }
    }

    /// Sends SIGINT and waits: the exit status and what the server printed after its start-up line.
    pub fn interrupt(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.process.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        let status = self.process.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).unwrap();
        (status, rest)
    }
}
