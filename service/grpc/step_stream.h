// The server side of StepStream: one worker's bidirectional stream. Requests
// are taken one at a time, in order: read, step (on this thread when the
// WorkPool has an inline slot free, else on the pool), write the reply,
// read the next. An error answers its request only (in
// StepStreamResponse.error_code) and the stream goes on.
//
// Exactly one of read, step or write is outstanding at any moment, so Finish
// is called once, from the callback of the operation that ends the stream;
// a cancelled stream's step in flight still applies wholly (the engine step
// is atomic) and its reply is dropped. Deletes itself in OnDone.
//
// A raw stream: each request is read in place into one reused
// WireStepRequest (bytes that are no StepRequest are answered
// INVALID_ARGUMENT, and the stream goes on), each reply written by
// StepStreamResponseWire (step_wire.h), which sends outputs and fetched
// K/V without copying them.
#ifndef KVMEM_SERVICE_GRPC_STEP_STREAM_H_
#define KVMEM_SERVICE_GRPC_STEP_STREAM_H_

#include <atomic>
#include <string>

#include "kvmem/v1/kvmem.grpc.pb.h"
#include "service/engine/engine.h"
#include "service/grpc/admission.h"
#include "service/grpc/step_wire.h"
#include "service/grpc/work_pool.h"
#include "service/metrics.h"

namespace kvmem {

class StepStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // `engine`, `pool` and `accepting` must outlive the stream (the server
  // waits for every stream before destroying them).
  StepStreamReactor(grpc::CallbackServerContext* context, Engine* engine,
                    WorkPool* pool, Admission* admission, Metrics* metrics,
                    const std::atomic<bool>* accepting);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override { delete this; }

 private:
  // One request to one reply (on the pool, or inline in OnReadDone).
  void Process();
  // out_ = StepStreamResponse{error_code, error_message, request_id}.
  void SetError(uint64_t request_id, const absl::Status& status);

  Engine* const engine_;                // not owned
  WorkPool* const pool_;                // not owned
  Metrics* const metrics_;              // not owned
  Admission* const admission_;          // not owned
  int64_t admitted_bytes_ = 0;          // of the request being processed
  const std::atomic<bool>* accepting_;  // not owned
  std::string tenant_;
  grpc::ByteBuffer in_, out_;  // the request read, the reply written
  WireStepRequest request_;    // in_ read in place, reused by every request
  absl::Time received_;        // of the request being processed
};

}  // namespace kvmem

#endif  // KVMEM_SERVICE_GRPC_STEP_STREAM_H_
