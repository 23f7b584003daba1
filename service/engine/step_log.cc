#include "service/engine/step_log.h"

#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "service/engine/live_session.h"

namespace kvmem {
namespace {

constexpr uint8_t kLoggedStepFormat = 1;

void PutBytes(std::string* out, absl::string_view bytes) {
  const uint64_t n = bytes.size();
  out->append(reinterpret_cast<const char*>(&n), 8);
  out->append(bytes.data(), bytes.size());
}

bool GetBytes(absl::string_view in, size_t* at, std::string* bytes) {
  uint64_t n;
  if (in.size() - *at < 8) return false;
  memcpy(&n, in.data() + *at, 8);
  *at += 8;
  if (in.size() - *at < n) return false;
  bytes->assign(in.data() + *at, size_t(n));
  *at += size_t(n);
  return true;
}

}  // namespace

std::string EncodeLoggedStep(StepMode mode, int num_tokens, absl::string_view q,
                             absl::string_view k, absl::string_view v) {
  std::string out;
  out.reserve(2 + 4 + 24 + q.size() + k.size() + v.size());
  out.push_back(char(kLoggedStepFormat));
  out.push_back(char(mode));
  const int32_t t = num_tokens;
  out.append(reinterpret_cast<const char*>(&t), 4);
  PutBytes(&out, q);
  PutBytes(&out, k);
  PutBytes(&out, v);
  return out;
}

absl::StatusOr<LoggedStep> DecodeLoggedStep(absl::string_view body) {
  LoggedStep step;
  int32_t t = 0;
  size_t at = 6;
  bool ok = body.size() >= 6 && uint8_t(body[0]) == kLoggedStepFormat;
  const int mode = ok ? int(uint8_t(body[1])) : 0;
  ok = ok && mode >= int(StepMode::kFetch) && mode <= int(StepMode::kAppend);
  if (ok) memcpy(&t, body.data() + 2, 4);
  ok = ok && t >= 1 && GetBytes(body, &at, &step.q) &&
       GetBytes(body, &at, &step.k) && GetBytes(body, &at, &step.v) &&
       at == body.size();
  if (!ok) {
    return absl::DataLossError(
        absl::StrCat("logged step of ", body.size(), " bytes is malformed"));
  }
  step.num_tokens = t;
  step.mode = StepMode(mode);
  return step;
}

namespace {

void PutU64(std::string* out, uint64_t v) {
  out->append(reinterpret_cast<const char*>(&v), 8);
}

bool GetU64(absl::string_view in, size_t* at, uint64_t* v) {
  if (in.size() - *at < 8) return false;
  memcpy(v, in.data() + *at, 8);
  *at += 8;
  return true;
}

void PutInts(std::string* out, const std::vector<int64_t>& v) {
  PutU64(out, v.size());
  for (int64_t x : v) PutU64(out, uint64_t(x));
}

bool GetInts(absl::string_view in, size_t* at, std::vector<int64_t>* v) {
  uint64_t n;
  if (!GetU64(in, at, &n) || n > (in.size() - *at) / 8) return false;
  v->resize(n);
  for (int64_t& x : *v) {
    uint64_t u = 0;
    GetU64(in, at, &u);  // the size check above covers every element
    x = int64_t(u);
  }
  return true;
}

constexpr uint8_t kLastStepFormat = 1;

}  // namespace

std::string EncodeLastStep(const Engine::LastStep& last) {
  std::string out;
  out.push_back(char(kLastStepFormat));
  out.push_back(char(last.mode));
  out.push_back(char(last.kept));
  PutU64(&out, uint64_t(last.position));
  PutU64(&out, uint64_t(last.num_tokens));
  PutU64(&out, last.fingerprint);
  const StepEntryResult& r = last.reply;
  PutU64(&out, uint64_t(r.next_position));
  PutBytes(&out, r.output);
  PutBytes(&out, r.lse);
  PutU64(&out, r.heads.size());
  for (const FetchedHead& h : r.heads) {
    PutInts(&out, h.positions);
    PutBytes(&out, h.k);
    PutBytes(&out, h.v);
    PutInts(&out, h.query_rotary_positions);
  }
  return out;
}

absl::StatusOr<Engine::LastStep> DecodeLastStep(absl::string_view body) {
  Engine::LastStep last;
  size_t at = 3;
  uint64_t position = 0, tokens = 0, next = 0, heads = 0;
  bool ok = body.size() >= 3 && uint8_t(body[0]) == kLastStepFormat;
  const int mode = ok ? int(uint8_t(body[1])) : 0;
  ok = ok && mode >= int(StepMode::kFetch) && mode <= int(StepMode::kAppend) &&
       GetU64(body, &at, &position) && GetU64(body, &at, &tokens) &&
       GetU64(body, &at, &last.fingerprint) && GetU64(body, &at, &next) &&
       GetBytes(body, &at, &last.reply.output) &&
       GetBytes(body, &at, &last.reply.lse) && GetU64(body, &at, &heads) &&
       heads <= 4096;
  for (uint64_t h = 0; ok && h < heads; ++h) {
    FetchedHead head;
    ok = GetInts(body, &at, &head.positions) && GetBytes(body, &at, &head.k) &&
         GetBytes(body, &at, &head.v) &&
         GetInts(body, &at, &head.query_rotary_positions);
    last.reply.heads.push_back(std::move(head));
  }
  if (!ok || at != body.size()) {
    return absl::DataLossError(
        absl::StrCat("kept step of ", body.size(), " bytes is malformed"));
  }
  last.mode = StepMode(mode);
  last.kept = body[2] != 0;
  last.position = int64_t(position);
  last.num_tokens = int(tokens);
  last.reply.next_position = int64_t(next);
  return last;
}

}  // namespace kvmem
