// kvmem::Session: a handle to one session of a kvmem server, made by
// Client::CreateSession or Client::OpenSession (kvmem_client.h).
#ifndef KVMEM_CLIENT_CPP_SESSION_H_
#define KVMEM_CLIENT_CPP_SESSION_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "base/mutex.h"
#include "client/cpp/step_reply.h"
#include "kvmem/v1/kvmem.pb.h"

namespace kvmem {

class Client;
class StepStream;

// The session's id and shape, and the next position of each layer as this
// handle last saw it (positions advance per layer: layer l of token t is
// accepted after layer l of token t-1). Thread-safe, though steps of one
// layer must still go in order. Borrows the Client that made it, which must
// outlive it.
class Session {
 public:
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::string& id() const { return id_; }
  const v1::ModelShape& shape() const { return shape_; }
  int layers() const { return shape_.layers(); }
  // Bytes of q (T·Hq·D) and of k or of v (T·H·D) for `num_tokens` tokens
  // in the session's dtype.
  size_t q_bytes(int num_tokens = 1) const;
  size_t kv_bytes(int num_tokens = 1) const;

  // The position `layer` accepts next, as this handle last saw it; -1 when
  // `layer` is outside [0, layers()).
  int64_t next_position(int layer) const;

  // Steps `num_tokens` tokens of `layer` at next_position(layer): on
  // `stream` when given (which must have no request in flight), else with
  // a unary Client::Step. On success next_position(layer) becomes the
  // reply's; result(0) of the reply holds the output and LSE (ATTEND) or
  // the fetched heads (FETCH). Errors are Client::Step's (or the stream's),
  // plus INVALID_ARGUMENT naming `layer` when it is outside [0, layers()),
  // checked here. A failed step changes nothing; after FAILED_PRECONDITION
  // (another worker moved the session) call Refresh().
  absl::StatusOr<StepReply> Step(int layer, v1::StepMode mode,
                                 absl::Span<const uint8_t> q,
                                 absl::Span<const uint8_t> k,
                                 absl::Span<const uint8_t> v,
                                 int num_tokens = 1,
                                 StepStream* stream = nullptr);

  // For a batch of several sessions (Client::Step, StepStream::Send): an
  // entry at next_position(layer) (or at -1 when `layer` is out of range,
  // which the server rejects). The entry borrows this handle's id and the
  // spans. Record its result with Advance.
  StepEntryView Entry(int layer, absl::Span<const uint8_t> q,
                      absl::Span<const uint8_t> k, absl::Span<const uint8_t> v,
                      int num_tokens = 1) const;
  // Records a step of `layer` answered elsewhere: next_position(layer)
  // becomes result.next_position. Ignores an out-of-range layer.
  void Advance(int layer, const StepResultView& result);

  // Re-reads every layer's next position from the server. NOT_FOUND if the
  // session is gone; on error the positions stay as they were.
  absl::Status Refresh();
  // The session as the server describes it now (Client::GetSession).
  absl::StatusOr<v1::Session> Describe() const;
  // Deletes the session on the server (Client::DeleteSession); the handle
  // must not step after. NOT_FOUND.
  absl::Status Delete();

 private:
  friend class Client;
  // `client` must outlive the handle; `described` comes from the server.
  Session(Client* client, const v1::Session& described);

  Client* const client_;  // not owned
  const std::string id_;
  const v1::ModelShape shape_;
  mutable Mutex mu_;
  std::vector<int64_t> next_positions_ ABSL_GUARDED_BY(mu_);  // [layers]
};

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CPP_SESSION_H_
