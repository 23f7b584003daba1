// The gRPC adapter of kvmem.v1.KvMemory: translate, validate, call the
// engine, translate back. No math, no policy, no RocksDB. Handlers that may
// block (storage writes) run on a WorkPool; steps may run on the callback
// thread that received them, a bounded few at once (work_pool.h says why).
//
// RPCs served here: CreateSession, GetSession, ListSessions, DeleteSession,
// Step, StepStream (service/grpc/step_stream.h), Checkpoint and GetStats.
// ExportSession and ImportSession answer gRPC's UNIMPLEMENTED (not built
// yet: moving sessions between servers is the cluster work's).
//
// Thread-safe.
#ifndef KVMEM_SERVICE_GRPC_KVMEM_SERVICE_H_
#define KVMEM_SERVICE_GRPC_KVMEM_SERVICE_H_

#include <atomic>
#include <functional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/engine/engine.h"
#include "service/grpc/admission.h"
#include "service/grpc/step_wire.h"
#include "service/grpc/work_pool.h"
#include "service/metrics.h"

namespace kvmem {

// The generated CallbackService with Step and StepStream raw: their
// requests are parsed here and their replies written by step_wire.h, which
// sends the tensors without copying them; the other methods are typed.
// Every method of the proto must be in the chain (one left out would be a
// synchronous method, which a callback server does not serve).
using KvMemoryCallbackBase = v1::KvMemory::WithCallbackMethod_CreateSession<
    v1::KvMemory::WithCallbackMethod_GetSession<
        v1::KvMemory::WithCallbackMethod_ListSessions<
            v1::KvMemory::WithCallbackMethod_DeleteSession<
                v1::KvMemory::WithRawCallbackMethod_Step<
                    v1::KvMemory::WithRawCallbackMethod_StepStream<
                        v1::KvMemory::WithCallbackMethod_Checkpoint<
                            v1::KvMemory::WithCallbackMethod_GetStats<
                                v1::KvMemory::WithCallbackMethod_ExportSession<
                                    v1::KvMemory::
                                        WithCallbackMethod_ImportSession<
                                            v1::KvMemory::Service>>>>>>>>>>;

class KvMemoryService final : public KvMemoryCallbackBase {
 public:
  struct Identity {
    std::string version;  // kvmem's version
    std::string backend;  // "cpu" or "cuda"
    std::string device;   // what the backend runs on
  };
  // `engine`, `pool`, `admission` and `metrics` must outlive the service.
  KvMemoryService(Engine* engine, WorkPool* pool, Admission* admission,
                  Metrics* metrics, Identity identity);

  // From now on every RPC answers UNAVAILABLE (shutdown has begun).
  void StopAccepting() { accepting_.store(false); }
  bool accepting() const { return accepting_.load(); }

  grpc::ServerUnaryReactor* CreateSession(
      grpc::CallbackServerContext* context,
      const v1::CreateSessionRequest* request, v1::Session* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const v1::GetSessionRequest* request,
                                       v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(
      grpc::CallbackServerContext* context,
      const v1::ListSessionsRequest* request,
      v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(
      grpc::CallbackServerContext* context,
      const v1::DeleteSessionRequest* request,
      v1::DeleteSessionResponse* response) override;
  grpc::ServerUnaryReactor* Step(grpc::CallbackServerContext* context,
                                 const grpc::ByteBuffer* request,
                                 grpc::ByteBuffer* response) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* StepStream(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* Checkpoint(
      grpc::CallbackServerContext* context,
      const v1::CheckpointRequest* request,
      v1::CheckpointResponse* response) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* context,
                                     const v1::GetStatsRequest* request,
                                     v1::GetStatsResponse* response) override;

 private:
  // Runs `handler` (which returns the call's status) on the pool, after the
  // tenant and shutdown checks, and finishes the call with its status.
  // `may_run_here`: on this thread when the pool has an inline slot free
  // (WorkPool::RunHereOrQueue; steps only).
  template <typename Handler>
  grpc::ServerUnaryReactor* Serve(grpc::CallbackServerContext* context,
                                  Handler handler, bool may_run_here = false);

  Engine* const engine_;        // not owned
  WorkPool* const pool_;        // not owned
  Metrics* const metrics_;      // not owned
  Admission* const admission_;  // not owned
  const Identity identity_;
  const absl::Time started_;
  std::atomic<bool> accepting_{true};
};

// A Step request's work on a worker thread: its views (left in *view for
// the metrics), Engine::Step, then `reply` with the results (writing the
// reply's message); the request's status. The wait since `received` and
// the conversions count as the Step phases kQueue and kConvert.
absl::Status RunStep(
    Engine* engine, const std::string& tenant, const WireStepRequest& request,
    absl::Time received, StepRequestView* view,
    const std::function<void(std::vector<StepEntryResult>)>& reply);

// Counts one step request of `view` that ended with `status`.
void RecordStep(Metrics* metrics, const StepRequestView& view,
                const absl::Status& status, absl::Time received);
// The same for a request refused before it ran (admission): its views
// are made here, for the metrics only.
void RecordRefusedStep(Metrics* metrics, const WireStepRequest& request,
                       const absl::Status& status, absl::Time received);

// The caller's tenant: metadata `kvmem-tenant`, or "default" when absent.
std::string TenantOf(const grpc::CallbackServerContext& context);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_KVMEM_SERVICE_H_
