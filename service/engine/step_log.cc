#include "service/engine/step_log.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "service/engine/field_codec.h"
#include "service/engine/live_session.h"

namespace kvmem {
namespace {

constexpr uint8_t kLoggedStepFormat = 1;

}  // namespace

std::string EncodeLoggedStep(StepMode mode, int num_tokens, absl::string_view q,
                             absl::string_view k, absl::string_view v) {
  FieldWriter w;
  // A decode step's q, k and v are most of the record (~12 KB a layer of
  // a 32-head model): written once, without the string's regrowth.
  w.Reserve(2 + sizeof(int32_t) + 3 * sizeof(uint64_t) + q.size() + k.size() +
            v.size());
  w.Put<uint8_t>(kLoggedStepFormat);
  w.Put<uint8_t>(uint8_t(mode));
  w.Put<int32_t>(num_tokens);
  w.PutBytes(q);
  w.PutBytes(k);
  w.PutBytes(v);
  return w.Take();
}

absl::StatusOr<LoggedStep> DecodeLoggedStep(absl::string_view body) {
  LoggedStep step;
  FieldReader r(body);
  uint8_t format = 0, mode = 0;
  int32_t t = 0;
  const bool ok = r.Get(&format) && format == kLoggedStepFormat &&
                  r.Get(&mode) && mode >= uint8_t(StepMode::kFetch) &&
                  mode <= uint8_t(StepMode::kAppend) && r.Get(&t) && t >= 1 &&
                  r.GetBytes(&step.q) && r.GetBytes(&step.k) &&
                  r.GetBytes(&step.v) && r.Done();
  if (!ok) {
    return absl::DataLossError(
        absl::StrCat("logged step of ", body.size(), " bytes is malformed"));
  }
  step.num_tokens = t;
  step.mode = StepMode(mode);
  return step;
}

namespace {

constexpr uint8_t kLastStepFormat = 1;

}  // namespace

std::string EncodeLastStep(const Engine::LastStep& last) {
  FieldWriter w;
  w.Put<uint8_t>(kLastStepFormat);
  w.Put<uint8_t>(uint8_t(last.mode));
  w.Put<uint8_t>(last.kept);
  w.Put<uint64_t>(uint64_t(last.position));
  w.Put<uint64_t>(uint64_t(last.num_tokens));
  w.Put<uint64_t>(last.fingerprint);
  const StepEntryResult& reply = last.reply;
  w.Put<uint64_t>(uint64_t(reply.next_position));
  w.PutBytes(reply.output);
  w.PutBytes(reply.lse);
  w.Put<uint64_t>(reply.heads.size());
  for (const FetchedHead& h : reply.heads) {
    w.PutVector(h.positions);
    w.PutBytes(h.k);
    w.PutBytes(h.v);
    w.PutVector(h.query_rotary_positions);
  }
  return w.Take();
}

absl::StatusOr<Engine::LastStep> DecodeLastStep(absl::string_view body) {
  Engine::LastStep last;
  FieldReader r(body);
  uint8_t format = 0, mode = 0, kept = 0;
  uint64_t position = 0, tokens = 0, next = 0, heads = 0;
  bool ok = r.Get(&format) && format == kLastStepFormat && r.Get(&mode) &&
            mode >= uint8_t(StepMode::kFetch) &&
            mode <= uint8_t(StepMode::kAppend) && r.Get(&kept) &&
            r.Get(&position) && r.Get(&tokens) && r.Get(&last.fingerprint) &&
            r.Get(&next) && r.GetBytes(&last.reply.output) &&
            r.GetBytes(&last.reply.lse) && r.Get(&heads) && heads <= 4096;
  for (uint64_t h = 0; ok && h < heads; ++h) {
    FetchedHead head;
    ok = r.GetVector(&head.positions) && r.GetBytes(&head.k) &&
         r.GetBytes(&head.v) && r.GetVector(&head.query_rotary_positions);
    last.reply.heads.push_back(std::move(head));
  }
  if (!ok || !r.Done()) {
    return absl::DataLossError(
        absl::StrCat("kept step of ", body.size(), " bytes is malformed"));
  }
  last.mode = StepMode(mode);
  last.kept = kept != 0;
  last.position = int64_t(position);
  last.num_tokens = int(tokens);
  last.reply.next_position = int64_t(next);
  return last;
}

}  // namespace kvmem
