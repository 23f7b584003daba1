#include "service/grpc/kvmem_service.h"

#include <map>

#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "service/grpc/convert.h"
#include "service/grpc/step_stream.h"
#include "service/grpc/step_wire.h"
#include "service/log.h"

namespace kvmem {

std::string TenantOf(const grpc::CallbackServerContext& context) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("kvmem-tenant");
  if (it == metadata.end()) return "default";
  return std::string(it->second.data(), it->second.size());
}

KvMemoryService::KvMemoryService(Engine* engine, WorkPool* pool,
                                 Admission* admission, Metrics* metrics,
                                 Identity identity)
    : engine_(engine),
      pool_(pool),
      metrics_(metrics),
      admission_(admission),
      identity_(std::move(identity)),
      started_(absl::Now()) {}

absl::Status RunStep(
    Engine* engine, const std::string& tenant, const WireStepRequest& request,
    absl::Time received, StepRequestView* view,
    const std::function<void(std::vector<StepEntryResult>)>& reply) {
  const absl::Time start = absl::Now();
  engine->AddStepPhaseNanos(StepPhase::kQueue,
                            absl::ToInt64Nanoseconds(start - received));
  KVMEM_RETURN_IF_ERROR(StepRequestFromWire(request, view));
  const absl::Duration viewing = absl::Now() - start;
  absl::StatusOr<std::vector<StepEntryResult>> results =
      engine->Step(tenant, *view);
  if (!results.ok()) return results.status();
  const absl::Time stepped = absl::Now();
  reply(*std::move(results));
  engine->AddStepPhaseNanos(
      StepPhase::kConvert,
      absl::ToInt64Nanoseconds(viewing + (absl::Now() - stepped)));
  return absl::OkStatus();
}

void RecordStep(Metrics* metrics, const StepRequestView& view,
                const absl::Status& status, absl::Time received) {
  if (!status.ok()) {
    LogEventThrottled(
        "step_rejected",
        {{"session", view.entries.empty() ? "" : view.entries[0].session_id},
         {"entries", absl::StrCat(view.entries.size())},
         {"layer", absl::StrCat(view.layer)},
         {"code", absl::StatusCodeToString(status.code())},
         {"message", std::string(status.message())}});
  }
  int64_t tokens = 0;
  for (const StepEntryView& e : view.entries) tokens += e.num_tokens;
  metrics->RecordStep(view.mode, int64_t(view.entries.size()), tokens,
                      absl::ToDoubleSeconds(absl::Now() - received),
                      status.code());
}

void RecordRefusedStep(Metrics* metrics, const WireStepRequest& request,
                       const absl::Status& status, absl::Time received) {
  StepRequestView view;
  StepRequestFromWire(request, &view).IgnoreError();  // what it can tell
  RecordStep(metrics, view, status, received);
}

template <typename Handler>
grpc::ServerUnaryReactor* KvMemoryService::Serve(
    grpc::CallbackServerContext* context, Handler handler, bool may_run_here) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (!accepting_.load()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 "kvmem-server is shutting down"));
    return reactor;
  }
  std::string tenant = TenantOf(*context);
  if (absl::Status st = ValidateTenant(tenant); !st.ok()) {
    reactor->Finish(ToGrpcStatus(st));
    return reactor;
  }
  std::function<void()> task = [reactor, context, tenant = std::move(tenant),
                                handler = std::move(handler)]() mutable {
    // A call whose deadline passed while it queued is refused whole: nothing
    // is applied, and the caller learns which.
    if (context->deadline() < std::chrono::system_clock::now()) {
      reactor->Finish(grpc::Status(
          grpc::StatusCode::DEADLINE_EXCEEDED,
          "the deadline passed before the call ran; nothing was applied"));
      return;
    }
    if (context->IsCancelled()) {
      reactor->Finish(grpc::Status(
          grpc::StatusCode::CANCELLED,
          "the call was cancelled before it ran; nothing was applied"));
      return;
    }
    reactor->Finish(ToGrpcStatus(handler(tenant)));
  };
  const bool queued = may_run_here ? pool_->RunHereOrQueue(std::move(task))
                                   : pool_->Run(std::move(task));
  if (!queued) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 "kvmem-server is shutting down"));
  }
  return reactor;
}

