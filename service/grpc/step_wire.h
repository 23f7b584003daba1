// The Step reply on the wire without copying its tensors. Protobuf would
// serialize a StepResponse into fresh buffers, copying every output and
// every fetched K/V row once more; a FETCH reply at batch 1 is 8 MB of
// them. StepResponseWire writes the same bytes as protobuf's serializer
// (proto3, fields in number order, packed repeated integers) as a
// ByteBuffer whose large fields are slices over the results' own strings,
// kept alive until gRPC has sent them; only tags, lengths and small fields
// are written anew. KvMemoryService answers Step and StepStream with it.
#ifndef KVMEM_SERVICE_GRPC_STEP_WIRE_H_
#define KVMEM_SERVICE_GRPC_STEP_WIRE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/support/byte_buffer.h"
#include "kvmem/v1/kvmem.pb.h"
#include "service/engine/step_types.h"

namespace kvmem {

// The request side: `wire` parsed into *request (cleared first); `wire`
// is consumed. INVALID_ARGUMENT when the bytes are no StepRequest.
absl::Status StepRequestFromWire(grpc::ByteBuffer* wire,
                                 v1::StepRequest* request);

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
