// Server-wide counters and the step latency histogram, rendered in the
// Prometheus text format (version 0.0.4) for `/metrics`. Recording is a few
// relaxed atomic adds, cheap enough for every step. Thread-safe.
#ifndef KVMEM_SERVICE_METRICS_H_
#define KVMEM_SERVICE_METRICS_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "service/engine/engine.h"

namespace kvmem {

class Metrics {
 public:
  // Upper bounds of the latency buckets, seconds (then +Inf).
  static constexpr std::array<double, 16> kLatencyBounds = {
      25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3,   2.5e-3, 5e-3,
      10e-3, 25e-3, 50e-3,  100e-3, 250e-3, 500e-3, 1.0,    5.0};

  // One request of `entries` entries and `tokens` tokens in `mode` took
  // `seconds` (receipt to reply) and ended with `code`.
  void RecordStep(StepMode mode, int64_t entries, int64_t tokens,
                  double seconds, absl::StatusCode code);

  // Gauges that are read when scraped rather than counted.
  struct Gauges {
    EngineStats engine;
    int64_t spill_queue_bytes = 0;
    int64_t queued_step_bytes = 0;
    int64_t storage_bytes_written = 0;
    int64_t storage_stall_micros = 0;
    int64_t storage_write_stopped = 0;
    int64_t storage_delayed_write_rate = 0;
    int64_t storage_bytes = 0;
  };
  // The Prometheus exposition of every metric.
  std::string Render(const Gauges& gauges) const;

 private:
  static constexpr int kModes = 4;   // index = StepMode value (0 unused)
  static constexpr int kCodes = 17;  // gRPC status codes 0..16
  std::array<std::atomic<int64_t>, kModes> requests_{};
  std::array<std::atomic<int64_t>, kModes> entries_{};
  std::array<std::atomic<int64_t>, kModes> tokens_{};
  std::array<std::atomic<int64_t>, kCodes> codes_{};
  std::array<std::atomic<int64_t>, kLatencyBounds.size() + 1> buckets_{};
  std::atomic<int64_t> latency_sum_nanos_{0};
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_METRICS_H_
