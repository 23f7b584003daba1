// kvmem::StepStream: one bidirectional StepStream call, the transport of a
// worker's decode loop. Made by Client::OpenStepStream (kvmem_client.h).
//
//   std::unique_ptr<kvmem::StepStream> stream = client->OpenStepStream();
//   for (int layer = 0; layer < layers; ++layer) {
//     absl::StatusOr<kvmem::StepReply> reply = session->Step(
//         layer, kvmem::v1::STEP_MODE_ATTEND, q, k, v, 1, stream.get());
//     if (!reply.ok() && !stream->is_open()) ...  // the stream ended
//   }
//   absl::Status final_status = stream->Close();
#ifndef KVMEM_CLIENT_CPP_STEP_STREAM_H_
#define KVMEM_CLIENT_CPP_STEP_STREAM_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/cpp/step_reply.h"
#include "kvmem/v1/kvmem.pb.h"

namespace kvmem {

namespace client_internal {
struct Connection;
}  // namespace client_internal

// Requests go out in order and replies come back in the same order. A
// rejected request is answered with its own status and the stream goes on;
// only a broken stream (server shut down, deadline, network) ends it, and
// then every call returns the stream's final status. Keep the requests in
// flight few: the server answers one at a time, and a sender that never
// receives is stalled by flow control.
//
// Not thread-safe: use it from one thread at a time (one stream per worker
// thread; the server serves many streams at once). Borrows the Client that
// opened it, which must outlive it.
class StepStream {
 public:
  // Cancels the call if Close() was not called; replies not received are
  // dropped (their steps may still have been applied, each wholly).
  ~StepStream();
  StepStream(const StepStream&) = delete;
  StepStream& operator=(const StepStream&) = delete;

  // Sends one layer of a batch of sessions (as Client::Step) and returns
  // its request id (1, 2, ... on this stream); its reply comes from a later
  // Receive. The tensors are copied once, into a request message the
  // stream reuses. If the stream has ended, returns its final status (e.g.
  // UNAVAILABLE) and is_open() is false.
  absl::StatusOr<uint64_t> Send(int layer, v1::StepMode mode,
                                absl::Span<const StepEntryView> entries);
  // Waits for the reply to the oldest request not yet received. A rejected
  // request gives the server's code and message (INVALID_ARGUMENT naming
  // `entries[i].field`, NOT_FOUND, FAILED_PRECONDITION naming the expected
  // position, RESOURCE_EXHAUSTED, ...; see Client::Step), applied nothing,
  // and leaves the stream open. FAILED_PRECONDITION (stream still open)
  // when no request is in flight. If the stream has ended: its final
  // status, with is_open() false.
  absl::StatusOr<StepReply> Receive();
  // Send, then Receive its reply. FAILED_PRECONDITION (nothing sent) when
  // other requests are in flight, whose replies would come first.
  absl::StatusOr<StepReply> Step(int layer, v1::StepMode mode,
                                 absl::Span<const StepEntryView> entries);

  // Requests sent and not yet received.
  int64_t in_flight() const { return static_cast<int64_t>(sent_ - received_); }
  // False once the stream has ended (broken, or closed).
  bool is_open() const { return open_; }

  // Half-closes the stream, drops replies not yet received, and waits for
  // the server to end it. Returns the stream's final status: OK when it
  // ended cleanly, else its error (also after an earlier break).
  // Idempotent.
  absl::Status Close();

 private:
  friend class Client;
  struct Call;
  // `connection` (the Client's) must outlive the stream.
  StepStream(const client_internal::Connection* connection,
             absl::Duration deadline);

  // Reads what is left, finishes the call and records its final status;
  // `expected_end` when the client closed its side. Returns the status.
  absl::Status End(bool expected_end);

  std::unique_ptr<Call> call_;
  bool open_ = true;
  absl::Status final_status_;  // once !open_
  uint64_t sent_ = 0;          // request ids are 1..sent_
  uint64_t received_ = 0;      // replies taken by Receive
};

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CPP_STEP_STREAM_H_
