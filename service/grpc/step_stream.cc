#include "service/grpc/step_stream.h"

#include "service/grpc/convert.h"
#include "service/grpc/kvmem_service.h"

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
  StartRead(&request_);
}

void StepStreamReactor::OnReadDone(bool ok) {
  if (!ok) {  // the worker closed its side (or the stream broke)
    Finish(grpc::Status::OK);
    return;
  }
  received_ = absl::Now();
  admitted_bytes_ = TensorBytes(request_);
  if (absl::Status admitted = admission_->Admit(admitted_bytes_);
      !admitted.ok()) {
    // Refused at once, on this thread: the reply is the error alone.
    response_.Clear();
    response_.set_request_id(request_.request_id());
    response_.set_error_code(int(admitted.code()));
    response_.set_error_message(std::string(admitted.message()));
    StepRequestView view;
    StepRequestFromProto(request_, &view).IgnoreError();  // for the metrics
    RecordStep(metrics_, view, admitted, received_);
    StartWrite(&response_);
    return;
  }
  if (!pool_->Run([this] { Process(); })) {
    admission_->Release(admitted_bytes_);
    Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        "kvmem-server is shutting down"));
  }
}

void StepStreamReactor::Process() {
  response_.Clear();
  response_.set_request_id(request_.request_id());
  absl::Status status;
  if (!accepting_->load()) {
    status = absl::UnavailableError("kvmem-server is shutting down");
  } else {
    StepRequestView view;
    status = RunStep(engine_, tenant_, request_, received_, &view,
                     [&](std::vector<StepEntryResult> results) {
                       v1::StepResponse* reply = response_.mutable_response();
                       StepResultsToProto(std::move(results), view, reply);
                       reply->set_request_id(request_.request_id());
                     });
    if (!status.ok()) response_.clear_response();
    RecordStep(metrics_, view, status, received_);
  }
  admission_->Release(admitted_bytes_);
  if (!status.ok()) {
    response_.set_error_code(int(status.code()));
    response_.set_error_message(std::string(status.message()));
  }
  StartWrite(&response_);
}

void StepStreamReactor::OnWriteDone(bool ok) {
  if (!ok) {
    Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                        "the stream broke while a reply was written"));
    return;
  }
  StartRead(&request_);
}

}  // namespace kvmem
