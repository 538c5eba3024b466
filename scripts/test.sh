#!/usr/bin/env bash
# The project's test command (README "Test"): formatting, lints, then every
# test in the workspace, after installing libtorch into the cache if needed
# (scripts/setup-libtorch.sh), the workspace's never-rules
# (scripts/check-layout.sh: which crates may reach libtorch or training
# code), data-parallel training over MPI (scripts/setup-mpi.sh installs
# OpenMPI), the Python package's wheel and pytest suite
# (scripts/test-python.sh), then the edge crate's lints and unit tests
# for 64-bit ARM under emulation (scripts/test-aarch64.sh). CI runs exactly
# this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-libtorch.sh
cargo fmt --all -- --check
scripts/check-layout.sh
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Data-parallel training over MPI (the `distributed` feature): OpenMPI from
# Debian's packages, then its lints and the two-process equivalence test.
scripts/setup-mpi.sh
cargo clippy -p frankensplit-train --all-targets --features distributed -- -D warnings
cargo test -p frankensplit-train --features distributed --test distributed
scripts/test-python.sh
scripts/test-aarch64.sh
