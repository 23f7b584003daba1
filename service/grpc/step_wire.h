// The Step request and reply on the wire without copying their tensors.
// Requests are read in place (WireStepRequest). Protobuf would serialize a
// StepResponse into fresh buffers, copying every output and every fetched
// K/V row once more; a FETCH reply at batch 1 is 8 MB of them.
// StepResponseWire writes the same bytes as protobuf's serializer (proto3,
// fields in number order, packed repeated integers) as a ByteBuffer whose
// large fields are slices over the results' own strings, kept alive until
// gRPC has sent them; only tags, lengths and small fields are written
// anew. KvMemoryService reads and answers Step and StepStream with them.
#ifndef KVMEM_SERVICE_GRPC_STEP_WIRE_H_
#define KVMEM_SERVICE_GRPC_STEP_WIRE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/byte_buffer.h"
#include "kvmem/v1/kvmem.pb.h"
#include "service/engine/step_types.h"

namespace kvmem {

// One entry of a WireStepRequest: its strings are views into the
// request's bytes.
struct WireStepEntry {
  absl::string_view session_id;
  int64_t position = 0;
  int32_t num_tokens = 0;
  absl::string_view q, k, v;
};

// A StepRequest read in place: protobuf would copy every q, k and v into a
// string of its own (~400 KB at batch 32, a copy and an allocation each);
// here they are views into the received bytes — its one slice, or its
// slices gathered into one buffer (one copy, reused by the next request).
// Read as protobuf 3.21 reads a StepRequest: fields in any order, the last
// of a scalar or string winning, each `entries` a new entry, integers
// truncated to their field's width, unknown fields (and known ones of
// another wire type) skipped, groups included, strings checked as UTF-8;
// bytes protobuf refuses are refused. Tested against protobuf's parser on
// random requests and random corruptions of them.
class WireStepRequest {
 public:
  // Reads `wire` (which keeps its bytes; this keeps its own reference to
  // them until the next Parse). INVALID_ARGUMENT when the bytes are no
  // StepRequest; nothing of the previous request is kept then.
  absl::Status Parse(const grpc::ByteBuffer& wire);
  // The same from contiguous bytes, which must outlive the views.
  absl::Status Parse(absl::string_view bytes);

  uint64_t request_id() const { return request_id_; }
  int32_t layer() const { return layer_; }
  int32_t mode() const { return mode_; }  // as sent: proto3 enums are open
  const std::vector<WireStepEntry>& entries() const { return entries_; }
  // The q, k and v bytes of every entry: what admission counts.
  int64_t tensor_bytes() const;

 private:
  // The fields of an empty request (the bytes held stay).
  void ClearFields();

  std::vector<grpc::Slice> slices_;  // the bytes, when one slice
  std::string gathered_;             // the bytes, when several
  uint64_t request_id_ = 0;
  int32_t layer_ = 0;
  int32_t mode_ = 0;
  std::vector<WireStepEntry> entries_;
};

// The engine's views of `request` (which must outlive them), as
// StepRequestFromProto makes them of the typed message: INVALID_ARGUMENT
// for an unspecified or unknown mode.
absl::Status StepRequestFromWire(const WireStepRequest& request,
                                 StepRequestView* view);

// StepResponse{request_id, results[i] for each entry of `request`} as
// StepResultsToProto would build it, serialized. Takes the results'
// strings over (no copy of any field of kMinSharedBytes or more).
grpc::ByteBuffer StepResponseWire(uint64_t request_id,
                                  std::vector<StepEntryResult> results,
                                  const StepRequestView& request);

// The same reply as StepStream sends it: StepStreamResponse{response:
// the StepResponse above, request_id}.
grpc::ByteBuffer StepStreamResponseWire(uint64_t request_id,
                                        std::vector<StepEntryResult> results,
                                        const StepRequestView& request);

// Fields shorter than this are copied into the reply's own buffer: a slice
// of its own costs more than the copy.
inline constexpr size_t kMinSharedBytes = 1024;

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_STEP_WIRE_H_
