#include "service/grpc/step_stream.h"

#include "service/grpc/convert.h"
#include "service/grpc/kvmem_service.h"
#include "service/grpc/step_wire.h"

namespace kvmem {

StepStreamReactor::StepStreamReactor(grpc::CallbackServerContext* context,
                                     Engine* engine, WorkPool* pool,
                                     Admission* admission, Metrics* metrics,
                                     const std::atomic<bool>* accepting)
    : engine_(engine),
      pool_(pool),
      metrics_(metrics),
      admission_(admission),
      accepting_(accepting),
      tenant_(TenantOf(*context)) {
  if (!accepting_->load()) {
    Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "kvmem-server is shutting down"));
    return;
  }
  if (absl::Status st = ValidateTenant(tenant_); !st.ok()) {
    Finish(ToGrpcStatus(st));
    return;
  }
  StartRead(&in_);
}

void StepStreamReactor::SetError(uint64_t request_id,
                                 const absl::Status& status) {
  v1::StepStreamResponse error;
  error.set_request_id(request_id);
  error.set_error_code(int(status.code()));
  error.set_error_message(std::string(status.message()));
  bool own = false;
  out_.Clear();
  grpc::SerializationTraits<v1::StepStreamResponse>::Serialize(error, &out_,
                                                               &own)
      .IgnoreError();  // a message this small always serializes
}

void StepStreamReactor::OnReadDone(bool ok) {
  if (!ok) {  // the worker closed its side (or the stream broke)
    Finish(grpc::Status::OK);
    return;
  }
  received_ = absl::Now();
  if (absl::Status parsed = request_.Parse(in_); !parsed.ok()) {
    SetError(0, parsed);
    StartWrite(&out_);
    return;
  }
  admitted_bytes_ = request_.tensor_bytes();
  if (absl::Status admitted = admission_->Admit(admitted_bytes_);
      !admitted.ok()) {
    // Refused at once, on this thread: the reply is the error alone.
    SetError(request_.request_id(), admitted);
    RecordRefusedStep(metrics_, request_, admitted, received_);
    StartWrite(&out_);
    return;
  }
  if (!pool_->RunHereOrQueue([this] { Process(); })) {
    admission_->Release(admitted_bytes_);
    Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "kvmem-server is shutting down"));
  }
}

void StepStreamReactor::Process() {
  absl::Status status;
  if (!accepting_->load()) {
    status = absl::UnavailableError("kvmem-server is shutting down");
  } else {
    StepRequestView view;
    status = RunStep(engine_, tenant_, request_, received_, &view,
                     [&](std::vector<StepEntryResult> results) {
                       grpc::ByteBuffer reply = StepStreamResponseWire(
                           request_.request_id(), std::move(results), view);
                       out_.Swap(&reply);
                     });
    RecordStep(metrics_, view, status, received_);
  }
  admission_->Release(admitted_bytes_);
  if (!status.ok()) SetError(request_.request_id(), status);
  StartWrite(&out_);
}

void StepStreamReactor::OnWriteDone(bool ok) {
  if (!ok) {
    Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                        "the stream broke while a reply was written"));
    return;
  }
  StartRead(&in_);
}

}  // namespace kvmem
