#include "service/server.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/mutex.h"
#include "base/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"
#include "kernels/cuda/device_probe.h"
#include "service/engine/device_backend.h"
#include "service/engine/engine.h"
#include "service/grpc/kvmem_service.h"
#include "service/log.h"
#include "service/metrics.h"
#include "service/metrics_http.h"
#include "storage/store.h"

namespace kvmem {
namespace {

constexpr char kVersion[] = "0.1.0";
constexpr char kServiceName[] = "kvmem.v1.KvMemory";

std::string HostName() {
  char name[256] = {0};
  if (gethostname(name, sizeof(name) - 1) != 0) return "host";
  return name;
}

class GrpcServer final : public Server {
 public:
  GrpcServer(std::unique_ptr<storage::Store> store,
             std::unique_ptr<Engine> engine, std::unique_ptr<WorkPool> pool,
             std::unique_ptr<Admission> admission,
             std::unique_ptr<Metrics> metrics,
             std::unique_ptr<KvMemoryService> service, std::string backend,
             std::string device)
      : store_(std::move(store)),
        engine_(std::move(engine)),
        pool_(std::move(pool)),
        admission_(std::move(admission)),
        metrics_(std::move(metrics)),
        service_(std::move(service)),
        backend_(std::move(backend)),
        device_(std::move(device)) {}

  ~GrpcServer() override { Shutdown(absl::Seconds(5)); }

  absl::Status Start(const ServerOptions& options) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    grpc::ServerBuilder builder;
    builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(),
                             &port_);
    builder.RegisterService(service_.get());
    builder.SetMaxReceiveMessageSize(options.max_message_bytes);
    builder.SetMaxSendMessageSize(options.max_message_bytes);
    // gRPC sets SO_REUSEPORT by default, which lets a second server bind the
    // same port and silently take half the connections. One port, one server.
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot serve on --listen=", options.listen,
                       " (address in use or malformed)"));
    }
    std::string host = options.listen.substr(0, options.listen.rfind(':'));
    address_ = absl::StrCat(host, ":", port_);
    grpc::HealthCheckServiceInterface* health =
        server_->GetHealthCheckService();
    health->SetServingStatus("", true);
    health->SetServingStatus(kServiceName, true);
    if (!options.metrics_listen.empty()) {
      KVMEM_ASSIGN_OR_RETURN(
          metrics_http_,
          MetricsHttpServer::Start(options.metrics_listen, [this] {
            Metrics::Gauges gauges;
            gauges.engine = engine_->Stats();
            storage::Store::StorageStats storage = store_->Stats();
            gauges.storage_bytes = int64_t(storage.live_bytes);
            gauges.storage_bytes_written = int64_t(storage.bytes_written);
            gauges.storage_stall_micros = int64_t(storage.stall_micros);
            gauges.storage_write_stopped = storage.write_stopped;
            gauges.storage_delayed_write_rate =
                int64_t(storage.delayed_write_rate);
            gauges.queued_step_bytes = admission_->queued_bytes();
            gauges.spill_queue_bytes = gauges.engine.spill_queue_bytes;
            return metrics_->Render(gauges);
          }));
    }
    return absl::OkStatus();
  }

  int port() const override { return port_; }
  int metrics_port() const override {
    return metrics_http_ ? metrics_http_->port() : 0;
  }
  std::string address() const override { return address_; }
  std::string backend() const override { return backend_; }
  std::string device() const override { return device_; }

  void Shutdown(absl::Duration deadline) override {
    {
      MutexLock lock(&mu_);
      if (shut_down_) return;
      shut_down_ = true;
    }
    metrics_http_.reset();  // its render reads the engine and storage
    if (server_ != nullptr) {
      server_->GetHealthCheckService()->SetServingStatus(false);
      service_->StopAccepting();
      server_->Shutdown(absl::ToChronoTime(absl::Now() + deadline));
      server_->Wait();
    }
    pool_.reset();  // runs what was queued, joins its threads
    // A graceful stop checkpoints every live session (DESIGN.md §
    // Persistence), so a restart needs no replay.
    absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> saved =
        engine_->Checkpoint("", "", /*all_tenants=*/true);
    if (!saved.ok()) {
      LogEvent("shutdown_checkpoint_failed",
               {{"error", std::string(saved.status().message())}});
    }
    engine_.reset();
    store_.reset();  // closes RocksDB
    MutexLock lock(&mu_);
    done_ = true;
    done_cv_.notify_all();
  }

  void Wait() override {
    std::unique_lock<Mutex> lock(mu_);
    done_cv_.wait(lock,
                  [this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { return done_; });
  }

 private:
  // Declared in dependency order: destroyed service first, storage last.
  std::unique_ptr<storage::Store> store_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<WorkPool> pool_;
  std::unique_ptr<Admission> admission_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<KvMemoryService> service_;
  std::unique_ptr<MetricsHttpServer> metrics_http_;
  std::unique_ptr<grpc::Server> server_;
  const std::string backend_;
  const std::string device_;
  int port_ = 0;
  std::string address_;
  Mutex mu_;
  std::condition_variable_any done_cv_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

// Which backend serves, and on what: the CUDA backend where asked for (or,
// with auto, where a device is present), its pool made now so that a
// device that cannot hold it fails the start (cuda) or leaves the CPU
// backend serving (auto), not a later step.
absl::Status ChooseBackend(const ServerOptions& options, std::string* backend,
                           std::string* device,
                           std::shared_ptr<DeviceBackend>* cuda_backend) {
  const std::string& flag = options.backend;
  if (flag != "auto" && flag != "cpu" && flag != "cuda") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--backend must be one of auto, cpu, cuda, got \"", flag, "\""));
  }
  cuda::DeviceProbe probe = cuda::ProbeDevices();
  if (flag == "cpu" || (flag == "auto" && probe.device_count == 0)) {
    *backend = "cpu";
    *device = HostName();
    return absl::OkStatus();
  }
  if (probe.device_count == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--backend=cuda: no CUDA device (", probe.why_none, ")"));
  }
  DeviceBackend::Options device_options;
  device_options.pool_bytes = size_t(options.device_memory_bytes);
  device_options.decode_graphs = options.cuda_graphs;
  device_options.spill_ring_tokens = options.device_spill_ring_tokens;
  absl::StatusOr<std::unique_ptr<DeviceBackend>> made =
      DeviceBackend::Create(device_options);
  if (!made.ok() && flag == "auto") {
    // A device that cannot hold the pool (busy, too small) leaves auto on
    // the CPU backend, which says why in the start line and GetStats.
    *backend = "cpu";
    *device = absl::StrCat(HostName(), " (CUDA device ", probe.device_name,
                           " unusable: ", made.status().message(), ")");
    return absl::OkStatus();
  }
  if (!made.ok()) {
    return absl::Status(
        made.status().code(),
        absl::StrCat("--backend=", flag, " on ", probe.device_name, ": ",
                     made.status().message()));
  }
  *cuda_backend = std::move(*made);
  *backend = "cuda";
  *device = probe.device_name;
  return absl::OkStatus();
}

}  // namespace

