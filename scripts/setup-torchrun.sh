#!/usr/bin/env bash
# Makes torchrun (torch.distributed.run) available for the NCCL launch
# tests without a second copy of torch: a virtual environment in the cache
# with torch's pure-Python dependencies, running the torch package that
# scripts/setup-libtorch.sh installed. Exports FRANKENSPLIT_TORCHRUN, the
# command line crates/train/tests/nccl.rs starts. Source it after
# setup-libtorch.sh and setup-nccl.sh (importing torch loads its CUDA
# libraries). Machines with PyTorch installed can instead set
# FRANKENSPLIT_TORCHRUN=torchrun.
_fs_cache=${FRANKENSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/frankensplit}
_fs_venv=$_fs_cache/torchrun-venv
if [ ! -f "$_fs_venv/.complete" ]; then
  echo "making a Python environment for torchrun in $_fs_venv (one time)" >&2
  rm -rf "$_fs_venv"
  python3 -m venv "$_fs_venv" && "$_fs_venv/bin/pip" install --quiet --disable-pip-version-check \
    typing_extensions filelock "sympy>=1.13.3" "networkx>=2.5.1" jinja2 "fsspec>=0.8.5" "setuptools<82" numpy || {
    echo "the torchrun environment could not be made; see pip's message above" >&2
    return 1 2>/dev/null || exit 1
  }
  touch "$_fs_venv/.complete"
fi
export FRANKENSPLIT_TORCHRUN="env PYTHONPATH=$(dirname "$LIBTORCH") $_fs_venv/bin/python -m torch.distributed.run"
unset _fs_cache _fs_venv
