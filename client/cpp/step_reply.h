// The step's data as the C++ client sees it: entries going out as borrowed
// spans, replies coming back as views into the received message.
//
// Tensors are bytes, row-major and little-endian in the session's dtype
// (kvmem.proto): q [T, Hq, D], k and v [T, H, D]; ATTEND returns the output
// [T, Hq, D] in the session's dtype and the LSE [T, Hq] as fp32.
#ifndef KVMEM_CLIENT_CPP_STEP_REPLY_H_
#define KVMEM_CLIENT_CPP_STEP_REPLY_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvmem/v1/kvmem.pb.h"

namespace google::protobuf {
class Arena;
}  // namespace google::protobuf

namespace kvmem {

// One session's tokens for one layer. Borrows everything: the id and the
// spans must stay valid until the call that takes the entry returns, which
// copies them once, into the request message.
struct StepEntryView {
  absl::string_view session_id;
  // The layer's next position (Session::next_position tracks it).
  int64_t position = 0;
  int num_tokens = 1;           // T: 1 decodes, > 1 is a prefill chunk
  absl::Span<const uint8_t> q;  // [T, Hq, D]; may be empty in APPEND mode
  absl::Span<const uint8_t> k;  // [T, H, D]
  absl::Span<const uint8_t> v;  // [T, H, D]
};

// FETCH mode, one KV head: the selected tokens in ascending position.
struct FetchedHeadView {
  absl::Span<const int64_t> positions;  // [N]
  absl::Span<const uint8_t> k;          // [N, D] session dtype
  absl::Span<const uint8_t> v;          // [N, D]
  // CACHE_RANK sessions: where the worker rotates each query token. [T]
  absl::Span<const int64_t> query_rotary_positions;
};

// One entry's result. Views into the StepReply that holds it.
struct StepResultView {
  absl::string_view session_id;
  int64_t next_position = 0;         // the layer's next position after the step
  int64_t durable_position = 0;      // tokens durable in every layer
  absl::Span<const uint8_t> output;  // ATTEND: [T, Hq, D] session dtype
  absl::Span<const uint8_t> lse;     // ATTEND: [T, Hq] fp32, natural log
  absl::Span<const FetchedHeadView> heads;  // FETCH: one per KV head

  // ATTEND: the LSE of query token `token` (< T), head `head` (<
  // `query_heads`, the session's Hq); lse's bytes need not be aligned for
  // a float view, so it is decoded here.
  float Lse(int token, int query_heads, int head) const;
};

// A received StepResponse and views of its results. Owns the message (on a
// protobuf Arena, freed at once with every fetched head in it); moving a
// StepReply keeps every view valid, and they end with the StepReply.
// Const access from many threads is safe.
class StepReply {
 public:
  StepReply(StepReply&&) noexcept;
  StepReply& operator=(StepReply&&) noexcept;
  ~StepReply();

  // Echo of the request's id (StepStream numbers its requests 1, 2, ...).
  uint64_t request_id() const;
  // One per entry of the request, in the request's order; i < size().
  absl::Span<const StepResultView> results() const { return results_; }
  const StepResultView& result(size_t i) const { return results_[i]; }
  // The message itself, for fields the views do not carry.
  const v1::StepResponse& proto() const { return *response_; }

 private:
  friend class StepReplyMaker;
  // `response` lives on `arena`.
  StepReply(std::unique_ptr<google::protobuf::Arena> arena,
            const v1::StepResponse* response);

  std::unique_ptr<google::protobuf::Arena> arena_;
  const v1::StepResponse* response_ = nullptr;  // on arena_
  std::vector<FetchedHeadView> heads_;          // results_[i].heads point here
  std::vector<StepResultView> results_;
};

}  // namespace kvmem

#endif  // KVMEM_CLIENT_CPP_STEP_REPLY_H_
