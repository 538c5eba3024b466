#!/usr/bin/env bash
# Installs libtorch (from PyPI's torch wheel, the same build the GPU machines
# run) into a cache outside the clone, once, and exports LIBTORCH and
# LD_LIBRARY_PATH for tch. Source it: `. scripts/setup-libtorch.sh`.
#
# CPU-only machines need just the torch wheel plus the CUDA runtime and CUPTI
# libraries libtorch_cpu links against (~1.2 GB). Idempotent: an install whose
# torch/version.py names the pinned version is reused; a half-finished one is
# discarded and redone.
TORCH_VERSION=2.11.0
_fs_cache=${FRANKENSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/frankensplit}
_fs_dir=$_fs_cache/libtorch-$TORCH_VERSION
if ! grep -q "__version__ = '$TORCH_VERSION" "$_fs_dir/torch/version.py" 2>/dev/null; then
  echo "installing libtorch $TORCH_VERSION into $_fs_dir (one time, ~1.2 GB)" >&2
  mkdir -p "$_fs_cache"
  rm -rf "$_fs_dir.partial" "$_fs_dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$_fs_dir.partial" \
    "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85 || {
    echo "libtorch install failed; see pip's message above" >&2
    return 1 2>/dev/null || exit 1
  }
  mv "$_fs_dir.partial" "$_fs_dir"
fi
export LIBTORCH="$_fs_dir/torch"
export LD_LIBRARY_PATH="$_fs_dir/torch/lib:$_fs_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _fs_cache _fs_dir
