// The step log's record of one applied entry: what a crash recovery
// replays (DESIGN.md § Persistence). Thread-safe (pure functions).
#ifndef KVMEM_SERVICE_ENGINE_STEP_LOG_H_
#define KVMEM_SERVICE_ENGINE_STEP_LOG_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "service/engine/step_types.h"

namespace kvmem {

struct LoggedStep {
  StepMode mode = StepMode::kAppend;  // as applied; replay rebuilds its reply
  int num_tokens = 0;
  std::string q;  // [T, Hq, D] session dtype; empty: APPEND without q
  std::string k;  // [T, H, D]
  std::string v;  // [T, H, D]
};

// Format version 1: [u8 version][u8 mode][i32 T][u64 |q|][q][u64 |k|][k]
// [u64 |v|][v].
std::string EncodeLoggedStep(StepMode mode, int num_tokens, absl::string_view q,
                             absl::string_view k, absl::string_view v);

// DATA_LOSS when `body` is malformed.
absl::StatusOr<LoggedStep> DecodeLoggedStep(absl::string_view body);

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_STEP_LOG_H_