absl::Status ServerOptions::Validate() const {
  if (listen.empty() || !absl::StrContains(listen, ':')) {
    return absl::InvalidArgumentError(
        absl::StrCat("--listen must be host:port, got \"", listen, "\""));
  }
  if (data_dir.empty()) {
    return absl::InvalidArgumentError("--data_dir must not be empty");
  }
  if (handler_threads < 1 || handler_threads > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--handler_threads must be in [1, 1024], got ", handler_threads));
  }
  if (inline_steps < -1 || inline_steps > 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--inline_steps must be -1 (the default) or in [0, 1024], got ",
        inline_steps));
  }
  if (max_queued_requests < 1 || max_queued_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_queued_requests and --max_queued_bytes must be >= 1, got ",
        max_queued_requests, " and ", max_queued_bytes));
  }
  if (device_memory_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--device_memory must be >= 0, got ", device_memory_bytes));
  }
  if (device_spill_ring_tokens < 0 || device_spill_ring_tokens > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device_spill_ring_tokens must be in [0, 1048576], got ",
                     device_spill_ring_tokens));
  }
  if (memory_limit_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--memory_limit_bytes must be >= 0, got ", memory_limit_bytes));
  }
  if (step_spin_us < -1 || step_spin_us > 100000) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--step_spin_us must be -1 (the default) or in [0, 100000], got ",
        step_spin_us));
  }
  if (max_log_bytes < (int64_t{1} << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_log_bytes must be at least 1 MiB (1048576), got ",
                     max_log_bytes));
  }
  if (max_message_bytes < 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_message_bytes must be at least 1024, got ", max_message_bytes));
  }
  return absl::OkStatus();
}

void ConfigureServingProcess() {
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  mallopt(M_TRIM_THRESHOLD, kServingTrimThreshold);
  mallopt(M_MMAP_THRESHOLD, kServingMmapThreshold);
  mallopt(M_TOP_PAD, kServingTopPad);
}

absl::StatusOr<std::unique_ptr<Server>> StartServer(
    const ServerOptions& options) {
  KVMEM_RETURN_IF_ERROR(options.Validate());
  std::string backend, device;
  std::shared_ptr<DeviceBackend> cuda_backend;
  KVMEM_RETURN_IF_ERROR(
      ChooseBackend(options, &backend, &device, &cuda_backend));
  KVMEM_ASSIGN_OR_RETURN(
      std::unique_ptr<storage::Store> store,
      storage::Store::Open(storage::Store::Options(), options.data_dir));
  Engine::Options engine_options;
  engine_options.memory_limit_bytes = options.memory_limit_bytes;
  engine_options.wal_sync_ms = options.wal_sync_ms;
  engine_options.max_log_bytes = options.max_log_bytes;
  engine_options.step_spin_us = options.step_spin_us;
  engine_options.device = cuda_backend;
  KVMEM_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                         Engine::Open(engine_options, store.get()));
  // gRPC 1.51 runs callbacks on max(2, min(16, cores / 2)) threads; steps
  // take at most half of them by default.
  const int inline_steps =
      options.inline_steps >= 0
          ? options.inline_steps
          : std::max(
                1,
                std::min(16, int(std::thread::hardware_concurrency()) / 2) / 2);
  auto pool = std::make_unique<WorkPool>(options.handler_threads, inline_steps);
  auto metrics = std::make_unique<Metrics>();
  auto admission = std::make_unique<Admission>(options.max_queued_requests,
                                               options.max_queued_bytes);
  auto service = std::make_unique<KvMemoryService>(
      engine.get(), pool.get(), admission.get(), metrics.get(),
      KvMemoryService::Identity{kVersion, backend, device});
  auto server = std::make_unique<GrpcServer>(
      std::move(store), std::move(engine), std::move(pool),
      std::move(admission), std::move(metrics), std::move(service), backend,
      device);
  KVMEM_RETURN_IF_ERROR(server->Start(options));
  return std::unique_ptr<Server>(std::move(server));
}

}  // namespace kvmem
