// A running kvmem server: storage, engine and the gRPC service, started by
// StartServer() (used by main.cc and by the integration tests).
#ifndef KVMEM_SERVICE_SERVER_H_
#define KVMEM_SERVICE_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace kvmem {

struct ServerOptions {
  // host:port to serve on; port 0 picks a free one (see Server::port()).
  std::string listen = "127.0.0.1:50051";
  // RocksDB directory; created if missing.
  std::string data_dir = "./kvmem-data";
  // "auto" (CUDA where a device is present, else CPU), "cpu" or "cuda".
  std::string backend = "auto";
  // CUDA backend: bytes of the device pool holding resident keys and
  // values; 0 = 80% of the device's free memory at start.
  int64_t device_memory_bytes = 0;
  // CUDA backend: decode steps without spilled pages replay a captured
  // CUDA graph (DeviceBackend::Options::decode_graphs).
  bool cuda_graphs = true;
  // CUDA backend: spilled tokens a recalling stream keeps on the device
  // (DeviceBackend::Options::spill_ring_tokens). Off until a GPU run has
  // checked and measured it.
  int device_spill_ring_tokens = 0;
  // Threads that run handlers which may block on storage. 1..1024.
  int handler_threads = 8;
  // Steps that may run at once on the gRPC thread that received them,
  // without the hand-off to a handler thread (WorkPool::RunHereOrQueue);
  // the rest queue for the handler threads. −1: the default, a quarter of
  // the cores (at least 1: half of gRPC's callback threads); 0: none.
  // −1..1024.
  int inline_steps = -1;
  // Largest request or response message, bytes. 1 KiB..2 GiB-1.
  int max_message_bytes = 256 << 20;
  // Step requests (and their tensor bytes) waiting or running at once;
  // past either, a step is RESOURCE_EXHAUSTED at once. ≥ 1.
  int64_t max_queued_requests = 1024;
  int64_t max_queued_bytes = int64_t{1} << 30;
  // ASYNC sessions: how often the write-ahead log is synced, ms. ≥ 1.
  int wal_sync_ms = 100;
  // Host bytes of the sessions' live state; 0 = 60% of physical memory.
  int64_t memory_limit_bytes = 0;
  // A session whose step log has grown past this many bytes since its last
  // checkpoint checkpoints at the end of the step. ≥ 1 MiB.
  int64_t max_log_bytes = int64_t{256} << 20;
  // How long the step worker threads spin before sleeping, µs; −1: the
  // default, none. 0..100000.
  int step_spin_us = -1;
  // host:port serving Prometheus text on GET /metrics; empty = off.
  std::string metrics_listen;

  // INVALID_ARGUMENT naming the field when out of range.
  absl::Status Validate() const;
};

// Thread-safe.
class Server {
 public:
  virtual ~Server() = default;
  // The port actually bound (the chosen one when `listen` ends in `:0`).
  virtual int port() const = 0;
  // The metrics endpoint's port, 0 when it is off.
  virtual int metrics_port() const = 0;
  // "host:port" with the real port.
  virtual std::string address() const = 0;
  // "cpu" or "cuda", and the device it runs on.
  virtual std::string backend() const = 0;
  virtual std::string device() const = 0;
  // Health goes NOT_SERVING, new calls get UNAVAILABLE, calls in flight
  // finish (those still running at `deadline` are cancelled), then storage
  // is closed. Idempotent.
  virtual void Shutdown(absl::Duration deadline) = 0;
  // Blocks until Shutdown has finished.
  virtual void Wait() = 0;
};

// Opens storage in `options.data_dir`, loads the sessions there, and serves.
// INVALID_ARGUMENT: bad options. UNAVAILABLE: the address cannot be bound,
// or the data directory cannot be opened (e.g. another server holds it).
// FAILED_PRECONDITION: `backend` names a backend this machine cannot run.
absl::StatusOr<std::unique_ptr<Server>> StartServer(
    const ServerOptions& options);

// Process-wide settings of a serving process: main.cc calls it before
// StartServer, and so do the benchmarks that serve in-process (so that they
// measure what the binary runs).
// - Abseil's mutex deadlock detection off. Debian builds Abseil without
//   NDEBUG, so every absl::Mutex lock — gRPC's, a few per call — otherwise
//   records its lock order in a global graph under a global lock: 95
//   against 30 ns for a nested lock pair on the development VM, and
//   contended across threads. kvmem's own locks (base/mutex.h) are checked
//   at compile time instead.
// - glibc's malloc keeps up to kServingTrimThreshold of free memory at the
//   top of each arena instead of returning it at once (128 KiB by
//   default), and maps only blocks from kServingMmapThreshold on. A step
//   allocates and frees its requests', logs' and replies' buffers (~1 MB
//   at batch 32); returned at each step's end, their pages were faulted
//   in afresh by the next: writing a 12 KB step log record took 10–11 µs
//   instead of 0.3 µs on the development VM, ~80 µs of a batch-8 step.
//   The cost is that much more resident memory per malloc arena.
void ConfigureServingProcess();
inline constexpr int kServingTrimThreshold = 32 << 20;
inline constexpr int kServingMmapThreshold = 16 << 20;
inline constexpr int kServingTopPad = 4 << 20;

}  // namespace kvmem

#endif  // KVMEM_SERVICE_SERVER_H_
