#!/usr/bin/env bash
# The project's test command (README "Test"): formatting, lints, then every
# test in the workspace, after installing libtorch into the cache if needed
# (scripts/setup-libtorch.sh), the workspace's never-rules
# (scripts/check-layout.sh: which crates may reach libtorch or training
# code), data-parallel training over MPI (scripts/setup-mpi.sh installs
# OpenMPI) and the NCCL engine's launch under torchrun
# (scripts/setup-nccl.sh, scripts/setup-torchrun.sh), the Python package's wheel and pytest suite
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
# Data-parallel training (the `distributed` feature: MPI; `nccl`: c10d's
# ProcessGroupNCCL under torchrun): OpenMPI from Debian's packages, NCCL
# with the CUDA headers and libraries torch 2.11 pins, torchrun from the
# libtorch install; the lints of both features, then the two-process MPI
# equivalence test and the NCCL engine's rendezvous tests (torchrun's
# agent store, and rank 0's own; no GPU is needed up to NCCL itself).
scripts/setup-mpi.sh
. scripts/setup-nccl.sh
. scripts/setup-torchrun.sh
cargo clippy -p frankensplit-train --all-targets --features distributed -- -D warnings
cargo clippy -p frankensplit-train --all-targets --features distributed,nccl -- -D warnings
cargo test -p frankensplit-train --features distributed,nccl --test distributed --test nccl
scripts/test-python.sh
scripts/test-aarch64.sh
