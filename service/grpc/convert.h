// Translation between kvmem.v1 messages and the engine's types, and between
// absl and gRPC statuses. The only place both kinds of types meet.
// Thread-safe (pure functions).
#ifndef KVMEM_SERVICE_GRPC_CONVERT_H_
#define KVMEM_SERVICE_GRPC_CONVERT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "kvmem/v1/kvmem.pb.h"
#include "service/engine/session_registry.h"
#include "service/engine/step_types.h"

namespace kvmem {

// The engine's configuration for `request`, defaults filled in where a field
// is unset. Checks only what the engine's types cannot carry (an
// unspecified dtype); ValidateSessionConfig checks the rest.
absl::Status SessionConfigFromProto(const v1::CreateSessionRequest& request,
                                    const std::string& tenant,
                                    SessionConfig* config);

// `info` as the wire describes a session (policy with defaults filled in).
void SessionToProto(const SessionInfo& info, v1::Session* out);

// A StepRequest's mode field as the engine's; INVALID_ARGUMENT for an
// unspecified or unknown one.
absl::StatusOr<StepMode> StepModeFromWire(int mode);

// Views of `request`'s tensors (no copies); `request` must outlive `view`.
// INVALID_ARGUMENT for an unspecified or unknown mode. The server reads
// requests in place instead (step_wire.h's WireStepRequest); these views
// of the typed message are what that reading is tested against.
absl::Status StepRequestFromProto(const v1::StepRequest& request,
                                  StepRequestView* view);

// Moves `results` (one per entry, in order) into `out`. The server sends
// step_wire.h's encoding instead; this typed reply is what that encoding
// is tested (and benchmarked) against.
void StepResultsToProto(std::vector<StepEntryResult> results,
                        const StepRequestView& request, v1::StepResponse* out);

// absl codes are gRPC codes; the message is kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_CONVERT_H_
