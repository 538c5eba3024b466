#!/usr/bin/env bash
# The edge crate on 64-bit ARM, from this x86-64 machine: installs (once)
# Rust's aarch64 standard library, Debian's cross linker and qemu's user-mode
# emulator, then lints the crate for aarch64 and runs its unit tests under
# qemu twice: on a CPU with the dot-product extension (NEON f32 and `sdot`
# int8 tiles) and on a Cortex-A72 without it (NEON f32, portable int8); on
# each, the ARM binary's payloads must be the x86-64 binary's bytes
# (crates/edge/tests/aarch64.rs). scripts/test.sh runs this after the
# x86-64 tests.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
# The x86-64 side of the payload comparison builds bundles with libtorch.
. scripts/setup-libtorch.sh
# Debian's cross linker, and qemu to run what is built (set here rather
# than in .cargo/config.toml, which would also apply on an ARM host).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy --target "$target" -p frankensplit-edge --all-targets -- -D warnings
# The test profile (optimised a little, as the unit tests are) keeps emulated encoding quick.
cargo build --profile test --target "$target" -p frankensplit-edge --bin frankensplit-edge
arm_binary="$(realpath -m "${CARGO_TARGET_DIR:-target}/$target/debug/frankensplit-edge")"
for cpu in max cortex-a72; do
    echo "frankensplit-edge on aarch64 ($cpu, emulated): unit tests, then payloads against x86-64"
    QEMU_CPU=$cpu cargo test --target "$target" -p frankensplit-edge --lib
    # --workspace: the features `cargo test --workspace` built with, so nothing is rebuilt.
    QEMU_CPU=$cpu FRANKENSPLIT_EDGE_ARM="qemu-aarch64 -L /usr/aarch64-linux-gnu $arm_binary" \
        cargo test --workspace --test aarch64 -- --ignored
done
