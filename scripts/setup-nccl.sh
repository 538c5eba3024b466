#!/usr/bin/env bash
# Installs what the `nccl` build feature (multi-GPU training over c10d's
# ProcessGroupNCCL, launched by torchrun) compiles and runs against, into a
# cache outside the clone, once, and exports FRANKENSPLIT_CUDA for the build
# and LD_LIBRARY_PATH for the binary. Source it after setup-libtorch.sh:
#   . scripts/setup-libtorch.sh && . scripts/setup-nccl.sh
#
# These are the CUDA 13.0 wheels torch 2.11.0 itself pins (its METADATA:
# cuda-toolkit 13.0.2's components, nvidia-nccl-cu13 2.28.9, cuDNN 9.19,
# cuSPARSELt 0.8.0, NVSHMEM 3.4.5): NCCL's header and library, the headers
# ProcessGroupNCCL.hpp pulls in (cuBLAS, cuSPARSE, cuSOLVER, CRT, CCCL), and
# every library libtorch_cuda.so loads, so that the binary also starts on a
# machine without a GPU (about 3.5 GB). Idempotent: a finished install is
# reused; a half-finished one is redone.
_fs_cache=${FRANKENSPLIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/frankensplit}
_fs_dir=$_fs_cache/cuda-13.0-torch-2.11.0
if [ ! -f "$_fs_dir/.complete" ]; then
  echo "installing NCCL and the CUDA 13.0 libraries into $_fs_dir (one time, ~3.5 GB)" >&2
  mkdir -p "$_fs_cache"
  rm -rf "$_fs_dir.partial" "$_fs_dir"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$_fs_dir.partial" \
    nvidia-nccl-cu13==2.28.9 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.1.0.3 nvidia-cusparse==12.6.3.3 nvidia-cusolver==12.0.4.66 nvidia-cufft==12.0.0.61 \
    nvidia-curand==10.4.0.35 nvidia-cufile==1.15.1.6 nvidia-nvjitlink==13.0.88 nvidia-cudnn-cu13==9.19.0.56 \
    nvidia-cusparselt-cu13==0.8.0 nvidia-nvshmem-cu13==3.4.5 || {
    echo "the CUDA/NCCL install failed; see pip's message above" >&2
    return 1 2>/dev/null || exit 1
  }
  touch "$_fs_dir.partial/.complete"
  mv "$_fs_dir.partial" "$_fs_dir"
fi
export FRANKENSPLIT_CUDA="$_fs_dir/nvidia"
_fs_libs=$(find "$FRANKENSPLIT_CUDA" -mindepth 2 -maxdepth 3 -type d -name lib | sort | tr '\n' ':')
export LD_LIBRARY_PATH="${_fs_libs%:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _fs_cache _fs_dir _fs_libs
