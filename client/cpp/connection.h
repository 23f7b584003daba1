// Internal to kvmem_client (not a public header): the channel that a Client
// and its Sessions and StepStreams share, and the translations between the
// client's types and the wire.
#ifndef KVMEM_CLIENT_CPP_CONNECTION_H_
#define KVMEM_CLIENT_CPP_CONNECTION_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/cpp/kvmem_client.h"
#include "client/cpp/step_reply.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "kvmem/v1/kvmem.grpc.pb.h"

namespace kvmem {
namespace client_internal {

// Owned by the Client; borrowed by its Sessions and StepStreams.
// Thread-safe (gRPC channels and stubs are).
struct Connection {
  ClientOptions options;
  std::shared_ptr<grpc::Channel> channel;  // shared with the stub
  std::unique_ptr<v1::KvMemory::Stub> stub;

  // A context carrying the tenant and a deadline `deadline` from now
  // (none when infinite).
  std::unique_ptr<grpc::ClientContext> NewContext(
      absl::Duration deadline) const;
};

// The same code (gRPC's and Abseil's numberings are equal) and message.
absl::Status FromGrpc(const grpc::Status& status);
// A code received as a number (StepStreamResponse.error_code); numbers
// outside Abseil's codes become UNKNOWN, keeping the number in the message.
absl::Status FromCode(int code, const std::string& message);

// Overwrites `request` with one step, reusing its entries and their buffers
// (Clear keeps them): the tensors are copied once, here.
void FillStepRequest(int layer, v1::StepMode mode,
                     absl::Span<const StepEntryView> entries,
                     uint64_t request_id, v1::StepRequest* request);

}  // namespace client_internal

// Makes StepReplies (their constructor is private to the library).
class StepReplyMaker {
 public:
  // `response` lives on `arena`.
  static StepReply Make(std::unique_ptr<google::protobuf::Arena> arena,
                        const v1::StepResponse* response);
};

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CPP_CONNECTION_H_
