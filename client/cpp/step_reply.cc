#include "client/cpp/step_reply.h"

#include <cstring>
#include <utility>

#include "client/cpp/connection.h"
#include "google/protobuf/arena.h"

namespace kvmem {
namespace {

absl::Span<const uint8_t> Bytes(const std::string& bytes) {
  return absl::Span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

absl::Span<const int64_t> Int64s(
    const google::protobuf::RepeatedField<int64_t>& values) {
  return absl::Span<const int64_t>(values.data(), size_t(values.size()));
}

}  // namespace

float StepResultView::Lse(int token, int query_heads, int head) const {
  float value;
  const size_t offset =
      (size_t(token) * size_t(query_heads) + size_t(head)) * sizeof(float);
  std::memcpy(&value, lse.data() + offset, sizeof(float));
  return value;
}

StepReply::StepReply(std::unique_ptr<google::protobuf::Arena> arena,
                     const v1::StepResponse* response)
    : arena_(std::move(arena)), response_(response) {
  size_t heads = 0;
  for (const v1::StepResult& result : response_->results()) {
    heads += size_t(result.heads_size());
  }
  // Reserved whole, so that the spans taken below stay valid.
  heads_.reserve(heads);
  results_.reserve(size_t(response_->results_size()));
  for (const v1::StepResult& result : response_->results()) {
    const size_t first_head = heads_.size();
    for (const v1::FetchedHead& head : result.heads()) {
      heads_.push_back(FetchedHeadView{Int64s(head.positions()),
                                       Bytes(head.k()), Bytes(head.v()),
                                       Int64s(head.query_rotary_positions())});
    }
    StepResultView view;
    view.session_id = result.session_id();
    view.next_position = result.next_position();
    view.durable_position = result.durable_position();
    view.output = Bytes(result.output());
    view.lse = Bytes(result.lse());
    view.heads = absl::Span<const FetchedHeadView>(heads_.data() + first_head,
                                                   heads_.size() - first_head);
    results_.push_back(view);
  }
}

StepReply::StepReply(StepReply&&) noexcept = default;
StepReply& StepReply::operator=(StepReply&&) noexcept = default;
StepReply::~StepReply() = default;

uint64_t StepReply::request_id() const { return response_->request_id(); }

StepReply StepReplyMaker::Make(std::unique_ptr<google::protobuf::Arena> arena,
                               const v1::StepResponse* response) {
  return StepReply(std::move(arena), response);
}

}  // namespace kvmem
