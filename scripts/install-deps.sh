#!/usr/bin/env bash
# Installs the Debian packages kvmem needs (scripts/debian-packages.txt) when
# some are missing: as root with apt-get, or says the one command to run.
# Also checks for CUDA at /usr/local/cuda (kernels are compiled everywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t packages < <(grep -v '^#' scripts/debian-packages.txt | grep .)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
  else
    echo "kvmem needs these Debian packages; run:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi
if [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "kvmem compiles its CUDA kernels everywhere and needs the CUDA toolkit" >&2
  echo "at /usr/local/cuda (nvcc); install CUDA 13 there." >&2
  exit 1
fi
