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
#
# A/B of the chunk kernels in one device call: AB_REVS="rev …" also packs,
# for each rev, kvmem_prefill_bench_<rev>: the current bench linked against
# that rev's chunk_attention.cu and chunk_attention_sm90a.cu (with its
# chunk_tiles.cuh), the rest of the binary the same. device-run.sh's `ab`
# step runs them beside the current one. EXTRA="file …" packs those files
# too (say, a kvmem_gpu_bench_<rev> built by hand for device-run.sh's
# decode_ab step). PERF=1 also packs this machine's perf (device-run.sh's
# profile step); the loopback bench then keeps its symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/release
# What is packed is what the tree says now, never a stale binary.
cmake --build --preset release -j 2 --target kvmem_gpu_tests \
  kvmem_prefill_bench kvmem_gpu_bench kvmem_loopback_bench
rm -rf .devpack .devpackz
../shared/device/pack.sh .devpack "$build/tests/gpu/kvmem_gpu_tests" \
  "$build/bench/gpu/kvmem_prefill_bench" "$build/bench/gpu/kvmem_gpu_bench" \
  "$build/bench/loopback/kvmem_loopback_bench"
for rev in ${AB_REVS:-}; do
  src=$(mktemp -d)
  mkdir -p "$src/kernels/cuda"
  objects=()
  for f in chunk_tiles.cuh chunk_attention.cu chunk_attention_sm90a.cu; do
    git show "$rev:kernels/cuda/$f" > "$src/kernels/cuda/$f"
  done
  for f in chunk_attention chunk_attention_sm90a; do
    arch=90; [ $f = chunk_attention_sm90a ] && arch=90a
    /usr/local/cuda/bin/nvcc -I"$src" -I. -O2 -DNDEBUG -std=c++17 \
      -gencode=arch=compute_$arch,code=sm_$arch -x cu \
      -c "$src/kernels/cuda/$f.cu" -o "$src/$f.o"
    objects+=("$src/$f.o")
  done
  # The bench's own link line, the rev's objects ahead of the libraries
  # (whose chunk kernels they replace).
  link=$(cd $build && ninja -t commands bench/gpu/kvmem_prefill_bench |
    tail -1 | sed 's/^: && //; s/ && :$//')
  link=${link//kernels\/libkvmem_kernels_cuda_sm90a.a/}
  link=${link//-o bench\/gpu\/kvmem_prefill_bench/-o $PWD\/.devpack\/kvmem_prefill_bench_$rev ${objects[*]}}
  (cd $build && eval "$link")
  rm -rf "$src"
done
strip --strip-all .devpack/kvmem_*  # debug info: the archive stays small
if [ -n "${PERF:-}" ]; then
  # perf and its libraries in their own folder; the profiled bench keeps
  # its symbol table (not its debug info) for the reports.
  ../shared/device/pack.sh .devpack/perf /usr/bin/perf
  cp -f "$build/bench/loopback/kvmem_loopback_bench" .devpack/
  strip --strip-debug .devpack/kvmem_loopback_bench
fi
cp bench/gpu/prefill_vs_sdpa.py bench/gpu/device-run.sh ${EXTRA:-} .devpack/
mkdir -p .devpackz
tar -C .devpack -czf .devpackz/pack.tgz .
ls -la .devpackz/pack.tgz
