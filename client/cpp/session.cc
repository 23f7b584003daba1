#include "client/cpp/session.h"

#include "absl/strings/str_cat.h"
#include "client/cpp/kvmem_client.h"
#include "client/cpp/step_stream.h"

namespace kvmem {
namespace {

size_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_BF16:
    case v1::DTYPE_FP16:
      return 2;
    case v1::DTYPE_FP32:
      return 4;
    default:
      return 0;
  }
}

}  // namespace

Session::Session(Client* client, const v1::Session& described)
    : client_(client), id_(described.session_id()), shape_(described.shape()) {
  MutexLock lock(&mu_);
  next_positions_.assign(described.layer_next_positions().begin(),
                         described.layer_next_positions().end());
  next_positions_.resize(size_t(shape_.layers()), described.position());
}

size_t Session::q_bytes(int num_tokens) const {
  return size_t(num_tokens) * size_t(shape_.query_heads()) *
         size_t(shape_.head_dim()) * DTypeBytes(shape_.dtype());
}

size_t Session::kv_bytes(int num_tokens) const {
  return size_t(num_tokens) * size_t(shape_.kv_heads()) *
         size_t(shape_.head_dim()) * DTypeBytes(shape_.dtype());
}

int64_t Session::next_position(int layer) const {
  MutexLock lock(&mu_);
  if (layer < 0 || size_t(layer) >= next_positions_.size()) return -1;
  return next_positions_[size_t(layer)];
}

absl::StatusOr<StepReply> Session::Step(int layer, v1::StepMode mode,
                                        absl::Span<const uint8_t> q,
                                        absl::Span<const uint8_t> k,
                                        absl::Span<const uint8_t> v,
                                        int num_tokens, StepStream* stream) {
  if (layer < 0 || layer >= layers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layer: ", layer, ", want 0..", layers() - 1, " (session ", id_, ")"));
  }
  const StepEntryView entry = Entry(layer, q, k, v, num_tokens);
  absl::StatusOr<StepReply> reply =
      stream != nullptr ? stream->Step(layer, mode, {&entry, 1})
                        : client_->Step(layer, mode, {&entry, 1});
  if (!reply.ok()) return reply.status();
  if (reply->results().size() != 1) {
    return absl::InternalError(absl::StrCat("the server answered ",
                                            reply->results().size(),
                                            " results to 1 entry"));
  }
  Advance(layer, reply->result(0));
  return reply;
}

StepEntryView Session::Entry(int layer, absl::Span<const uint8_t> q,
                             absl::Span<const uint8_t> k,
                             absl::Span<const uint8_t> v,
                             int num_tokens) const {
  StepEntryView entry;
  entry.session_id = id_;
  entry.position = next_position(layer);
  entry.num_tokens = num_tokens;
  entry.q = q;
  entry.k = k;
  entry.v = v;
  return entry;
}

void Session::Advance(int layer, const StepResultView& result) {
  MutexLock lock(&mu_);
  if (layer < 0 || size_t(layer) >= next_positions_.size()) return;
  next_positions_[size_t(layer)] = result.next_position;
}

absl::Status Session::Refresh() {
  absl::StatusOr<v1::Session> described = client_->GetSession(id_);
  if (!described.ok()) return described.status();
  MutexLock lock(&mu_);
  for (size_t layer = 0; layer < next_positions_.size(); ++layer) {
    next_positions_[layer] = int(layer) < described->layer_next_positions_size()
                                 ? described->layer_next_positions(int(layer))
                                 : described->position();
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Session> Session::Describe() const {
  return client_->GetSession(id_);
}

absl::Status Session::Delete() { return client_->DeleteSession(id_); }

}  // namespace kvmem
