#include "client/cpp/connection.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace kvmem {
namespace client_internal {

std::unique_ptr<grpc::ClientContext> Connection::NewContext(
    absl::Duration deadline) const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (!options.tenant.empty()) {
    context->AddMetadata("kvmem-tenant", options.tenant);
  }
  if (deadline != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  }
  return context;
}

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return FromCode(int(status.error_code()), status.error_message());
}

absl::Status FromCode(int code, const std::string& message) {
  if (code == 0) return absl::OkStatus();
  if (code < 0 || code > int(absl::StatusCode::kUnauthenticated)) {
    return absl::UnknownError(
        absl::StrCat("status code ", code, ": ", message));
  }
  return absl::Status(static_cast<absl::StatusCode>(code), message);
}

void FillStepRequest(int layer, v1::StepMode mode,
                     absl::Span<const StepEntryView> entries,
                     uint64_t request_id, v1::StepRequest* request) {
  request->Clear();
  request->set_layer(layer);
  request->set_mode(mode);
  request->set_request_id(request_id);
  for (const StepEntryView& entry : entries) {
    v1::StepEntry* out = request->add_entries();
    out->set_session_id(entry.session_id.data(), entry.session_id.size());
    out->set_position(entry.position);
    out->set_num_tokens(entry.num_tokens);
    // Clear() kept the buffers, so these reuse their capacity.
    if (!entry.q.empty()) out->set_q(entry.q.data(), entry.q.size());
    if (!entry.k.empty()) out->set_k(entry.k.data(), entry.k.size());
    if (!entry.v.empty()) out->set_v(entry.v.data(), entry.v.size());
  }
}

}  // namespace client_internal
}  // namespace kvmem
