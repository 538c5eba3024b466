"""Paths shared by the tests: the repository root and its committed fixtures."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def edge_binary() -> Path:
    """The `frankensplit-edge` binary the workspace built (scripts/test-python.sh names it)."""
    path = Path(os.environ.get("FRANKENSPLIT_EDGE", ROOT / "target" / "debug" / "frankensplit-edge"))
    assert path.exists(), f"{path} is missing: build it (cargo build -p frankensplit-edge) or set FRANKENSPLIT_EDGE"
    return path


@pytest.fixture(scope="session")
def bundle() -> Path:
    """A built-in trained model's bundle directory, unpacked by the `frankensplit` CLI the workspace built."""
    import json
    import subprocess

    cli = Path(os.environ.get("FRANKENSPLIT_CLI", ROOT / "target" / "debug" / "frankensplit"))
    assert cli.exists(), f"{cli} is missing: build it (cargo build -p frankensplit-cli) or set FRANKENSPLIT_CLI"
    info = subprocess.run([str(cli), "info", "--model", "demo-l0.64", "--json"], check=True, capture_output=True, text=True)
    return Path(json.loads(info.stdout)["path"])