grpc::ServerUnaryReactor* KvMemoryService::CreateSession(
    grpc::CallbackServerContext* context,
    const v1::CreateSessionRequest* request, v1::Session* response) {
  return Serve(context, [this, request, response](const std::string& tenant) {
    SessionConfig config;
    absl::Status st = SessionConfigFromProto(*request, tenant, &config);
    if (!st.ok()) return st;
    absl::StatusOr<SessionInfo> info =
        engine_->CreateSession(std::move(config));
    if (!info.ok()) return info.status();
    LogEvent(
        "session_created",
        {{"tenant", tenant}, {"session", info->manifest.config.session_id}});
    SessionToProto(*info, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvMemoryService::GetSession(
    grpc::CallbackServerContext* context, const v1::GetSessionRequest* request,
    v1::Session* response) {
  return Serve(context, [this, request, response](const std::string& tenant) {
    absl::StatusOr<SessionInfo> info =
        engine_->GetSession(tenant, request->session_id());
    if (!info.ok()) return info.status();
    SessionToProto(*info, response);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvMemoryService::ListSessions(
    grpc::CallbackServerContext* context,
    const v1::ListSessionsRequest* request,
    v1::ListSessionsResponse* response) {
  return Serve(context, [this, request, response](const std::string& tenant) {
    std::map<std::string, std::string> filter(request->label_filter().begin(),
                                              request->label_filter().end());
    absl::StatusOr<SessionRegistry::ListPage> page = engine_->ListSessions(
        tenant, request->page_size(), request->page_token(), filter);
    if (!page.ok()) return page.status();
    for (const SessionInfo& info : page->sessions) {
      SessionToProto(info, response->add_sessions());
    }
    response->set_next_page_token(page->next_page_token);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvMemoryService::DeleteSession(
    grpc::CallbackServerContext* context,
    const v1::DeleteSessionRequest* request, v1::DeleteSessionResponse*) {
  return Serve(context, [this, request](const std::string& tenant) {
    absl::Status st = engine_->DeleteSession(tenant, request->session_id());
    if (st.ok()) {
      LogEvent("session_deleted",
               {{"tenant", tenant}, {"session", request->session_id()}});
    }
    return st;
  });
}

grpc::ServerUnaryReactor* KvMemoryService::Step(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw,
    grpc::ByteBuffer* response) {
  const absl::Time received = absl::Now();
  // Read in place here, on gRPC's thread, as a typed method's request
  // would be parsed (step_wire.h).
  auto request = std::make_shared<WireStepRequest>();
  if (absl::Status parsed = request->Parse(*raw); !parsed.ok()) {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(parsed));
    return reactor;
  }
  const int64_t bytes = request->tensor_bytes();
  if (absl::Status admitted = admission_->Admit(bytes); !admitted.ok()) {
    RecordRefusedStep(metrics_, *request, admitted, received);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(admitted));
    return reactor;
  }
  // Shared by the handler's copies; released when the last one goes.
  auto ticket = std::make_shared<AdmissionTicket>(admission_, bytes);
  return Serve(
      context,
      [this, request, response, received, ticket](const std::string& tenant) {
        StepRequestView view;
        absl::Status st =
            RunStep(engine_, tenant, *request, received, &view,
                    [&](std::vector<StepEntryResult> results) {
                      grpc::ByteBuffer reply = StepResponseWire(
                          request->request_id(), std::move(results), view);
                      response->Swap(&reply);
                    });
        RecordStep(metrics_, view, st, received);
        return st;
      },
      /*may_run_here=*/true);
}

grpc::ServerUnaryReactor* KvMemoryService::Checkpoint(
    grpc::CallbackServerContext* context, const v1::CheckpointRequest* request,
    v1::CheckpointResponse* response) {
  return Serve(context, [this, request, response](const std::string& tenant) {
    if (!request->session_id().empty()) {
      absl::Status st = ValidateSessionId(request->session_id(), "session_id");
      if (!st.ok()) return st;
    }
    absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> durable =
        engine_->Checkpoint(tenant, request->session_id());
    if (!durable.ok()) return durable.status();
    for (const auto& [id, position] : *durable) {
      v1::CheckpointResponse::Durable* d = response->add_sessions();
      d->set_session_id(id);
      d->set_durable_position(position);
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvMemoryService::GetStats(
    grpc::CallbackServerContext* context, const v1::GetStatsRequest*,
    v1::GetStatsResponse* response) {
  return Serve(context, [this, response](const std::string&) {
    response->set_version(identity_.version);
    response->set_backend(identity_.backend);
    response->set_device(identity_.device);
    response->set_uptime_seconds(absl::ToInt64Seconds(absl::Now() - started_));
    EngineStats stats = engine_->Stats();
    response->set_sessions(stats.sessions);
    response->set_steps(stats.steps);
    response->set_tokens_appended(stats.tokens_appended);
    response->set_resident_bytes(stats.resident_bytes);
    response->set_spilled_bytes(stats.spilled_bytes);
    response->set_spill_queue_bytes(stats.spill_queue_bytes);
    response->set_hibernations(stats.hibernations);
    response->set_device_pool_bytes(stats.device_pool_bytes);
    response->set_device_pool_used_bytes(stats.device_pool_used_bytes);
    response->set_device_side_bytes(stats.device_side_bytes);
    response->set_device_fallbacks(stats.device_fallbacks);
    response->set_device_policy_steps(stats.device_policy_steps);
    response->set_device_attend_steps(stats.device_attend_steps);
    for (int p = 0; p < int(StepPhase::kCount); ++p) {
      (*response->mutable_step_phase_seconds())[kStepPhaseNames[p]] =
          double(stats.step_phase_nanos[p]) * 1e-9;
    }
    return absl::OkStatus();
  });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>*
KvMemoryService::StepStream(grpc::CallbackServerContext* context) {
  return new StepStreamReactor(context, engine_, pool_, admission_, metrics_,
                               &accepting_);
}

}  // namespace kvmem
