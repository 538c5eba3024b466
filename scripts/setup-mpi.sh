#!/usr/bin/env bash
# Installs what multi-process training's CPU engine needs, once: OpenMPI
# (library, headers, mpirun) and libclang, through which the `mpi` crate's
# build generates its bindings (docs/training.md, "Multi-process training").
# Debian/Ubuntu (apt-get; as root, or through sudo). Idempotent: nothing is
# installed when mpirun, mpi.h and libclang are already there.
set -euo pipefail
have() {
  command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 &&
    { ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; }
}
if have; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-mpi: no apt-get here; install OpenMPI (mpirun, mpicc, mpi.h) and libclang by hand" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
echo "installing OpenMPI and libclang (apt-get, one time)" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  libopenmpi-dev openmpi-bin libclang-dev >/dev/null
have || { echo "setup-mpi: OpenMPI or libclang still missing after apt-get" >&2; exit 1; }
