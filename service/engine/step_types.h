// The step as the engine sees it: borrowed views of a request's tensors in,
// owned results out. No gRPC types (the adapter translates).
#ifndef KVMEM_SERVICE_ENGINE_STEP_TYPES_H_
#define KVMEM_SERVICE_ENGINE_STEP_TYPES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kvmem {

// Values equal kvmem.v1.StepMode.
enum class StepMode : int { kFetch = 1, kAttend = 2, kAppend = 3 };

// One session's tokens for one layer. The views borrow the request's bytes,
// which must outlive the Step call.
struct StepEntryView {
  std::string session_id;
  int64_t position = 0;  // of the first token; must be the layer's next
  int num_tokens = 1;    // T
  absl::string_view q;   // [T, Hq, D] session dtype; may be empty in APPEND
  absl::string_view k;   // [T, H, D]
  absl::string_view v;   // [T, H, D]
};

struct StepRequestView {
  int layer = 0;
  StepMode mode = StepMode::kAttend;
  std::vector<StepEntryView> entries;
};

// FETCH: one KV head's selection, in ascending original position.
struct FetchedHead {
  std::vector<int64_t> positions;  // [N]
  std::string k;                   // [N, D] session dtype
  std::string v;                   // [N, D]
  // CACHE_RANK only: where the worker rotates each query token. [T]
  std::vector<int64_t> query_rotary_positions;
};

struct StepEntryResult {
  int64_t next_position = 0;       // the layer's, after this step
  int64_t durable_position = 0;    // tokens durable in every layer
  std::vector<FetchedHead> heads;  // FETCH: [H]
  std::string output;              // ATTEND: [T, Hq, D] session dtype
  std::string lse;                 // ATTEND: [T, Hq] fp32 LE
};

// Limits of one request, named once.
inline constexpr int kMaxEntriesPerStep = 4096;
inline constexpr int kMaxTokensPerEntry = 65536;

}  // namespace kvmem

#endif  // KVMEM_SERVICE_ENGINE_STEP_TYPES_H_
