#include "service/engine/step_log.h"

#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"

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

}  // namespace kvmem
