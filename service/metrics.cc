#include "service/metrics.h"

#include "absl/strings/str_cat.h"

namespace kvmem {
namespace {

const char* ModeLabel(int mode) {
  switch (mode) {
    case 1:
      return "fetch";
    case 2:
      return "attend";
    case 3:
      return "append";
  }
  return "unknown";
}

void Gauge(std::string* out, const char* name, const char* help,
           int64_t value) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name,
                  " gauge\n", name, " ", value, "\n");
}

}  // namespace

void Metrics::RecordStep(StepMode mode, int64_t entries, int64_t tokens,
                         double seconds, absl::StatusCode code) {
  const int m = int(mode) >= 1 && int(mode) < kModes ? int(mode) : 0;
  const int c = int(code) >= 0 && int(code) < kCodes ? int(code) : 2;
  requests_[m].fetch_add(1, std::memory_order_relaxed);
  codes_[c].fetch_add(1, std::memory_order_relaxed);
  if (code == absl::StatusCode::kOk) {
    entries_[m].fetch_add(entries, std::memory_order_relaxed);
    tokens_[m].fetch_add(tokens, std::memory_order_relaxed);
  }
  size_t bucket = 0;
  while (bucket < kLatencyBounds.size() && seconds > kLatencyBounds[bucket]) {
    ++bucket;
  }
  buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
  latency_sum_nanos_.fetch_add(int64_t(seconds * 1e9),
                               std::memory_order_relaxed);
}

std::string Metrics::Render(const Gauges& gauges) const {
  std::string out;
  auto counter_by_mode =
      [&](const char* name, const char* help,
          const std::array<std::atomic<int64_t>, kModes>& v) {
        absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name,
                        " counter\n");
        for (int m = 1; m < kModes; ++m) {
          absl::StrAppend(&out, name, "{mode=\"", ModeLabel(m), "\"} ",
                          v[m].load(std::memory_order_relaxed), "\n");
        }
      };
  counter_by_mode("kvmem_step_requests_total",
                  "Step requests (unary or stream messages), by mode.",
                  requests_);
  counter_by_mode("kvmem_step_entries_total",
                  "Session entries applied by successful steps, by mode.",
                  entries_);
  counter_by_mode("kvmem_step_tokens_total",
                  "Tokens appended by successful steps, by mode.", tokens_);
  absl::StrAppend(&out,
                  "# HELP kvmem_step_results_total Step requests by gRPC "
                  "status code.\n# TYPE kvmem_step_results_total counter\n");
  for (int c = 0; c < kCodes; ++c) {
    const int64_t n = codes_[c].load(std::memory_order_relaxed);
    if (n == 0 && c != 0) continue;
    absl::StrAppend(&out, "kvmem_step_results_total{code=\"",
                    absl::StatusCodeToString(absl::StatusCode(c)), "\"} ", n,
                    "\n");
  }
  absl::StrAppend(&out,
                  "# HELP kvmem_step_latency_seconds Step request latency, "
                  "receipt to reply.\n# TYPE kvmem_step_latency_seconds "
                  "histogram\n");
  int64_t cumulative = 0;
  for (size_t b = 0; b <= kLatencyBounds.size(); ++b) {
    cumulative += buckets_[b].load(std::memory_order_relaxed);
    absl::StrAppend(&out, "kvmem_step_latency_seconds_bucket{le=\"",
                    b < kLatencyBounds.size() ? absl::StrCat(kLatencyBounds[b])
                                              : std::string("+Inf"),
                    "\"} ", cumulative, "\n");
  }
  absl::StrAppend(
      &out, "kvmem_step_latency_seconds_sum ",
      double(latency_sum_nanos_.load(std::memory_order_relaxed)) * 1e-9,
      "\nkvmem_step_latency_seconds_count ", cumulative, "\n");
  Gauge(&out, "kvmem_sessions", "Sessions of every tenant.",
        gauges.engine.sessions);
  Gauge(&out, "kvmem_resident_bytes",
        "Bytes of keys and values resident in cascades.",
        gauges.engine.resident_bytes);
  Gauge(&out, "kvmem_spilled_bytes",
        "Bytes of keys and values spilled out of cascades.",
        gauges.engine.spilled_bytes);
  absl::StrAppend(&out,
                  "# HELP kvmem_step_phase_seconds_total Seconds Step requests "
                  "spent in each phase.\n"
                  "# TYPE kvmem_step_phase_seconds_total counter\n");
  for (int p = 0; p < int(StepPhase::kCount); ++p) {
    absl::StrAppend(&out, "kvmem_step_phase_seconds_total{phase=\"",
                    kStepPhaseNames[p], "\"} ",
                    double(gauges.engine.step_phase_nanos[p]) * 1e-9, "\n");
  }
  Gauge(&out, "kvmem_hibernations",
        "Idle sessions hibernated to make room since start.",
        gauges.engine.hibernations);
  Gauge(&out, "kvmem_spill_queue_bytes",
        "Bytes of spilled pages waiting for the storage writer.",
        gauges.spill_queue_bytes);
  Gauge(&out, "kvmem_queued_step_bytes",
        "Tensor bytes of step requests waiting or running.",
        gauges.queued_step_bytes);
  Gauge(&out, "kvmem_memory_bytes", "Host bytes of the sessions' live state.",
        gauges.engine.memory_bytes);
  Gauge(&out, "kvmem_memory_limit_bytes", "The engine's memory limit.",
        gauges.engine.memory_limit_bytes);
  Gauge(&out, "kvmem_device_side_bytes",
        "CUDA backend: device bytes beside the pool (device-owned layers' "
        "state, staging, scratch).",
        gauges.engine.device_side_bytes);
  Gauge(&out, "kvmem_rocksdb_bytes_written",
        "Bytes RocksDB wrote since the server started (WAL and memtables).",
        gauges.storage_bytes_written);
  Gauge(&out, "kvmem_rocksdb_stall_micros",
        "Microseconds RocksDB held writes back (write stall), total.",
        gauges.storage_stall_micros);
  Gauge(&out, "kvmem_rocksdb_write_stopped",
        "1 while RocksDB stops writes (too many L0 files or memtables).",
        gauges.storage_write_stopped);
  Gauge(&out, "kvmem_rocksdb_delayed_write_rate",
        "Bytes/s RocksDB lets through while it delays writes.",
        gauges.storage_delayed_write_rate);
  Gauge(&out, "kvmem_storage_bytes",
        "RocksDB live SST files and memtables, bytes.", gauges.storage_bytes);
  return out;
}

}  // namespace kvmem
