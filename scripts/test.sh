#!/usr/bin/env bash
# The project's test command (README "Test"): formatting, lints, then every
# test in the workspace, after installing libtorch into the cache if needed
# (scripts/setup-libtorch.sh). CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-libtorch.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
