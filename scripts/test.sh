#!/usr/bin/env bash
# The project's test command (README "Test"): formatting, lints, then every
# test in the workspace. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
