#!/usr/bin/env bash
# The project's main job (README "Run"): builds the release binary and runs
# `frankensplit` with the given arguments, or with its default job when none
# are given.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-libtorch.sh
if [ "$#" -eq 0 ]; then
  set -- demo
fi
cargo run --release -p frankensplit-cli -- "$@"
