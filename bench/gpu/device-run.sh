#!/usr/bin/env bash
# One device call's worth of GPU work (scripts/gpu-pack.sh packs it): the
# GPU tests, the prefill benchmark of both chunk kernel families, prefill
# against PyTorch SDPA at 1M tokens, the decode-step benchmark. Each step
# has its own timeout, in the order of what a session most needs, so a
# short lease still brings the first ones back; outputs go to $OUT.
# STEPS (space-separated, default all): tests prefill sdpa decode; ab
# (not in the default) runs the current prefill bench beside the
# kvmem_prefill_bench_<rev> that AB_REVS packed, twice, wgmma kernels;
# decode_ab runs the 4K decode steps (and b32 attention rows) of every
# kvmem_gpu_bench_* packed (scripts/gpu-pack.sh EXTRA) beside the current
# one, twice; loopback the same for kvmem_loopback_bench (packed by
# EXTRA, the current one too). steady: 600-step ATTEND cells (the sessions
# grow past their fill, so selections take spilled pages) of every packed
# loopback bench, once each. profile: perf with call graphs of the
# current loopback bench's ATTEND b8 and b32 cells (PERF=1 packs perf),
# the reports in $OUT/perf_*.txt.
cd "$(dirname "$0")"
export LD_LIBRARY_PATH=.
: "${OUT:=/tmp/out}"
mkdir -p "$OUT"
steps=${STEPS:-"tests prefill sdpa decode"}
# A/B in one run: every packed <name>_<rev> beside ./<name>, alternating,
# twice. $1 the name, $2 the output file under $OUT, $3 a sed script
# printing the lines to show; the rest are the benchmark's flags.
alternate() {
  local name=$1 out=$2 show=$3
  shift 3
  for round in $(seq "${ALT_ROUNDS:-2}"); do
    for b in ./"$name"_* ./"$name"; do
      [ -x "$b" ] || continue  # nothing packed: the glob stays as it is
      echo "$b, round $round"
      timeout "${ALT_TIMEOUT:-60}" "$b" "$@" > /tmp/alternate.txt 2>&1
      sed -n "$show" /tmp/alternate.txt
      cat /tmp/alternate.txt >> "$OUT/$out"
    done
  done
}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
for step in $steps; do
  case $step in
    tests)
      timeout 240 ./kvmem_gpu_tests > "$OUT/gpu_tests.txt" 2>&1
      echo "tests rc=$?"
      grep -E "^\[  (PASSED|FAILED)|^\[  FAILED|Failure" "$OUT/gpu_tests.txt" | head -20 ;;
    prefill)
      timeout 120 ./kvmem_prefill_bench --tokens=65536 --budgets=16384,65536 \
        --cascades=1 --repeats=3 --kernels=1,2 > "$OUT/prefill.txt" 2>&1
      echo "prefill rc=$?"
      grep -E "^#|^ " "$OUT/prefill.txt" ;;
    sdpa)
      timeout 240 python3 prefill_vs_sdpa.py --bench ./kvmem_prefill_bench \
        --tokens 1048576 --budgets 16384,65536 --cascades 1 --repeats 2 \
        > "$OUT/sdpa.txt" 2>&1
      echo "sdpa rc=$?"
      tail -7 "$OUT/sdpa.txt" ;;
    ab)
      alternate kvmem_prefill_bench ab.txt '/full cache/p' --tokens=65536 \
        --budgets=16384,65536 --cascades=1 --repeats=3 --kernels=2 ;;
    decode_ab)
      alternate kvmem_gpu_bench decode_ab.txt '/^workload/,$p' \
        --benchmark_filter='BM_DecodeStep/(1|8|32)/4096/0/0|BM_DecodeStep/32/4096/[345]/0' ;;
    loopback)
      # Loopback A/B, server --backend=cuda: table 1's 4K cells, then per
      # token at batch 1 (32 layers), 4K and 96K.
      ALT_TIMEOUT=120 alternate kvmem_loopback_bench loopback.txt '/^|/p' \
        --backend=cuda --modes=attend,fetch --batches=1,8,32 \
        --resident=4096 --iterations=50 --warmup=5 --token_layers=32 \
        --token_batches=1 --token_resident=${TOKEN_RESIDENT:-4096,98304} \
        --token_iterations=10 ;;
    steady)
      ALT_ROUNDS=1 ALT_TIMEOUT=90 alternate kvmem_loopback_bench steady.txt \
        '/^|/p' --backend=cuda --modes=attend --batches=1,32 \
        --resident=4096 --iterations=600 --warmup=20 --token_layers=0 ;;
    profile)
      [ -x perf/perf ] || { echo "profile: no perf packed (PERF=1)"; continue; }
      LD_LIBRARY_PATH=.:perf timeout 150 perf/perf record -F 1999 \
        --call-graph dwarf,16384 -o /tmp/perf.data -- ./kvmem_loopback_bench \
        --backend=cuda --modes=attend --batches=8,32 --resident=4096 \
        --iterations=200 --warmup=10 --token_layers=0 \
        ${PROFILE_FLAGS:-} > "$OUT/perf_run.txt" 2>&1
      echo "profile rc=$?"
      sed -n '/^|/p' "$OUT/perf_run.txt"
      # Inclusive time per function (where a step's time goes), then self.
      LD_LIBRARY_PATH=.:perf timeout 100 perf/perf report -i /tmp/perf.data \
        --children --sort symbol --stdio -g none --percent-limit 0.25 \
        2>/dev/null | cut -c1-200 > "$OUT/perf_children.txt"
      LD_LIBRARY_PATH=.:perf timeout 60 perf/perf report -i /tmp/perf.data \
        --no-children --sort dso,symbol --stdio -g none --percent-limit 0.3 \
        2>/dev/null | cut -c1-200 > "$OUT/perf_self.txt"
      head -60 "$OUT/perf_children.txt" ;;
    decode)
      timeout 240 ./kvmem_gpu_bench > "$OUT/decode.txt" 2>&1
      echo "decode rc=$?"
      sed -n '/^device:/,$p' "$OUT/decode.txt" ;;
  esac
done
