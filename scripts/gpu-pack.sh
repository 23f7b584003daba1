#!/usr/bin/env bash
# Packs the GPU test and benchmark binaries (built here, release preset)
# with the libraries they need and bench/gpu/device-run.sh into one archive
# for the device tool, whose carry limit is 64 MiB in all:
#   scripts/gpu-pack.sh            # -> .devpackz/pack.tgz
# then a device `run` with carry [".devpackz"] and the command
#   mkdir -p /tmp/p && tar -C /tmp/p -xzf .devpackz/pack.tgz && /tmp/p/device-run.sh
# (device time is scarce: one call runs everything, each step under its own
# timeout, results under $OUT). Once per checkout:
#   printf '/.devpack/\n/.devpackz/\n' >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/release
rm -rf .devpack .devpackz
../shared/device/pack.sh .devpack "$build/tests/gpu/kvmem_gpu_tests" \
  "$build/bench/gpu/kvmem_prefill_bench" "$build/bench/gpu/kvmem_gpu_bench"
strip --strip-all .devpack/kvmem_*  # debug info: the archive stays small
cp bench/gpu/prefill_vs_sdpa.py bench/gpu/device-run.sh .devpack/
mkdir -p .devpackz
tar -C .devpack -czf .devpackz/pack.tgz .
ls -la .devpackz/pack.tgz
