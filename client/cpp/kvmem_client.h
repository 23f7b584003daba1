// kvmem::Client: the C++ client of kvmem.v1.KvMemory
// (proto/kvmem/v1/kvmem.proto). Descriptions, shapes, policies and stats are
// the contract's own messages (kvmem/v1/kvmem.pb.h); tensors travel as
// spans of bytes in the session's dtype (step_reply.h).
//
//   kvmem::ClientOptions options;
//   options.address = "127.0.0.1:50051";
//   absl::StatusOr<std::unique_ptr<kvmem::Client>> client =
//       kvmem::Client::Connect(options);
//   kvmem::SessionSpec spec;  // shape: layers, heads, head_dim, dtype
//   ... session = (*client)->CreateSession(spec);
//   ... reply = (*session)->Step(layer, kvmem::v1::STEP_MODE_ATTEND, q, k, v);
//
// Errors. Every call returns the server's gRPC status as an absl::Status
// with the same code (the two numberings are equal) and the same message;
// the client throws nothing. Beyond the codes listed per method, any call
// may return UNAVAILABLE (no server at the address, or it is shutting
// down), DEADLINE_EXCEEDED (ClientOptions::deadline passed; a step is then
// applied wholly or not at all) and RESOURCE_EXHAUSTED (a message over
// max_message_bytes, here or at the server). A failed call changes nothing
// on the server.
#ifndef KVMEM_CLIENT_CPP_KVMEM_CLIENT_H_
#define KVMEM_CLIENT_CPP_KVMEM_CLIENT_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/cpp/session.h"
#include "client/cpp/step_reply.h"
#include "client/cpp/step_stream.h"
#include "kvmem/v1/kvmem.pb.h"

namespace kvmem {

namespace client_internal {
struct Connection;
}  // namespace client_internal

struct ClientOptions {
  // gRPC target of the server: "host:port" or any gRPC name
  // ("dns:///kvmem.internal:50051"). Non-empty. Default 127.0.0.1:50051.
  std::string address = "127.0.0.1:50051";
  // Sent as the `kvmem-tenant` metadata of every call; empty sends none,
  // which the server reads as "default". 0..64 characters of
  // [A-Za-z0-9._-].
  std::string tenant;
  // Deadline of each unary call, from its start. > 0; InfiniteDuration()
  // means none. StepStreams take theirs at OpenStepStream. Default 30 s.
  absl::Duration deadline = absl::Seconds(30);
  // Largest message sent or received, bytes; a larger one fails with
  // RESOURCE_EXHAUSTED and is not sent. 1024..2^31-1. Default 256 MiB
  // (the server's default).
  int max_message_bytes = 256 << 20;

  // OK, or INVALID_ARGUMENT naming the bad field.
  absl::Status Validate() const;
};

// What CreateSession makes. Each field's range is in kvmem.proto.
struct SessionSpec {
  std::string session_id;  // empty: the server picks a unique id
  v1::ModelShape shape;    // L, H, Hq, D and dtype required; scale, rotary
  v1::CachePolicy policy;  // unset fields take the contract's defaults
  v1::Durability durability = v1::DURABILITY_ASYNC;
  std::map<std::string, std::string> labels;
};

// One channel to one server. Thread-safe: share one Client among a worker's
// threads. Every Session and StepStream it makes borrows it, so the Client
// must outlive them.
class Client {
 public:
  // Makes the channel; does not wait for it to connect (an unreachable
  // server fails the first call with UNAVAILABLE). INVALID_ARGUMENT names
  // the bad option.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const ClientOptions& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const ClientOptions& options() const;

  // Creates a session; the handle starts at its positions (all 0).
  // INVALID_ARGUMENT naming the field and the rule (e.g. `shape.head_dim
  // must be one of 64, 128, 256, got 96`); ALREADY_EXISTS if this tenant
  // has a session of that id. On error nothing is created.
  absl::StatusOr<std::unique_ptr<Session>> CreateSession(
      const SessionSpec& spec);
  // A handle to an existing session at the positions the server reports
  // (to resume a session another worker drove). NOT_FOUND.
  absl::StatusOr<std::unique_ptr<Session>> OpenSession(
      const std::string& session_id);

  // The session as the server describes it now: shape, policy with every
  // default filled in, positions, resident and spilled counts.
  // NOT_FOUND: no such session for this tenant. INVALID_ARGUMENT: a
  // malformed id.
  absl::StatusOr<v1::Session> GetSession(const std::string& session_id);
  // Every session of this tenant having all of `label_filter`'s labels, in
  // id order, fetched `page_size` per call (0: the server's 100; else
  // 1..1000, INVALID_ARGUMENT naming `page_size` otherwise).
  absl::StatusOr<std::vector<v1::Session>> ListSessions(
      const std::map<std::string, std::string>& label_filter = {},
      int page_size = 0);
  // Removes the session and all its stored data. NOT_FOUND.
  absl::Status DeleteSession(const std::string& session_id);
  // Server-wide figures.
  absl::StatusOr<v1::GetStatsResponse> GetStats();

  // One layer of a batch of sessions (at most one entry per session) in a
  // unary call. The reply's results follow `entries`' order. The request
  // is validated whole and applied whole: INVALID_ARGUMENT naming
  // `entries[i].field` (mode, layer, byte lengths, num_tokens, a session
  // twice); NOT_FOUND naming the session; FAILED_PRECONDITION naming the
  // expected position (a gap or a repeat); on error nothing is applied.
  // The tensors are copied once, into the request.
  absl::StatusOr<StepReply> Step(int layer, v1::StepMode mode,
                                 absl::Span<const StepEntryView> entries);

  // Opens a StepStream for a decode loop (step_stream.h). `deadline` bounds
  // the whole stream; InfiniteDuration() (the default) sets none. Failures
  // to reach the server show at the stream's first Send or Receive.
  std::unique_ptr<StepStream> OpenStepStream(
      absl::Duration deadline = absl::InfiniteDuration());

 private:
  explicit Client(std::unique_ptr<client_internal::Connection> connection);

  const std::unique_ptr<client_internal::Connection> connection_;
};

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CPP_KVMEM_CLIENT_H_
