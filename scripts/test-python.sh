#!/usr/bin/env bash
# The Python package's tests (part of scripts/test.sh): builds the abi3
# wheel from the workspace with maturin (the dev profile, reusing the
# workspace's build), installs it into a fresh virtual environment with
# numpy and pytest, and runs crates/python/tests against it and against the
# `frankensplit` and `frankensplit-edge` binaries the workspace built.
# Needs python3 (>= 3.9) with venv, and PyPI for maturin, numpy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-libtorch.sh
venv=target/python-test-venv
rm -rf "$venv" target/wheels/dev
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.9,<2" numpy pytest
cargo build --quiet -p frankensplit-cli -p frankensplit-edge --bins
"$venv/bin/maturin" build --quiet --profile dev -m crates/python/Cargo.toml --interpreter "$venv/bin/python" -o target/wheels/dev
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps target/wheels/dev/frankensplit-*.whl
cd crates/python
# From the package's directory, so that `import frankensplit` finds the installed wheel.
FRANKENSPLIT_CLI="$PWD/../../target/debug/frankensplit" FRANKENSPLIT_EDGE="$PWD/../../target/debug/frankensplit-edge" \
  "../../$venv/bin/python" -m pytest -q tests
