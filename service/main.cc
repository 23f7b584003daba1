// kvmem-server: serves kvmem.v1.KvMemory, gRPC health and reflection.
// Flags become ServerOptions here and nowhere else.
#include <csignal>
#include <cstdio>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "service/log.h"
#include "service/server.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "host:port to serve gRPC on; a port of 0 picks a free one, and the "
          "start line says which");
ABSL_FLAG(std::string, data_dir, "./kvmem-data",
          "RocksDB directory holding sessions, spilled pages and checkpoints; "
          "created if missing; one server per directory");
ABSL_FLAG(std::string, backend, "auto",
          "auto: CUDA where a device is present, else CPU; cpu; cuda");
ABSL_FLAG(int64_t, device_memory, 0,
          "CUDA backend: bytes of the device pool for resident keys and "
          "values; 0 = 80% of the device's free memory at start");
ABSL_FLAG(bool, cuda_graphs, true,
          "CUDA backend: replay a decode step's launches as a CUDA graph "
          "(captured at the second step of each batch shape); false: plain "
          "launches every step");
ABSL_FLAG(int, device_spill_ring_tokens, 0,
          "CUDA backend: rows of each recalling stream's last spilled "
          "tokens kept on the device (rounded down to the page; 0: none), "
          "so that steps taking those pages need no host round trip. "
          "Experimental: not yet run on a GPU (try 1024)");
ABSL_FLAG(int, handler_threads, 8,
          "threads running handlers that may block on storage (1..1024)");
ABSL_FLAG(int, inline_steps, -1,
          "steps that may run at once on the gRPC thread that received "
          "them, skipping the hand-off to a handler thread; -1: the "
          "default, a quarter of the cores (at least 1); 0: none");
ABSL_FLAG(int, max_message_bytes, 256 << 20,
          "largest gRPC request or response, bytes; larger ones are "
          "RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, max_queued_requests, 1024,
          "step requests waiting or running at once; more are "
          "RESOURCE_EXHAUSTED at once");
ABSL_FLAG(int64_t, max_queued_bytes, int64_t{1} << 30,
          "tensor bytes of step requests waiting or running at once; more "
          "are RESOURCE_EXHAUSTED at once");
ABSL_FLAG(int64_t, memory_limit_bytes, 0,
          "host bytes the sessions' live state may hold; steps past it are "
          "RESOURCE_EXHAUSTED; 0 = 60% of physical memory");
ABSL_FLAG(int64_t, max_log_bytes, int64_t{256} << 20,
          "a session checkpoints when its step log has grown past this "
          "many bytes since its last checkpoint (bounds recovery's replay; "
          "each checkpoint writes the session's whole state)");
ABSL_FLAG(int, step_spin_us, -1,
          "how long idle step worker threads spin before sleeping, µs "
          "(a wake-up costs 10-50 µs on virtual machines); -1: the "
          "default, none");
ABSL_FLAG(int, wal_sync_ms, 100,
          "ASYNC sessions: how often the write-ahead log is synced, which "
          "advances their durable_position (ms)");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port serving Prometheus text metrics on GET /metrics (e.g. "
          "127.0.0.1:9464); empty turns the endpoint off");
ABSL_FLAG(int, shutdown_grace_ms, 5000,
          "on SIGTERM/SIGINT, how long calls in flight may take to finish");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvmem-server: the KV memory tier for LLM inference workers.\n"
      "Serves kvmem.v1.KvMemory (see proto/kvmem/v1/kvmem.proto), the gRPC\n"
      "health service and server reflection. Stops gracefully on SIGTERM or\n"
      "SIGINT.");
  absl::ParseCommandLine(argc, argv);
  kvmem::ConfigureServingProcess();

  // Block the stop signals in every thread (gRPC's included, which inherit
  // this mask); one thread below waits for them synchronously.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  kvmem::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.data_dir = absl::GetFlag(FLAGS_data_dir);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.device_memory_bytes = absl::GetFlag(FLAGS_device_memory);
  options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  options.device_spill_ring_tokens =
      absl::GetFlag(FLAGS_device_spill_ring_tokens);
  options.handler_threads = absl::GetFlag(FLAGS_handler_threads);
  options.inline_steps = absl::GetFlag(FLAGS_inline_steps);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  options.max_queued_bytes = absl::GetFlag(FLAGS_max_queued_bytes);
  options.memory_limit_bytes = absl::GetFlag(FLAGS_memory_limit_bytes);
  options.max_log_bytes = absl::GetFlag(FLAGS_max_log_bytes);
  options.step_spin_us = absl::GetFlag(FLAGS_step_spin_us);
  options.wal_sync_ms = absl::GetFlag(FLAGS_wal_sync_ms);
  absl::StatusOr<std::unique_ptr<kvmem::Server>> server =
      kvmem::StartServer(options);
  if (!server.ok()) {
    std::fprintf(stderr, "kvmem-server: %s\n",
                 server.status().ToString().c_str());
    return 1;
  }
  std::printf("kvmem-server listening on %s (backend=%s on %s, data_dir=%s)\n",
              (*server)->address().c_str(), (*server)->backend().c_str(),
              (*server)->device().c_str(), options.data_dir.c_str());
  if ((*server)->metrics_port() != 0) {
    std::printf(
        "kvmem-server metrics on http://%s:%d/metrics\n",
        options.metrics_listen.substr(0, options.metrics_listen.rfind(':'))
            .c_str(),
        (*server)->metrics_port());
  }
  std::fflush(stdout);

  kvmem::Server* running = server->get();
  const int grace_ms = absl::GetFlag(FLAGS_shutdown_grace_ms);
  std::thread waiter([&stop_signals, running, grace_ms] {
    int signal = 0;
    sigwait(&stop_signals, &signal);
    std::printf("kvmem-server: signal %d, shutting down\n", signal);
    std::fflush(stdout);
    kvmem::LogEvent("shutdown", {{"signal", std::to_string(signal)}});
    running->Shutdown(absl::Milliseconds(grace_ms));
  });
  running->Wait();
  waiter.join();
  std::printf("kvmem-server: stopped\n");
  return 0;
}
